#!/usr/bin/env bash
# A restore drill against any sprited (local, in a VM, anywhere you can reach):
# creates a counter service, writes files, checkpoints, mutates, restores and
# verifies the files byte for byte and the service's process state, then
# prints a short report with timings. Exits non-zero on any mismatch.
#
#   scripts/drill.sh [BASE_URL]          # default http://127.0.0.1:8181
#   SPRITE_TOKEN=secret scripts/drill.sh http://10.0.0.5:8181
#
# It leaves its files under drill/ in the environment, a service named
# drill-counter (deleted at the end) and the checkpoint it took.
# Needs python3 (standard library only).
set -euo pipefail
export DRILL_URL=${1:-${SPRITE_URL:-http://127.0.0.1:8181}}
export DRILL_TOKEN=${SPRITE_TOKEN:-${SPRITE_HTTP_API_TOKEN:-}}
exec python3 - <<'PY'
import hashlib, json, os, sys, time, urllib.error, urllib.parse, urllib.request

URL = os.environ["DRILL_URL"].rstrip("/")
TOKEN = os.environ.get("DRILL_TOKEN", "")
failures, report = [], []


def req(method, path, body=None, raw=None, timeout=600):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    r = urllib.request.Request(URL + path, data=data, method=method)
    if TOKEN:
        r.add_header("Authorization", f"Bearer {TOKEN}")
    if body is not None:
        r.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ok(status, body, what):
    if status // 100 != 2:
        sys.exit(f"drill: {what}: HTTP {status}: {body[:300]!r}")
    return body


def stream_last(method, path, body=None):
    """Runs a streaming call; returns its events (the last must be complete)."""
    status, raw = req(method, path, body)
    events = [json.loads(l) for l in ok(status, raw, path).splitlines() if l.strip()]
    if not events or events[-1].get("type") != "complete":
        sys.exit(f"drill: {path} did not complete: {events[-3:]}")
    return events


def check(cond, what):
    (report if cond else failures).append(("ok  " if cond else "FAIL") + " " + what)


def fs_read(root, rel):
    q = urllib.parse.urlencode({"path": f"{root}/{rel}"})
    return req("GET", f"/v1/fs/read?{q}")


def fs_write(root, rel, data):
    q = urllib.parse.urlencode({"path": f"{root}/{rel}", "mkdirParents": "true"})
    ok(*req("PUT", f"/v1/fs/write?{q}", raw=data), f"write {rel}")


def service(name):
    return json.loads(ok(*req("GET", f"/v1/services/{name}"), "get service"))["state"]


def counter(root):
    status, body = fs_read(root, "drill/counter")
    return int(body) if status == 200 and body.strip() else None


def wait_for(pred, what, secs=60):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    sys.exit(f"drill: gave up waiting for {what}")


status = json.loads(ok(*req("GET", "/v1/status"), "status"))
if status.get("state") != "running":
    ok(*req("GET", "/v1/ready", timeout=120), "ready")
# Paths are the environment's own: its `/` is the root of the filesystem API
# and of every service.
root = ""
criu = bool((status.get("criu") or {}).get("available"))
print(f"drill: {URL} ({status.get('kernel', '?')}; CRIU {'yes' if criu else 'no'}; env {status.get('fs', {}).get('env_root', '?')})")

# 1. Files and a service that keeps state in memory and on disk.
blob = os.urandom(1 << 20)
files = {"drill/a.txt": b"alpha\n", "drill/keep.txt": b"keep me\n", "drill/blob.bin": blob}
for rel, data in files.items():
    fs_write(root, rel, data)
COUNTER = (
    "import os, time\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    open('drill/.counter', 'w').write(str(n))\n"
    "    os.replace('drill/.counter', 'drill/counter')\n"
    "    time.sleep(0.05)\n"
)
stream_last("PUT", "/v1/services/drill-counter?duration=0",
            {"cmd": "python3", "args": ["-u", "-c", COUNTER], "dir": "/"})
before = wait_for(lambda: (lambda s: s if s["status"] == "running" else None)(service("drill-counter")), "the counter")
# Far enough that a fresh start (counting from 1) cannot pass for a restore.
wait_for(lambda: (counter(root) or 0) >= 100, "the counter to reach 100")

# 2. Checkpoint.
t = time.monotonic()
events = stream_last("POST", "/v1/checkpoint", {"comment": "drill"})
took_cp = time.monotonic() - t
cp = events[-1]["data"].split()[1]
# How the frozen scan read the upper dir (information, not a check: without
# fanotify every capture lists the whole tree, correctly but slower).
journal = any("change journal" in (e.get("data") or "") for e in events)
at_checkpoint = counter(root)

# 3. Mutate: change, delete, add.
fs_write(root, "drill/a.txt", b"changed\n")
ok(*req("DELETE", "/v1/fs/delete?" + urllib.parse.urlencode({"path": f"{root}/drill/keep.txt"})), "delete")
fs_write(root, "drill/new.txt", b"new\n")
wait_for(lambda: (counter(root) or 0) > at_checkpoint + 10, "the counter to move on")

# 4. Restore and verify.
t = time.monotonic()
events = stream_last("POST", f"/v1/checkpoints/{cp}/restore")
took_restore = time.monotonic() - t
for rel, data in files.items():
    s, body = fs_read(root, rel)
    check(s == 200 and hashlib.sha256(body).digest() == hashlib.sha256(data).digest(),
          f"{rel} is as checkpointed ({len(data)} bytes)")
check(fs_read(root, "drill/new.txt")[0] == 404, "drill/new.txt (added after) is gone")
after = wait_for(lambda: (lambda s: s if s["status"] == "running" else None)(service("drill-counter")), "the counter after restore")
restored = any("restored with its memory" in (e.get("data") or "") for e in events)
if criu:
    check(restored, "the counter was restored by CRIU")
    check(after["pid"] == before["pid"], f"same pid ({before['pid']} -> {after['pid']})")
    check(after["started_at"] == before["started_at"], "same start time")
else:
    check(after["pid"] is not None, "the counter runs again (started fresh: no CRIU)")
first = wait_for(lambda: counter(root), "the counter after restore")
if criu:
    check(first >= 100, f"the counter resumes from its checkpointed memory (at checkpoint ~{at_checkpoint}, now {first})")
wait_for(lambda: (counter(root) or 0) > first + 5, "the counter to keep counting")
check(True, "the counter keeps counting")
stream_last("POST", "/v1/services/drill-counter/stop?timeout=5s")
ok(*req("DELETE", "/v1/services/drill-counter"), "delete service")

for line in report + failures:
    print("  " + line)
print(f"drill: checkpoint {cp} {took_cp * 1000:.0f} ms, restore {took_restore * 1000:.0f} ms"
      f" (freeze {json.loads(ok(*req('GET', f'/v1/checkpoints/{cp}'), 'get'))['freeze_ms']:.1f} ms;"
      f" {'change journal' if journal else 'whole upper dir listed'})")
if failures:
    print(f"drill: FAILED ({len(failures)} of {len(report) + len(failures)} checks)")
    sys.exit(1)
print(f"drill: passed ({len(report)} checks)")
PY
