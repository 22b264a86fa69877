"""One decoder block end to end: capture its inputs, search, apply, quantize to output tensors.

Shared by the unstreamed reference and the streaming engine, so both run the same math.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .config import QuantConfig
from .errors import InputError, NumericError
from .families import Family
from .families.base import tensor_dtype
from .formats import Format, dense_state, dequantize, linear_tensors
from .timing import UNTIMED, Phases
from .formats.awq import AWQ
from .gram import cheaper
from .gptq import NotPositiveDefinite, gptq_quantize, hessian, scaled_hessian
from .kernels import TORCH, Ops
from .placement import (Assembler, TokenCollector, compute_device, loaded, original, parked_root,
                        upload)
from .quant import check_group_size, quant_params, quantize
from .search import (
    Chunks,
    ClipRecord,
    ScaleRecord,
    act_scale,
    check_foldable,
    fixed_scale,
    fold_into_inputs,
    fold_into_prev,
    keep_salient_quantize,
    run_batches,
    salient_channels,
    sample_tokens,
    search_scale,
    search_scale_gram,
    token_count,
)


@dataclass
class BlockRecords:
    """Everything the search decided for one block: enough to replay it exactly."""

    scales: list[ScaleRecord] = field(default_factory=list)
    clips: list[ClipRecord] = field(default_factory=list)
    salient: dict[str, torch.Tensor] = field(default_factory=dict)  # keep1: kept channels
    # linears that see only some tokens (experts): how many each input got, and those quantized
    # round-to-nearest (no scale of their own, no clip, no GPTQ) for having fewer than
    # qcfg.min_expert_tokens
    tokens: dict[str, int] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)

    def scales_by_linear(self) -> dict[str, torch.Tensor]:
        """Each scaled linear's s (its inputs are x / s)."""
        return {n: r.scales for r in self.scales for n in r.linears}


def linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def block_groups(block: nn.Module, family: Family, config: Any) -> list:
    """The family's scale groups this block has: those whose modules it holds (a model with two
    kinds of blocks, dense and sparse MLPs, lists the groups of both)."""
    have = {name for name, _ in block.named_modules()}
    return [g for g in family.scale_groups(config)
            if {g.prev_op, g.inspect, *g.linears, *g.absorbers, *([g.input_of] if g.input_of else [])} <= have]


def input_source(block: nn.Module, family: Family, config: Any) -> dict[str, str]:
    """For each linear, the linear whose captured input it shares: the first of its group under
    the same parent module (q/k/v; gate/up; one expert's gate/up, not another expert's)."""
    source = {name: name for name in linear_names(block)}
    for group in block_groups(block, family, config):
        first: dict[str, str] = {}
        for name in group.linears:
            source[name] = first.setdefault(name.rpartition(".")[0], name)
    return source


def captured_inputs(block: nn.Module, family: Family, config: Any) -> set[str]:
    """The modules whose inputs one block's quantization captures: each linear's (shared as
    input_source says) and the modules the scale groups read (a sparse MLP's)."""
    names = set(input_source(block, family, config).values())
    return names | {g.input_of for g in block_groups(block, family, config) if g.input_of}


def search_input(group) -> str:
    """The captured input a scale group's search reads."""
    return group.input_of or group.linears[0]


def routed(block: nn.Module, name: str) -> bool:
    """A linear that sees only the tokens routed to it (an expert's)."""
    return hasattr(block.get_submodule(name), "routed_fraction")


def check_shapes(block: nn.Module, prefix: str, group_size: int) -> None:
    for name in linear_names(block):
        check_group_size(block.get_submodule(name).in_features, group_size, f"{prefix}{name}")


@torch.no_grad()
def capture(
    block: nn.Module, x_chunks: Chunks, kwargs: dict, names: set[str], store: torch.device | None = None,
    micro: int | None = None,
) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Run the unmodified block over the chunks (forward passes of `micro` samples); return the
    inputs of `names` per chunk (as [b, T, C]) and the block outputs (the next block's inputs),
    kept on `store` (default: where each chunk came from)."""
    device = compute_device(block)
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    parts: dict[str, Assembler | TokenCollector] = {}
    seqlen: list[int] = []  # tokens per sample of the chunk being run

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            parts[name].add(args[0].detach().reshape(-1, seqlen[0], args[0].shape[-1]))  # OPT flattens tokens
        return record

    def routed_hook(name: str):
        parent = block.get_submodule(name.rpartition(".")[0])

        def record(module: nn.Module, args: tuple) -> None:
            # the expert holding this linear says which tokens of the micro-batch it is given
            parts[name].add(args[0].detach().reshape(-1, args[0].shape[-1]), parent.routed_tokens, seqlen[0])
        return record

    by_token = {n for n in names if routed(block, n)}
    handles = [block.get_submodule(n).register_forward_pre_hook(routed_hook(n) if n in by_token else hook(n))
               for n in names]
    outs = []
    try:
        for x in x_chunks:
            keep = store or x.device
            parts.update({n: TokenCollector(keep) if n in by_token else Assembler(keep, x.shape[0]) for n in names})
            out = Assembler(keep, x.shape[0])
            seqlen[:] = [x.shape[1]]
            # a block that runs several batches together (a MoE layer with parked experts) gets a
            # chunk's at once: each linear's inputs still arrive batch by batch, in order
            for y in run_batches(block, upload(x, device), kwargs, micro):
                out.add(y)
            outs.append(out.result())
            for n in names:
                if n in by_token:  # one entry per sample that routed any token here
                    feats[n].extend(parts.pop(n).result())
                else:
                    feats[n].append(parts.pop(n).result())
    finally:
        for h in handles:
            h.remove()
    return feats, outs


def folded_weight(block: nn.Module, name: str, records: BlockRecords) -> torch.Tensor:
    """A linear's weight with the scale records folded in, as a new float32 tensor on the
    block's compute device (a parked expert's comes from the host): times s
    along its inputs where it belongs to a group, divided by s along its rows where it is a
    group's previous op, in the order apply_scale replays the records. Never rounded to the
    compute dtype: in fp16 the scaled weights' rounding before quantization cost 0.4 % ppl on
    SmolLM2 (docs/benchmarks.md)."""
    w = original(block.get_submodule(name)).to(compute_device(block), torch.float32, copy=True)
    for record in records.scales:
        if record.prev_op == name:
            fold_into_prev(w, "linear", record)
        if name in record.linears:
            fold_into_inputs(w, record)
    return w


def folded_tensors(block: nn.Module, records: BlockRecords) -> dict[str, torch.Tensor]:
    """Every tensor of the block but the linears' weights, with the scales folded into the
    previous ops (norm weights and biases, linear biases divided by s), in float32."""
    linears = set(linear_names(block))
    out = {}
    for key, t in block.state_dict().items():
        module, param = key.rsplit(".", 1)
        if module in linears and param == "weight":
            continue
        t = t.to(torch.float32, copy=True)
        for record in records.scales:
            if record.prev_op == module and param in ("weight", "bias"):
                fold_into_prev(t, "bias" if param == "bias" else "norm", record)
            if module in record.absorbers and param == "weight":  # a router reading prev_op: W * s
                fold_into_inputs(t, record)
        out[key] = t
    return out


@torch.no_grad()
def search_block(
    block: nn.Module,
    family: Family,
    config: Any,
    feats: dict[str, list[torch.Tensor]],
    kwargs: dict,
    qcfg: QuantConfig,
    ops: Ops = TORCH,
    micro: int | None = None,
    phases: Phases = UNTIMED,
) -> BlockRecords:
    """Search this block's scales and clips per qcfg.mode; the block is left as it was (the
    records are folded in float32 when the output is made). `ops` says whether the PyTorch path
    or the CUDA kernels run the hot loops, `micro` how many samples each forward pass takes
    (None: a whole chunk)."""
    records = BlockRecords()
    source = input_source(block, family, config)
    device = compute_device(block)
    for key in sorted(set(source.values())):
        if routed(block, key):
            records.tokens[key] = token_count(feats[key])
    cold = {key for key, n in records.tokens.items() if n < qcfg.min_expert_tokens}
    records.fallback = [name for name in linear_names(block) if source[name] in cold]
    if qcfg.mode == "keep1":
        for name in linear_names(block):
            records.salient[name] = (torch.zeros(0, dtype=torch.long) if source[name] in cold else
                                     salient_channels(act_scale(feats[source[name]], device), qcfg.salient_frac))
        return records
    if qcfg.mode in ("awq", "s2"):
        for group in block_groups(block, family, config):  # every search sees the unscaled block, as in the paper
            if search_input(group) in cold:  # too few tokens to judge a scale: none (s = 1)
                continue
            x = feats[search_input(group)]
            x_mean = act_scale(x, device)
            if qcfg.mode == "awq":
                linears = [block.get_submodule(n) for n in group.linears]
                inspect = block.get_submodule(group.inspect)
                with loaded(parked_root(block, group.inspect)), phases(f"scale {group.prev_op}"):
                    # one parked expert's group: on the device while it is searched
                    if qcfg.gram_loss and group.own_output and cheaper(token_count(x), *inspect.weight.shape,
                                                                       qcfg.n_grid):
                        scales, losses = search_scale_gram(inspect, x, x_mean, qcfg, ops.scaled_pseudo_quantize)
                    else:
                        scales, losses = search_scale(inspect, linears, x, x_mean,
                                                      kwargs if group.inspect_takes_block_kwargs else {}, qcfg,
                                                      ops.scaled_pseudo_quantize, micro)
            else:
                scales, losses = fixed_scale(x_mean, qcfg.salient_frac), []
            records.scales.append(ScaleRecord(group.prev_op, group.linears, scales, losses, group.prev_rows,
                                              family.norm_offset, group.absorbers))
        for record in records.scales:
            check_foldable(block, record)
    if qcfg.mode == "awq" and qcfg.clip:
        scale_of = records.scales_by_linear()
        for name in linear_names(block):
            if name in family.no_clip or source[name] in cold:
                continue
            with phases("clip"):
                x_tok = sample_tokens(feats[source[name]], qcfg.clip_tokens).to(device)
                if name in scale_of:  # the scaled linear sees x / s
                    x_tok = x_tok / scale_of[name].to(device=device, dtype=x_tok.dtype)
                weight = folded_weight(block, name, records)
                records.clips.append(ClipRecord(name, ops.search_clip(weight, x_tok, qcfg)))
                del weight
    return records


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    family: Family,
    config: Any,
    x_chunks: Chunks,
    kwargs: dict,
    qcfg: QuantConfig,
    store: torch.device | None = None,
    ops: Ops = TORCH,
    micro: int | None = None,
    fmt: Format = AWQ,
    where: str = "",
    phases: Phases = UNTIMED,
) -> tuple[BlockRecords, dict[str, torch.Tensor], list[torch.Tensor]]:
    """The whole AWQ step for one block: (records, output tensors, next block's inputs).
    The next block's inputs are this block's unquantized outputs (as llm-awq does), or with
    qcfg.next_input "quantized" the outputs of the block as the checkpoint holds it (the GPTQ
    paper's sequential order: each block calibrated on what the quantized model feeds it).
    `phases` times capture, each scale group's search, the clip search, quantize-and-pack
    (GPTQ's rounding included) and the quantized next-input pass."""
    with phases("capture"):
        feats, x_next = capture(block, x_chunks, kwargs, captured_inputs(block, family, config), store, micro)
    if qcfg.next_input == "quantized":
        del x_next
    records = search_block(block, family, config, feats, kwargs, qcfg, ops, micro, phases)
    hessians = HessianSource(block, family, config, feats, records) if qcfg.gptq else None
    del feats  # GPTQ keeps the captured inputs through `hessians` until the last linear is done
    with phases("gptq and pack" if qcfg.gptq else "quantize and pack"):
        tensors = output_tensors(block, records, qcfg, fmt, hessians, where)
    if qcfg.next_input == "quantized":
        with phases("next input (quantized)"):
            x_next = capture(quantized_copy(block, tensors, qcfg, fmt), x_chunks, kwargs, set(), store, micro)[1]
    return records, tensors, x_next


def quantized_copy(block: nn.Module, tensors: dict[str, torch.Tensor], qcfg: QuantConfig, fmt: Format) -> nn.Module:
    """A copy of the block computing with the written tensors: packed linears dequantized as a
    loader does, every other tensor as stored; in the block's dtype, on its device. A parked
    expert stays parked and storage-less: each time it comes to the device its packed tensors
    (held for the writer anyway) are uploaded and dequantized there, so the copy holds on the
    device only what the block itself does, and nothing dense of the experts anywhere."""
    device, dtype = compute_device(block), next(block.parameters()).dtype
    twin = copy.deepcopy(block)
    packed = linear_tensors(fmt, list(tensors))
    parked: set[str] = set()  # the parked parameters, by full name
    for name, m in twin.named_modules():
        sources = m.__dict__.get("sources")
        if not sources:
            continue
        m.sources = {}
        for param in sources:
            key, kept = f"{name}.{param}", tensor_dtype(block, f"{name}.{param}", dtype)
            if param == "weight" and name in packed:
                m.sources[param] = _dequantizer(fmt, {s: tensors[t] for s, t in packed[name].items()}, qcfg.w_bit, kept)
            else:
                m.sources[param] = lambda to, t=tensors[key], kept=kept: t.to(device=to, dtype=kept)
            parked.add(key)
    held = {k: v for k, v in tensors.items() if k not in parked and k.rpartition(".")[0] + ".weight" not in parked}
    state = dense_state(fmt, held, qcfg.w_bit, device)
    missing, unexpected = twin.load_state_dict(
        {k: v.to(device, tensor_dtype(block, k, dtype)) for k, v in state.items()}, strict=False)
    if unexpected or set(missing) != parked:
        raise RuntimeError(f"the quantized copy does not match the block: missing {missing}, unexpected {unexpected}")
    return twin


def _dequantizer(fmt: Format, packed: dict[str, torch.Tensor], bits: int, dtype: torch.dtype):
    """A parked linear's source in the quantized copy: its packed tensors dequantized on the
    device it is loaded to."""
    return lambda device: dequantize(fmt, {s: t.to(device, non_blocking=True) for s, t in packed.items()},
                                     bits).to(dtype)


class HessianSource:
    """For GPTQ: each linear's input Hessian, computed from the captured inputs when asked for
    and kept while the next linear shares it (q/k/v, gate/up: same inputs, same scales)."""

    def __init__(self, block: nn.Module, family: Family, config: Any, feats: dict[str, list[torch.Tensor]],
                 records: BlockRecords):
        self.source, self.scale_of = input_source(block, family, config), records.scales_by_linear()
        self.feats, self.device = feats, compute_device(block)
        self.cache: dict[tuple, torch.Tensor] = {}

    def key(self, name: str) -> tuple:
        """Linears with the same key have the same Hessian: the same captured input, scaled alike."""
        scales = self.scale_of.get(name)
        return self.source[name], None if scales is None else id(scales)

    def __call__(self, name: str) -> torch.Tensor:
        key = self.key(name)
        if key not in self.cache:
            self.cache.clear()  # one Hessian at a time: linears sharing it come one after another
            self.cache[key] = scaled_hessian(hessian(self.feats[self.source[name]], self.device),
                                             self.scale_of.get(name))
        return self.cache[key]


def gptq_sets(names: list[str], shared: Callable[[str], object]) -> list[list[str]]:
    """Consecutive linears whose GPTQ shares one Hessian (`shared` gives the same key: q/k/v,
    gate/up), rounded together."""
    sets: list[list[str]] = []
    for name in names:
        if sets and shared(sets[-1][-1]) == shared(name):
            sets[-1].append(name)
        else:
            sets.append([name])
    return sets


def rounded(block: nn.Module, names: list[str], records: BlockRecords, qcfg: QuantConfig,
            hessians: HessianSource | None, where: str):
    """(name, codes, scales, zeros) of each linear, from its folded float32 weight clamped to its
    clips: round to nearest, or with GPTQ the linears of one Hessian stacked through one column
    loop (gptq_quantize's parts: the same codes as one at a time). One set's float32 weights
    exist at a time."""
    storage = qcfg.storage_torch_dtype
    clip_of = {r.linear: r.max_val for r in records.clips}

    def folded_clipped(name: str) -> torch.Tensor:
        w = folded_weight(block, name, records)
        if name in clip_of:
            max_val = clip_of[name].to(device=w.device, dtype=w.dtype)[..., None]
            w.view(w.shape[0], max_val.shape[1], -1).clamp_(-max_val, max_val)  # as apply_clip, in place
        return w

    by_rtn = {n for n in names if not qcfg.gptq or n in records.fallback}
    for group in gptq_sets(names, lambda n: n if n in by_rtn else hessians.key(n)):
        if group[0] in by_rtn:
            w = folded_clipped(group[0])
            scales, zeros = quant_params(w, qcfg.w_bit, qcfg.group_size, qcfg.zero_point, storage)
            yield group[0], quantize(w, scales, zeros, qcfg.w_bit, inplace=True), scales, zeros
            del w
            continue
        heights = [block.get_submodule(n).out_features for n in group]
        # each folded weight written into its rows of the set, held transposed as gptq_quantize
        # walks it (the transpose of [in, out] storage: no second copy of the set)
        w = torch.empty(block.get_submodule(group[0]).in_features, sum(heights), dtype=torch.float32,
                        device=compute_device(block)).t()
        for name, rows in zip(group, w.split(heights)):
            rows.copy_(folded_clipped(name))
        try:
            codes, scales, zeros = gptq_quantize(w, hessians(group[0]), qcfg.w_bit, qcfg.group_size, qcfg.zero_point,
                                                 storage, qcfg.gptq_damp, act_order=qcfg.gptq_act_order,
                                                 parts=heights)
        except NotPositiveDefinite as exc:
            raise NumericError(f"GPTQ cannot quantize {', '.join(where + n for n in group)}: the Hessian of "
                               f"{'its' if len(group) == 1 else 'their'} inputs is {exc}; calibrate with more samples "
                               "(--n-samples) or raise --gptq-damp") from None
        del w
        yield from zip(group, codes.split(heights), scales.split(heights), zeros.split(heights))


@torch.no_grad()
def output_tensors(block: nn.Module, records: BlockRecords, qcfg: QuantConfig, fmt: Format = AWQ,
                   hessians: HessianSource | None = None, where: str = "") -> dict[str, torch.Tensor]:
    """The block's tensors as written to the checkpoint (names relative to the block, on the
    host), from the unmodified block and its records: per linear the folded float32 weight,
    clamped to its clips, quantized and packed by the output format, or fake-quantized weights
    for keep1; every other tensor (norms, biases, scales folded in) in the storage dtype (fp16,
    or bf16 for compressed-tensors of a bf16 model)."""
    storage = qcfg.storage_torch_dtype
    out: dict[str, torch.Tensor] = {}
    names = linear_names(block)
    if qcfg.mode == "keep1":
        for name in names:
            w = original(block.get_submodule(name)).to(compute_device(block))
            out[f"{name}.weight"] = keep_salient_quantize(w, records.salient[name], qcfg).to(storage).cpu()
        names = []
    for name, codes, scales, zeros in rounded(block, names, records, qcfg, hessians, where):
        for key, t in fmt.pack(codes.contiguous(), scales.to(storage), zeros.to(torch.uint8), qcfg).items():
            out[f"{name}.{key}"] = t.cpu()
        del codes
    for key, t in folded_tensors(block, records).items():
        out[key] = t.to(tensor_dtype(block, key, storage)).cpu()
    return dict(sorted(out.items()))


def output_bytes(block: nn.Module, qcfg: QuantConfig, fmt: Format) -> int:
    """Bytes one block takes in the checkpoint, as output_tensors writes it, from its shapes
    alone (a block on the meta device will do): each linear packed by the format, every other
    tensor in the storage dtype."""
    storage = qcfg.storage_torch_dtype
    packed = set() if qcfg.mode == "keep1" else {f"{n}.weight" for n in linear_names(block)}
    total = sum(t.numel() * (torch.finfo(tensor_dtype(block, name, storage)).bits // 8)
                for name, t in block.state_dict().items() if name not in packed)
    for name in sorted(packed):
        out, inp = block.get_submodule(name[: -len(".weight")]).weight.shape
        groups = inp // qcfg.group_size
        codes = torch.empty(out, inp, dtype=torch.uint8, device="meta")
        scales = torch.empty(out, groups, dtype=storage, device="meta")
        tensors = fmt.pack(codes, scales, torch.empty(out, groups, dtype=torch.uint8, device="meta"), qcfg)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    return total


def check_finite(block: nn.Module, prefix: str) -> None:
    """Refuse a source block holding NaN or inf before it is searched (the search would find no
    finite loss and the earlier blocks' work would look lost): named, in one line."""
    for key, t in block.state_dict().items():
        if t.is_meta:  # a parked expert's: read from its source
            module, _, param = key.rpartition(".")
            t = original(block.get_submodule(module), param)
        # a float32 sum is finite when every value is (NaN and inf propagate); where it is not
        # (those, or an overflow of the sum) the values are counted one by one
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)) and \
                (bad := int((~torch.isfinite(t)).sum())):
            raise InputError(f"the source's {prefix}{key} holds {bad} non-finite values (NaN or inf) of {t.numel()}; "
                             "the checkpoint is damaged or was saved from a diverged model")


def check_storable(tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Refuse a block whose output tensors hold inf or NaN (a value beyond fp16's range, or an
    overflow in the computation) before anything of it is written."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NumericError(f"{prefix}{key} cannot be stored in {t.dtype}: {bad} of {t.numel()} values are not "
                               "finite (fp16 holds magnitudes up to 65504); nothing of this block was written. If the "
                               "computation overflowed, --compute-dtype float32 (or bfloat16 on a GPU) avoids it")
