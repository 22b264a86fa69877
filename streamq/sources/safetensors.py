"""safetensors files: the header checked before any tensor is read, tensors read lazily
through safe_open (a memory map: reading one tensor touches only its pages)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from .base import DTYPE_BYTES, TensorInfo, WeightFiles

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


def tensors(path: Path) -> dict[str, TensorInfo]:
    return {name: TensorInfo(info["dtype"], tuple(info["shape"]), info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in validate_header(path).items()}


class _Handle:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise InputError(f"cannot open shard {path}: {exc}") from None

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.file.get_tensor(name)
        except Exception as exc:  # safetensors' own error types: an I/O error, a damaged file
            raise InputError(f"cannot read {name} from {self.path}: {exc}") from None

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.file.get_slice(name)[start:stop]


SAFETENSORS = WeightFiles(name="safetensors", single_name=SINGLE_NAME, index_name=INDEX_NAME, suffix=".safetensors",
                          tensors=tensors, open=_Handle, fingerprint=read_header)
