"""Atomic, incremental safetensors output: shards are written under a temporary name,
fsynced and renamed as they fill; the index is written last."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from . import faults
from .errors import DiskFullError, ResumeError
from .sources.safetensors import INDEX_NAME

DEFAULT_SHARD_BYTES = 4 * 1024**3


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    replace_atomic(tmp, path)


@contextmanager
def disk_full_guard(path: Path, out_dir: Path, remove: bool = True):
    """Turn ENOSPC into a clear error (and drop the partial temporary file); anything written
    before stays, so the run can be resumed once space is freed."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        if remove:
            path.unlink(missing_ok=True)
        raise DiskFullError(f"disk full while writing {path}; free space, then run: streamq resume {out_dir}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SPOOL_DIR = ".streamq"


class ShardWriter:
    """Writes tensors into safetensors shards of at most max_bytes without holding them in
    memory: each tensor's bytes are appended to a spool file on disk as it arrives (only names,
    dtypes and shapes stay in memory), and a full shard is assembled from the spool (header,
    then a streamed copy). Host memory stays O(one tensor) whatever the shard size.

    Shard N accumulates in spool `pending-N.data`. With keep_spools (the resume journal), a
    written shard's spool stays until the journal has recorded the shard (drop_written_spools),
    so a crash between the two never loses data the journal still counts as pending."""

    def __init__(self, out_dir: Path, max_bytes: int = DEFAULT_SHARD_BYTES, keep_spools: bool = False,
                 stem: str = "model", spool_dir: Path | None = None):
        self.out_dir = Path(out_dir)
        self.spool_dir = Path(spool_dir) if spool_dir else self.out_dir / SPOOL_DIR
        self.stem = stem  # shards are STEM-00001.safetensors, ...: one stem per writing process
        self.max_bytes = max_bytes
        self.keep_spools = keep_spools
        self.pending: list[list] = []  # [name, dtype, shape, nbytes] in spool order
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.n_shards = 0
        self.hashes: dict[str, str] = {}  # shard file -> sha256, for the resume journal

    def spool(self, shard: int | None = None) -> Path:
        return self.spool_dir / f"pending-{(shard or self.n_shards + 1):05d}.data"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or any(p[0] == name for p in self.pending):
            raise ValueError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        spool = self.spool()
        with disk_full_guard(spool, self.out_dir, remove=False):
            with open(spool, "ab") as f:
                f.write(data.tobytes())
        faults.point("spool:appended")
        self.pending.append([name, SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), size])
        self.pending_bytes += size

    def sync(self) -> None:
        """fsync the spool: what the journal is about to call pending is on disk."""
        if self.pending:
            with open(self.spool(), "rb+") as f:
                os.fsync(f.fileno())

    def flush(self) -> None:
        if not self.pending:
            return
        spool = self.spool()
        self.n_shards += 1
        name = f"{self.stem}-{self.n_shards:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tname, dtype, shape, size in self.pending:
            header[tname] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        tmp = self.out_dir / (name + ".tmp")
        digest = hashlib.sha256()
        with disk_full_guard(tmp, self.out_dir):
            with open(tmp, "wb") as out, open(spool, "rb") as src:
                for chunk in (struct.pack("<Q", len(raw)), raw):
                    out.write(chunk)
                    digest.update(chunk)
                remaining = self.pending_bytes
                while remaining:
                    chunk = src.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise RuntimeError(f"spool {spool} is shorter than the tensors it holds")
                    out.write(chunk)
                    digest.update(chunk)
                    remaining -= len(chunk)
            self.hashes[name] = digest.hexdigest()
            faults.point(f"shard{self.n_shards}:written")
            replace_atomic(tmp, self.out_dir / name)
        for tname, *_ in self.pending:
            self.weight_map[tname] = name
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = [], 0
        if not self.keep_spools:
            spool.unlink()

    def drop_written_spools(self) -> None:
        """Delete the spools of shards already written (after the journal recorded them)."""
        for n in range(1, self.n_shards + 1):
            self.spool(n).unlink(missing_ok=True)

    def finish(self, others: list[tuple[dict[str, str], int]] = ()) -> None:
        """Write the last shard and the index, which also lists `others`: the (weight map, total
        bytes) of the other processes' writers of a block-parallel run. A journal's spools stay
        until the journal records the run complete (drop_written_spools): a crash or a full disk
        before that resumes from them."""
        self.flush()
        weight_map, total = dict(self.weight_map), self.total_bytes
        for their_map, their_bytes in others:
            weight_map.update(their_map)
            total += their_bytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with disk_full_guard(self.out_dir / (INDEX_NAME + ".tmp"), self.out_dir):
            write_json_atomic(self.out_dir / INDEX_NAME, index)
        try:
            self.spool_dir.rmdir()  # gone unless the journal lives there
        except OSError:
            pass

    def state(self) -> dict:
        return {"n_shards": self.n_shards, "total_bytes": self.total_bytes, "weight_map": self.weight_map,
                "hashes": self.hashes, "pending": self.pending, "pending_bytes": self.pending_bytes}

    @classmethod
    def restore(cls, out_dir: Path, max_bytes: int, state: dict, stem: str = "model",
                spool_dir: Path | None = None) -> "ShardWriter":
        """The writer as the journal recorded it; the spool is cut back to the recorded length
        (bytes appended after the last journal entry belong to an unfinished block)."""
        writer = cls(out_dir, max_bytes, keep_spools=True, stem=stem, spool_dir=spool_dir)
        writer.n_shards, writer.total_bytes = state["n_shards"], state["total_bytes"]
        writer.weight_map, writer.hashes = dict(state["weight_map"]), dict(state["hashes"])
        writer.pending, writer.pending_bytes = [list(p) for p in state["pending"]], state["pending_bytes"]
        spool = writer.spool()
        if writer.pending_bytes:
            if not spool.is_file() or spool.stat().st_size < writer.pending_bytes:
                raise ResumeError(f"{spool} lacks tensors the journal records as pending; start over with --overwrite")
            os.truncate(spool, writer.pending_bytes)
        else:
            spool.unlink(missing_ok=True)
        return writer
