"""What a weight file type is: its names, and how one file of it is listed, opened lazily and
fingerprinted (the types themselves: sources.safetensors, sources.pytorch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

# Weight dtypes streamq reads, by their safetensors names (bytes per element); anything else
# is refused by name.
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "BOOL": 1, "U8": 1, "I8": 1,
               "F8_E4M3": 1}  # FP8 block-scaled weights (sources.fp8)
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    """What a file says of one tensor before its data is read."""

    dtype: str  # safetensors' name: F16, BF16, F32, ...
    shape: tuple[int, ...]
    nbytes: int
    # tensors that repeat one stored tensor (a pickle's tied weights) share this key within a file
    storage: tuple | None = None


class Handle(Protocol):
    """One open file: tensors by their stored names, read lazily."""

    def get(self, name: str) -> torch.Tensor: ...

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class WeightFiles:
    """One weight file type: its single-file and index names, and three functions of a file."""

    name: str  # for messages: "safetensors", "PyTorch pickle"
    single_name: str  # model.safetensors, pytorch_model.bin
    index_name: str  # model.safetensors.index.json, pytorch_model.bin.index.json
    suffix: str  # of its shards
    tensors: Callable[[Path], dict[str, TensorInfo]]  # every tensor's info, checked, no data read
    open: Callable[[Path], Handle]
    fingerprint: Callable[[Path], bytes]  # changes when the file's tensors change; cheap to compute
