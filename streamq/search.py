"""AWQ search for one block (Lin et al., MLSys 2024, sec. 3.2-3.3) as pure functions of
(module, input activations) that return plain records; apply_* replays the records.

Activations arrive as a sequence of chunks of whole calibration samples [b, T, C]. Every
statistic and loss is reduced one sample at a time (in float32, whatever the compute dtype)
and summed over samples in order in float64, and forward passes run on micro-batches of a
fixed number of samples (`micro`; None: the whole chunk, which CPUs allow), so the chunk
sizes change scheduling, never the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .config import QuantConfig
from .gram import gram, gram_sse, row_spans
from .placement import Assembler, compute_device, original, upload
from .quant import dequantize, pseudo_quantize, quant_params, quantize

Chunks = Sequence[torch.Tensor]


@dataclass
class ScaleRecord:
    """Input-channel scales s folded as prev_op /= s, linears *= s (float32, on the host)."""

    prev_op: str
    linears: tuple[str, ...]
    scales: torch.Tensor
    losses: list[float] = field(default_factory=list)  # one per grid point, for inspection
    prev_rows: tuple[int, int] | None = None  # a fused previous linear: only these output rows
    norm_offset: float = 0.0  # a previous norm computing x * (norm_offset + w) (Gemma: 1)
    absorbers: tuple[str, ...] = ()  # unquantized modules reading prev_op (routers): weight * s


def fold_into_prev(t: torch.Tensor, kind: str, record: ScaleRecord) -> None:
    """Divide one tensor of the previous op by s, in place: `kind` is "linear" (a weight's output
    rows, or the rows record.prev_rows of a fused one), "bias", or "norm" (an affine norm's
    weight; with an offset, norm_offset + w becomes (norm_offset + w) / s)."""
    s = record.scales.to(device=t.device, dtype=t.dtype)
    rows = t[record.prev_rows[0]:record.prev_rows[1]] if record.prev_rows else t
    if kind == "linear":
        rows.div_(s.view(-1, 1))
    elif kind == "norm" and record.norm_offset:
        rows.add_(record.norm_offset).div_(s).sub_(record.norm_offset)
    else:
        rows.div_(s)


def fold_into_inputs(t: torch.Tensor, record: ScaleRecord) -> None:
    """Multiply a weight [out, in] by s along its inputs, in place: a scaled linear, or an
    unquantized module reading the previous op's output (record.absorbers)."""
    t.mul_(record.scales.to(device=t.device, dtype=t.dtype).view(1, -1))


@dataclass
class ClipRecord:
    """Per (output channel, group) clipping range: weights clamp to [-max_val, max_val]."""

    linear: str
    max_val: torch.Tensor  # [out, in // group_size], float32, on the host


def run_module(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = module(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def micro_batches(x: torch.Tensor, micro: int | None) -> list[torch.Tensor]:
    """x split into forward passes of `micro` samples (the last may be smaller); None: whole.
    On a GPU, cuBLAS may pick another kernel (split-K) for another batch size, so the bytes
    of a result depend on the batch: a fixed micro-batch keeps them independent of the chunk
    (budget.forward_samples decides it on a GPU, and the plan cuts chunks in multiples of it)."""
    return [x] if micro is None or x.shape[0] <= micro else list(x.split(micro))


def token_count(chunks: Chunks) -> int:
    """Calibration tokens in the chunks ([b, T, C] each)."""
    return sum(c.shape[0] * c.shape[1] for c in chunks)


def act_scale(chunks: Chunks, device: torch.device | None = None) -> torch.Tensor:
    """mean |x| per input channel over every calibration token (float32, host). Each sample is
    reduced on its own in float32 on `device` (default: where each chunk is): the same
    reduction whatever the chunking, and no float64 copy of a chunk (a float64 sum of a half
    tensor materialises one); the per-sample sums are added in float64, in sample order."""
    per_sample = []
    for c in chunks:
        c = upload(c, device or c.device)
        per_sample.append(torch.stack([x.abs().sum(dim=0, dtype=torch.float32) for x in c]).cpu())
    return (torch.cat(per_sample).double().sum(dim=0) / token_count(chunks)).to(torch.float32)


def weight_scale(weights: Iterable[torch.Tensor], group_size: int, device: torch.device) -> torch.Tensor:
    """mean over the output channels of all the weights of |w| / max|w| of its group (the
    duo-scaling statistic): each weight reduced on `device` in float32, one at a time (a parked
    expert's read from the shards alone), the sums added in float64."""
    total, rows = None, 0
    for w in weights:
        w = w.to(device).float()
        g = w.abs().reshape(w.shape[0], -1, group_size)
        g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)
        part = g.reshape(w.shape).sum(dim=0).cpu().double()
        total, rows = (part if total is None else total + part), rows + w.shape[0]
    return (total / rows).to(torch.float32)


def _per_sample_sse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per sample (float32, where the tensors are). Squared in float32:
    in fp16 a difference under 3e-4 squares to 0 and one over 256 to inf, which silently
    changes which scale wins; each sample is one reduction of the same shape whatever the batch."""
    return torch.stack([(o.float() - r.float()).square_().sum() for o, r in zip(out, ref)])


def scaled_pseudo_quantize(w: torch.Tensor, s: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """Q(w * s) / s: the weights a scale-search candidate s computes with."""
    return pseudo_quantize(w * s, qcfg.w_bit, qcfg.group_size, qcfg.zero_point, qcfg.storage_torch_dtype).div_(s)


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int,
                     alpha_one: bool = False, identity: bool = False) -> list[torch.Tensor]:
    """s = mean|x|^alpha (or mean|x|^alpha / mean|w|^(1-alpha) with duo scaling) for alpha in
    {0, 1/n_grid, ...}, clamped at 1e-4 and normalised by sqrt(max s * min s); float32, host.
    identity: with duo scaling, s = 1 (no scaling) comes first, as no alpha gives it."""
    grid = [torch.ones_like(x_mean)] if identity and w_mean is not None else []
    for i in range(n_grid + alpha_one):  # alpha_one: the grid reaches alpha = 1, as later AWQ tools search
        ratio = i / n_grid
        s = x_mean.pow(ratio) if w_mean is None else x_mean.pow(ratio) / w_mean.pow(1 - ratio)
        s = s.clamp(min=1e-4)
        grid.append(s / (s.max() * s.min()).sqrt())
    return grid


Quantizer = Callable[[torch.Tensor, torch.Tensor, QuantConfig], torch.Tensor]


def _set_candidate(linears: list[nn.Linear], originals: list[torch.Tensor | None], s: torch.Tensor | None,
                   qcfg: QuantConfig, scaled_quantize: Quantizer, device: torch.device) -> None:
    """The linears compute with Q(W*s)/s (s on the compute device), or their originals for None:
    a linear on the device gets the new weights now; a parked one (original None: its weight is
    read from the shards) gets them made on the device each time it is loaded (placement.loaded)."""
    s_dev = None if s is None else s.to(device=device, dtype=linears[0].weight.dtype)
    for lin, w in zip(linears, originals):
        if w is None:
            lin.candidate = None if s_dev is None else (lambda v, s_dev=s_dev: scaled_quantize(v, s_dev, qcfg))
        else:
            lin.weight.data = w if s_dev is None else scaled_quantize(w, s_dev, qcfg)


def run_batches(module: nn.Module, x: torch.Tensor, kwargs: dict, micro: int | None):
    """The module's output for each micro-batch of x: at once where the module computes many
    batches together (a sparse MLP whose experts are parked, or its decoder layer, loads each
    expert once), else one at a time."""
    batches = micro_batches(x, micro)
    many = getattr(module, "forward_batches", None)
    if many is not None:
        return many(batches, kwargs)
    return (run_module(module, xm, kwargs) for xm in batches)


def _sse_resident(inspect, linears, originals, x_chunks, kwargs, qcfg, grid, scaled_quantize, micro, device):
    """Per candidate, the per-sample squared errors, candidate by candidate: the references of
    every chunk are computed once and kept where the chunk lives; each candidate is quantized once
    (a parked linear's: once per chunk, as it is loaded)."""
    _set_candidate(linears, originals, None, qcfg, scaled_quantize, device)
    refs = []
    for x in x_chunks:
        ref = Assembler(x.device, x.shape[0])
        for out in run_batches(inspect, upload(x, device), kwargs, micro):
            ref.add(out)
        refs.append(ref.result())
    out = []
    for s in grid:
        _set_candidate(linears, originals, s, qcfg, scaled_quantize, device)
        sse = []
        for x, ref in zip(x_chunks, refs):
            x, ref = upload(x, device), upload(ref, device)
            for y, rm in zip(run_batches(inspect, x, kwargs, micro), micro_batches(ref, micro)):
                sse.append(_per_sample_sse(y, rm))
        out.append(torch.cat(sse))
    return out, sum(r.numel() for r in refs)


def _sse_streamed(inspect, linears, originals, x_chunks, kwargs, qcfg, grid, scaled_quantize, micro, device):
    """The same numbers, chunk by chunk: each chunk is uploaded once, its references are computed
    on the device and every candidate is evaluated on it (and quantized again for each chunk),
    instead of every chunk and its references crossing the bus once per candidate (for OPT-30B's
    fc1 at 128 x 512 tokens, 20 x 4.7 GB). No reference is stored."""
    sse: list[list[torch.Tensor]] = [[] for _ in grid]
    n_elem = 0
    for x in x_chunks:
        x = upload(x, device)
        _set_candidate(linears, originals, None, qcfg, scaled_quantize, device)
        refs = list(run_batches(inspect, x, kwargs, micro))
        n_elem += sum(r.numel() for r in refs)
        for i, s in enumerate(grid):
            _set_candidate(linears, originals, s, qcfg, scaled_quantize, device)
            for y, rm in zip(run_batches(inspect, x, kwargs, micro), refs):
                sse[i].append(_per_sample_sse(y, rm))
        del refs
    return [torch.cat(per_chunk) for per_chunk in sse], n_elem


@torch.no_grad()
def search_scale(
    inspect: nn.Module,
    linears: list[nn.Linear],
    x_chunks: Chunks,
    x_mean: torch.Tensor,
    kwargs: dict,
    qcfg: QuantConfig,
    scaled_quantize: Quantizer = scaled_pseudo_quantize,
    micro: int | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Grid-search alpha for s = mean|x|^alpha (normalised by sqrt(max s * min s)), each
    candidate judged by the MSE of `inspect`'s output with weights Q(W*s)/s against the
    unquantized output. Returns the best s (float32, host) and the loss of every alpha.
    Chunks on the device are searched candidate by candidate. Chunks in host memory are
    searched chunk by chunk when there are at most n_grid of them: each candidate is then
    quantized once per chunk (n_chunks x n_grid times instead of n_grid), which costs less than
    moving every chunk and its references n_grid times while chunks are few and large; with
    more, smaller chunks the transfers are cheaper. Both orders give the same per-sample
    errors, summed in the same order, so the same bytes. Parked linears (a block's experts
    under a tight budget, read from the shards at each use) are not copied: their candidates
    are made as they come to the device."""
    device = compute_device(inspect)
    originals = [None if lin.weight.device != device else lin.weight.data.clone() for lin in linears]
    w_mean = weight_scale((original(lin) for lin in linears), qcfg.group_size, device) if qcfg.duo_scaling else None
    grid = scale_candidates(x_mean, w_mean, qcfg.n_grid, qcfg.alpha_one, qcfg.identity)
    on_host = any(x.device != device for x in x_chunks)
    losses_of = _sse_streamed if on_host and len(x_chunks) <= qcfg.n_grid else _sse_resident
    try:
        sse, n_elem = losses_of(inspect, linears, originals, x_chunks, kwargs, qcfg, grid, scaled_quantize, micro,
                                device)
    finally:
        _set_candidate(linears, originals, None, qcfg, scaled_quantize, device)
    return _best(grid, sse, n_elem)


def _best(grid: list[torch.Tensor], sse: list[torch.Tensor], n_elem: int) -> tuple[torch.Tensor, list[float]]:
    """The candidate of least mean squared error, and every candidate's, from each one's parts of
    the sum of squared errors (one copy to the host per candidate, not per micro-batch: each would
    stall the device; summed there in float64)."""
    losses = [float(e.cpu().double().sum() / n_elem) for e in sse]
    best = min((i for i in range(len(losses)) if losses[i] == losses[i]), key=losses.__getitem__, default=None)
    if best is None:  # every loss was NaN: the block's activations are broken
        raise FloatingPointError(f"scale search found no finite loss: {losses}")
    return grid[best], losses


@torch.no_grad()
def search_scale_gram(
    linear: nn.Linear,
    x_chunks: Chunks,
    x_mean: torch.Tensor,
    qcfg: QuantConfig,
    scaled_quantize: Quantizer = scaled_pseudo_quantize,
) -> tuple[torch.Tensor, list[float]]:
    """search_scale for a group judged on its one linear's own output: the same candidates, each
    judged by ||X Eᵀ||² / (tokens x out) computed from the inputs' Gram matrix (gram.py), which
    equals the output MSE up to float32 rounding (the forward pass rounds its outputs to the
    compute dtype; this does not). G lives where the chunks do: on the device, or in host memory
    streamed block by block for each candidate."""
    device = compute_device(linear)
    w = linear.weight.data.to(device)  # a parked expert's weight is on the device while searched
    w_mean = weight_scale([w], qcfg.group_size, device) if qcfg.duo_scaling else None
    grid = scale_candidates(x_mean, w_mean, qcfg.n_grid, qcfg.alpha_one, qcfg.identity)
    on_host = any(x.device != device for x in x_chunks)
    blocks = gram(x_chunks, device, torch.device("cpu") if on_host else device)
    error = torch.empty(w.shape, dtype=torch.float32, device=device)
    sse = []
    for s in grid:
        s = s.to(device=device, dtype=w.dtype)
        for a, b in row_spans(*w.shape):  # the quantizer works row by row: spans change no bit
            error[a:b] = scaled_quantize(w[a:b], s, qcfg)
            error[a:b].sub_(w[a:b])
        sse.append(gram_sse(error, blocks))
    del error
    return _best(grid, sse, token_count(x_chunks) * w.shape[0])


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
    total = token_count(chunks)
    stride = max(1, total // n_tokens)
    wanted = torch.arange(0, total, stride)[:n_tokens]
    rows, start = [], 0
    for c in chunks:
        flat = c.reshape(-1, c.shape[-1])
        local = wanted[(wanted >= start) & (wanted < start + flat.shape[0])] - start
        rows.append(flat[local.to(flat.device)])
        start += flat.shape[0]
    return torch.cat(rows)


CLIP_MAX_ELEMS = 2**21


def clip_batch_size(out_features: int, in_features: int, max_elems: int = CLIP_MAX_ELEMS) -> int:
    """Output channels per clip-search step, from shapes only: each of the step's [batch, in]
    float32 forms (weights, clipped, quantized, error, its products) stays under max_elems
    elements (8 MiB) whatever the layer."""
    return max(1, min(out_features, max_elems // max(1, in_features)))


def group_gram(x_tok: torch.Tensor, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input group of `weight`, the Gram matrix X_g^T X_g [groups, group, group] (float32, on
    the weight's device) of the sampled tokens x_tok [T, in] as the layer sees them (rounded to
    its dtype): what the clip search judges a candidate's error with."""
    x = x_tok.to(device=weight.device, dtype=weight.dtype).float()
    x = x.reshape(x.shape[0], -1, group_size).transpose(0, 1)
    return torch.bmm(x.transpose(1, 2), x)


@torch.no_grad()
def search_clip(weight: torch.Tensor, x_tok: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """Per (output channel, group) max_val from {max|w| * (1 - i/n_grid)} minimising the MSE
    of the group's contribution to the layer output on the sampled tokens.

    The official code forms the 4-D product (channels x tokens x groups x group_size) and
    subtracts two outputs; here a group's output error over the T tokens, |X_g e|^2 / T for the
    weight error e = Q(clamp(w)) - w, is e G_g e^T / T with G_g = X_g^T X_g, the group's
    [group, group] Gram matrix made once: per candidate group_size instead of T products per
    weight (8x fewer at the default 512 tokens and group 64), no cancellation of two outputs,
    and a working set bounded by clip_batch_size. The CUDA kernel sums the same form. The whole
    search is float32 whatever the compute dtype (candidates, clamping, the quantized weights,
    the error): with the candidates and quantized weights rounded to fp16 it clipped measurably
    worse (SmolLM2, AWQ INT4 g64: docs/benchmarks.md), and fp16 squares would underflow or
    overflow. The chosen max_val is returned in float32; apply_clip rounds it to the weights' dtype."""
    out_features, in_features = weight.shape
    gs = qcfg.group_size
    n_group = in_features // gs
    gram, n_tokens = group_gram(x_tok, weight, gs), x_tok.shape[0]
    batch = clip_batch_size(out_features, in_features)
    best = []
    for start in range(0, out_features, batch):
        w = weight[start:start + batch].float()  # exact: half values are float32 values
        wg = w.reshape(w.shape[0], n_group, gs)
        org_max = wg.abs().amax(dim=-1)  # [b, G]
        best_max = org_max.clone()
        min_err = torch.full(org_max.shape, float("inf"), device=w.device)
        for i in range(int(qcfg.max_shrink * qcfg.n_grid)):
            max_val = org_max * (1 - i / qcfg.n_grid)
            clipped = torch.clamp(wg, -max_val[..., None], max_val[..., None]).reshape(w.shape)
            e = pseudo_quantize(clipped, qcfg.w_bit, gs, qcfg.zero_point, qcfg.storage_torch_dtype).reshape(wg.shape) - wg
            e = e.transpose(0, 1)  # [G, b, gs]
            err = (torch.bmm(e, gram) * e).sum(dim=-1).t() / n_tokens  # [b, G]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best.append(best_max.cpu())
    return torch.cat(best)


def check_foldable(block: nn.Module, record: ScaleRecord) -> None:
    """The previous op must absorb 1/s: a linear (its rows, or the rows prev_rows of a fused
    one) or an affine norm (its weight), as many channels as s has."""
    prev = block.get_submodule(record.prev_op)
    if not isinstance(prev, nn.Linear) and (getattr(prev, "weight", None) is None or prev.weight.dim() != 1):
        raise ValueError(f"cannot fold scales into {record.prev_op} ({type(prev).__name__})")
    a, b = record.prev_rows or (0, prev.weight.shape[0])
    if b - a != record.scales.numel() or b > prev.weight.shape[0]:
        raise ValueError(f"cannot fold {record.scales.numel()} scales into rows {a}:{b} of {record.prev_op} "
                         f"({prev.weight.shape[0]} outputs)")
    for name in record.absorbers:
        weight = getattr(block.get_submodule(name), "weight", None)
        if weight is None or weight.dim() != 2 or weight.shape[1] != record.scales.numel():
            raise ValueError(f"{name} cannot absorb {record.scales.numel()} input scales")


@torch.no_grad()
def apply_scale(block: nn.Module, record: ScaleRecord) -> None:
    """Fold s into the previous op (its output divided by s) and the linears (inputs * s)."""
    check_foldable(block, record)
    prev = block.get_submodule(record.prev_op)
    fold_into_prev(prev.weight.data, "linear" if isinstance(prev, nn.Linear) else "norm", record)
    if getattr(prev, "bias", None) is not None:
        fold_into_prev(prev.bias.data, "bias", record)
    for name in record.linears + record.absorbers:
        fold_into_inputs(block.get_submodule(name).weight.data, record)


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
    scales, zeros = quant_params(masked, qcfg.w_bit, qcfg.group_size, qcfg.zero_point, qcfg.storage_torch_dtype)
    out = dequantize(quantize(masked, scales, zeros, qcfg.w_bit), scales, zeros, w.dtype)
    out[:, salient] = w[:, salient]
    return out
