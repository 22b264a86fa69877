"""The adapter protocol: what differs between model families, declared as data."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .. import placement


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
    # a fused previous linear (Phi-3's qkv_proj, gate_up_proj): only its output rows [a, b)
    # feed the group, so only they absorb 1/s
    prev_rows: tuple[int, int] | None = None
    # the module whose input the search reads, where the linears see only part of it (a sparse
    # MLP: the experts get the tokens routed to them); None: the first linear's input
    input_of: str | None = None
    # unquantized modules that also read prev_op's output (a router): their weights absorb s
    # along their inputs, so they compute what they computed before the fold
    absorbers: tuple[str, ...] = ()

    @property
    def own_output(self) -> bool:
        """Judged on its one linear's own output (v -> o, up -> down): the Gram-matrix loss applies."""
        return self.linears == (self.inspect,) and not self.inspect_takes_block_kwargs and self.input_of is None


@dataclass(frozen=True)
class Family:
    """One model family: names and shapes streamq needs, no search code."""

    name: str
    model_types: tuple[str, ...]
    layers_prefix: str  # tensor-name prefix of block i is f"{layers_prefix}.{i}."
    scale_groups: Callable[[Any], list[ScaleGroup]]  # from the HF config
    no_clip: tuple[str, ...]  # linears whose clip search is skipped (q/k: attention logits)
    # the block's extra inputs (config, seqlen, device, dtype, block index): rotary, mask, ...
    block_kwargs: Callable[..., dict]
    # Hidden states entering block 0 for token ids [b, T], from non-block tensors read by name
    # (get(name) -> tensor), computed exactly as the transformers model computes them.
    embed: Callable[[Callable[[str], torch.Tensor], Any, torch.Tensor, torch.device, torch.dtype], torch.Tensor]
    # What runs between the last block and lm_head (final norm, projections), built from the
    # non-block tensors; find(name) returns None for a tensor the checkpoint does not have.
    final: Callable[[Callable[[str], torch.Tensor | None], Any, torch.device, torch.dtype], nn.Module]
    embed_weight: str  # the token embedding table; also lm_head's weight when they are tied
    # Linears outside the blocks, never quantized (listed in modules_to_not_convert).
    extra_linears: Callable[[Any], list[str]] = field(default=lambda config: ["lm_head"])
    # Scale groups AWQ would search but this config cannot fold exactly, each with its reason
    # (recorded in streamq.json): e.g. v_proj -> o_proj under grouped-query attention.
    skipped_groups: Callable[[Any], list[str]] = field(default=lambda config: [])
    norm_offset: float = 0.0  # the norms compute x * (norm_offset + w): Gemma's 1 + w
    # the logits are soft-capped, cap * tanh(logits / cap) (Gemma 2), from the config
    logit_softcap: Callable[[Any], float | None] = field(default=lambda config: None)
    # name prefixes checkpoints are published with beside transformers' own, (as published,
    # canonical): OPT-6.7b/13b/30b/350m were saved from the base model as decoder.*
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()
    # layer i's kind, as the first layer of that kind (config, i) -> index: models whose blocks
    # differ (dense and sparse MLPs) are planned per kind; one kind by default
    layer_kind: Callable[[Any, int], int] = field(default=lambda config, index: 0)
    # config.json settings the output changes (config -> {key: value}): DeepSeek-V3's
    # multi-token-prediction layer is not written, so num_nextn_predict_layers is 0
    output_config: Callable[[Any], dict] = field(default=lambda config: {})

    def n_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def kinds(self, config: Any) -> list[int]:
        """One layer index per kind of block, in order."""
        return sorted({self.layer_kind(config, i) for i in range(self.n_layers(config))})

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def tied_names(self, config: Any) -> dict[str, str]:
        """Names a checkpoint may carry as a copy of another tensor when the config ties them:
        lm_head repeats the token embedding (tie_word_embeddings, transformers' default)."""
        return {"lm_head.weight": self.embed_weight} if getattr(config, "tie_word_embeddings", False) else {}


MODELING_MODULE = {"gemma3_text": "gemma3"}  # model types whose classes live in another model's module


def modeling_class(config: Any, suffix: str) -> type:
    """The transformers class of this model type whose name ends with `suffix`."""
    name = MODELING_MODULE.get(config.model_type, config.model_type)
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    found = [getattr(module, n) for n in dir(module) if n.endswith(suffix) and not n.startswith("_")]
    found = [c for c in found if isinstance(c, type) and issubclass(c, nn.Module)]
    if len(found) != 1:
        raise RuntimeError(f"expected one *{suffix} class for {config.model_type}, found {found}")
    return found[0]


def layer_type(config: Any, index: int) -> str:
    """full_attention or sliding_attention, as the transformers model decides it: the config's
    layer_types where it has them (Qwen2/3, Gemma 2/3), else every layer slides when the config
    has a sliding window (Mistral, Phi-3)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def causal_mask(config: Any, seqlen: int, index: int, device: torch.device, dtype: torch.dtype,
                eager: bool) -> torch.Tensor | None:
    """The attention mask transformers builds for layer `index` over unpadded samples, [1, 1, T, T]
    (it broadcasts over any number of samples): None where SDPA's own causal path applies (full
    attention, or a window no shorter than the samples), else a key k is seen from query q when
    q - window < k <= q; boolean for SDPA, additive (0 or the dtype's minimum) for eager attention."""
    window = getattr(config, "sliding_window", None) if layer_type(config, index) == "sliding_attention" else None
    if not eager and (window is None or seqlen <= window):
        return None
    q = torch.arange(seqlen, device=device)[:, None]
    k = torch.arange(seqlen, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    if not eager:
        return allowed[None, None]
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def rotary_kwargs(config: Any, seqlen: int, device: torch.device, dtype: torch.dtype, index: int = 0,
                  eager: bool = False) -> dict:
    """The extra inputs of a LLaMA-style decoder layer: rotary (cos, sin) for positions
    0..seqlen-1, shape [1, seqlen, head_dim] (per layer type where the model has several, as
    Gemma 3's local and global rope), and the layer's attention mask. Both broadcast over any
    number of samples, so chunking samples never changes them."""
    rotary = modeling_class(config, "RotaryEmbedding")(config=config).to(device)
    position_ids = torch.arange(seqlen, device=device)[None]
    probe = torch.empty(0, device=device, dtype=dtype)
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        cos, sin = rotary(probe, position_ids, layer_type(config, index))
    else:
        cos, sin = rotary(probe, position_ids)
    return {"attention_mask": causal_mask(config, seqlen, index, device, dtype, eager),
            "position_embeddings": (cos, sin)}


# model types whose decoder layer streamq assembles itself (config, index) -> module: mixtures of
# experts, whose experts transformers fuses in memory (families/moe.py)
BLOCK_BUILDERS: dict[str, Callable[[Any, int], nn.Module]] = {}
# and how such a layer of a whole transformers model becomes the one streamq builds, in place,
# sharing the model's storage (the unstreamed reference holds the whole model)
LAYER_ADAPTERS: dict[str, Callable[[nn.Module, Any], None]] = {}


def meta_block(config: Any, index: int = 0) -> nn.Module:
    """A block with no storage: its shapes, for checks made before any weight is read."""
    with torch.device("meta"):
        build = BLOCK_BUILDERS.get(config.model_type)
        return build(config, index) if build else modeling_class(config, "DecoderLayer")(config, layer_idx=index)


def eager_only(config: Any) -> bool:
    """Attention that SDPA cannot compute: soft-capped logits (Gemma 2)."""
    return getattr(config, "attn_logit_softcapping", None) is not None


def tensor_dtype(block: nn.Module, key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a block's tensor is held and written in: float32 for a module that keeps it
    (`keep_float32`: DeepSeek-V3's router, as transformers keeps it), else `dtype`."""
    module = block.get_submodule(key.rpartition(".")[0])
    return torch.float32 if getattr(module, "keep_float32", False) else dtype


def build_block(
    config: Any,
    index: int,
    state: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    park: bool = False,
) -> nn.Module:
    """One decoder block, built on the meta device and filled from `state` (names relative
    to the block), so no memory is spent on the randomly initialised weights. With `park`, the
    modules that may be parked (a mixture's routed experts: `parkable`) hold no storage: their
    tensors are read from `state` (its `load`: from the shards, decoded on the device for FP8)
    each time they come to the device to compute (placement.loaded), so host memory never holds
    a block's experts.

    Blocks run with SDPA attention (eager where the family needs it: Gemma 2's soft-capped
    attention logits), with the mask of causal_mask: calibration samples are unpadded."""
    config._attn_implementation = "eager" if eager_only(config) else "sdpa"
    block = meta_block(config, index)
    expected = set(block.state_dict())
    missing = expected - set(state)
    if missing:
        raise KeyError(f"block {index} lacks tensors {sorted(missing)}")
    parked = [n for n, m in block.named_modules() if park and getattr(m, "parkable", False)]
    shapes = {k: t.shape for k, t in block.state_dict().items()}

    def place(key: str) -> torch.Tensor:
        kept = tensor_dtype(block, key, dtype)
        if not any(key.startswith(f"{n}.") for n in parked):
            return state[key].to(device=device, dtype=kept)
        # parked: no storage here; read from the source each time it comes to the device
        module, _, param = key.rpartition(".")
        source = (lambda to, k=key: state.load(k, to).to(kept)) if hasattr(state, "load") else \
            (lambda to, k=key: state[k].to(device=to, dtype=kept))
        block.get_submodule(module).__dict__.setdefault("sources", {})[param] = source
        return torch.empty(shapes[key], dtype=kept, device="meta")

    block.load_state_dict({k: place(k) for k in expected}, assign=True, strict=True)
    for name in parked:
        placement.park(block.get_submodule(name), device)
    return block.eval()
