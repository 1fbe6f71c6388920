"""The official sprites-py SDK's policy calls against a real sprited: the
network policy has no rules in force, and an update is refused with the
reason (it cannot be enforced yet) rather than stored. Driven by
tests/sdk.rs."""

from sprites import NetworkPolicy, PolicyRule
from sprites.exceptions import SpriteError

from common import check, sprite

policy = sprite.get_network_policy()
check(policy.rules == [], f"get_network_policy: {policy!r}")
try:
    sprite.update_network_policy(
        NetworkPolicy(rules=[PolicyRule(domain="github.com", action="allow"), PolicyRule(domain="*", action="deny")])
    )
    check(False, "an update that cannot be enforced is refused")
except SpriteError as e:
    check("status 501" in str(e) and "not enforced" in str(e), f"update_network_policy refused: {e}")
try:
    sprite.update_network_policy(NetworkPolicy(rules=[PolicyRule(domain="not a domain", action="allow")]))
    check(False, "an invalid rule is refused")
except SpriteError as e:
    check("status 400" in str(e) and "rules[0].domain" in str(e), f"an invalid rule is named: {e}")
check(sprite.get_network_policy().rules == [], "nothing was stored")
print("SDK policy: all passed")
