"""Atomic, incremental safetensors output: shards are written under a temporary name,
fsynced and renamed as they fill; the index is written last."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import faults
from .errors import DiskFullError
from .shards import INDEX_NAME

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
def disk_full_guard(path: Path, out_dir: Path):
    """Turn ENOSPC into a clear error (and drop the partial temporary file); anything written
    before stays, so the run can be resumed once space is freed."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
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


class ShardWriter:
    """Accumulates tensors and writes a shard whenever the next tensor would pass max_bytes."""

    def __init__(self, out_dir: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.n_shards = 0
        self.hashes: dict[str, str] = {}  # shard file -> sha256, for the resume journal

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise ValueError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        self.n_shards += 1
        name = f"model-{self.n_shards:05d}.safetensors"
        tmp = self.out_dir / (name + ".tmp")
        with disk_full_guard(tmp, self.out_dir):
            save_file(self.pending, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, 0o644)  # safetensors creates files private to the owner
            self.hashes[name] = sha256_file(tmp)
            faults.point(f"shard{self.n_shards}:written")
            replace_atomic(tmp, self.out_dir / name)
        for key in self.pending:
            self.weight_map[key] = name
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        with disk_full_guard(self.out_dir / (INDEX_NAME + ".tmp"), self.out_dir):
            write_json_atomic(self.out_dir / INDEX_NAME, index)

    def state(self) -> dict:
        """Everything but the pending tensors, as JSON (the journal saves those separately)."""
        return {"n_shards": self.n_shards, "total_bytes": self.total_bytes,
                "weight_map": self.weight_map, "hashes": self.hashes, "pending_bytes": self.pending_bytes}

    @classmethod
    def restore(cls, out_dir: Path, max_bytes: int, state: dict, pending: dict[str, torch.Tensor]) -> "ShardWriter":
        writer = cls(out_dir, max_bytes)
        writer.n_shards, writer.total_bytes = state["n_shards"], state["total_bytes"]
        writer.weight_map, writer.hashes = dict(state["weight_map"]), dict(state["hashes"])
        writer.pending = dict(pending)
        writer.pending_bytes = state["pending_bytes"]
        return writer
