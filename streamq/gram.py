"""The exact Gram-matrix form of AWQ's loss for a scale group judged on its one linear's own
output (v -> o, up -> down, fc1 -> fc2, an expert's up -> down): with the candidate's weight error
E = Q(W s)/s - W, the squared output error over calibration inputs X is
||X Eᵀ||² = Σ_rows e G eᵀ, G = XᵀX (the bias cancels). G is made once per group; each candidate
then costs out x in² products instead of tokens x in x out, and no forward pass.

G is held as the square blocks on and above its diagonal, GRAM_BLOCK wide: every product has one
shape whatever the budget or where G lives (the device, or pinned host memory from which each
block is uploaded as it is used), so the losses, and the picks, are the same bytes under any plan.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .placement import to_store, upload

GRAM_BLOCK = 4096  # columns per block of G: large enough for a GPU's products, small enough to stream
ROW_ELEMS = 2**24  # weight elements per step of making the error and of its products: bounds their transients
FLOAT32 = 4


def spans(width: int) -> list[tuple[int, int]]:
    """The column ranges of G's blocks."""
    return [(a, min(a + GRAM_BLOCK, width)) for a in range(0, width, GRAM_BLOCK)]


def pairs(width: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The blocks of G kept: (rows, columns) on and above the diagonal (G is symmetric)."""
    s = spans(width)
    return [(s[i], s[j]) for i in range(len(s)) for j in range(i, len(s))]


def row_spans(rows: int, width: int) -> list[tuple[int, int]]:
    """The output rows a weight of `width` inputs is taken in, a fixed number at a time (by its
    shape alone, so the products have the same shapes whatever the budget)."""
    step = max(1, ROW_ELEMS // width)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def work_bytes(rows: int, width: int, g_whole: bool) -> int:
    """The device memory one candidate's loss takes beside the weight: its float32 error, one
    row span's quantization (w * s, the quantizer's float32 codes, the result: 4-byte compute, a
    bound), one product [span, block], and G whole or two of its blocks (one in use, one arriving
    from the host)."""
    span = row_spans(rows, width)[0][1]
    g = gram_bytes(width) if g_whole else 2 * block_bytes(width)
    return rows * width * FLOAT32 + span * width * 3 * FLOAT32 + span * min(width, GRAM_BLOCK) * FLOAT32 + g


def cheaper(tokens: int, rows: int, width: int, candidates: int) -> bool:
    """Whether the Gram form takes fewer multiply-adds than a forward pass per candidate for a
    linear [rows, width] judged on `tokens` calibration tokens: making G (tokens x its kept
    elements) and each candidate's quadratic form (rows x its kept elements) against the reference
    and each candidate's product (tokens x width x rows). An expert given few tokens is judged by
    forward passes; a decision from shapes and token counts alone, never from the budget."""
    kept = gram_bytes(width) // FLOAT32
    return tokens * kept + candidates * rows * kept < (candidates + 1) * tokens * width * rows


def gram_bytes(width: int) -> int:
    """Bytes of G's kept blocks for inputs `width` wide (float32)."""
    return sum((r[1] - r[0]) * (c[1] - c[0]) for r, c in pairs(width)) * FLOAT32


def block_bytes(width: int) -> int:
    """Bytes of G's largest block: what is on the device at a time when G lives on the host."""
    return min(width, GRAM_BLOCK) ** 2 * FLOAT32


@torch.no_grad()
def gram(chunks: Sequence[torch.Tensor], device: torch.device, store: torch.device) -> list[torch.Tensor]:
    """G's kept blocks (in pairs(width) order) in float32 on `store`, made on `device`: each
    sample's XᵀX added in sample order, so any chunking of the same samples gives the same bits.
    A chunk is [b, T, C] (or one routed sample's tokens); each sample is copied to a fresh float32
    tensor first, exact from any compute dtype, and aligned alike wherever it sat in its chunk."""
    width = chunks[0].shape[-1]
    blocks = [torch.zeros(r[1] - r[0], c[1] - c[0], device=device, dtype=torch.float32) for r, c in pairs(width)]
    for chunk in chunks:
        chunk = upload(chunk, device)
        for sample in chunk.reshape(-1, *chunk.shape[-2:]):
            x = sample.reshape(-1, width).to(torch.float32, copy=True)
            for g, (r, c) in zip(blocks, pairs(width)):
                g.addmm_(x[:, r[0]:r[1]].t(), x[:, c[0]:c[1]])
            del x
    return [to_store(g, store) for g in blocks]


@torch.no_grad()
def gram_sse(error: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Σ_rows e G eᵀ for the weight error [out, in] (float32), as one float32 part per kept block
    (an off-diagonal block counts twice), on the error's device; the caller sums the parts in
    float64 on the host, one copy per candidate."""
    parts = []
    spans_of_rows = row_spans(*error.shape)
    for g, (r, c) in zip(blocks, pairs(error.shape[1])):
        g = upload(g, error.device)
        for a, b in spans_of_rows:
            part = (error[a:b, r[0]:r[1]] @ g).mul_(error[a:b, c[0]:c[1]]).sum()
            parts.append(part if r == c else 2 * part)
    return torch.stack(parts)
