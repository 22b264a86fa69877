"""OPT (facebook/opt-*): LayerNorm blocks, learned positions added before the first block."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Family, ScaleGroup


def _scale_groups(config: Any) -> list[ScaleGroup]:
    pre_norm = config.do_layer_norm_before
    return [
        *([ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      "self_attn", inspect_takes_block_kwargs=True)] if pre_norm else []),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        *([ScaleGroup("final_layer_norm", ("fc1",), "fc1")] if pre_norm else []),
        ScaleGroup("fc1", ("fc2",), "fc2"),
    ]


def _skipped_groups(config: Any) -> list[str]:
    """opt-350m normalises after attention and after the MLP (do_layer_norm_before false): q/k/v
    read the block's input and fc1 reads self_attn_layer_norm's output, and both also feed the
    residual sum, so a scale folded into the norm before them would change the residual too."""
    if config.do_layer_norm_before:
        return []
    return ["self_attn.q_proj, self_attn.k_proj, self_attn.v_proj: norms after attention (do_layer_norm_before "
            "false), so they read the block's input, which also feeds the residual sum",
            "self_attn_layer_norm -> fc1: norms after attention (do_layer_norm_before false), so its output also "
            "feeds the residual sum"]


def _block_kwargs(config: Any, seqlen: int, device: torch.device, dtype: torch.dtype, index: int = 0) -> dict:
    # Positions enter at the embedding; inside a block only the causal mask matters and
    # SDPA applies it when attention_mask is None.
    return {"attention_mask": None}


def _embed(get, config: Any, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Token embeddings (projected when word_embed_proj_dim differs) plus learned positions,
    which OPT offsets by 2. Rows are gathered from the mmap'd table on the host, then cast:
    exact, and the table never goes to the device whole."""
    tokens = F.embedding(ids.cpu(), get("model.decoder.embed_tokens.weight")).to(device, dtype)
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        tokens = F.linear(tokens, get("model.decoder.project_in.weight").to(device, dtype))
    positions = torch.arange(ids.shape[1]) + 2
    return tokens + F.embedding(positions, get("model.decoder.embed_positions.weight")).to(device, dtype)[None]


def _final(find, config: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """final_layer_norm (absent in models that normalise after each block, like opt-350m),
    then project_out where the embedding width differs from the hidden size."""
    steps: list[nn.Module] = []
    if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
        affine = config.layer_norm_elementwise_affine
        norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine, device="meta" if affine else device)
        if affine:
            norm.weight = nn.Parameter(find("model.decoder.final_layer_norm.weight").to(device, dtype), False)
            norm.bias = nn.Parameter(find("model.decoder.final_layer_norm.bias").to(device, dtype), False)
        steps.append(norm)
    project_out = find("model.decoder.project_out.weight")
    if project_out is not None:
        linear = nn.Linear(*project_out.shape[::-1], bias=False, device="meta")
        linear.weight = nn.Parameter(project_out.to(device, dtype), requires_grad=False)
        steps.append(linear)
    return nn.Sequential(*steps).eval()


def _extra_linears(config: Any) -> list[str]:
    extra = ["lm_head"]
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        extra += ["model.decoder.project_in", "model.decoder.project_out"]
    return extra


OPT = Family(
    name="opt",
    model_types=("opt",),
    layers_prefix="model.decoder.layers",
    scale_groups=_scale_groups,
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    block_kwargs=_block_kwargs,
    embed=_embed,
    final=_final,
    embed_weight="model.decoder.embed_tokens.weight",
    extra_linears=_extra_linears,
    skipped_groups=_skipped_groups,
    checkpoint_prefixes=(("decoder.", "model.decoder."),),
)
