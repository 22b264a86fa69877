"""AWQ search for one block (Lin et al., MLSys 2024, sec. 3.2-3.3) as pure functions of
(module, input activations) that return plain records; apply_* replays the records.

Activations arrive as a sequence of chunks of whole calibration samples [b, T, C]. Every
statistic and loss is reduced per sample first and summed over samples in order, in
float64, so the chunk sizes change scheduling, never the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .config import QuantConfig
from .quant import dequantize, pseudo_quantize, quant_params, quantize

Chunks = Sequence[torch.Tensor]


@dataclass
class ScaleRecord:
    """Input-channel scales s folded as prev_op /= s, linears *= s (float32, on the host)."""

    prev_op: str
    linears: tuple[str, ...]
    scales: torch.Tensor
    losses: list[float] = field(default_factory=list)  # one per grid point, for inspection


@dataclass
class ClipRecord:
    """Per (output channel, group) clipping range: weights clamp to [-max_val, max_val]."""

    linear: str
    max_val: torch.Tensor  # [out, in // group_size], float32, on the host


def run_module(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = module(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def act_scale(chunks: Chunks, device: torch.device | None = None) -> torch.Tensor:
    """mean |x| per input channel over every calibration token (float32, host). Reduced on
    `device` (default: where each chunk is), so the result does not depend on where
    activations are stored."""
    per_sample = torch.cat([c.to(device or c.device).abs().sum(dim=1, dtype=torch.float64).cpu() for c in chunks])
    n_tokens = sum(c.shape[0] * c.shape[1] for c in chunks)
    return (per_sample.sum(dim=0) / n_tokens).to(torch.float32)


def weight_scale(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """mean over output channels of |w| / max|w| of its group (the duo-scaling statistic)."""
    w = torch.cat(weights, dim=0).float()
    g = w.abs().reshape(w.shape[0], -1, group_size)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(w.shape).mean(dim=0).cpu()


def _per_sample_sse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    d = out - ref
    return (d * d).reshape(d.shape[0], -1).sum(dim=1, dtype=torch.float64).cpu()


def scaled_pseudo_quantize(w: torch.Tensor, s: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """Q(w * s) / s: the weights a scale-search candidate s computes with."""
    return pseudo_quantize(w * s, qcfg.w_bit, qcfg.group_size, qcfg.zero_point).div_(s)


@torch.no_grad()
def search_scale(
    inspect: nn.Module,
    linears: list[nn.Linear],
    x_chunks: Chunks,
    x_mean: torch.Tensor,
    kwargs: dict,
    qcfg: QuantConfig,
    scaled_quantize: Callable[[torch.Tensor, torch.Tensor, QuantConfig], torch.Tensor] = scaled_pseudo_quantize,
) -> tuple[torch.Tensor, list[float]]:
    """Grid-search alpha for s = mean|x|^alpha (normalised by sqrt(max s * min s)), each
    candidate judged by the MSE of `inspect`'s output with weights Q(W*s)/s against the
    unquantized output. Returns the best s (float32, host) and the loss of every alpha."""
    device = linears[0].weight.device
    originals = [lin.weight.data.clone() for lin in linears]
    # references stay where their chunk lives (the device, or host memory when streaming)
    refs = [run_module(inspect, x.to(device), kwargs).to(x.device) for x in x_chunks]
    n_elem = sum(r.numel() for r in refs)
    w_mean = weight_scale(originals, qcfg.group_size) if qcfg.duo_scaling else None
    losses: list[float] = []
    best_loss, best_s = float("inf"), None
    for i in range(qcfg.n_grid):
        ratio = i / qcfg.n_grid
        s = x_mean.pow(ratio) if w_mean is None else x_mean.pow(ratio) / w_mean.pow(1 - ratio)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s_dev = s.to(device=device, dtype=originals[0].dtype)
        for lin, w in zip(linears, originals):
            lin.weight.data = scaled_quantize(w, s_dev, qcfg)
        sse = torch.cat([_per_sample_sse(run_module(inspect, x.to(device), kwargs), ref.to(device))
                         for x, ref in zip(x_chunks, refs)])
        loss = float(sse.sum() / n_elem)
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_s = loss, s
    for lin, w in zip(linears, originals):
        lin.weight.data = w
    if best_s is None:  # every loss was NaN: the block's activations are broken
        raise FloatingPointError(f"scale search found no finite loss: {losses}")
    return best_s, losses


def salient_channels(x_mean: torch.Tensor, frac: float) -> torch.Tensor:
    """Indices of the top `frac` input channels by mean |x| (at least one), sorted."""
    k = max(1, round(frac * x_mean.numel()))
    return torch.topk(x_mean, k).indices.sort().values


def fixed_scale(x_mean: torch.Tensor, frac: float, value: float = 2.0) -> torch.Tensor:
    """The paper's ablation: s = value on the salient channels, 1 elsewhere."""
    s = torch.ones_like(x_mean)
    s[salient_channels(x_mean, frac)] = value
    return s


def sample_tokens(chunks: Chunks, n_tokens: int) -> torch.Tensor:
    """About n_tokens rows [n, C] taken at a fixed stride over all calibration tokens."""
    total = sum(c.shape[0] * c.shape[1] for c in chunks)
    stride = max(1, total // n_tokens)
    wanted = torch.arange(0, total, stride)[:n_tokens]
    rows, start = [], 0
    for c in chunks:
        flat = c.reshape(-1, c.shape[-1])
        local = wanted[(wanted >= start) & (wanted < start + flat.shape[0])] - start
        rows.append(flat[local.to(flat.device)])
        start += flat.shape[0]
    return torch.cat(rows)


CLIP_MAX_ELEMS = 2**24


def clip_batch_size(out_features: int, n_group: int, n_tokens: int, max_elems: int = CLIP_MAX_ELEMS) -> int:
    """Output channels per clip-search step, from shapes only: the [groups, tokens, batch]
    products stay under max_elems elements (64 MiB in float32) whatever the layer."""
    return max(1, min(out_features, max_elems // max(1, n_group * n_tokens)))


@torch.no_grad()
def search_clip(weight: torch.Tensor, x_tok: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """Per (output channel, group) max_val from {max|w| * (1 - i/n_grid)} minimising the MSE
    of the group's contribution to the layer output on the sampled tokens.

    The official code forms the 4-D product (channels x tokens x groups x group_size); here
    each group's contribution is a batched matmul [groups, tokens, group] x [groups, group,
    batch], so the working set is bounded by clip_batch_size, not by the layer."""
    out_features, in_features = weight.shape
    gs = qcfg.group_size
    n_group = in_features // gs
    x = x_tok.to(device=weight.device, dtype=weight.dtype).reshape(-1, n_group, gs).transpose(0, 1)  # [G, t, gs]
    batch = clip_batch_size(out_features, n_group, x.shape[1])
    best = []
    for start in range(0, out_features, batch):
        w = weight[start:start + batch]
        wg = w.reshape(w.shape[0], n_group, gs)
        ref = torch.bmm(x, wg.permute(1, 2, 0))  # [G, t, b]
        org_max = wg.abs().amax(dim=-1)  # [b, G]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(qcfg.max_shrink * qcfg.n_grid)):
            max_val = org_max * (1 - i / qcfg.n_grid)
            clipped = torch.clamp(wg, -max_val[..., None], max_val[..., None]).reshape(w.shape)
            q = pseudo_quantize(clipped, qcfg.w_bit, gs, qcfg.zero_point).reshape(wg.shape)
            err = (torch.bmm(x, q.permute(1, 2, 0)) - ref).pow(2).mean(dim=1).t()  # [b, G]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best.append(best_max.float().cpu())
    return torch.cat(best)


@torch.no_grad()
def apply_scale(block: nn.Module, record: ScaleRecord) -> None:
    """Fold s into the previous op (its output divided by s) and the linears (inputs * s)."""
    prev = block.get_submodule(record.prev_op)
    device, dtype = prev.weight.device, prev.weight.dtype
    s = record.scales.to(device=device, dtype=dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1))
    elif prev.weight is not None and prev.weight.dim() == 1:  # LayerNorm / RMSNorm affine
        prev.weight.div_(s)
    else:
        raise ValueError(f"cannot fold scales into {record.prev_op} ({type(prev).__name__})")
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for name in record.linears:
        block.get_submodule(name).weight.mul_(s.view(1, -1))


@torch.no_grad()
def apply_clip(block: nn.Module, record: ClipRecord) -> None:
    linear = block.get_submodule(record.linear)
    w = linear.weight
    g = w.data.reshape(w.shape[0], record.max_val.shape[1], -1)
    max_val = record.max_val.to(device=w.device, dtype=w.dtype)[..., None]
    w.data = torch.clamp(g, -max_val, max_val).reshape(w.shape)


def keep_salient_quantize(
    w: torch.Tensor, salient: torch.Tensor, qcfg: QuantConfig
) -> torch.Tensor:
    """The `keep1` ablation: salient input channels stay as they are, the rest are RTN
    pseudo-quantized with group ranges computed as if the salient weights were zero."""
    masked = w.clone()
    masked[:, salient] = 0
    scales, zeros = quant_params(masked, qcfg.w_bit, qcfg.group_size, qcfg.zero_point)
    out = dequantize(quantize(masked, scales, zeros, qcfg.w_bit), scales, zeros, w.dtype)
    out[:, salient] = w[:, salient]
    return out
