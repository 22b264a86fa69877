"""The LLaMA layout: RMSNorm, rotary, gated MLP, q/k/v/o projections. LLaMA-2/3 and the families
that share its tensor names and block structure: Mistral (sliding window), Qwen2/2.5 (q/k/v
biases: a bias is an output, untouched by input scales), Qwen3 (q_norm/k_norm on the projections'
outputs, after them: untouched too)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Family, ScaleGroup, eager_only, modeling_class, rotary_kwargs


def gqa(config: Any) -> bool:
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return n_kv != config.num_attention_heads


def skipped_v_o(config: Any) -> list[str]:
    if not gqa(config):
        return []
    return [f"self_attn.v_proj -> self_attn.o_proj: grouped-query attention ({config.num_key_value_heads} key/value "
            f"heads for {config.num_attention_heads} query heads), v_proj's outputs are not o_proj's inputs"]


def attention_groups(config: Any) -> list[ScaleGroup]:
    """LLaMA-style attention's groups (also Gemma's and the LLaMA-like mixtures'): the input
    norm -> q/k/v, and v -> o, whose output channels are o_proj's input channels only without
    grouped-query attention (with GQA the shapes differ and the scale cannot be folded)."""
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "self_attn", inspect_takes_block_kwargs=True)]
    if not gqa(config):
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    return groups


def _scale_groups(config: Any) -> list[ScaleGroup]:
    return attention_groups(config) + [
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ]


def block_kwargs(config: Any, seqlen: int, device: torch.device, dtype: torch.dtype, index: int = 0) -> dict:
    return rotary_kwargs(config, seqlen, device, dtype, index, eager=eager_only(config))


def _embed(get, config: Any, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return F.embedding(ids.cpu(), get("model.embed_tokens.weight")).to(device, dtype)


def _final(find, config: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    norm = modeling_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight = nn.Parameter(find("model.norm.weight").to(device, dtype), requires_grad=False)
    return norm.to(device).eval()


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    layers_prefix="model.layers",
    scale_groups=_scale_groups,
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    block_kwargs=block_kwargs,
    embed=_embed,
    final=_final,
    embed_weight="model.embed_tokens.weight",
    skipped_groups=skipped_v_o,
)
MISTRAL = dataclasses.replace(LLAMA, name="mistral", model_types=("mistral",))
QWEN2 = dataclasses.replace(LLAMA, name="qwen2", model_types=("qwen2",))
QWEN3 = dataclasses.replace(LLAMA, name="qwen3", model_types=("qwen3",))
