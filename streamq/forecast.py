"""`streamq plan`: what a run would do, before any work, from the config and the shard headers
alone (never a weight): the chunking, where activations live, the device's estimated peak and the
smallest budget that fits, whether experts park, the host memory expected and the size on disk.
The engine plans its runs with the same function (block_plan), so the two cannot disagree."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import parallel
from .block import block_groups, captured_inputs, check_shapes, output_bytes
from .budget import BlockShape, Plan, format_bytes, forward_samples, host_bytes, plan_block
from .config import CalibConfig, QuantConfig
from .errors import SettingsError
from .families import Family, detect
from .families.base import meta_block
from .formats import Format, by_name, settle
from .models import check_seqlen, compute_dtype, dtype_name, load_config, open_checkpoint, resolve_device
from .shards import ShardReader
from .sources import resolve
from .sources.files import find

GB = 1e9


def block_plan(hf_config: Any, family: Family, qcfg: QuantConfig, calib: CalibConfig, dev: torch.device,
               dtype: torch.dtype, budget: int | None) -> tuple[BlockShape, Plan]:
    """The plan for the model's blocks under `budget` (SettingsError where one block does not
    fit), and the shapes of its largest block. A model with several kinds of blocks (dense and
    sparse MLPs) plans each kind and runs every block with what all of them allow: the smallest
    chunk, activations on the device only where every kind keeps them there, the largest fixed
    forward pass, experts parked where a kind parks them. A data-free run (RTN) plans one
    block's weights and their quantization, no sample in flight."""
    check_seqlen(hf_config, calib.seqlen)
    if qcfg.data_free:
        calib = CalibConfig(n_samples=1, seqlen=2)
    elem = torch.finfo(dtype).bits // 8
    shapes, found = [], set()
    for i in family.kinds(hf_config):
        block = meta_block(hf_config, i)
        check_shapes(block, family.block_prefix(i), qcfg.group_size)
        groups = block_groups(block, family, hf_config)
        found |= set(groups)
        shapes.append(BlockShape.of(block, captured_inputs(block, family, hf_config), groups, qcfg.group_size,
                                    qcfg.clip_tokens, qcfg.gram_loss and qcfg.mode == "awq"))
    unplaced = [g.prev_op for g in family.scale_groups(hf_config) if g not in found]
    if unplaced:  # a family names a group no block holds: a bug, not a setting
        raise RuntimeError(f"{family.name}: scale groups after {unplaced} match no block's modules")
    micros = [m for m in (forward_samples(dev, s, calib.n_samples, calib.seqlen, elem) for s in shapes) if m]
    micro = max(micros, default=None)

    def plans(resident: bool | None, budget: int | None) -> list[Plan]:
        return [plan_block(s, calib.n_samples, calib.seqlen, elem, budget, micro=micro, gptq=qcfg.gptq,
                           twin=qcfg.next_input == "quantized", resident=resident) for s in shapes]
    shape = max(shapes, key=lambda s: s.weight_elems)
    if len(shapes) == 1:
        return shape, plans(None, budget)[0]
    # one place for every kind's activations: on the device where all fit there, else streamed
    minimum = min(max(p.minimum_bytes for p in plans(place, None)) for place in (True, False))
    each = plans(False, None) if budget is None else _first_fitting(plans, budget)
    if each is None:
        raise SettingsError(f"--max-gpu-mem {format_bytes(budget)} is too small: a block of each kind needs at least "
                            f"{format_bytes(minimum, up=True)} (its weights, the search's copies of its largest "
                            "linears, and one forward pass of calibration samples, the activations of every kind "
                            "kept in one place)")
    return shape, Plan(min(p.chunk_samples for p in each), each[0].activations_on_device,
                       max(p.estimated_peak_bytes for p in each), minimum, micro, any(p.experts_parked for p in each))


def _first_fitting(plans, budget: int) -> list[Plan] | None:
    """Every kind's plan with its activations on the device, else all streamed; None where
    neither fits."""
    for place in (True, False):
        try:
            return plans(place, budget)
        except SettingsError:
            pass
    return None


def block_bytes(hf_config: Any, family: Family, qcfg: QuantConfig, fmt: Format) -> int:
    """Bytes the blocks take in the checkpoint, kind by kind."""
    kinds = {i: output_bytes(meta_block(hf_config, i), qcfg, fmt) for i in family.kinds(hf_config)}
    return sum(kinds[family.layer_kind(hf_config, i)] for i in range(family.n_layers(hf_config)))


def device_budget(dev: torch.device, budget: int | None) -> int | None:
    """--max-gpu-mem, or on a GPU its free memory, shared by the processes using it."""
    if budget is None and dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0] // parallel.ranks_per_device()
    return budget


@dataclass
class Forecast:
    source: dict
    family: str
    blocks: int
    device: str
    compute_dtype: str
    budget: int | None
    fits: bool
    plan: dict  # the run's Plan as streamq.json records it (the smallest budget's where it does not fit)
    host_bytes: int
    output_bytes: int
    source_bytes: int | None  # None: the weights are not here yet (a Hub id planned from its config)
    format: str
    w_bit: int
    group_size: int
    data_free: bool = False  # round-to-nearest: no calibration, no activations

    def to_json(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        p = self.plan
        budget = f"--max-gpu-mem {format_bytes(self.budget)}" if self.budget is not None else "no budget (CPU)"
        size = _size(self.source_bytes) if self.source_bytes is not None else "weights not downloaded yet"
        passes = _samples(p["forward_samples"]) if p["forward_samples"] else "whole chunks"
        where = ("on the device" if p["activations_on_device"] else
                 "in host memory" + (", streamed to the device" if self.device != "cpu" else ""))
        smallest = format_bytes(p["minimum_bytes"], up=True)
        work = (f"chunks of {_samples(p['chunk_samples'])}, activations {where}, forward passes of {passes}"
                if not self.data_free else "its weights rounded to nearest (no calibration, no activations)")
        lines = [
            f"{self.source['asked']}: {self.family}, {self.blocks} blocks ({size}); {self.device}, computing in "
            f"{self.compute_dtype}, {budget}",
            f"  every block: {work}" + ("; routed experts parked (read from the shards at each use, one at a time "
                                        "on the device)" if p["experts_parked"] else ""),
            f"  device peak (estimated): {format_bytes(p['estimated_peak_bytes'], up=True)}; smallest budget that "
            f"fits: {smallest}",
            f"  host memory (estimated): {format_bytes(self.host_bytes, up=True)}",
            f"  output: {_size(self.output_bytes)} ({self.format}, INT{self.w_bit}, group {self.group_size})",
        ]
        if self.fits:
            lines.append("  fits: yes")
        else:
            lines.append(f"  fits: no: one block needs at least {smallest}; run with --max-gpu-mem {smallest} or more "
                         "(a shorter --seqlen lowers the need; --n-samples does not)")
        return lines


def _samples(n: int) -> str:
    return f"{n} sample{'s' if n != 1 else ''}"


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 1e6:.2f} MB"


def _non_block_bytes(reader: ShardReader | None, hf_config: Any, family: Family, elem: int) -> int:
    """The tensors outside the blocks (embeddings, final norm, lm_head when untied), stored in
    the storage dtype: from the shards' headers, else from the config on the meta device."""
    prefix = family.layers_prefix + "."
    if reader is not None:
        return sum(elem * math.prod(reader.info(n).shape) for n in reader.names() if not n.startswith(prefix))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    state = model.state_dict()
    every_param = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    kept = [n for n, _ in model.named_parameters()]  # a tied tensor once, as save_pretrained writes it
    kept += [n for n in state if n not in every_param]  # persistent buffers
    return sum(elem * state[n].numel() for n in kept if not n.startswith(prefix))


def _target_device(device: str, budget: int | None) -> torch.device:
    """The device to plan for: a CUDA device may be planned on a machine without one, given the
    budget (what a 40 GB card would offer), as nothing runs."""
    if not device.startswith("cuda") or torch.cuda.is_available():
        return resolve_device(device)
    if budget is None:
        raise SettingsError("planning for a CUDA device on a machine without one needs --max-gpu-mem (the memory "
                            "the run would have, e.g. 40GB)")
    return torch.device(device)


def forecast(model: str | Path, qcfg: QuantConfig = QuantConfig(), calib: CalibConfig = CalibConfig(),
             device: str = "auto", max_gpu_mem: int | None = None, compute: str = "auto",
             revision: str | None = None, format: str = "awq") -> Forecast:
    """What `streamq run` with these settings would plan and need, reading no weight."""
    source = resolve(model, revision, weights=False)
    if find(source.path) is not None:
        reader, hf_config, family = open_checkpoint(source.path, headers_only=True)
    else:  # a Hub id planned from its config alone
        reader, hf_config = None, load_config(source.path)
        family = detect(hf_config)
    dev = _target_device(device, max_gpu_mem)
    stored = reader.float_dtype() if reader is not None else _config_dtype(hf_config)
    dtype = compute_dtype(dev, compute, stored)
    budget = device_budget(dev, max_gpu_mem)
    fmt: Format = by_name(format)
    qcfg = settle(fmt, qcfg, stored)
    try:
        shape, plan = block_plan(hf_config, family, qcfg, calib, dev, dtype, budget)
        fits = True
    except SettingsError as exc:
        if "is too small" not in str(exc):
            raise
        shape, plan = block_plan(hf_config, family, qcfg, calib, dev, dtype, None)
        plan = Plan(plan.forward_samples or 1, False, plan.minimum_bytes, plan.minimum_bytes, plan.forward_samples,
                    plan.experts_parked)
        fits = False
    elem = torch.finfo(dtype).bits // 8
    source_elem = torch.finfo(stored).bits // 8 if stored is not None else 2
    storage_elem = torch.finfo(qcfg.storage_torch_dtype).bits // 8
    n_layers = family.n_layers(hf_config)
    out = block_bytes(hf_config, family, qcfg, fmt) + _non_block_bytes(reader, hf_config, family, storage_elem)
    return Forecast(
        source=source.to_json(), family=family.name, blocks=n_layers, device=str(dev), compute_dtype=dtype_name(dtype),
        budget=budget, fits=fits, plan=plan.to_json(),
        host_bytes=host_bytes(shape, plan, 0 if qcfg.data_free else calib.n_samples, calib.seqlen, elem,
                              source_elem, dev.type == "cuda"),
        output_bytes=out, source_bytes=sum(p.stat().st_size for p in reader.shards()) if reader is not None else None,
        format=fmt.name, w_bit=qcfg.w_bit, group_size=qcfg.group_size, data_free=qcfg.data_free)


def _config_dtype(hf_config: Any) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
