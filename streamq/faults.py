"""Named points where tests interrupt the process to prove crash safety.

STREAMQ_KILL_AT=NAME makes the process send itself SIGKILL at the point NAME, e.g.
`block1:search` (block 1 loaded, its capture and search not done), `shard2:written` (the shard's
temporary file is written, not yet renamed), `block0:hidden` (the journal's data is written, its
index not yet); NAME:SIGINT, NAME:SIGTERM or NAME:SIGSTOP sends that signal instead, and NAME:OOM
raises torch.OutOfMemoryError there, as a device that runs out of memory does; NAME#K acts at
the K-th time the point is passed (spool:appended is passed once per tensor).
STREAMQ_FAULT_LOG=FILE appends the name of every point passed to FILE (the randomized crash test
draws its moments from that list). Unset, a point costs two dict lookups."""

from __future__ import annotations

import os
import signal

_passed: dict[str, int] = {}


def _parse(target: str) -> tuple[str, int | None, str]:
    """NAME[#K][:ACTION] -> (NAME, K, ACTION); ACTION is OOM or a signal's name, SIGKILL unsaid."""
    action = "SIGKILL"
    head, _, last = target.rpartition(":")
    if head and (last == "OOM" or last.startswith("SIG")):
        target, action = head, last
    name, _, nth = target.partition("#")
    return name, int(nth) if nth else None, action


def point(name: str) -> None:
    log = os.environ.get("STREAMQ_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")
    target = os.environ.get("STREAMQ_KILL_AT")
    if not target:
        return
    where, nth, action = _parse(target)
    if where != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if nth is not None and nth != _passed[name]:
        return
    if action == "OOM":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {name})")
    os.kill(os.getpid(), getattr(signal, action))
