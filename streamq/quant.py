"""Group-wise integer quantization (AWQ's min/max quantizer): pure functions of tensors.

Weights are nn.Linear layout [out, in]; groups run along `in`. Scales are rounded to the
dtype the output format stores them in (fp16; compressed-tensors: the source's bf16) before
codes are computed, so the codes, zeros and scales written to
disk reproduce exactly the pseudo-quantized weights the search evaluated. The arithmetic is
float32 whatever the weights' dtype (fp16 and bf16 values are exact there): a division held
in fp16 (relative error 5e-4) moves codes near a rounding boundary to the wrong side, which
measurably costs perplexity on the GPU path.
"""

from __future__ import annotations

import torch

from .errors import SettingsError

STORAGE_DTYPE = torch.float16


def check_group_size(in_features: int, group_size: int, where: str) -> None:
    """Refuse a group size that does not divide a layer's input width, naming sizes that fit."""
    if in_features % group_size == 0:
        return
    fits = [g for g in (256, 128, 64, 32, 16, 8) if in_features % g == 0]
    hint = f"sizes that fit: {', '.join(map(str, fits))}" if fits else "no power-of-two group size fits"
    raise SettingsError(
        f"--group-size {group_size} does not divide the input width {in_features} of {where}; {hint}"
    )


def quant_params(
    w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True, scale_dtype: torch.dtype = STORAGE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) of w [out, in]; both [out, in // group_size], float32.

    Asymmetric: scale = (max - min) / (2^b - 1), zero = clamp(-round(min / scale), 0, 2^b - 1).
    Symmetric: scale = max|w| / (2^(b-1) - 1) with the constant zero 2^(b-1), which gives
    the same values as signed codes and keeps one unsigned storage layout for both.
    """
    out_features, in_features = w.shape
    g = w.reshape(out_features, in_features // group_size, group_size)
    max_int = 2**w_bit - 1
    if zero_point:
        max_val = g.amax(dim=-1).float()
        min_val = g.amin(dim=-1).float()
        scales = ((max_val - min_val).clamp(min=1e-5) / max_int).to(scale_dtype).float()
        zeros = (-torch.round(min_val / scales)).clamp(0, max_int)
    else:
        max_val = g.abs().amax(dim=-1).float().clamp(min=1e-5)
        scales = (max_val / (2 ** (w_bit - 1) - 1)).to(scale_dtype).float()
        zeros = torch.full_like(scales, 2 ** (w_bit - 1))
    return scales, zeros


def _float_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, w_bit: int,
                 inplace: bool = False) -> torch.Tensor:
    """Codes as float32, grouped [out, n_group, group_size]. One temporary (none with inplace,
    for a float32 w the caller gives up), updated in place: for a 28672 x 7168 weight every
    extra temporary is 0.8 GB of float32 traffic."""
    g = w.reshape(w.shape[0], scales.shape[1], -1)
    if inplace and w.dtype == torch.float32:
        q = g.div_(scales[..., None])
    else:
        q = g / scales[..., None].float()  # float32 division, w promoted element by element
    return q.round_().add_(zeros[..., None]).clamp_(0, 2**w_bit - 1)


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, w_bit: int, inplace: bool = False
) -> torch.Tensor:
    """Integer codes [out, in] (uint8) of w for the given per-group scales and zeros; with
    inplace, a float32 w is overwritten on the way."""
    return _float_codes(w, scales, zeros, w_bit, inplace).reshape(w.shape).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """W = (q - z) * s, per group; codes [out, in], scales/zeros [out, in // group]."""
    out_features, in_features = codes.shape
    n_group = scales.shape[1]
    q = codes.to(dtype).reshape(out_features, n_group, in_features // n_group)
    w = (q - zeros.to(dtype)[..., None]) * scales.to(dtype)[..., None]
    return w.reshape(out_features, in_features)


def pseudo_quantize(
    w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True, scale_dtype: torch.dtype = STORAGE_DTYPE
) -> torch.Tensor:
    """Quantize-dequantize w (float32 arithmetic, the result in w's dtype): the weights a
    quantized model computes with."""
    scales, zeros = quant_params(w, w_bit, group_size, zero_point, scale_dtype)
    q = _float_codes(w, scales, zeros, w_bit)
    return q.sub_(zeros[..., None]).mul_(scales[..., None]).reshape(w.shape).to(w.dtype)
