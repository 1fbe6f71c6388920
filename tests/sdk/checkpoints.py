"""The official sprites-py SDK against a real sprited: create, list, get and
restore checkpoints, with the files written and read back through the SDK's
filesystem calls at the environment's absolute paths. Driven by tests/sdk.rs."""

from common import check, client, sprite

fs = sprite.filesystem("/")
hello = fs / "app/hello.txt"
hello.write_text("before")
messages = list(sprite.create_checkpoint("from the SDK"))
check(messages[-1].type == "complete" and messages[-1].data == "Checkpoint v1 created", f"create_checkpoint streams to complete: {messages[-1]}")

hello.write_text("after")
list(sprite.create_checkpoint("second"))
cps = sprite.list_checkpoints()
check([c.id for c in cps] == ["v2", "v1"], f"list_checkpoints newest first: {[c.id for c in cps]}")
check(cps[0].history == ["v1"], f"history: {cps[0].history}")
check([c.id for c in sprite.list_checkpoints(history_filter="v1")] == ["v2"], "history filter")
v1 = sprite.get_checkpoint("v1")
check(v1.comment == "from the SDK" and v1.create_time is not None, "get_checkpoint")

hello.write_text("overwritten")
restored = list(sprite.restore_checkpoint("v1"))
check(restored[-1].type == "complete" and restored[-1].data == "Restored to v1", f"restore_checkpoint: {restored[-1]}")
check(hello.read_text() == "before", "the file is back to v1 (read through the SDK)")
r = sprite.run("cat", "/app/hello.txt", capture_output=True)
check(r.stdout == b"before", f"and exec sees it: {r.stdout!r}")
print("SDK checkpoints: all passed")
