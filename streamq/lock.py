"""One writer per output folder: an exclusive OS lock (flock) on OUTPUT/.streamq/lock, held
for the whole life of `run`, `resume` and `convert`. The kernel releases it when the process
dies, however it dies, so a kill -9 never leaves a stale lock; the file records who holds it
(pid, host, command, start time) for the line that refuses a second writer.

On a shared filesystem (several machines writing one folder under torchrun) the lock is only as
good as the filesystem's flock: local disks, NFSv4 and GPFS honour it across machines (Linux's
NFS client turns flock into a byte-range lock the server keeps); Lustre only when mounted with
`-o flock` (with `localflock` it holds per machine only); some FUSE filesystems accept the call
and lock nothing. Each rank locks its own folder (.streamq/rank-R/lock), rank 0 the top level
(.streamq/lock)."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError

LOCK_NAME = "lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a folder's lock, as the holder wrote it."""

    pid: int | None
    host: str
    command: str
    since: float | None

    def describe(self) -> str:
        when = time.strftime("%H:%M", time.localtime(self.since)) if self.since else "an unknown time"
        return f"streamq pid {self.pid or '?'} on {self.host} since {when} ({self.command})"


def _read(fd: int) -> Holder:
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        raw = {}  # written a moment after the lock was taken: who is not known yet
    return Holder(raw.get("pid"), raw.get("host", "an unknown host"), raw.get("command", "command unknown"),
                  raw.get("since"))


def holder(path: Path) -> Holder | None:
    """The process holding the lock file `path` now, or None when no other process does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _read(fd)
            return None if who.pid == os.getpid() else who  # this process's own lock is no other writer
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def busy_message(folder: Path, who: Holder, resume: str) -> str:
    return f"{folder} is being written by {who.describe()}; wait for it, or stop it and run: {resume}"


class FolderLock:
    """The exclusive lock of one folder (its lock file: `path`), taken once and held until
    release() (or the process's end). acquire() refuses at once, naming the holder, when another
    process holds it; `resume` is what the refusal tells the user to run once it is stopped."""

    def __init__(self, path: Path, folder: Path, resume: str):
        self.path, self.folder, self.resume = Path(path), Path(folder), resume
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _read(fd)
            os.close(fd)
            raise OutputError(busy_message(self.folder, who, self.resume)) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": "streamq " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "streamq"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock; `remove` also deletes the lock file (and its folder if that is left empty),
        for a writer that keeps no journal beside it (convert)."""
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
