"""The official sprites-py SDK in control mode: its commands go over the
multiplexed control WebSocket (GET .../control), several over one pooled
connection, with exit codes, stderr, env and cwd. Driven by tests/sdk.rs,
which also checks that nothing fell back to the plain exec WebSocket."""

import os

from sprites import SpritesClient
from sprites.exceptions import ExitError

from common import check

client = SpritesClient(os.environ["SPRITED_TOKEN"], base_url=os.environ["SPRITED_URL"], control_mode=True)
sprite = client.sprite(os.environ["SPRITED_NAME"])

for i in range(3):
    out = sprite.command("sh", "-c", f"echo run{i}").output()
    check(out == f"run{i}\n".encode(), f"command {i} over the control connection: {out!r}")
try:
    sprite.command("sh", "-c", "echo out; echo err >&2; exit 3").output()
    check(False, "a failing command raises")
except ExitError as e:
    check(e.exit_code() == 3, f"exit code 3: {e.exit_code()}")
    check(e.stdout == b"out\n" and e.stderr == b"err\n", f"stdout/stderr: {e.stdout!r} {e.stderr!r}")
r = sprite.run("sh", "-c", "echo $GREETING $PWD", env={"GREETING": "hi", "PATH": "/usr/bin:/bin"}, cwd="/tmp", capture_output=True)
check(r.returncode == 0 and r.stdout == b"hi /tmp\n", f"env and cwd: {r.stdout!r}")
print("SDK control: all passed")
