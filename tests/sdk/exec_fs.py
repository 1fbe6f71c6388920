"""The official sprites-py SDK against a real sprited: commands over the
exec WebSocket, session listing and kill, and the filesystem calls. Driven by
tests/sdk.rs (which also passes the env root)."""

import os
import stat
import threading
import time

from sprites.exceptions import ExitError
from common import check, client, on_host, sprite


# Commands.
out = sprite.command("echo", "hello", "world").output()
check(out == b"hello world\n", f"command().output(): {out!r}")
check(sprite.command("cat").output() == b"", "stdin EOF reaches cat at once")
try:
    sprite.command("sh", "-c", "echo out; echo err >&2; exit 3").output()
    check(False, "a failing command raises")
except ExitError as e:
    check(e.exit_code() == 3, f"exit code 3: {e.exit_code()}")
    check(e.stdout == b"out\n" and e.stderr == b"err\n", f"stdout/stderr kept: {e.stdout!r} {e.stderr!r}")
r = sprite.run("sh", "-c", "pwd", cwd="/usr/share", capture_output=True)
check(r.returncode == 0 and r.stdout.decode().strip() == "/usr/share", f"cwd: {r.stdout!r}")
r = sprite.run("sh", "-c", "echo $GREETING", env={"GREETING": "hi there"}, capture_output=True)
check(r.stdout == b"hi there\n", f"env: {r.stdout!r}")

# Sessions: a long command shows up in the list.
done = threading.Event()


def long_running():
    try:
        sprite.command("sleep", "30").run()
    except Exception:
        pass
    done.set()


def listed(marker):
    """The sessions whose command holds `marker`, once one is listed (up to
    10 s)."""
    found = []
    for _ in range(200):
        found = [s for s in sprite.list_sessions() if marker in s.command]
        if found:
            break
        time.sleep(0.05)
    return found


t = threading.Thread(target=long_running, daemon=True)
t.start()
found = listed("sleep 30")
check(bool(found), f"list_sessions shows the running command: {found}")
check(found[0].is_active, "a session with a client is active")

from sprites.session import kill_session  # noqa: E402

stream = kill_session(sprite, found[0].id)
kinds = [m.type for m in stream]
check(kinds[0] == "signal" and kinds[-1] == "complete", f"kill_session streams signal..complete: {kinds}")
check(done.wait(15), "kill_session ends the command")

# Attach: a second client of a running session gets what it printed so far
# (the scrollback), then the rest, and its exit.
outputs = {}


def first_client():
    outputs["first"] = sprite.command(
        "sh", "-c", "rm -f /tmp/go; mkfifo /tmp/go; echo one; read x < /tmp/go; echo two $x"
    ).output()


a = threading.Thread(target=first_client, daemon=True)
a.start()
found = listed("mkfifo /tmp/go")
check(bool(found), f"the session to attach to is listed: {found}")
fifo = False
for _ in range(200):
    try:
        fifo = stat.S_ISFIFO(os.stat(on_host("/tmp/go")).st_mode)
    except FileNotFoundError:
        pass
    if fifo:
        break
    time.sleep(0.05)
check(fifo, "the session made its fifo (and printed `one`)")


def second_client():
    outputs["attached"] = sprite.attach_session(found[0].id).output()


b = threading.Thread(target=second_client, daemon=True)
b.start()
sprite.command("sh", "-c", "echo go > /tmp/go").output()
a.join(30)
b.join(30)
check(outputs.get("first") == b"one\ntwo go\n", f"the first client: {outputs.get('first')!r}")
check(outputs.get("attached") == b"one\ntwo go\n", f"attach_session: {outputs.get('attached')!r}")

# Filesystem: absolute paths are the environment's, the same `/` as exec's.
fs = sprite.filesystem("/")
(fs / "app/hello.txt").write_text("hello from the sdk")
r = sprite.run("cat", "/app/hello.txt", capture_output=True)
check(r.stdout == b"hello from the sdk", f"exec sees what the fs API wrote: {r.stdout!r}")
names = [p.name for p in (fs / "app").iterdir()]
check(names == ["hello.txt"], f"list /app: {names}")
sprite.run("sh", "-c", "mkdir -p /app/made && echo from-exec > /app/made/f", capture_output=True)
check((fs / "app/made/f").read_text() == "from-exec\n", "the fs API sees what exec wrote")
root = "/work"
fs = sprite.filesystem(root)
(fs / "dir/a.txt").write_text("alpha")
check((fs / "dir/a.txt").read_text() == "alpha", "write_text/read_text")
(fs / "dir/b.bin").write_bytes(bytes(range(256)))
check((fs / "dir/b.bin").read_bytes() == bytes(range(256)), "binary round trip")
names = sorted(p.name for p in (fs / "dir").iterdir())
check(names == ["a.txt", "b.bin"], f"iterdir: {names}")
st = (fs / "dir/a.txt").stat()
check(st.size == 5, f"stat size: {st}")
check((fs / "dir/a.txt").exists() and not (fs / "dir/nope").exists(), "exists")
(fs / "dir/a.txt").chmod(0o600)
check(os.stat(os.path.join(on_host(root), "dir/a.txt")).st_mode & 0o777 == 0o600, "chmod")
(fs / "dir/a.txt").rename(fs / "dir/c.txt")
check(os.path.exists(os.path.join(on_host(root), "dir/c.txt")) and not os.path.exists(os.path.join(on_host(root), "dir/a.txt")), "rename")
(fs / "dir/c.txt").copy_to(fs / "dir/d.txt")
check(open(os.path.join(on_host(root), "dir/d.txt")).read() == "alpha", "copy_to")
(fs / "dir/d.txt").unlink()
check(not os.path.exists(os.path.join(on_host(root), "dir/d.txt")), "unlink")
(fs / "made").mkdir()
check(os.path.isdir(os.path.join(on_host(root), "made")), "mkdir")
(fs / "dir").rmtree()
check(not os.path.exists(os.path.join(on_host(root), "dir")), "rmtree")
print("SDK exec and fs: all passed")
