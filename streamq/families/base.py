"""The adapter protocol: what differs between model families, declared as data."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of `prev_op`; AWQ scales their input channels together.

    The search loss is the MSE of `inspect`'s output (the module the linears feed);
    `inspect_takes_block_kwargs` says whether it needs the block's extra inputs (attention).
    """

    prev_op: str
    linears: tuple[str, ...]
    inspect: str
    inspect_takes_block_kwargs: bool = False


@dataclass(frozen=True)
class Family:
    """One model family: names and shapes streamq needs, no search code."""

    name: str
    model_types: tuple[str, ...]
    layers_prefix: str  # tensor-name prefix of block i is f"{layers_prefix}.{i}."
    scale_groups: Callable[[Any], list[ScaleGroup]]  # from the HF config
    no_clip: tuple[str, ...]  # linears whose clip search is skipped (q/k: attention logits)
    block_kwargs: Callable[[Any, int, torch.device, torch.dtype], dict]
    # Hidden states entering block 0 for token ids [b, T], from non-block tensors read by name
    # (get(name) -> tensor), computed exactly as the transformers model computes them.
    embed: Callable[[Callable[[str], torch.Tensor], Any, torch.Tensor, torch.device, torch.dtype], torch.Tensor]
    # What runs between the last block and lm_head (final norm, projections), built from the
    # non-block tensors; find(name) returns None for a tensor the checkpoint does not have.
    final: Callable[[Callable[[str], torch.Tensor | None], Any, torch.device, torch.dtype], nn.Module]
    embed_weight: str  # the token embedding table; also lm_head's weight when they are tied
    # Linears outside the blocks, never quantized (listed in modules_to_not_convert).
    extra_linears: Callable[[Any], list[str]] = field(default=lambda config: ["lm_head"])

    def n_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."


def modeling_class(config: Any, suffix: str) -> type:
    """The transformers class of this model type whose name ends with `suffix`."""
    module = importlib.import_module(
        f"transformers.models.{config.model_type}.modeling_{config.model_type}"
    )
    found = [getattr(module, n) for n in dir(module) if n.endswith(suffix) and not n.startswith("_")]
    found = [c for c in found if isinstance(c, type) and issubclass(c, nn.Module)]
    if len(found) != 1:
        raise RuntimeError(f"expected one *{suffix} class for {config.model_type}, found {found}")
    return found[0]


def meta_block(config: Any, index: int = 0) -> nn.Module:
    """A block with no storage: its shapes, for checks made before any weight is read."""
    with torch.device("meta"):
        return modeling_class(config, "DecoderLayer")(config, layer_idx=index)


def build_block(
    config: Any,
    index: int,
    state: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """One decoder block, built on the meta device and filled from `state` (names relative
    to the block), so no memory is spent on the randomly initialised weights.

    Blocks run with SDPA attention, which is causal when no mask is given: calibration
    samples are unpadded, so no attention mask is ever materialised."""
    config._attn_implementation = "sdpa"
    block = meta_block(config, index)
    expected = set(block.state_dict())
    missing = expected - set(state)
    if missing:
        raise KeyError(f"block {index} lacks tensors {sorted(missing)}")
    block.load_state_dict(
        {k: state[k].to(device=device, dtype=dtype) for k in expected}, assign=True, strict=True
    )
    return block.eval()
