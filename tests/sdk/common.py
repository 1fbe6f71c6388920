"""What every SDK script shares: the client for the daemon tests/sdk.rs
started (its URL, token, sprite name and env root come in the environment)
and a `check` that fails the script with a message."""

import os
import sys

from sprites import SpritesClient

client = SpritesClient(os.environ["SPRITED_TOKEN"], base_url=os.environ["SPRITED_URL"])
sprite = client.sprite(os.environ["SPRITED_NAME"])
# The environment's root as the host sees it (an overlay mount): where the
# scripts check what the SDK did. The SDK itself uses the environment's own
# absolute paths (its `/` is the environment's `/`).
host_root = os.environ.get("SPRITED_ENV_ROOT", "")


def on_host(path):
    """The host path of an absolute path inside the environment."""
    return os.path.join(host_root, path.lstrip("/"))


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")
