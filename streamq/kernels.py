"""Which implementation runs the hot loops: the PyTorch reference, or the fused CUDA kernels of
cuda/streamq_kernels.cu, compiled on first use with torch's extension builder and cached.

The kernels are used only on a CUDA device, only when they build, and (under `auto`) only after
a self-check on small random inputs agrees with the PyTorch path; anything else falls back to
PyTorch, which stays the reference.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import QuantConfig
from .errors import SettingsError, StreamqError
from .formats.awq import dequantize_gemm, pack_gemm
from .quant import pseudo_quantize
from .search import group_gram, scaled_pseudo_quantize, search_clip

KERNEL_MODES = ("auto", "torch", "cuda")
SOURCE = Path(__file__).resolve().parent.parent / "cuda" / "streamq_kernels.cu"
CLIP_MAX_GROUP = 128  # the clip kernel keeps a group's Gram matrix (group^2 floats) in shared memory


class KernelError(StreamqError):
    """--kernels cuda was asked for and the kernels cannot be used."""


@dataclass(frozen=True)
class Ops:
    """The three hot loops, each with the PyTorch functions' signatures and results."""

    name: str
    scaled_pseudo_quantize: Callable[[torch.Tensor, torch.Tensor, QuantConfig], torch.Tensor]
    search_clip: Callable[[torch.Tensor, torch.Tensor, QuantConfig], torch.Tensor]
    dequantize_gemm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


TORCH = Ops("torch", scaled_pseudo_quantize, search_clip, dequantize_gemm)


def build(verbose: bool = False) -> Any:
    """Compile (or load from the cache) the extension module; raises what the builder raises."""
    from torch.utils.cpp_extension import load

    from .assets import cache_dir

    if not SOURCE.is_file():
        raise FileNotFoundError(f"{SOURCE} is not there (streamq installed without its cuda/ folder)")
    build_dir = cache_dir() / "kernels" / f"torch-{torch.__version__}-cuda-{torch.version.cuda}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load("streamq_kernels", [str(SOURCE)], build_directory=str(build_dir),
                extra_cuda_cflags=["-O3"], verbose=verbose)


def cuda_ops(ext: Any) -> Ops:
    # the kernels round scales to fp16 (the AWQ format's); bf16 scales (compressed-tensors output
    # of a bf16 model) take the PyTorch path, which rounds them as the format stores them
    def scaled(w: torch.Tensor, s: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
        if qcfg.storage_dtype != "float16":
            return scaled_pseudo_quantize(w, s, qcfg)
        return ext.scaled_pseudo_quantize(w.contiguous(), s.contiguous(), qcfg.w_bit, qcfg.group_size,
                                          qcfg.zero_point)

    def clip(weight: torch.Tensor, x_tok: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
        gs = qcfg.group_size
        if gs % 32 or gs > CLIP_MAX_GROUP or qcfg.storage_dtype != "float16":
            return search_clip(weight, x_tok, qcfg)
        # the output error of a group error e is e^T (X^T X) e / tokens, as the reference judges it
        gram = group_gram(x_tok, weight, gs).contiguous()
        best = ext.clip_search(weight.contiguous(), gram, qcfg.w_bit, gs, qcfg.zero_point, qcfg.n_grid,
                               int(qcfg.max_shrink * qcfg.n_grid), x_tok.shape[0])
        return best.cpu()

    def dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if not qweight.is_cuda:
            return dequantize_gemm(qweight, qzeros, scales)
        return ext.dequantize_gemm(qweight.contiguous(), qzeros.contiguous(), scales.to(torch.float16).contiguous())

    return Ops("cuda", scaled, clip, dequant)


NEAR_TIE = 1e-3  # a clip pick may differ from the reference's only where their exact errors are this close


def clip_error(w: torch.Tensor, x: torch.Tensor, max_val: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """Exact (float64, host) output MSE per (output channel, group) of clipping w at max_val and
    quantizing in float32, as the clip search judges a candidate; x as the layer sees it."""
    gs = qcfg.group_size
    x = x.to(w.dtype)
    w = w.float()
    wg = w.reshape(w.shape[0], -1, gs)
    m = max_val.to(device=w.device, dtype=w.dtype)[..., None]
    q = pseudo_quantize(torch.clamp(wg, -m, m).reshape(w.shape), qcfg.w_bit, gs, qcfg.zero_point,
                        qcfg.storage_torch_dtype)
    e = (q.double() - w.double()).cpu().reshape(w.shape[0], -1, gs)
    xg = x.double().cpu().reshape(x.shape[0], -1, gs)
    return torch.einsum("tgk,ogk->tog", xg, e).pow(2).mean(dim=0)


def self_check(ops: Ops, device: torch.device, dtype: torch.dtype = torch.float16) -> str | None:
    """Compare the kernels with the PyTorch path on small random inputs with ragged shapes, in
    the dtype the run computes in; None when they agree, else what differed. Pseudo-quantized
    and dequantized weights must be bit-identical; a clip pick may differ only at a near-tie
    (both sum e^T (X^T X) e in float32, the kernel in another order),
    where the exact errors of the two picks are within NEAR_TIE of each other."""
    g = torch.Generator(device="cpu").manual_seed(0)
    for w_bit, gs, rows, cols in ((4, 128, 37, 384), (3, 64, 5, 192)):
        qcfg = QuantConfig(w_bit=w_bit, group_size=gs)
        w = (torch.randn(rows, cols, generator=g) * 0.05).to(device=device, dtype=dtype)
        s = (torch.rand(cols, generator=g) + 0.5).to(device=device, dtype=dtype)
        if not torch.equal(ops.scaled_pseudo_quantize(w, s, qcfg), TORCH.scaled_pseudo_quantize(w, s, qcfg)):
            return f"scaled_pseudo_quantize differs ({dtype}, w_bit {w_bit}, group {gs})"
        # the engine clip-searches the folded float32 weights on inputs of the compute dtype
        x = torch.randn(96, cols, generator=g).to(device=device, dtype=dtype)
        got, want = ops.search_clip(w.float(), x, qcfg), TORCH.search_clip(w.float(), x, qcfg)
        differ = got != want
        if differ.any():
            err_got, err_want = clip_error(w, x, got, qcfg), clip_error(w, x, want, qcfg)
            worse = (err_got > err_want * (1 + NEAR_TIE) + 1e-30) & differ
            if worse.any():
                return (f"search_clip picks differ beyond near-ties on {int(worse.sum())} of {differ.numel()} groups "
                        f"({dtype}, w_bit {w_bit}, group {gs}; worst exact error ratio "
                        f"{float((err_got / err_want.clamp(min=1e-30))[worse].max()):.4f})")
    codes = torch.randint(0, 16, (256, 64), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (2, 64), generator=g, dtype=torch.uint8)
    scales = (torch.rand(2, 64, generator=g) * 0.01).half()
    packed = [t.to(device) for t in (pack_gemm(codes), pack_gemm(zeros), scales)]
    if not torch.equal(ops.dequantize_gemm(*packed), TORCH.dequantize_gemm(*packed)):
        return "dequantize_gemm differs"
    return None


@functools.lru_cache(maxsize=None)
def select(mode: str, device: torch.device, dtype: torch.dtype = torch.float16) -> tuple[Ops, str]:
    """The ops for this run (computing in `dtype`) and a one-line account of the choice."""
    if mode not in KERNEL_MODES:
        raise SettingsError(f"--kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    if mode == "torch":
        return TORCH, "kernels: torch (--kernels torch)"
    if device.type != "cuda":
        if mode == "cuda":
            raise SettingsError(f"--kernels cuda needs a CUDA device; this run is on {device}")
        return TORCH, f"kernels: torch (no CUDA device: {device})"
    start = time.time()
    try:
        ops = cuda_ops(build(verbose=os.environ.get("STREAMQ_KERNELS_VERBOSE") == "1"))
        problem = self_check(ops, device, dtype)
    except Exception as exc:  # a missing compiler, a failed build or launch: fall back, say why
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if mode == "cuda":
            raise KernelError(f"the CUDA kernels cannot be used: {reason}") from None
        return TORCH, f"kernels: torch (the CUDA kernels could not be built or run: {reason[:200]})"
    if problem is not None:
        if mode == "cuda":
            raise KernelError(f"the CUDA kernels failed their self-check: {problem}")
        return TORCH, f"kernels: torch (the CUDA kernels failed their self-check: {problem})"
    return ops, f"kernels: cuda (cuda/streamq_kernels.cu, ready in {time.time() - start:.1f} s)"
