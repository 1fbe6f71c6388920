"""What every SDK script shares: the client for the daemon tests/sdk.rs
started (its URL, token, sprite name and env root come in the environment)
and a `check` that fails the script with a message."""

import os
import sys

from sprites import SpritesClient

client = SpritesClient(os.environ["SPRITED_TOKEN"], base_url=os.environ["SPRITED_URL"])
sprite = client.sprite(os.environ["SPRITED_NAME"])
root = os.environ.get("SPRITED_ENV_ROOT", "")


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")
