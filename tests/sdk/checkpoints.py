"""The official sprites-py SDK against a real sprited: create, list, get and
restore checkpoints. Driven by tests/sdk.rs (which also passes the env root)."""

import os

from common import check, client, root, sprite


with open(os.path.join(root, "note.txt"), "w") as f:
    f.write("before")
messages = list(sprite.create_checkpoint("from the SDK"))
check(messages[-1].type == "complete" and messages[-1].data == "Checkpoint v1 created", f"create_checkpoint streams to complete: {messages[-1]}")

with open(os.path.join(root, "note.txt"), "w") as f:
    f.write("after")
list(sprite.create_checkpoint("second"))
cps = sprite.list_checkpoints()
check([c.id for c in cps] == ["v2", "v1"], f"list_checkpoints newest first: {[c.id for c in cps]}")
check(cps[0].history == ["v1"], f"history: {cps[0].history}")
check([c.id for c in sprite.list_checkpoints(history_filter="v1")] == ["v2"], "history filter")
v1 = sprite.get_checkpoint("v1")
check(v1.comment == "from the SDK" and v1.create_time is not None, "get_checkpoint")

restored = list(sprite.restore_checkpoint("v1"))
check(restored[-1].type == "complete" and restored[-1].data == "Restored to v1", f"restore_checkpoint: {restored[-1]}")
with open(os.path.join(root, "note.txt")) as f:
    check(f.read() == "before", "the file is back to v1")
print("SDK checkpoints: all passed")
