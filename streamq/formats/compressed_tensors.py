"""The compressed-tensors "pack-quantized" format (what llm-compressor writes; vLLM serves it
with its Machete/Marlin kernels, transformers loads it with the `compressed-tensors` package).

Per linear: weight_packed int32 [out, ceil(in * b / 32)], weight_scale [out, in/g] in the
model's dtype, weight_zero_point int32 [ceil(out * b / 32), in/g] (packed along the output
dimension; absent when symmetric), weight_shape int64 [2]. Values are stored signed
(q - 2^(b-1)) and packed with that offset added back, so the packed bits are the unsigned codes:
element j of a row sits at bit j*b of the row's little-endian stream of 32-bit words, with no
padding between elements (a 3-bit element may straddle two words)."""

from __future__ import annotations

import sys

import torch

from ..config import QuantConfig
from .base import Format, Unpacked

WORD = 32


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values [rows, cols] (< 2^bits) -> int32 [rows, ceil(cols * bits / 32)]."""
    rows, cols = values.shape
    n32 = -(-cols // WORD)
    if cols % WORD:
        values = torch.nn.functional.pad(values, (0, n32 * WORD - cols))
    v = values.reshape(rows, n32, WORD)
    if bits in (4, 8) and sys.byteorder == "little":
        # element j's bits sit in byte j * bits / 8 of its 32-element run: make the bytes in
        # uint8 and read four as one int32, the same bits as shifting each into a wider word
        b = v if bits == 8 else torch.bitwise_or(v[..., 0::2], v[..., 1::2] << 4)
        return b.contiguous().view(torch.int32).reshape(rows, n32 * bits)[:, : -(-cols * bits // WORD)].contiguous()
    # one element column at a time in int64 (no sign overflow), bits words per 32 elements
    words = torch.zeros(rows, n32, bits, dtype=torch.int64, device=values.device)
    for j in range(WORD):
        k, offset = divmod(j * bits, WORD)
        column = v[..., j].to(torch.int64)
        words[..., k] |= (column << offset) & 0xFFFFFFFF
        if offset + bits > WORD:  # the element's high bits start the next word
            words[..., k + 1] |= column >> (WORD - offset)
    words = words.reshape(rows, n32 * bits)[:, : -(-cols * bits // WORD)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_dense(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_dense: int32 [rows, ceil(cols * bits / 32)] -> uint8 [rows, cols]."""
    rows, n_words = packed.shape
    n32 = -(-cols // WORD)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if n_words < n32 * bits:
        words = torch.nn.functional.pad(words, (0, n32 * bits - n_words))
    words = words.reshape(rows, n32, bits)
    mask = (1 << bits) - 1
    out = torch.empty(rows, n32, WORD, dtype=torch.uint8, device=packed.device)
    for j in range(WORD):
        k, offset = divmod(j * bits, WORD)
        value = words[..., k] >> offset
        if offset + bits > WORD:
            value = value | (words[..., k + 1] << (WORD - offset))
        out[..., j] = (value & mask).to(torch.uint8)
    return out.reshape(rows, n32 * WORD)[:, :cols]


def _pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    out = {
        "weight_packed": pack_dense(codes, qcfg.w_bit),
        "weight_scale": scales.to(qcfg.storage_torch_dtype).contiguous(),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if qcfg.zero_point:  # symmetric codes have the constant zero 2^(b-1): signed zero 0, not stored
        out["weight_zero_point"] = pack_dense(zeros.to(torch.uint8).t().contiguous(), qcfg.w_bit).t().contiguous()
    return out


def _unpack(tensors: dict[str, torch.Tensor], bits: int) -> Unpacked:
    out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
    scales = tensors["weight_scale"]
    codes = unpack_dense(tensors["weight_packed"], bits, in_features)
    if "weight_zero_point" in tensors:
        zeros = unpack_dense(tensors["weight_zero_point"].t().contiguous(), bits, out_features).t()
    else:
        zeros = torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.uint8, device=scales.device)
    return codes, scales, zeros


def _quantization_config(qcfg: QuantConfig, ignore: list[str]) -> dict:
    weights = {"num_bits": qcfg.w_bit, "type": "int", "symmetric": not qcfg.zero_point,
               "group_size": qcfg.group_size, "strategy": "group", "dynamic": False, "actorder": None,
               "observer": "minmax", "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def _read_config(qc: dict) -> dict | None:
    if qc.get("quant_method") != "compressed-tensors":
        return None
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{len(groups)} config groups (streamq reads one)")
    scheme = next(iter(groups.values()))
    weights = scheme.get("weights") or {}
    fmt = scheme.get("format") or qc.get("format")
    if fmt != "pack-quantized" or weights.get("type") != "int" or weights.get("strategy") != "group":
        raise ValueError(f"format {fmt!r} with {weights.get('type')!r} weights, strategy {weights.get('strategy')!r} "
                         "(streamq reads pack-quantized int weights with group strategy)")
    if scheme.get("input_activations") or weights.get("actorder"):
        raise ValueError("quantized activations or act-order (streamq reads weight-only static groups)")
    return {"w_bit": int(weights["num_bits"]), "group_size": int(weights["group_size"]),
            "zero_point": not weights.get("symmetric", True)}


COMPRESSED_TENSORS = Format(
    name="compressed-tensors",
    storage="compressed-tensors-pack-quantized",
    marker="weight_packed",
    suffixes=("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"),
    pack=_pack,
    unpack=_unpack,
    quantization_config=_quantization_config,
    read_config=_read_config,
    # the model's own half precision: a bf16 model stays bf16 (its loaders expect bf16 scales)
    storage_dtype=lambda source: torch.bfloat16 if source == torch.bfloat16 else torch.float16,
)
