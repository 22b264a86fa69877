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
# Weight dtypes streamq reads (bytes per element); anything else is refused by name.
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1}
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


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


def validate_header(path: Path) -> dict[str, dict]:
    """Parse and check a shard's header: known dtypes, sizes that match shapes, every tensor
    inside the file, no two tensors overlapping. Returns {name: {dtype, shape, data_offsets}}."""
    raw = read_header(path)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path} has a corrupt header (not a JSON object)") from None
    header.pop("__metadata__", None)
    data_len = path.stat().st_size - 8 - len(raw)
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name} has a corrupt header entry") from None
        if dtype not in DTYPE_BYTES:
            raise InputError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPE_BYTES[dtype] or begin < 0:
            raise InputError(f"{path}: tensor {name} spans {end - begin} bytes, its shape {shape} "
                             f"{dtype} needs {numel * DTYPE_BYTES[dtype]}")
        if end > data_len:
            raise InputError(f"{path}: tensor {name} ends at byte {end} past the data ({data_len} bytes); "
                             "the file is truncated")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise InputError(f"{path}: tensors {n0} and {n1} overlap")
    return header


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
            self.files = {name: single for name in validate_header(single)}
        else:
            raise InputError(f"{self.model_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        self.headers: dict[Path, dict[str, dict]] = {}
        for shard in sorted(set(self.files.values())):
            if not shard.is_file():
                raise InputError(f"shard {shard.name} named in {INDEX_NAME} is missing from {self.model_dir}")
            self.headers[shard] = validate_header(shard)
        for name, shard in self.files.items():
            if name not in self.headers[shard]:
                raise InputError(f"tensor {name} is missing from shard {shard.name}")
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

    def release(self) -> None:
        """Unmap every shard: pages read so far stop counting toward this process's RSS."""
        self._handles.clear()

    def names(self) -> list[str]:
        return sorted(self.files)

    def dtype(self, name: str) -> torch.dtype | None:
        """A tensor's dtype from its shard's header (None for a non-float one); nothing read."""
        return _FLOAT_DTYPES.get(self.headers[self.files[name]][name]["dtype"])

    def shards(self) -> list[Path]:
        return sorted(set(self.files.values()))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise InputError(f"tensor {name} is missing from {self.model_dir}")
        return self._handle(self.files[name]).get_tensor(name)

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose names start with prefix, keyed by the rest of the name."""
        return {n[len(prefix):]: self.get(n) for n in self.names() if n.startswith(prefix)}

    def float_dtype(self) -> torch.dtype | None:
        """The floating-point dtype holding most of the checkpoint's bytes (from the headers,
        nothing read): what the weights were trained and published in."""
        sizes: dict[str, int] = {}
        for header in self.headers.values():
            for info in header.values():
                if info["dtype"] in _FLOAT_DTYPES:
                    begin, end = info["data_offsets"]
                    sizes[info["dtype"]] = sizes.get(info["dtype"], 0) + end - begin
        return _FLOAT_DTYPES[max(sizes, key=sizes.get)] if sizes else None

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
