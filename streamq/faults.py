"""Named points where tests interrupt the process to prove crash safety.

STREAMQ_KILL_AT=NAME makes the process send itself SIGKILL at the point NAME, e.g.
`block1:search` (block 1 loaded, its capture and search not done), `shard2:written` (the shard's temporary file is written, not yet renamed),
`block0:hidden` (the journal's data is written, its index not yet); NAME:SIGINT or
NAME:SIGTERM sends that signal instead. Unset, a point costs one dict lookup."""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    target = os.environ.get("STREAMQ_KILL_AT")
    if not target:
        return
    where, _, sig = target.partition(":SIG")
    if where == name:
        os.kill(os.getpid(), getattr(signal, "SIG" + sig) if sig else signal.SIGKILL)
