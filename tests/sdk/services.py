"""The official sprites-py SDK against a real sprited: list, create, start,
stop, signal and delete a service. Driven by tests/sdk.rs, which passes the
daemon's URL, token and sprite name in the environment."""

import os

from sprites.exceptions import APIError
from common import check, client, sprite


check(sprite.list_services() == [], "list_services() on a fresh daemon is empty")

stream = sprite.create_service(
    "sdk-svc", "sh", args=["-c", "echo hello-from-sdk; trap 'echo got-hup' HUP; while :; do sleep 0.05; done"],
    duration=1.0, env={"GREETING": "hi"},
)
events = list(stream)
types = [e.type for e in events]
check("started" in types and types[-1] == "complete", f"create_service streams started..complete: {types}")
check(any(e.type == "stdout" and e.data == "hello-from-sdk\n" for e in events), "create_service stream carries stdout")
check(events[-1].log_files and events[-1].log_files["stdout"].endswith("sdk-svc.log"), "complete names the log file")

services = sprite.list_services()
check([s.name for s in services] == ["sdk-svc"], "list_services() lists it")
svc = sprite.get_service("sdk-svc")
check(svc.state.status == "running" and svc.state.pid, f"get_service(): running with a pid ({svc.state})")
check(svc.env == {"GREETING": "hi"} and svc.args[0] == "-c", "get_service() returns the definition")
check(svc.state.started_at is not None, "started_at parses as a datetime")

sprite.signal_service("sdk-svc", "HUP")
print("ok: signal_service(HUP)")

stopped = list(sprite.stop_service("sdk-svc", timeout=5.0))
# The service's own output (the HUP trap's line) may still arrive meanwhile.
stypes = [e.type for e in stopped if e.type not in ("stdout", "stderr")]
check(stypes[0] == "stopping" and "stopped" in stypes and stypes[-1] == "complete", f"stop_service streams: {stypes}")
check(sprite.get_service("sdk-svc").state.status == "stopped", "stopped after stop_service")

try:
    list(sprite.stop_service("sdk-svc"))
    check(False, "a second stop must fail")
except APIError as e:
    check(e.status_code == 409, f"second stop is 409 ({e.status_code})")

started = list(sprite.start_service("sdk-svc", duration=0.5))
check(any(e.type == "started" for e in started), "start_service streams started")
check(sprite.get_service("sdk-svc").state.status == "running", "running after start_service")

sprite.delete_service("sdk-svc")
check(sprite.list_services() == [], "delete_service() removes it")
try:
    sprite.get_service("sdk-svc")
    check(False, "get of a deleted service must fail")
except APIError as e:
    check(e.status_code == 404, "get of a deleted service is 404")

print("SDK services: all passed")
