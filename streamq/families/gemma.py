"""Gemma 2 and Gemma 3 (text): the LLaMA layout with norms that compute x * (1 + w) (a scale is
folded as 1 + w' = (1 + w) / s), a norm after attention and after the MLP as well as before
them (the MLP's scale group follows pre_feedforward_layernorm), embeddings scaled by
sqrt(hidden), sliding-window layers, Gemma 2's soft-capped attention logits (eager attention)
and final logits, Gemma 3's q/k norms and per-layer-type rope."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from .base import ScaleGroup
from .llama import LLAMA, attention_groups


def _scale_groups(config: Any) -> list[ScaleGroup]:
    return attention_groups(config) + [
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ]


def _embed(get, config: Any, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows in the compute dtype times sqrt(hidden) rounded to it, as both models compute it."""
    rows = F.embedding(ids.cpu(), get("model.embed_tokens.weight")).to(device, dtype)
    return rows * torch.tensor(config.hidden_size**0.5, dtype=dtype, device=device)


GEMMA2 = dataclasses.replace(
    LLAMA,
    name="gemma2",
    model_types=("gemma2",),
    scale_groups=_scale_groups,
    embed=_embed,
    norm_offset=1.0,
    logit_softcap=lambda config: getattr(config, "final_logit_softcapping", None),
)
GEMMA3 = dataclasses.replace(GEMMA2, name="gemma3", model_types=("gemma3_text",))
