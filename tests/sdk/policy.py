"""The official sprites-py SDK's network policy calls against a real
sprited whose environment has its own network (`--network own`): no rules
at first; an update is in force and read back; an invalid rule is named and
leaves the policy in force alone; an empty policy lifts it. Driven by
tests/sdk.rs (the enforcement itself: tests/network.rs)."""

from sprites import NetworkPolicy, PolicyRule
from sprites.exceptions import SpriteError

from common import check, sprite

policy = sprite.get_network_policy()
check(policy.rules == [], f"get_network_policy: {policy!r}")
sprite.update_network_policy(
    NetworkPolicy(rules=[PolicyRule(domain="github.com", action="allow"), PolicyRule(domain="*", action="deny")])
)
got = sprite.get_network_policy().rules
check(
    [(r.domain, r.action) for r in got] == [("github.com", "allow"), ("*", "deny")],
    f"the update is in force: {got!r}",
)
try:
    sprite.update_network_policy(NetworkPolicy(rules=[PolicyRule(domain="not a domain", action="allow")]))
    check(False, "an invalid rule is refused")
except SpriteError as e:
    check("status 400" in str(e) and "rules[0].domain" in str(e), f"an invalid rule is named: {e}")
check(len(sprite.get_network_policy().rules) == 2, "the policy in force stays")
sprite.update_network_policy(NetworkPolicy(rules=[]))
check(sprite.get_network_policy().rules == [], "an empty policy lifts it")
print("SDK policy: all passed")
