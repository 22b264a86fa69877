"""Mixtures of experts: Mixtral, Qwen2-MoE, Qwen3-MoE.

Transformers 5 fuses a block's experts into 3-D parameters in memory while checkpoints hold one
tensor per expert. streamq builds the sparse MLP itself with one nn.Linear per expert weight,
named as the checkpoint names them (`block_sparse_moe.experts.3.w1`, `mlp.experts.3.gate_proj`),
so the block reads the shards' tensors as they are (no fused copy), and the search, clip, GPTQ
and packing see ordinary linears. Its forward computes what transformers' eager experts compute:
the router's softmax in float32, top-k, (renormalised) weights, each hit expert over its tokens,
summed with index_add_ in expert order.

The router (and Qwen2-MoE's shared-expert gate) stay unquantized: they are plain modules with a
weight, not linears, so every linear-only path leaves them alone, and they are named in the
output's ignore list. They read the post-attention norm's output, so when that norm absorbs 1/s
they absorb s along their inputs (ScaleGroup.absorbers): routing is then what the unscaled
model routes, up to the rounding of W * s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..placement import is_parked, loaded
from ..search import run_module
from .base import BLOCK_BUILDERS, LAYER_ADAPTERS, Family, ScaleGroup, modeling_class
from .llama import LLAMA, attention_groups


def qwen_sparse(config: Any, index: int) -> bool:
    """Whether layer `index` holds the sparse MLP, as transformers decides it: Qwen's
    mlp_only_layers and decoder_sparse_step make some layers dense (Mixtral has neither)."""
    only = list(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return index not in only and (index + 1) % step == 0


def first_k_dense(config: Any, index: int) -> bool:
    """DeepSeek-V3: the first `first_k_dense_replace` layers are dense, the rest sparse."""
    return index >= int(config.first_k_dense_replace or 0)


class Router(nn.Module):
    """A weight the block's input is multiplied with and which is never quantized: the router
    ([experts, hidden]) or the shared expert's gate ([1, hidden])."""

    def __init__(self, rows: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class BiasedRouter(Router):
    """DeepSeek-V3's router: logits in float32 from a float32 weight, and a per-expert bias
    (e_score_correction_bias) that steers the choice of experts but not their weights. Both
    stay float32 in the block and in the output (`keep_float32`), as transformers keeps them
    (_keep_in_fp32_modules_strict)."""

    keep_float32 = True

    def __init__(self, rows: int, hidden: int):
        super().__init__(rows, hidden)
        self.register_buffer("e_score_correction_bias", torch.empty(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


def softmax_top_k(config: Any, layout: "MoeLayout"):
    """Mixtral, Qwen-MoE: softmax over the experts in float32, the top k, (renormalised)
    weights, in float32 or the logits' dtype."""
    top_k = int(config.num_experts_per_tok)
    renormalise = True if layout.renormalise is None else bool(getattr(config, layout.renormalise))

    def select(logits: torch.Tensor, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, top_k, dim=-1)
        if renormalise:
            weights /= weights.sum(dim=-1, keepdim=True)
        if layout.scores_in_compute_dtype:
            weights = weights.to(logits.dtype)
        return weights, chosen
    return select


def grouped_sigmoid_top_k(config: Any, layout: "MoeLayout"):
    """DeepSeek-V3: sigmoid scores; the choice adds the correction bias, keeps the topk_group
    groups of experts whose two best biased scores sum highest and takes the top k in them; the
    weights are the unbiased scores, renormalised (norm_topk_prob) and times
    routed_scaling_factor, in float32, as transformers' DeepseekV3TopkRouter computes them."""
    top_k, groups, kept = int(config.num_experts_per_tok), int(config.n_group), int(config.topk_group)
    renormalise, factor = bool(getattr(config, layout.renormalise)), float(config.routed_scaling_factor)

    def select(logits: torch.Tensor, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        n = choice.shape[-1]
        group_scores = choice.view(-1, groups, n // groups).topk(2, dim=-1)[0].sum(dim=-1)
        best = torch.topk(group_scores, k=kept, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, best, 1)
        mask = mask.unsqueeze(-1).expand(-1, groups, n // groups).reshape(-1, n)
        chosen = torch.topk(choice.masked_fill(~mask.bool(), float("-inf")), k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if renormalise:
            weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
        return weights * factor, chosen
    return select


@dataclasses.dataclass(frozen=True)
class MoeLayout:
    """Where a family keeps its sparse MLP, what its parts are called on disk, how it routes."""

    attr: str  # the decoder layer's attribute on disk: block_sparse_moe (Mixtral) or mlp
    names: tuple[str, str, str]  # an expert's gate, up and down projections
    n_experts: str  # the config field counting experts
    moe_ffn: str  # the config field of an expert's width
    renormalise: str | None  # config field saying whether top-k weights are renormalised; None: always
    scores_in_compute_dtype: bool  # the weights cast to the logits' dtype before use (Qwen) or kept in float32
    # a shared expert beside the routed ones: its attribute (Qwen2-MoE: shared_expert, DeepSeek:
    # shared_experts), its width from the config, its sigmoid gate's attribute (None: ungated)
    shared: str | None = None
    shared_width: Callable[[Any], int] = lambda config: int(config.shared_expert_intermediate_size)
    shared_gate: str | None = None
    router: type = Router
    routing: Callable[[Any, "MoeLayout"], Callable] = softmax_top_k  # (config, layout) -> select(logits, router)
    sparse: Callable[[Any, int], bool] = qwen_sparse  # (config, layer) -> whether the layer's MLP is sparse


class Expert(nn.Module):
    """act(gate(x)) * up(x) -> down, three linears named as on disk. With `routed_fraction`
    (a routed expert's share of the tokens, on average), each linear carries it: capture reads
    such a linear's inputs token by token, the memory planner counts its share. While the
    expert runs, `routed_tokens` says which tokens of the micro-batch it was given."""

    def __init__(self, names: tuple[str, str, str], hidden: int, width: int, act: str, routed_fraction: float | None):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((hidden, width), (hidden, width), (width, hidden))):
            lin = nn.Linear(i, o, bias=False)
            if routed_fraction is not None:
                lin.routed_fraction = routed_fraction
            self.add_module(name, lin)
        self.act_fn = ACT2FN[act]
        self.parkable = routed_fraction is not None  # a routed expert may be parked (read at each use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class SparseMoe(nn.Module):
    recording: list[torch.Tensor] | None = None  # while set (forward_batches_of_layer), forward records its input

    def __init__(self, config: Any, layout: MoeLayout):
        super().__init__()
        hidden, n = config.hidden_size, int(getattr(config, layout.n_experts))
        self.top_k = int(config.num_experts_per_tok)
        self.select = layout.routing(config, layout)
        self.gate = layout.router(n, hidden)
        width = int(getattr(config, layout.moe_ffn))
        self.experts = nn.ModuleList(Expert(layout.names, hidden, width, config.hidden_act, self.top_k / n)
                                     for _ in range(n))
        self.shared, self.shared_gate = layout.shared, layout.shared_gate
        if layout.shared:
            self.add_module(layout.shared, Expert(("gate_proj", "up_proj", "down_proj"), hidden,
                                                  layout.shared_width(config), config.hidden_act, None))
        if layout.shared_gate:
            self.add_module(layout.shared_gate, Router(1, hidden))

    def _route(self, hidden_states: torch.Tensor):
        """The tokens [n, h], and per hit expert (in expert order) the tokens it gets (ascending)
        with the weight each gets from it."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, chosen = self.select(self.gate(x), self.gate)
        hit = F.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)  # [expert, k, token]
        routes = {}
        for e in torch.greater(hit.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            pos, tokens = torch.where(hit[e])
            tokens, order = tokens.sort()  # token order (each token comes once per expert)
            routes[e] = (tokens, weights[tokens, pos[order], None])
        return x, routes

    def _add_expert(self, out: torch.Tensor, x: torch.Tensor, e: int, tokens: torch.Tensor,
                    weight: torch.Tensor) -> None:
        expert = self.experts[e]
        expert.routed_tokens = tokens  # read by the capture of its inputs (block.capture)
        try:
            y = expert(x[tokens]) * weight
        finally:
            del expert.routed_tokens
        out.index_add_(0, tokens, y.to(out.dtype))

    def _finish(self, out: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.shared:
            y = getattr(self, self.shared)(x)
            if self.shared_gate:
                y = torch.sigmoid(getattr(self, self.shared_gate)(x)) * y
            out = out + y
        return out.reshape(shape)

    def parked(self) -> bool:
        return any(is_parked(expert) for expert in self.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.recording is not None:  # the layer runs up to here; this MLP runs later, for every batch
            self.recording.append(hidden_states)
            return torch.zeros_like(hidden_states)
        x, routes = self._route(hidden_states)
        out = torch.zeros_like(x)
        for e, (tokens, weight) in routes.items():
            with loaded(self.experts[e]):  # a parked expert comes to the device for its tokens
                self._add_expert(out, x, e, tokens, weight)
        return self._finish(out, x, hidden_states.shape)

    def forward_batches(self, batches: list[torch.Tensor], kwargs: dict | None = None):
        """forward of each batch, byte for byte (each output receives the same experts' results
        in the same order), with every parked expert brought to the device once for all the
        batches instead of once per batch. Holds every batch's output at once."""
        if not self.parked():
            return (self(xb) for xb in batches)  # one at a time, as run_module
        routed = [self._route(xb) for xb in batches]
        outs = [torch.zeros_like(x) for x, _ in routed]
        for e, expert in enumerate(self.experts):
            users = [(out, x, routes[e]) for out, (x, routes) in zip(outs, routed) if e in routes]
            if users:
                with loaded(expert):
                    for out, x, (tokens, weight) in users:
                        self._add_expert(out, x, e, tokens, weight)
        return [self._finish(out, x, xb.shape) for out, (x, _), xb in zip(outs, routed, batches)]


def forward_batches_of_layer(layer: nn.Module, batches: list[torch.Tensor], kwargs: dict):
    """The decoder layer's output for each batch, byte for byte as its forward computes it; with
    parked experts, each expert is loaded once for all the batches instead of once per batch: the
    layer runs every batch up to its sparse MLP (which records its input and returns zeros), the
    MLP then runs the batches expert by expert, and each output is the residual (the input of
    the post-attention norm) plus the MLP's output, the sum the layer's forward ends with."""
    moe = layer.mlp
    if not moe.parked():
        return (run_module(layer, xb, kwargs) for xb in batches)
    residuals: list[torch.Tensor] = []
    hook = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args: residuals.append(args[0]))
    moe.recording = []
    try:
        for xb in batches:
            layer(xb, **kwargs)
        inputs = moe.recording
    finally:
        hook.remove()
        moe.recording = None
    return (residual + y for residual, y in zip(residuals, moe.forward_batches(inputs)))


_BATCHED: dict[type, type] = {}


def _batched(cls: type) -> type:
    """The transformers decoder layer class with forward_batches (block.capture uses it)."""
    if cls not in _BATCHED:
        _BATCHED[cls] = type(cls.__name__, (cls,), {"forward_batches": forward_batches_of_layer,
                                                     "__module__": cls.__module__})
    return _BATCHED[cls]


def _layer_kind(layout: MoeLayout):
    def kind(config: Any, index: int) -> int:
        """The first layer with layer `index`'s MLP (dense or sparse)."""
        return next(i for i in range(index + 1) if layout.sparse(config, i) == layout.sparse(config, index))
    return kind


def moe_builder(layout: MoeLayout):
    def build(config: Any, index: int) -> nn.Module:
        """The transformers decoder layer with its sparse MLP replaced by SparseMoe (a dense
        layer as transformers builds it)."""
        layer = modeling_class(config, "DecoderLayer")(config, layer_idx=index)
        if not layout.sparse(config, index):
            return layer
        _install(layer, layout, SparseMoe(config, layout))
        layer.__class__ = _batched(type(layer))  # the same layer, able to run batches expert by expert
        return layer
    return build


def _install(layer: nn.Module, layout: MoeLayout, moe: SparseMoe) -> None:
    """moe replaces the layer's sparse MLP, registered under the checkpoint's name; for Mixtral
    (disk: block_sparse_moe, memory: mlp) the layer's forward still finds it as self.mlp through
    a plain attribute that no state dict sees."""
    del layer.mlp
    setattr(layer, layout.attr, moe)
    if layout.attr != "mlp":
        object.__setattr__(layer, "mlp", moe)


def moe_adapter(layout: MoeLayout):
    @torch.no_grad()
    def adapt(layer: nn.Module, config: Any) -> None:
        """A transformers decoder layer (fused experts) made into the one moe_builder builds:
        every expert linear's weight is a view of the fused parameters (gate_up_proj[e] rows
        [0, F) and [F, 2F), down_proj[e]), the routers and shared expert share the model's tensors."""
        fused = layer.mlp
        if not hasattr(fused, "experts"):  # a dense layer: as transformers holds it
            return
        param = fused.experts.gate_up_proj
        with torch.device("meta"):
            moe = SparseMoe(config, layout)
        width = fused.experts.down_proj.shape[-1]
        gate, up, down = layout.names
        for e, expert in enumerate(moe.experts):
            for name, w in ((gate, param[e, :width]), (up, param[e, width:]), (down, fused.experts.down_proj[e])):
                getattr(expert, name).weight = nn.Parameter(w, requires_grad=False)
        moe.gate.weight = fused.gate.weight
        if hasattr(moe.gate, "e_score_correction_bias"):
            moe.gate.e_score_correction_bias = fused.gate.e_score_correction_bias
        if layout.shared:
            setattr(moe, layout.shared, getattr(fused, layout.shared))
        if layout.shared_gate:
            getattr(moe, layout.shared_gate).weight = getattr(fused, layout.shared_gate).weight
        _install(layer, layout, moe)
    return adapt


def _moe_groups(layout: MoeLayout, attention: Callable[[Any], list[ScaleGroup]]):
    gate, up, down = layout.names
    p = layout.attr

    def groups(config: Any) -> list[ScaleGroup]:
        n = int(getattr(config, layout.n_experts))
        out = attention(config)
        # the norm feeds every expert's gate and up (and the shared expert's): one s for all of
        # them, judged on the sparse MLP's output over all tokens; the routers absorb it exactly
        first = tuple(f"{p}.experts.{e}.{name}" for e in range(n) for name in (gate, up))
        shared = (f"{p}.{layout.shared}.gate_proj", f"{p}.{layout.shared}.up_proj") if layout.shared else ()
        absorbers = (f"{p}.gate",) + ((f"{p}.{layout.shared_gate}",) if layout.shared_gate else ())
        out.append(ScaleGroup("post_attention_layernorm", first + shared, p, input_of=p, absorbers=absorbers))
        # each expert's up -> down, on the tokens routed to it
        out += [ScaleGroup(f"{p}.experts.{e}.{up}", (f"{p}.experts.{e}.{down}",), f"{p}.experts.{e}.{down}")
                for e in range(n)]
        if layout.shared:
            out.append(ScaleGroup(f"{p}.{layout.shared}.up_proj", (f"{p}.{layout.shared}.down_proj",),
                                  f"{p}.{layout.shared}.down_proj"))
        if not all(layout.sparse(config, i) for i in range(config.num_hidden_layers)):  # dense layers' MLPs
            out += [ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")]
        return out
    return groups


def _ignored(layout: MoeLayout):
    def ignored(config: Any) -> list[str]:
        # the routers stay unquantized; full module names, which both formats' loaders match
        # (compressed-tensors by name, AutoAWQ/vLLM by substring)
        names = ["gate"] + ([layout.shared_gate] if layout.shared_gate else [])
        return ["lm_head"] + [f"{LLAMA.layers_prefix}.{i}.{layout.attr}.{n}" for i in range(config.num_hidden_layers)
                              if layout.sparse(config, i) for n in names]
    return ignored


def moe_family(name: str, layout: MoeLayout, attention: Callable[[Any], list[ScaleGroup]] = attention_groups,
               **fields: Any) -> Family:
    """A LLaMA-like family whose MLPs are (some or all) sparse, with its block builder and the
    adapter of transformers' whole-model layers registered; `fields` replace LLaMA's others."""
    BLOCK_BUILDERS[name] = moe_builder(layout)
    LAYER_ADAPTERS[name] = moe_adapter(layout)
    return dataclasses.replace(LLAMA, name=name, model_types=(name,), scale_groups=_moe_groups(layout, attention),
                               extra_linears=_ignored(layout), layer_kind=_layer_kind(layout), **fields)


MIXTRAL = moe_family("mixtral", MoeLayout("block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts",
                                          "intermediate_size", None, False))
QWEN2_MOE = moe_family("qwen2_moe", MoeLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                                              "moe_intermediate_size", "norm_topk_prob", True,
                                              shared="shared_expert", shared_gate="shared_expert_gate"))
QWEN3_MOE = moe_family("qwen3_moe", MoeLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                                              "moe_intermediate_size", "norm_topk_prob", True))
