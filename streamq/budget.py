"""Plans how one block's calibration work fits a memory budget: how many whole samples per
chunk, and whether the block's activations stay on the device or stream from host memory.

The figures are estimates from the block's shapes; the engine records the measured peaks
(torch.cuda.max_memory_allocated, peak RSS) next to them in streamq.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .errors import SettingsError
from .search import CLIP_MAX_ELEMS

MAX_CHUNK_SAMPLES = 64  # beyond this, larger chunks buy no speed and only cost memory


@dataclass(frozen=True)
class Plan:
    chunk_samples: int
    activations_on_device: bool
    estimated_peak_bytes: int
    minimum_bytes: int  # the smallest budget any plan fits in

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BlockShape:
    weight_bytes: int  # all parameters, in the compute dtype
    largest_linear: int  # elements of the largest weight matrix
    hidden: int
    widest: int  # the widest activation inside the block (ffn width, or 3 x hidden for qkv)
    captured_width: int  # sum of the widths of the captured linear inputs
    clip_bytes: int  # the clip search's working set for the largest linear

    @classmethod
    def of(cls, block: nn.Module, captured: set[str], elem_bytes: int, group_size: int,
           clip_tokens: int) -> "BlockShape":
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        hidden = min(m.in_features for m in linears.values())
        return cls(
            weight_bytes=sum(p.numel() for p in block.parameters()) * elem_bytes,
            largest_linear=max(m.weight.numel() for m in linears.values()),
            hidden=hidden,
            widest=max(max(m.out_features for m in linears.values()), 3 * hidden),
            captured_width=sum(linears[n].in_features for n in captured),
            # ~4 tensors of [groups, tokens, batch] = numel * tokens / group_size elements, capped
            clip_bytes=4 * elem_bytes * min(CLIP_MAX_ELEMS, max(
                m.weight.numel() * clip_tokens // group_size for m in linears.values())),
        )


def plan_block(shape: BlockShape, n_samples: int, seqlen: int, elem_bytes: int,
               budget: int | None, default_chunk: int = 16) -> Plan:
    """The largest chunk (in whole samples) that fits the budget, activations on the device
    if they fit there with at least one sample per chunk, else streamed from the host."""
    # block weights + a copy of the searched linears + float32 quantizer temporaries + clip search
    fixed = 2 * shape.weight_bytes + 3 * shape.largest_linear * 4 + shape.clip_bytes
    # per sample kept for the whole block: input, output, captured linear inputs, search references
    resident = seqlen * elem_bytes * (3 * shape.hidden + shape.captured_width)
    # per sample in flight during one forward: intermediates and the error of a chunk
    working = seqlen * elem_bytes * (4 * shape.widest + 4 * shape.hidden)

    def on_device(c: int) -> int:
        return fixed + n_samples * resident + c * working

    def streamed(c: int) -> int:
        return fixed + c * (working + 2 * resident)

    minimum = streamed(1)
    if budget is None:
        c = min(n_samples, default_chunk)
        return Plan(c, False, streamed(c), minimum)
    cap = min(n_samples, MAX_CHUNK_SAMPLES)
    if on_device(1) <= budget:
        c = max(k for k in range(1, cap + 1) if on_device(k) <= budget)
        return Plan(c, True, on_device(c), minimum)
    if minimum <= budget:
        c = max(k for k in range(1, cap + 1) if streamed(k) <= budget)
        return Plan(c, False, streamed(c), minimum)
    raise SettingsError(
        f"--max-gpu-mem {format_bytes(budget)} is too small: one block needs at least "
        f"{format_bytes(minimum)} (its weights {format_bytes(shape.weight_bytes)} twice, plus one "
        f"calibration sample of {seqlen} tokens in flight)"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    return f"{n}"
