"""Plans how one block's calibration work fits a memory budget: how many whole samples per
chunk, how many per forward pass, and whether the block's activations stay on the device or
stream from pinned host memory.

The figures are estimates from the block's shapes, counting every tensor the block's
quantization holds at once (tools/gpu_check.py and tests/test_budget.py measure them); the
engine records the measured peaks (torch.cuda.max_memory_allocated, peak RSS) beside them in
streamq.json."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn

from . import gram, search
from .errors import SettingsError

MAX_CHUNK_SAMPLES = 64  # beyond this, larger chunks buy no speed and only cost memory
SLACK_BYTES = 256 * 2**20  # cuBLAS workspaces, the allocator's rounding, small tensors
FLOAT32 = 4


@dataclass(frozen=True)
class Plan:
    chunk_samples: int  # samples per chunk: the unit activations are stored and moved in
    activations_on_device: bool
    estimated_peak_bytes: int
    minimum_bytes: int  # the smallest budget any plan fits in
    forward_samples: int | None = None  # samples per forward pass; None: a whole chunk
    experts_parked: bool = False  # a mixture's routed experts wait in host memory, one on the device at a time

    def to_json(self) -> dict:
        return asdict(self)


PASS_TOKENS = 4096  # a GPU's forward pass: this many tokens make its products large enough to run near peak
PASS_BYTES = 2**28  # and one pass's intermediates under this: wide models keep a small smallest budget


def forward_samples(device: torch.device, shape: "BlockShape", n_samples: int, seqlen: int,
                    elem_bytes: int) -> int | None:
    """Samples per forward pass. On a GPU a fixed number decided by the model and its calibration
    shape, never by the budget: cuBLAS chooses its kernels (split-K among them) by the product's
    shape, so a batch size that followed the budget would let the budget change the output's last
    bits. The largest power of two (so it divides the reference's chunks of 16) with at most
    PASS_TOKENS tokens, intermediates under PASS_BYTES, and no more than the samples there are;
    the plan then cuts chunks in multiples of it, so every pass but the last of all has this
    shape whatever the budget. On a CPU the whole chunk: its products give bit-identical rows for
    any whole number of samples (tested), and larger products run faster there; but not in a
    block with routed experts, where an expert's product has as many rows as tokens were routed
    to it in the pass, and a CPU's GEMM does not give every row count the same bits (a Mixtral
    block chunked by 4 and by 1 differed in the last bit of one scale): there too the passes
    have the fixed size."""
    if device.type != "cuda" and not shape.parkable_elems:
        return None
    per = forward_bytes(shape, seqlen, elem_bytes)
    f = 1
    while 2 * f * seqlen <= PASS_TOKENS and 2 * f * per <= PASS_BYTES and 2 * f <= n_samples:
        f *= 2
    return f


def forward_bytes(shape: "BlockShape", seqlen: int, elem_bytes: int) -> int:
    """One sample's intermediates in a forward pass of the block."""
    return seqlen * elem_bytes * (4 * shape.widest + 6 * shape.hidden)


def chunk_sizes(n_samples: int, cap: int, micro: int | None) -> list[int]:
    """The chunk sizes a plan may choose, smallest first: with forward passes of `micro` samples,
    multiples of it (or every sample at once), so the passes fall on the same samples whatever
    the chunk."""
    sizes = range(1, min(n_samples, cap) + 1)
    return [c for c in sizes if micro is None or c % micro == 0 or c == n_samples]


@dataclass(frozen=True)
class BlockShape:
    """Element counts of one block's tensors and activation widths (no dtype)."""

    weight_elems: int  # all parameters
    largest_linear: int  # elements of the largest weight matrix
    largest_group: int  # elements of the largest scale group's weights (cloned during its search)
    hidden: int
    widest: int  # the widest activation inside the block (ffn width, or 3 x hidden for qkv)
    captured_width: int  # sum of the widths of the captured linear inputs
    ref_width: int  # the widest search reference: the output of a group's inspected module
    clip_bytes: int  # the clip search's working set for its largest linear (4-byte compute: a bound)
    # GPTQ of the largest set of linears sharing a Hessian: it in four forms, their float32 weights, codes
    gptq_bytes: int = 0
    parkable_elems: int = 0  # parameters of the modules that may wait in host memory (routed experts)
    largest_parkable: int = 0  # parameters of the largest such module (one expert)
    resident_group: int = 0  # elements of the largest group's weights cloned on the device when parked
    # a Gram-matrix search (gram.py) of the largest such group, beside its linear's weights: G whole
    # on the device, or one block of it at a time when G waits in host memory; and G's size
    gram_device_bytes: int = 0
    gram_streamed_bytes: int = 0
    gram_bytes: int = 0

    @classmethod
    def of(cls, block: nn.Module, captured: Iterable[str], groups: Iterable, group_size: int,
           clip_tokens: int, gram_loss: bool = True) -> "BlockShape":
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        # the block's input width: the most common input width of its linears (q/k/v, gate/up, the
        # experts' read it; the smallest would be MLA's latent rank, 512 in DeepSeek-V3 against 7168)
        widths = [m.in_features for m in linears.values()]
        hidden = max(set(widths), key=widths.count)
        groups = list(groups)
        parkable = [(n, sum(p.numel() for p in m.parameters())) for n, m in block.named_modules()
                    if getattr(m, "parkable", False)]

        def parked(name: str) -> bool:
            return any(name.startswith(f"{p}.") for p, _ in parkable)

        def out_width(name: str) -> int:
            module = block.get_submodule(name)
            return module.out_features if isinstance(module, nn.Linear) else hidden

        def captured_width(name: str) -> int:
            # a linear's input; a routed one (an expert's) holds its share of the tokens, which
            # over all experts is exactly top-k of every token; a module's (a sparse MLP): hidden
            if name not in linears:
                return hidden
            m = linears[name]
            return math.ceil(m.in_features * getattr(m, "routed_fraction", 1.0))

        def clip_bytes(m: nn.Linear) -> int:
            # the sampled tokens (as captured, divided by the scales, in float32), the groups'
            # Gram matrices, and per batch of output channels eight [batch, in] float32 forms
            # (the weights' copy, clipped, quantized in float32 and back, the error and its
            # transpose, its product with the Gram matrices and the one with the error)
            batch = search.clip_batch_size(m.out_features, m.in_features)
            return clip_tokens * m.in_features * 12 + m.in_features * group_size * FLOAT32 + batch * m.in_features * 32

        own = [linears[g.inspect] for g in groups if gram_loss and g.own_output]
        # GPTQ rounds the linears of one Hessian together (q/k/v; gate/up; one expert's): a
        # group's linears under one parent, their weights stacked beside the one being folded
        gptq_sets = [[m] for m in linears.values()]
        for g in groups:
            parents: dict[str, list[nn.Linear]] = {}
            for n in g.linears:
                parents.setdefault(n.rpartition(".")[0], []).append(linears[n])
            gptq_sets += list(parents.values())
        return cls(
            gram_device_bytes=max([gram.work_bytes(*m.weight.shape, True) for m in own] or [0]),
            gram_streamed_bytes=max([gram.work_bytes(*m.weight.shape, False) for m in own] or [0]),
            gram_bytes=max([gram.gram_bytes(m.in_features) for m in own] or [0]),
            weight_elems=sum(p.numel() for p in block.parameters()),
            largest_linear=max(m.weight.numel() for m in linears.values()),
            largest_group=max([sum(linears[n].weight.numel() for n in g.linears) for g in groups] or [0]),
            hidden=hidden,
            widest=max(max(m.out_features for m in linears.values()), 3 * hidden),
            captured_width=sum(captured_width(n) for n in captured),
            ref_width=max([out_width(g.inspect) for g in groups] or [hidden]),
            clip_bytes=max(clip_bytes(m) for m in linears.values()),
            # its Hessian in four forms, the set's float32 weights twice (a folded weight being
            # written into the set; under act-order the permuted copy) and its codes
            gptq_bytes=max(4 * ms[0].in_features ** 2 * FLOAT32 + sum(m.weight.numel() for m in ms) * (2 * FLOAT32 + 1)
                           for ms in gptq_sets),
            parkable_elems=sum(n for _, n in parkable),
            largest_parkable=max([n for _, n in parkable] or [0]),
            resident_group=max([sum(linears[n].weight.numel() for n in g.linears if not parked(n)) for g in groups]
                               or [0]),
        )


def resident_bytes(shape: BlockShape, seqlen: int, elem_bytes: int) -> int:
    """Per sample, kept for the whole block: its input, output, captured linear inputs, and the
    references of the group being searched."""
    return seqlen * elem_bytes * (2 * shape.hidden + shape.captured_width + shape.ref_width)


PROCESS_BYTES = 400 * 2**20  # torch, transformers, streamq: a tiny CPU run's RSS is ~360 MiB
# what CUDA's context and libraries add to a process's RSS: 1.26-1.31 GiB measured on an H200
# (peak RSS of roomy runs less this estimate without it, docs/benchmarks.md)
CUDA_PROCESS_BYTES = 1280 * 2**20


def host_bytes(shape: BlockShape, plan: Plan, n_samples: int, seqlen: int, elem_bytes: int,
               source_elem_bytes: int, cuda: bool = False) -> int:
    """The host memory a run is expected to reach (an estimate, set beside the measured peak
    RSS in streamq.json): the process itself, one block's weights read from the shards (with
    its experts parked: all but the experts, and one expert being read), every sample's
    activations where they live on the host (with a Gram-matrix search's G). Parked experts are
    read from the shards each time they are used, never held. Not counted: pinned buffers'
    rounding to powers of two, which the measured runs put at 27-39 % of streamed activations
    on a GPU."""
    streamed = n_samples * resident_bytes(shape, seqlen, elem_bytes) + shape.gram_bytes  # G beside them
    activations = 0 if plan.activations_on_device else streamed
    read = shape.weight_elems - (shape.parkable_elems - shape.largest_parkable if plan.experts_parked else 0)
    base = PROCESS_BYTES + (CUDA_PROCESS_BYTES if cuda else 0)
    return base + read * source_elem_bytes + activations


def parked_reads(plan: Plan, n_samples: int, n_grid: int) -> int:
    """How many times a block's parked experts are read from the shards and cross to the
    device: once per chunk to capture the inputs, once per chunk for the norm group's references
    and once per chunk and candidate in its search, and about three more times (the expert's own
    group, clip and packing, the finiteness check); 0 when nothing is parked."""
    if not plan.experts_parked:
        return 0
    chunks = -(-n_samples // plan.chunk_samples)
    return (n_grid + 2) * chunks + 3


def plan_block(shape: BlockShape, n_samples: int, seqlen: int, elem_bytes: int,
               budget: int | None, default_chunk: int = 16, micro: int | None = None, gptq: bool = False,
               twin: bool = False, park: bool | None = None, resident: bool | None = None) -> Plan:
    """The largest chunk (in whole samples) that fits the budget, activations on the device
    if they fit there with at least one sample per chunk, else streamed from the host;
    `micro` samples per forward pass (None: the whole chunk); `twin`: a quantized copy of the block
    runs the calibration again (--next-input quantized). A block with routed experts that does
    not fit whole parks its experts in host memory, one on the device at a time (`park`: None
    decides so, True always, False never). `resident` likewise for the activations: True only on
    the device, False only streamed (a model with several kinds of blocks keeps them in one place
    for all), None whichever fits; the smallest budget is that of the places allowed."""
    e = elem_bytes
    L = shape.largest_linear
    # the largest of: a candidate being made (w * s, the quantizer's float32 codes, the result),
    # the clip search beside its linear's folded float32 weight, the output of the largest
    # linear (its folded float32 weight turned into codes in place, uint8 codes and their
    # transpose, int64 words and their temporaries), or with GPTQ its Hessian and inverse factor
    # beside the weight, or the quantized copy of the block's weights on the device
    # or the Gram-matrix search (G whole where the activations stay on the device)
    def transient(device_weights: int, gram_bytes: int) -> int:
        return max(2 * L * e + L * FLOAT32, shape.clip_bytes + L * FLOAT32, 7 * L, shape.gptq_bytes if gptq else 0,
                   device_weights * e if twin else 0, gram_bytes)

    # whole: the block's weights and, during a group's search, the group's originals; parked:
    # the weights but the experts', the originals of the group's linears that are not parked, one
    # expert loaded and the originals of its own group
    whole = shape.weight_elems * e + shape.largest_group * e + SLACK_BYTES
    kept = shape.weight_elems - shape.parkable_elems
    parked = kept * e + shape.resident_group * e + 2 * shape.largest_parkable * e + SLACK_BYTES
    sample = resident_bytes(shape, seqlen, e)  # one sample's activations kept for the block
    # per sample in one forward pass: the block's intermediates; and one sample's error in float32
    per_forward = forward_bytes(shape, seqlen, e)
    loss = 3 * seqlen * shape.ref_width * FLOAT32
    # parked experts come to the device once for all the forward passes of a chunk: the sparse
    # MLP's inputs and outputs of the whole chunk are then held together, and while the block's
    # inputs are captured, the residuals too (and the routes: 64 bytes a token bound them)
    batch_out = seqlen * (3 * shape.hidden * e + 64)

    def peaks(fixed: int, device_weights: int, per_chunk: int):
        def on_device(c: int) -> int:
            return (fixed + transient(device_weights, shape.gram_device_bytes) + n_samples * sample
                    + (micro or c) * per_forward + loss + c * per_chunk)

        def streamed(c: int) -> int:
            return (fixed + transient(device_weights, shape.gram_streamed_bytes) + 2 * c * sample
                    + (micro or c) * per_forward + loss + c * per_chunk)
        return on_device, streamed

    options = []
    if park is not True or not shape.parkable_elems:
        options.append((False, *peaks(whole, shape.weight_elems, 0)))
    if park is not False and shape.parkable_elems:
        options.append((True, *peaks(parked, kept, batch_out)))
    sizes = chunk_sizes(n_samples, MAX_CHUNK_SAMPLES, micro)
    # the smallest chunk streamed, or kept on the device where that costs less (a chunk of fixed
    # forward passes may hold half the samples or more)
    def smallest(on_device, streamed) -> int:  # the smallest chunk in the places allowed
        if resident is None:
            return min(on_device(sizes[0]), streamed(sizes[0]))
        return (on_device if resident else streamed)(sizes[0])
    minimum = min(smallest(on_device, streamed) for _, on_device, streamed in options)
    if budget is None:
        c = max(k for k in chunk_sizes(n_samples, default_chunk, micro) + sizes[:1])
        parks, _, streamed = options[0]
        return Plan(c, False, streamed(c), minimum, micro, parks)
    for parks, on_device, streamed in options:  # the whole block first: parking costs transfers
        if resident is not False and on_device(sizes[0]) <= budget:
            c = max(k for k in sizes if on_device(k) <= budget)
            return Plan(c, True, on_device(c), minimum, micro, parks)
        if resident is not True and streamed(sizes[0]) <= budget:
            c = max(k for k in sizes if streamed(k) <= budget)
            return Plan(c, False, streamed(c), minimum, micro, parks)
    weights = f"its weights of {format_bytes(shape.weight_elems * e)}"
    if shape.parkable_elems:
        weights = (f"its weights without the routed experts, {format_bytes(kept * e)}, and one expert of "
                   f"{format_bytes(shape.largest_parkable * e)} at a time")
    raise SettingsError(
        f"--max-gpu-mem {format_bytes(budget)} is too small: one block needs at least "
        f"{format_bytes(minimum, up=True)} ({weights}, the search's copies of its largest linears, and "
        f"{'one calibration sample' if sizes[0] == 1 else f'{sizes[0]} calibration samples'} of {seqlen} tokens in flight)"
    )


def format_bytes(n: float, up: bool = False) -> str:
    """n bytes in the largest binary unit that keeps it above 1, two decimals; `up` rounds up,
    so a smallest budget named in a message fits when it is copied back as --max-gpu-mem."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if up else round(n)}{unit}"
            return f"{math.ceil(n * 100) / 100 if up else n:.2f}{unit}"
        n /= 1024
    return f"{n}"
