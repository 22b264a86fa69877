"""Phi-3: the LLaMA layout with fused projections. qkv_proj holds q, k and v as row blocks and
gate_up_proj gate then up, so a scale group's previous op can be a row range of a fused linear:
o_proj's inputs are qkv_proj's v rows, down_proj's are (through the gate) gate_up_proj's up rows."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import ScaleGroup
from .llama import LLAMA, gqa, skipped_v_o


def _scale_groups(config: Any) -> list[ScaleGroup]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_rows = config.num_attention_heads * head_dim
    kv_rows = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    ffn = config.intermediate_size
    groups = [ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn", inspect_takes_block_kwargs=True)]
    if not gqa(config):
        groups.append(ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj",
                                 prev_rows=(q_rows + kv_rows, q_rows + 2 * kv_rows)))
    return groups + [
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_rows=(ffn, 2 * ffn)),
    ]


PHI3 = dataclasses.replace(
    LLAMA,
    name="phi3",
    model_types=("phi3",),
    scale_groups=_scale_groups,
    no_clip=("self_attn.qkv_proj",),  # q and k rows shape attention logits; clipped together with v or not at all
    skipped_groups=lambda config: [s.replace("self_attn.v_proj", "self_attn.qkv_proj (v rows)")
                                   for s in skipped_v_o(config)],
)
