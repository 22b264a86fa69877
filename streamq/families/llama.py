"""LLaMA-2/3 layout (and Mistral, Qwen2 where tensor names match): RMSNorm, rotary, gated MLP."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Family, ScaleGroup, modeling_class


def _scale_groups(config: Any) -> list[ScaleGroup]:
    groups = [
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "self_attn", inspect_takes_block_kwargs=True),
    ]
    # v_proj's output channels are o_proj's input channels only without grouped-query
    # attention; with GQA the shapes differ and the scale cannot be folded.
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if n_kv == config.num_attention_heads:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups += [
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ]
    return groups


def _block_kwargs(config: Any, seqlen: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Rotary (cos, sin) for positions 0..seqlen-1, shape [1, seqlen, head_dim]: they
    broadcast over any number of samples, so chunking samples never changes them."""
    rotary = modeling_class(config, "RotaryEmbedding")(config=config).to(device)
    position_ids = torch.arange(seqlen, device=device)[None]
    probe = torch.empty(0, device=device, dtype=dtype)
    cos, sin = rotary(probe, position_ids)
    return {"attention_mask": None, "position_embeddings": (cos, sin)}


def _embed(get, config: Any, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return F.embedding(ids.cpu(), get("model.embed_tokens.weight")).to(device, dtype)


def _final(find, config: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    norm = modeling_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight = nn.Parameter(find("model.norm.weight").to(device, dtype), requires_grad=False)
    return norm.to(device).eval()


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers_prefix="model.layers",
    scale_groups=_scale_groups,
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    block_kwargs=_block_kwargs,
    embed=_embed,
    final=_final,
    embed_weight="model.embed_tokens.weight",
)
