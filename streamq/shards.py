"""Memory-mapped safetensors reader: the index, shard headers, one block's tensors by prefix."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8:
                raise InputError(f"{path} has a corrupt header (length {n} past the end of a {size}-byte file)")
            return f.read(n)
    except OSError as exc:
        raise InputError(f"cannot read shard {path}: {exc.strerror}") from None


class ShardReader:
    """Tensor name -> shard file, opened lazily with safe_open (mmap): reading one tensor
    touches only that tensor's pages."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_NAME
        single = self.model_dir / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{index} is not a valid safetensors index") from None
            self.files = {name: self.model_dir / f for name, f in weight_map.items()}
        elif single.is_file():
            with self._open(single) as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise InputError(f"{self.model_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        for shard in sorted(set(self.files.values())):
            if not shard.is_file():
                raise InputError(f"shard {shard.name} named in {INDEX_NAME} is missing from {self.model_dir}")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise InputError(f"cannot open shard {path}: {exc}") from None

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted(self.files)

    def shards(self) -> list[Path]:
        return sorted(set(self.files.values()))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise InputError(f"tensor {name} is missing from {self.model_dir}")
        return self._handle(self.files[name]).get_tensor(name)

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose names start with prefix, keyed by the rest of the name."""
        return {n[len(prefix):]: self.get(n) for n in self.names() if n.startswith(prefix)}

    def fingerprint(self) -> str:
        """sha256 over config.json and each shard's name, size and header: changes when the
        weights' layout or any file size changes, computed without reading the weights."""
        h = hashlib.sha256()
        config = self.model_dir / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        for shard in self.shards():
            h.update(shard.name.encode())
            h.update(str(shard.stat().st_size).encode())
            h.update(read_header(shard))
        return h.hexdigest()
