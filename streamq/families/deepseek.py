"""DeepSeek-V3 / R1 (and Kimi-K2, the same architecture under model_type kimi_k2): multi-head
latent attention (MLA), dense MLPs in the first `first_k_dense_replace` layers and a mixture of
experts in the rest (sigmoid routing with a correction bias, limited to the best groups of
experts, one shared expert added ungated), built on transformers' own DeepseekV3DecoderLayer.

MLA's scale groups, from its algebra: q_a_proj and kv_a_proj_with_mqa both read the input norm's
output (one s, judged on the attention's output); q_b_proj reads q_a_layernorm's and kv_b_proj
reads kv_a_layernorm's, RMS norms whose weights absorb 1/s exactly, each judged on its linear's
own output (as AutoAWQ's DeepSeek-V2 and llm-compressor's DeepSeek mappings judge them). o_proj
reads the attention's values, kv_b_proj's output rows [nope, nope + v) of every head's nope + v:
attention is linear in the values, so a v -> o group would fold exactly through those strided
rows, but on random DeepSeek-V3 blocks it raised the summed block-output error by 6 % (worse in 5
of 8 blocks; docs/benchmarks.md), and both peers leave it out: it is skipped, with that reason in
streamq.json. Without q_lora_rank (DeepSeek-V2-Lite shapes) q_proj reads the input norm directly.

The multi-token-prediction layer a checkpoint carries after the last block (model.layers.61.* in
DeepSeek-V3) is not a decoder block transformers runs: it is left out of the output (never read),
and the output's config says num_nextn_predict_layers 0 so no loader looks for it.

GLM-4.5 (glm4_moe) has DeepSeek-V3's MLPs, router and MTP layer under LLaMA-style attention
(q/k/v with biases, optional q/k norms after the projections, grouped-query: v -> o skipped)."""

from __future__ import annotations

from typing import Any

from .base import ScaleGroup
from .llama import skipped_v_o
from .moe import BiasedRouter, MoeLayout, first_k_dense, grouped_sigmoid_top_k, moe_family


def mla_attention(config: Any) -> list[ScaleGroup]:
    first = "self_attn.q_a_proj" if config.q_lora_rank else "self_attn.q_proj"
    out = [ScaleGroup("input_layernorm", (first, "self_attn.kv_a_proj_with_mqa"), "self_attn",
                      inspect_takes_block_kwargs=True)]
    if config.q_lora_rank:
        out.append(ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn.q_b_proj"))
    out.append(ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj"))
    return out


def mla_skipped(config: Any) -> list[str]:
    nope, v = config.qk_nope_head_dim, config.v_head_dim
    return [f"self_attn.kv_b_proj -> self_attn.o_proj: o_proj's inputs are kv_b_proj's value rows, [{nope}, "
            f"{nope + v}) of each head's {nope + v}; a scale there measured 6 % more block-output error on random "
            "DeepSeek-V3 blocks, and AutoAWQ and llm-compressor leave it out"]


def no_mtp_layer(config: Any) -> dict:
    """The output's config: the multi-token-prediction layer is not written."""
    return {"num_nextn_predict_layers": 0}


DEEPSEEK_LAYOUT = MoeLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "n_routed_experts", "moe_intermediate_size",
                            "norm_topk_prob", False, shared="shared_experts",
                            shared_width=lambda config: int(config.moe_intermediate_size * config.n_shared_experts),
                            router=BiasedRouter, routing=grouped_sigmoid_top_k, sparse=first_k_dense)

DEEPSEEK_V3 = moe_family(
    "deepseek_v3", DEEPSEEK_LAYOUT, mla_attention,
    # the query path is not clipped (its errors are judged through the attention logits), as q_proj's
    no_clip=("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj"),
    skipped_groups=mla_skipped,
    output_config=no_mtp_layer,
)

GLM4_MOE = moe_family("glm4_moe", DEEPSEEK_LAYOUT, skipped_groups=skipped_v_o,
                      output_config=no_mtp_layer)
