"""PyTorch pickles (pytorch_model.bin, pytorch_model-0000K-of-0000N.bin), read lazily and
safely: torch.load with mmap=True, so tensors are views into one memory map of the file and a
block's pages are read when the block is built, and weights_only=True, so a pickle that names
anything but tensors, storages and plain containers is refused before any of it runs."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..errors import InputError
from .base import DTYPE_BYTES, TensorInfo, WeightFiles

INDEX_NAME = "pytorch_model.bin.index.json"
SINGLE_NAME = "pytorch_model.bin"
DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a zip pickle, tensors mapped from the file, nothing of it executed."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            # a bare pickle: torch.save before 1.6, or with _use_new_zipfile_serialization=False
            legacy = f.read(1) == b"\x80"
        if legacy:
            size = path.stat().st_size / 1e9
            raise InputError(f"{path} is a PyTorch pickle in the legacy (pre-1.6) format, which cannot be memory-"
                             "mapped; re-save it once as a zip pickle, holding the whole file in memory "
                             f"({size:.2f} GB): python -c \"import torch; p='{path}'; "
                             "torch.save(torch.load(p, weights_only=True), p)\"")
        raise InputError(f"{path} is not a PyTorch zip pickle (truncated, or another kind of file)")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        what = f"names {found.group(1)}" if found else "holds objects"
        raise InputError(f"{path} is refused: its pickle {what}, which is not a tensor or a storage (read with "
                         "weights_only, so none of its code ran)") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot read {path}: {first}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{path}: {name} is a {type(t).__name__}, not a tensor")
        if DTYPE_NAMES.get(t.dtype) not in DTYPE_BYTES:
            raise InputError(f"{path}: tensor {name} has unsupported dtype {DTYPE_NAMES.get(t.dtype, t.dtype)}")
    return state


def tensors(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes from the pickle; tensors that view the same bytes (tied weights
    saved once) share a storage key."""
    return {name: TensorInfo(DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size(),
                             (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.stride())))
            for name, t in load(path).items()}


class _Handle:
    def __init__(self, path: Path):
        self.state = load(path)

    def get(self, name: str) -> torch.Tensor:
        # a view into the private map: the engine's in-place folds copy the touched pages (copy
        # on write) and never reach the file; contiguous() copies only a strided view
        return self.state[name].contiguous()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state[name][start:stop]


def fingerprint(path: Path) -> bytes:
    """The zip directory: every record's name, size and CRC-32 (torch.save stores one per
    tensor storage), so any change to the weights changes it; nothing but the directory is read."""
    try:
        with zipfile.ZipFile(path) as z:
            return "\n".join(f"{i.filename} {i.file_size} {i.CRC}" for i in z.infolist()).encode()
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


PYTORCH = WeightFiles(name="PyTorch pickle", single_name=SINGLE_NAME, index_name=INDEX_NAME, suffix=".bin",
                      tensors=tensors, open=_Handle, fingerprint=fingerprint)
