"""Output formats as data (formats/base.py): the AutoAWQ GEMM layout and compressed-tensors'
pack-quantized; `reading(config)` says which one a checkpoint holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import QuantConfig
from ..errors import SettingsError, UnsupportedModelError
from ..sources.fp8 import block_scaled
from .awq import AWQ
from .base import Format, config_dict, dense_state, dequantize, linear_tensors
from .compressed_tensors import COMPRESSED_TENSORS

FORMATS: dict[str, Format] = {f.name: f for f in (COMPRESSED_TENSORS, AWQ)}

__all__ = ["FORMATS", "Format", "by_name", "dense_state", "dequantize", "linear_tensors", "reading", "settle"]


def by_name(name: str) -> Format:
    if name not in FORMATS:
        raise SettingsError(f"--format must be one of {', '.join(FORMATS)}, got {name!r}")
    return FORMATS[name]


def settle(fmt: Format, qcfg: QuantConfig, source: torch.dtype | None) -> QuantConfig:
    """qcfg with the storage dtype `fmt` gives a model whose weights are `source`."""
    if qcfg.w_bit > fmt.max_bits:
        raise SettingsError(f"--format {fmt.name} holds at most {fmt.max_bits} bits per weight, got {qcfg.w_bit}")
    return dataclasses.replace(qcfg, storage_dtype=str(fmt.storage_dtype(source)).replace("torch.", ""))


def reading(hf_config: Any) -> tuple[Format, dict] | None:
    """(format, settings) of a quantized checkpoint's config; None for plain weights. A
    quantization_config streamq cannot read is refused in one line."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None or block_scaled(hf_config) is not None:  # FP8 source weights: the reader decodes them
        return None
    qc = config_dict(qc)
    for fmt in FORMATS.values():
        try:
            settings = fmt.read_config(qc)
        except (ValueError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(f"cannot read this {fmt.name} checkpoint: {exc}") from None
        if settings is not None:
            return fmt, settings
    raise UnsupportedModelError(f"cannot read quantization_config {qc.get('quant_method')!r}; streamq reads plain "
                                f"fp16/bf16/fp32 checkpoints and its own formats ({', '.join(FORMATS)})")
