"""GPTQ (Frantar et al., ICLR 2023) as pure functions: the Hessian of a linear's inputs, then
column-by-column rounding with the error spread over the columns not yet quantized, through the
upper Cholesky factor of the inverse Hessian, in lazy blocks of columns.

Groups are contiguous runs of `group_size` input columns, so the result packs into both output
formats; by default columns go in order and each group's scale and zero point come from its
columns as they stand when the algorithm reaches the group's first column (the reference
implementation's choice). With act_order, columns go in descending order of the Hessian's diagonal
(the inputs with the most energy first, while the most columns remain to absorb their error) and
the groups are static: each group's parameters come from its columns before any update, so a
column's group stays that of its position in the checkpoint and no group index is stored (the
"static groups" of the GPTQ code and llm-compressor's default). Scales are rounded to the storage
dtype like every other scale streamq writes. Everything is float32."""

from __future__ import annotations

from itertools import accumulate
from typing import Sequence

import torch

from .quant import quant_params

DAMP = 0.01  # dampening: this share of the mean diagonal is added to the diagonal
BLOCK = 128  # columns per lazy batch update (a multiple of every group size used)


class NotPositiveDefinite(ValueError):
    pass


@torch.no_grad()
def hessian(chunks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum_i X_i^T X_i over samples i ([T, C] each, wherever the chunks are), float32 [C, C] on
    `device`: one product per sample, added in sample order, so chunking never changes it."""
    h = None
    for chunk in chunks:
        for x in chunk:
            x = x.to(device=device, dtype=torch.float32).reshape(-1, x.shape[-1])
            if h is None:
                h = torch.zeros(x.shape[1], x.shape[1], device=device, dtype=torch.float32)
            h.addmm_(x.t(), x)
    return h


def scaled_hessian(h: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The Hessian of x / s (a linear whose inputs AWQ scaled): H / (s s^T)."""
    if scales is None:
        return h
    s = scales.to(device=h.device, dtype=torch.float32)
    return h / s[:, None] / s[None, :]


def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: channels that never saw a
    nonzero input get a unit diagonal (the caller zeroes their weights, as in the paper's code).
    Raises NotPositiveDefinite when dampening does not make H positive definite."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise NotPositiveDefinite(f"not positive definite after dampening {damp} (Cholesky failed at column {int(info)})")
    inv = torch.cholesky_inverse(chol)
    upper, info = torch.linalg.cholesky_ex(inv, upper=True)
    if int(info) != 0:
        raise NotPositiveDefinite(f"its inverse is not positive definite after dampening {damp}")
    return upper


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True,
                  scale_dtype: torch.dtype = torch.float16, damp: float = DAMP, block: int = BLOCK,
                  act_order: bool = False, parts: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of w [out, in] (float32, consumed) for inputs whose Hessian is h [in, in]:
    (codes uint8 [out, in], scales [out, in/g] and zeros [out, in/g], float32), in the
    checkpoint's column order whatever the processing order.

    The loop walks columns, so it works on w transposed, [in, out], where a column is a
    contiguous row (a column of [out, in] is strided: every step touched `out` cache lines, and
    the loop ran 2-3x slower); a w that is the transpose of contiguous [in, out] storage is used
    in place, any other is copied once. Every step is the elementwise arithmetic of the
    column-by-column algorithm, and the lazy batch update multiplies the same operands in the
    same layout as on [out, in], so the codes are the same bits either way.

    `parts`: w is several linears' weights stacked by rows (q/k/v, gate/up: the same inputs, so
    one Hessian), this many rows each, rounded in one column loop. Every step of the loop is
    row by row (elementwise, or a max/min over a row's group), so stacking changes no bit; the
    lazy batch update, a matrix product whose kernel may depend on its shape, runs per part,
    so each linear's codes equal those of its own run (tested)."""
    out_features, in_features = w.shape
    if block % group_size and group_size % block:
        raise ValueError(f"block {block} and group size {group_size} must divide one another")
    if scale_dtype not in (torch.float16, torch.bfloat16):  # the exactness the loop's addcmul relies on
        raise ValueError(f"scales are stored in half precision, not {scale_dtype}")
    wt = w.t() if w.t().is_contiguous() else w.t().contiguous()  # [in, out]: row i is column i
    del w
    wt[torch.diag(h) == 0] = 0  # dead inputs (inverse_factor gives them a unit diagonal)
    max_int = 2**w_bit - 1
    n_group = in_features // group_size
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=wt.device)
    if act_order:
        scales, zeros = quant_params(wt.t(), w_bit, group_size, zero_point, scale_dtype)  # static groups
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
        wt, h = wt[order], h[order][:, order]
        scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()  # a group's parameters: a row
        order = order.tolist()
    else:
        scales_t = torch.empty(n_group, out_features, dtype=torch.float32, device=wt.device)
        zeros_t = torch.empty(n_group, out_features, dtype=torch.float32, device=wt.device)
        order = list(range(in_features))
    hinv = inverse_factor(h, damp)
    bounds = [0, *accumulate(parts or [out_features])]
    rows = list(zip(bounds[:-1], bounds[1:]))
    scale = zero = None
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1 = wt[i1:i2]  # a view: updated in place
        q1, err1 = torch.empty_like(w1), torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        diagonal = torch.diagonal(h1).tolist()  # float32 values, exact as Python floats
        for i in range(i2 - i1):
            col = order[i1 + i]  # the column's place in the checkpoint
            if act_order:
                scale, zero = scales_t[col // group_size], zeros_t[col // group_size]
            elif col % group_size == 0:  # the group's parameters from its columns as they stand now
                g = col // group_size
                s, z = quant_params(wt[col:col + group_size].t(), w_bit, group_size, zero_point, scale_dtype)
                scales_t[g], zeros_t[g] = s[:, 0], z[:, 0]
                scale, zero = scales_t[g], zeros_t[g]
            q, err = q1[i], err1[i]
            # q = clamp(round(w / scale) + zero, 0, max) and err = (w - (q - zero) * scale) / d,
            # as quant.quantize rounds, computed into the block's buffers; (q - zero) * scale is
            # exact in float32 (an integer of at most 8 bits times a half-precision scale), so
            # addcmul's one rounding of w - (q - zero) * scale, fused or not, is the two steps'
            torch.div(w1[i], scale, out=q).round_().add_(zero).clamp_(0, max_int)
            torch.addcmul(w1[i], torch.sub(q, zero, out=err), scale, value=-1, out=err).div_(diagonal[i])
            w1[i:].sub_(h1[i, i:, None] * err[None, :])
        codes[:, order[i1:i2] if act_order else slice(i1, i2)] = q1.t().to(torch.uint8)
        for a, b in rows:  # the product of err1 [rows, block] as on [out, in], then transposed
            wt[i2:, a:b].sub_((err1[:, a:b].t().contiguous() @ hinv[i1:i2, i2:]).t())
    return codes, scales_t.t().contiguous(), zeros_t.t().contiguous()
