"""What an output format is, as data: how one quantized linear's integer codes, per-group
scales and zero points become tensors on disk and back, and the quantization_config that
loaders (transformers, vLLM) read. The engine, convert and ppl never name a format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import QuantConfig

# codes uint8 [out, in], scales [out, in/g] (values of the storage dtype), zeros uint8 [out, in/g]
Unpacked = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Format:
    name: str  # the --format value
    storage: str  # what streamq.json calls the storage
    marker: str  # the tensor suffix that marks a packed linear (its other tensors are in `suffixes`)
    suffixes: tuple[str, ...]
    # one linear's tensors by suffix from its codes, scales and zeros, for these settings
    pack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, QuantConfig], dict[str, torch.Tensor]]
    # the inverse, from one linear's tensors by suffix and the bits per weight
    unpack: Callable[[dict[str, torch.Tensor], int], Unpacked]
    # what config.json says: the settings and the linears left unquantized (full module names)
    quantization_config: Callable[[QuantConfig, list[str]], dict]
    # of a checkpoint's quantization_config: None if it is not this format, else the settings it
    # fixes (w_bit, group_size, zero_point); a variant this reader cannot read raises ValueError
    read_config: Callable[[dict], dict | None]
    # the dtype of every floating tensor written, for a source whose weights are `source`
    storage_dtype: Callable[[torch.dtype], torch.dtype]
    max_bits: int = 8
    # a faster dequantization through the run's kernels (ops), exactly equal to `dequantize` below
    kernel_dequantize: Callable[[dict[str, torch.Tensor], Any], torch.Tensor] | None = None


def dequantize(fmt: Format, tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """One linear's weight [out, in] as a loader computes it: (q - z) * s, exact in float32 and
    rounded once to the scales' dtype. Runs wherever the tensors are."""
    codes, scales, zeros = fmt.unpack(tensors, bits)
    n_group = scales.shape[1]
    q = codes.to(torch.float32).reshape(codes.shape[0], n_group, -1)
    w = (q - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(codes.shape).to(scales.dtype)


def dense_state(fmt: Format, raw: dict[str, torch.Tensor], bits: int, device: torch.device,
                ops: Any = None) -> dict[str, torch.Tensor]:
    """Tensors by name with every packed linear replaced by its dequantized `weight` (computed on
    `device`, by the format's kernel where `ops` are given and the format has one: the same
    values), every other tensor as it is."""
    linears = linear_tensors(fmt, list(raw))
    consumed = {name for names in linears.values() for name in names.values()}
    state = {name: t for name, t in raw.items() if name not in consumed}
    for base, names in linears.items():
        tensors = {suffix: raw[name].to(device) for suffix, name in names.items()}
        if ops is not None and fmt.kernel_dequantize is not None:
            state[base + ".weight"] = fmt.kernel_dequantize(tensors, ops)
        else:
            state[base + ".weight"] = dequantize(fmt, tensors, bits)
    return state


def linear_tensors(fmt: Format, names: list[str]) -> dict[str, dict[str, str]]:
    """Packed linears among tensor names: {linear: {suffix: full name}}."""
    bases = [n[: -len(fmt.marker) - 1] for n in names if n.endswith("." + fmt.marker)]
    present = set(names)
    return {b: {s: f"{b}.{s}" for s in fmt.suffixes if f"{b}.{s}" in present} for b in bases}


def config_dict(qc: Any) -> dict:
    return qc if isinstance(qc, dict) else qc.to_dict()
