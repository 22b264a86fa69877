"""Crash-safe progress journal of a streamed run, kept in OUTPUT/.streamq/.

After each finished block: the writer's spool (the packed tensors not yet in a shard) is
fsynced, the next block's inputs (the calibration hidden states) go to a new file (temp,
fsync, rename), then journal.json, which records the spool's length and tensors, the hidden
file and the sha256 of every finished shard, is replaced atomically; only then are files no
longer needed removed (the previous hidden states, spools of shards now recorded). Whatever instant the process dies, journal.json describes
a complete, consistent state: finished blocks, shards on disk, and the exact inputs to resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import faults
from .errors import ResumeError
from .lock import LOCK_NAME, FolderLock, Holder, holder
from .writer import ShardWriter, disk_full_guard, fsync_dir, replace_atomic, sha256_file, write_json_atomic

JOURNAL_DIR = ".streamq"
JOURNAL_NAME = "journal.json"
FORMAT = 1


def journal_dir(out_dir: Path, rank: int | None = None) -> Path:
    """A one-process run keeps its journal in OUTPUT/.streamq; each process of a block-parallel
    run (streamq.parallel) its own in OUTPUT/.streamq/rank-R."""
    base = Path(out_dir) / JOURNAL_DIR
    return base if rank is None else base / f"rank-{rank}"


def journal_path(out_dir: Path, rank: int | None = None) -> Path:
    return journal_dir(out_dir, rank) / JOURNAL_NAME


def lock(out_dir: Path, rank: int | None = None) -> FolderLock:
    """The lock of the output folder (rank None: the top level) or of a rank's own folder."""
    return FolderLock(journal_dir(out_dir, rank) / LOCK_NAME, out_dir, resume_command(out_dir))


def writer_of(out_dir: Path, rank: int | None = None) -> Holder | None:
    """The process writing out_dir now (holding its lock), or None."""
    return holder(journal_dir(out_dir, rank) / LOCK_NAME)


def shard_stem(rank: int | None) -> str:
    """The output shards' names: model-00001.safetensors, or per process model-rank1-00001...."""
    return "model" if rank is None else f"model-rank{rank}"


def parallel_world(out_dir: Path) -> int | None:
    """The number of processes a block-parallel run in out_dir was started with; None for a
    one-process run (or no run)."""
    path = journal_path(out_dir, 0)
    if not path.is_file():
        return None
    return int(read(out_dir, 0)["settings"]["world_size"])


def resume_command(out_dir: Path) -> str:
    """How to continue an interrupted run in out_dir."""
    world = parallel_world(out_dir)
    if world is None:
        return f"streamq resume {out_dir}"
    return f"torchrun --nproc-per-node {world} -m streamq resume {out_dir}"


@dataclass
class Status:
    """What a run directory is: complete, resumable after `done` of `total` blocks."""

    complete: bool
    done: int
    total: int


def status(out_dir: Path) -> Status | None:
    """None when out_dir holds no streamq journal. A block-parallel run is complete when its
    rank 0 has written the index; its blocks done are summed over the processes' journals."""
    world = parallel_world(out_dir)
    if world is not None:
        states = [read(out_dir, r) for r in range(world) if journal_path(out_dir, r).is_file()]
        done = sum(st["done_blocks"] - st["settings"]["ranges"][st["settings"]["rank"]][0] for st in states)
        return Status(states[0]["complete"], done, states[0]["n_layers"])
    if not journal_path(out_dir).is_file():
        return None
    state = read(out_dir)
    return Status(state["complete"], state["done_blocks"], state["n_layers"])


def read(out_dir: Path, rank: int | None = None) -> dict:
    path = journal_path(out_dir, rank)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ResumeError(f"{path} is unreadable; the run cannot be resumed (start over with --overwrite)") from None
    if state.get("format") != FORMAT:
        raise ResumeError(f"{path} was written by an incompatible streamq version")
    return state


class Journal:
    """The journal of a one-process run (rank None) or of one process of a block-parallel run,
    which owns the blocks from the `done_blocks` it starts with and the shards of its stem."""

    def __init__(self, out_dir: Path, state: dict, rank: int | None = None):
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.dir = journal_dir(out_dir, rank)
        self.state = state

    @classmethod
    def start(cls, out_dir: Path, settings: dict, n_layers: int, rank: int | None = None,
              first: int = 0) -> "Journal":
        journal = cls(out_dir, {"format": FORMAT, "settings": settings, "n_layers": n_layers, "done_blocks": first,
                                "complete": False, "writer": None, "hidden": None, "blocks": []}, rank)
        journal.dir.mkdir(parents=True, exist_ok=True)
        journal._write_index()
        return journal

    @classmethod
    def open(cls, out_dir: Path, rank: int | None = None) -> "Journal":
        if not journal_path(out_dir, rank).is_file():
            raise ResumeError(f"{out_dir} is not a streamq run directory (no {journal_path(out_dir, rank)})")
        return cls(out_dir, read(out_dir, rank), rank)

    def owns(self, name: str) -> bool:
        """Whether a file in the output directory is this journal's to keep or clean up: all of
        them for one process; for a block-parallel run each process's shards, and rank 0 also
        what is not a process's shard (index, config, a crash's leftovers)."""
        if self.rank is None:
            return True
        if name.startswith(shard_stem(self.rank) + "-"):
            return True
        return self.rank == 0 and not name.startswith("model-rank")

    def _write_index(self) -> None:
        with disk_full_guard(self.dir / (JOURNAL_NAME + ".tmp"), self.out_dir):
            write_json_atomic(self.dir / JOURNAL_NAME, self.state)

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.dir / (name + ".tmp")
        with disk_full_guard(tmp, self.out_dir):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            replace_atomic(tmp, self.dir / name)

    def files(self) -> set[str]:
        """The journal directory's files that the current entry needs (and the lock)."""
        live = {JOURNAL_NAME, LOCK_NAME}
        if self.state["hidden"]:
            live.add(self.state["hidden"])
        if self.state["writer"] and self.state["writer"]["pending"]:
            live.add(f"pending-{self.state['writer']['n_shards'] + 1:05d}.data")
        return live

    def save_input(self, hidden: list[torch.Tensor]) -> None:
        """Record the inputs of the first block still to do (a block-parallel process's, as
        received), so that a resume need not ask for them again."""
        name = f"hidden-{self.state['done_blocks']:05d}.safetensors"
        self._save(name, {"hidden": torch.cat([h.cpu() for h in hidden])})
        self.state.update(hidden=name)
        self._write_index()

    def record_writer(self, writer: ShardWriter) -> None:
        """Record the writer's state after its last shard is written (the process's part done)."""
        self.state.update(writer=writer.state())
        self._write_index()
        writer.drop_written_spools()

    def commit(self, done: int, writer: ShardWriter, hidden: list[torch.Tensor], block_stats: dict) -> None:
        """Record that `done` blocks are finished; `hidden` are the inputs of block `done`."""
        previous_hidden = self.state["hidden"]
        writer.sync()
        hidden_name = f"hidden-{done:05d}.safetensors" if hidden else None  # none in a data-free run
        if hidden_name:
            self._save(hidden_name, {"hidden": torch.cat([h.cpu() for h in hidden])})
        faults.point(f"block{done - 1}:hidden")
        self.state.update(done_blocks=done, writer=writer.state(), hidden=hidden_name,
                          blocks=self.state["blocks"] + [block_stats])
        self._write_index()
        faults.point(f"block{done - 1}:journal")
        writer.drop_written_spools()
        if previous_hidden:
            (self.dir / previous_hidden).unlink(missing_ok=True)

    def complete(self) -> None:
        if self.state["hidden"]:
            (self.dir / self.state["hidden"]).unlink(missing_ok=True)
        self.state.update(complete=True, hidden=None)
        self._write_index()

    def load_hidden(self) -> torch.Tensor:
        return load_file(self.dir / self.state["hidden"])["hidden"]

    def new_writer(self, max_bytes: int) -> ShardWriter:
        return ShardWriter(self.out_dir, max_bytes, keep_spools=True, stem=shard_stem(self.rank), spool_dir=self.dir)

    def load_writer(self, max_bytes: int) -> ShardWriter:
        state = self.state["writer"] or {"n_shards": 0, "total_bytes": 0, "weight_map": {}, "hashes": {},
                                         "pending": [], "pending_bytes": 0}
        return ShardWriter.restore(self.out_dir, max_bytes, state, shard_stem(self.rank), self.dir)

    def verify_and_clean(self) -> None:
        """Check every recorded shard against its hash; remove what the crash left behind
        (temporary files, shards written after the last journal entry, a stale index)."""
        hashes = (self.state["writer"] or {}).get("hashes", {})
        for name, digest in sorted(hashes.items()):
            path = self.out_dir / name
            if not path.is_file():
                raise ResumeError(f"shard {name} recorded in the journal is missing from {self.out_dir}")
            if sha256_file(path) != digest:
                raise ResumeError(f"shard {name} does not match the hash recorded when it was written "
                                  "(modified or damaged); start over with --overwrite")
        keep = set(hashes) | {JOURNAL_DIR}
        for path in self.out_dir.iterdir():
            if path.name not in keep and path.is_file() and self.owns(path.name):
                path.unlink()  # partial or unrecorded shards, .tmp files, index/config of a crash
        live = self.files()
        n_shards = (self.state["writer"] or {}).get("n_shards", 0)
        current_spool = f"pending-{n_shards + 1:05d}.data"  # ShardWriter.restore cuts it back
        for path in self.dir.iterdir():
            if path.name not in live and path.name != current_spool:
                path.unlink()
        fsync_dir(self.out_dir)
