"""The AutoAWQ "GEMM" format (vLLM's `awq` / `awq_marlin`; transformers through gptqmodel).

qweight int32 [in, out/8]: nibble i (bits 4i..4i+3) of int32 column c holds output column
8c + AWQ_ORDER[i]; qzeros int32 [in/g, out/8] is packed the same way; scales fp16 [in/g, out].
INT3 codes use the same 4-bit slots (values 0..7): an INT4 GEMM kernel fed these tensors
computes exactly (q - z) * s, so the only thing that differs from INT4 is `bits` in the config.
"""

from __future__ import annotations

import sys

import torch

from ..config import QuantConfig
from .base import Format, Unpacked

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SLOT_BITS = 4
_PER_INT32 = 32 // _SLOT_BITS


def _little_endian(what: str) -> None:
    """pack_gemm and unpack_gemm see an int32 word as its four bytes, low byte first."""
    if sys.byteorder != "little":
        raise RuntimeError(f"AWQ {what} reads an int32 as four little-endian bytes; this machine is big-endian")


def pack_gemm(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [rows, cols] (values < 16) into int32 [rows, cols / 8] in AWQ order.

    Byte j of a word holds nibbles 2j (low) and 2j + 1 (high), so each byte is made from two
    code columns in uint8 and four bytes are read as one little-endian int32: the same bits as
    shifting every nibble into place in a wider integer, with an eighth of the memory traffic."""
    rows, cols = codes.shape
    if cols % _PER_INT32:
        raise ValueError(f"packed width {cols} is not a multiple of {_PER_INT32}")
    _little_endian("packing")
    c = codes.reshape(rows, cols // _PER_INT32, _PER_INT32)
    packed = torch.empty(rows, cols // _PER_INT32, 4, dtype=torch.uint8, device=codes.device)
    for j in range(4):
        low, high = AWQ_ORDER[2 * j], AWQ_ORDER[2 * j + 1]
        torch.bitwise_or(c[..., low], c[..., high] << _SLOT_BITS, out=packed[..., j])
    return packed.view(torch.int32).reshape(rows, cols // _PER_INT32)


def unpack_gemm(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_gemm: int32 [rows, cols / 8] -> uint8 codes [rows, cols]. Each word is
    read as its four little-endian bytes and each byte's low and high nibble written to their
    columns, in uint8 (3-5x faster than shifting every word eight times in int32)."""
    rows, n = packed.shape
    _little_endian("unpacking")
    words = packed.contiguous().view(torch.uint8).reshape(rows, n, 4)
    codes = torch.empty(rows, n, _PER_INT32, dtype=torch.uint8, device=packed.device)
    for j in range(4):
        torch.bitwise_and(words[..., j], 0xF, out=codes[..., AWQ_ORDER[2 * j]])
        torch.bitwise_right_shift(words[..., j], _SLOT_BITS, out=codes[..., AWQ_ORDER[2 * j + 1]])
    return codes.reshape(rows, n * _PER_INT32)


def pack_linear(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Tensors of one quantized linear from codes [out, in] and per-group scales/zeros [out, in/g]."""
    return {
        "qweight": pack_gemm(codes.t().contiguous()),
        "qzeros": pack_gemm(zeros.t().contiguous().to(torch.uint8)),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def dequantize_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, storage: torch.dtype = torch.float16
) -> torch.Tensor:
    """nn.Linear weight [out, in] from one linear's GEMM tensors, W = (q - z) * s rounded once
    to `storage` (fp16): what an AWQ kernel computes before its multiply, so an evaluation of
    this weight sees exactly the model a loader runs. Runs wherever the tensors are."""
    q = unpack_gemm(qweight).to(torch.int32)  # [in, out]
    z = unpack_gemm(qzeros).to(torch.int32)  # [in/g, out]
    group = q.shape[0] // z.shape[0]
    s = scales.to(torch.float32)
    # (q - z) has 5 significant bits and s 11: the float32 product is exact, then rounded once
    w = (q.reshape(z.shape[0], group, -1) - z[:, None]).to(torch.float32) * s[:, None]
    return w.reshape(q.shape).t().contiguous().to(storage)


def _pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    return pack_linear(codes, scales, zeros)


def _unpack(tensors: dict[str, torch.Tensor], bits: int) -> Unpacked:
    codes = unpack_gemm(tensors["qweight"]).t()
    zeros = unpack_gemm(tensors["qzeros"]).t()
    return codes, tensors["scales"].t(), zeros


def _quantization_config(qcfg: QuantConfig, ignore: list[str]) -> dict:
    """zero_point is true even for --symmetric: symmetric codes are stored unsigned with the
    constant zero 2^(bits-1), which the GEMM format expresses exactly."""
    return {"quant_method": "awq", "bits": qcfg.w_bit, "group_size": qcfg.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": ignore}


def _read_config(qc: dict) -> dict | None:
    if qc.get("quant_method") != "awq":
        return None
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} (streamq reads the GEMM layout)")
    return {"w_bit": int(qc["bits"]), "group_size": int(qc["group_size"]), "zero_point": bool(qc.get("zero_point", True))}


AWQ = Format(
    name="awq",
    storage="awq-gemm",
    marker="qweight",
    suffixes=("qweight", "qzeros", "scales"),
    pack=_pack,
    unpack=_unpack,
    quantization_config=_quantization_config,
    read_config=_read_config,
    storage_dtype=lambda source: torch.float16,  # the GEMM kernels take fp16 scales
    max_bits=4,
    kernel_dequantize=lambda t, ops: ops.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"]),
)
