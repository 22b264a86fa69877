"""The unstreamed reference: the whole model in memory, AWQ block by block, as the paper's
code runs it. It is the oracle the streaming engine must match byte for byte."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from .families.base import LAYER_ADAPTERS
from .block import BlockRecords, check_shapes, check_storable, quantize_block
from .calib import calibration_blocks, tokens_digest
from .checkpoint import write_metadata, write_non_block_tensors
from .config import CalibConfig, QuantConfig
from .families.base import eager_only
from .forecast import block_plan
from .formats import by_name, settle
from .kernels import select as select_kernels
from .models import check_output_dir, claim_output_dir, compute_dtype, load_tokenizer, open_checkpoint, resolve_device
from .writer import DEFAULT_SHARD_BYTES, ShardWriter


@dataclass
class Result:
    records: list[BlockRecords]
    calib_ids: torch.Tensor


class _StopForward(Exception):
    pass


@torch.no_grad()
def first_block_inputs(model: torch.nn.Module, first_block: torch.nn.Module, ids: torch.Tensor,
                       chunk_samples: int, device: torch.device) -> list[torch.Tensor]:
    """Hidden states entering block 0, from the model's own embedding code, per chunk."""
    caught: list[torch.Tensor] = []

    def catch(module, args, kwargs):
        caught.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], chunk_samples):
            try:
                model(input_ids=ids[start:start + chunk_samples].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    qcfg: QuantConfig = QuantConfig(),
    calib: CalibConfig = CalibConfig(),
    device: str = "auto",
    chunk_samples: int = 16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    on_block: Callable[[int, int], None] | None = None,
    kernels: str = "auto",
    compute: str = "auto",
    format: str = "awq",
) -> Result:
    """Quantize model_dir into out_dir holding the whole model in memory. Device, compute
    dtype, kernels and forward-pass size resolve as in the engine, so both run the same ops."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite)
    reader, hf_config, family = open_checkpoint(model_dir)
    dev = resolve_device(device)
    dtype = compute_dtype(dev, compute, reader.float_dtype())
    fmt = by_name(format)
    qcfg = settle(fmt, qcfg, reader.float_dtype())
    ops = select_kernels(kernels, dev, dtype)[0]
    micro = block_plan(hf_config, family, qcfg, calib, dev, dtype, None)[1].forward_samples  # the engine's passes
    if micro:  # chunks in multiples of the passes, as the engine cuts them
        chunk_samples = -(-chunk_samples // micro) * micro
    ids = calibration_blocks(calib, load_tokenizer(model_dir), hf_config.vocab_size)

    hf_logging.disable_progress_bar()
    attn = "eager" if eager_only(hf_config) else "sdpa"  # as build_block: Gemma 2's soft-capped logits
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model = model.to(dev).eval()
    layers = model.get_submodule(family.layers_prefix)
    adapt = LAYER_ADAPTERS.get(hf_config.model_type)
    for i, block in enumerate(layers):
        if adapt:
            adapt(block, model.config)
        check_shapes(block, family.block_prefix(i), qcfg.group_size)
    claim_output_dir(out_dir, overwrite).release(remove=True)  # emptied as a run empties it

    x_chunks = first_block_inputs(model, layers[0], ids, chunk_samples, dev)
    writer = ShardWriter(out_dir, shard_bytes)
    all_records = []
    if on_block:
        on_block(0, len(layers))
    for i, block in enumerate(layers):
        kwargs = family.block_kwargs(model.config, calib.seqlen, dev, dtype, i)
        records, tensors, x_chunks = quantize_block(block, family, hf_config, x_chunks, kwargs, qcfg, ops=ops,
                                                    micro=micro, fmt=fmt, where=family.block_prefix(i))
        check_storable(tensors, family.block_prefix(i))
        for name, t in tensors.items():
            writer.add(family.block_prefix(i) + name, t)
        all_records.append(records)
        if on_block:
            on_block(i + 1, len(layers))
    write_non_block_tensors(reader, family, writer, qcfg.storage_torch_dtype)
    writer.finish()
    write_metadata(out_dir, model_dir, family, hf_config, qcfg, calib, tokens_digest(ids),
                   reader.fingerprint(), fmt, extra={"engine": "reference"})
    return Result(all_records, ids)
