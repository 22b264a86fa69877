"""FP8 block-scaled weights, as DeepSeek-V3/R1, Kimi-K2 and the Qwen3 *-FP8 checkpoints publish
them: a linear's weight in float8_e4m3fn beside `weight_scale_inv`, one float32 scale per block
of weight_block_size (128 x 128) of the weight, named in config.json's quantization_config
({"quant_method": "fp8", "weight_block_size": [128, 128]}). The reader hands out the weights
they encode: each e4m3 value times its block's scale in float32, rounded once to the dtype the
checkpoint's other tensors are in (bf16), as transformers' own FP8 dequantization rounds them to
the model's dtype: an FP8 checkpoint is then exactly the bf16 checkpoint of its weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedModelError

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv


@dataclass(frozen=True)
class BlockScaled:
    """How a checkpoint's weights are encoded: e4m3 values, one scale per block of `block`."""

    block: tuple[int, int]

    def scale_name(self, name: str) -> str:
        return name + SCALE_SUFFIX

    def decode(self, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The weight [rows, cols] in float32: values [rows, cols] (float8_e4m3fn) times the scale
        of the block holding each, scales [ceil(rows / b0), ceil(cols / b1)]; the last blocks
        may be partial."""
        if values.dtype != torch.float8_e4m3fn or values.dim() != 2:
            raise UnsupportedModelError(f"FP8 block-scaled weights must be 2-D float8_e4m3fn, got {values.dtype} "
                                        f"{tuple(values.shape)}")
        (rows, cols), (b0, b1) = values.shape, self.block
        want = (-(-rows // b0), -(-cols // b1))
        if tuple(scales.shape) != want:
            raise UnsupportedModelError(f"a {rows} x {cols} FP8 weight in {b0} x {b1} blocks needs {want[0]} x "
                                        f"{want[1]} scales, found {tuple(scales.shape)}")
        # in place, one float32 copy of the weight: each run of whole blocks (and the partial
        # last row and column of blocks) viewed as [blocks, rows of one, blocks, columns of one]
        # times its scales broadcast, instead of a full-size float32 tensor of repeated scales
        out, s = values.float(), scales.float()
        for rows_at, blocks_r in _runs(rows, b0):
            for cols_at, blocks_c in _runs(cols, b1):
                part, by = out[rows_at, cols_at], s[blocks_r, blocks_c]
                if part.numel():
                    part.unflatten(1, (by.shape[1], -1)).unflatten(0, (by.shape[0], -1)).mul_(by[:, None, :, None])
        return out


def _runs(n: int, block: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Along an axis of n values in blocks of `block`: (values, blocks) of the whole blocks, and
    of the partial last block (empty when there is none)."""
    whole = n // block
    return (slice(0, whole * block), slice(0, whole)), (slice(whole * block, n), slice(whole, None))


def block_scaled(hf_config: Any) -> BlockScaled | None:
    """The encoding a config's quantization_config names, or None for plain weights or another
    quantization (the formats layer reads those). FP8 without blocks is refused in one line."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size")
    fmt = qc.get("fmt", "e4m3")
    if not block or len(block) != 2 or fmt != "e4m3":
        raise UnsupportedModelError(f"this FP8 checkpoint (fmt {fmt}, weight_block_size {block}) is not read yet: "
                                    "streamq reads e4m3 weights with a scale per block (weight_block_size [128, 128])")
    return BlockScaled((int(block[0]), int(block[1])))
