"""The streaming engine: one decoder block on the device at a time, weights read from the
mmap'd shards, packed shards written as blocks finish. Output is byte-identical to
streamq.reference on the same inputs; memory scales with one block, not with the model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig

from .block import capture, to_store, check_shapes, input_source, output_tensors, search_block
from .budget import BlockShape, Plan, plan_block
from .calib import cut_blocks, load_tokens, tokens_digest
from .checkpoint import write_metadata, write_non_block_tensors
from .config import CalibConfig, QuantConfig
from .families import build_block, detect
from .families.base import meta_block
from .memory import peak_device, peak_rss, reset_peaks
from .models import check_output_dir, compute_dtype, load_tokenizer, prepare_output_dir, resolve_device
from .shards import ShardReader
from .writer import DEFAULT_SHARD_BYTES, ShardWriter


@dataclass
class Summary:
    plan: Plan
    blocks: list[dict] = field(default_factory=list)  # per block: seconds and measured peaks
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0


@torch.no_grad()
def quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    qcfg: QuantConfig = QuantConfig(),
    calib: CalibConfig = CalibConfig(),
    device: str = "auto",
    max_gpu_mem: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    on_block: Callable[[int, int], None] | None = None,
) -> Summary:
    """Quantize model_dir into out_dir, streaming one block at a time."""
    start = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite)
    reader = ShardReader(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    family = detect(hf_config)
    dev = resolve_device(device)
    dtype = compute_dtype(dev)
    n_layers = family.n_layers(hf_config)

    shape_block = meta_block(hf_config)  # every block has the same shapes
    check_shapes(shape_block, family.block_prefix(0), qcfg.group_size)
    captured = set(input_source(shape_block, family, hf_config).values())
    ids = cut_blocks(load_tokens(calib, load_tokenizer(model_dir)), calib, hf_config.vocab_size)
    elem = torch.finfo(dtype).bits // 8
    if max_gpu_mem is None and dev.type == "cuda":
        max_gpu_mem = torch.cuda.mem_get_info(dev)[0]
    shape = BlockShape.of(shape_block, captured, elem, qcfg.group_size, qcfg.clip_tokens)
    plan = plan_block(shape, calib.n_samples, calib.seqlen, elem, max_gpu_mem)
    store = dev if plan.activations_on_device else torch.device("cpu")
    prepare_output_dir(out_dir, overwrite)

    x_chunks = [to_store(family.embed(reader.get, hf_config, c, dev, dtype), store)
                for c in ids.split(plan.chunk_samples)]
    reader.release()
    kwargs = family.block_kwargs(hf_config, calib.seqlen, dev, dtype)
    writer = ShardWriter(out_dir, shard_bytes)
    summary = Summary(plan)
    if on_block:
        on_block(0, n_layers)
    for i in range(n_layers):
        t0 = time.time()
        reset_peaks(dev)
        prefix = family.block_prefix(i)
        block = build_block(hf_config, i, reader.with_prefix(prefix), dev, dtype)
        reader.release()
        # The next block's inputs are this block's unquantized outputs (as llm-awq does).
        feats, x_next = capture(block, x_chunks, kwargs, captured, store)
        records = search_block(block, family, hf_config, feats, kwargs, qcfg)
        for name, t in output_tensors(block, records, qcfg).items():
            writer.add(prefix + name, t)
        # records are not kept: at OPT-30B shape they are ~13 MB a block, growing with depth
        del block, feats, records
        x_chunks = x_next
        summary.blocks.append({"block": i, "seconds": round(time.time() - t0, 3),
                               "peak_rss_bytes": peak_rss(), "peak_gpu_bytes": peak_device(dev)})
        if on_block:
            on_block(i + 1, n_layers)
    write_non_block_tensors(reader, family, writer)
    writer.finish()
    summary.seconds = time.time() - start
    summary.input_bytes = sum(p.stat().st_size for p in reader.shards())
    summary.output_bytes = sum(p.stat().st_size for p in out_dir.glob("model-*.safetensors"))
    write_metadata(out_dir, model_dir, family, hf_config, qcfg, calib, tokens_digest(ids), reader.fingerprint(),
                   extra={"engine": "stream", "device": str(dev), "max_gpu_mem": max_gpu_mem,
                          "plan": plan.to_json(), "blocks": summary.blocks})
    return summary
