"""The planner against measured memory: every tensor one block's quantization holds at once
stays within the plan's estimate (measured on the CPU allocator, in the GPU's float16 and in
float32, with forward passes of whole chunks and of one sample), and the plan's terms follow
the block's real shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from helpers import peak_allocated_during
from make_tiny_model import make_tiny
from streamq.block import captured_inputs, quantize_block
from streamq.budget import MAX_CHUNK_SAMPLES, SLACK_BYTES, BlockShape, plan_block
from streamq.config import QuantConfig
from streamq.families import build_block, detect
from streamq.families.base import meta_block
from streamq.shards import ShardReader

N_SAMPLES, SEQLEN = 8, 64


@pytest.fixture(scope="module")
def one_block_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return {name: make_tiny(root / name, family, hidden=256, ffn=1024, layers=1, heads=4, kv_heads=kv, vocab=512,
                            tokenizer=False, max_shard_size="100MB")
            for name, family, kv in (("opt", "opt", None), ("llama", "llama", None), ("llama_gqa", "llama", 2),
                                     ("mixtral", "mixtral", 2), ("qwen2_moe", "qwen2_moe", None))}


def shape_of(config, qcfg=QuantConfig()):
    family = detect(config)
    block = meta_block(config)
    captured = captured_inputs(block, family, config)
    return BlockShape.of(block, captured, family.scale_groups(config), qcfg.group_size, qcfg.clip_tokens)


@pytest.mark.parametrize("name", ["opt", "llama", "llama_gqa", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("micro", [None, 1])
def test_measured_peak_stays_within_the_estimate(one_block_models, name, dtype, micro):
    """Activations resident on the (CPU) device, as a roomy GPU budget plans them: weights,
    inputs and everything quantize_block allocates peak below the estimate without its slack."""
    config = AutoConfig.from_pretrained(one_block_models[name])
    family, cpu, elem = detect(config), torch.device("cpu"), torch.finfo(dtype).bits // 8
    plan = plan_block(shape_of(config), N_SAMPLES, SEQLEN, elem, budget=10**12, micro=micro)
    assert plan.activations_on_device and plan.chunk_samples == N_SAMPLES
    block = build_block(config, 0, ShardReader(one_block_models[name]).with_prefix(family.block_prefix(0)), cpu, dtype)
    x = torch.randn(N_SAMPLES, SEQLEN, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    chunks = list(x.split(4))
    kwargs = family.block_kwargs(config, SEQLEN, cpu, dtype)
    held = sum(p.numel() for p in block.parameters()) * elem + x.numel() * elem
    measured = held + peak_allocated_during(
        lambda: quantize_block(block, family, config, chunks, kwargs, QuantConfig(), cpu, micro=micro))
    assert measured <= plan.estimated_peak_bytes - SLACK_BYTES, (measured, plan)


def test_references_are_as_wide_as_the_inspected_output(one_block_models):
    """OPT's fc1 group is judged on fc1's own output (FFN-wide); LLaMA's groups on hidden-wide
    outputs; the captured inputs are q's, out/o's, fc1's or gate's (hidden) and fc2's or down's (FFN)."""
    opt = shape_of(AutoConfig.from_pretrained(one_block_models["opt"]))
    llama = shape_of(AutoConfig.from_pretrained(one_block_models["llama_gqa"]))
    assert (opt.ref_width, opt.captured_width, opt.hidden) == (1024, 3 * 256 + 1024, 256)
    assert (llama.ref_width, llama.captured_width) == (256, 3 * 256 + 1024)
    assert llama.largest_group == 2 * 256 * 1024  # gate + up, cloned during their search


def test_one_sample_forward_passes_free_the_chunk_size(one_block_models):
    """With forward passes of one sample, a chunk costs only its stored activations: the
    largest chunk fits where whole-chunk forward passes would have to stay small."""
    shape = shape_of(AutoConfig.from_pretrained(one_block_models["opt"]))
    whole = plan_block(shape, 128, 512, 2, budget=None)
    budget = plan_block(shape, 128, 512, 2, budget=10**12, micro=1).estimated_peak_bytes
    single = plan_block(shape, 128, 512, 2, budget=budget, micro=1)
    chunked = plan_block(shape, 128, 512, 2, budget=budget)
    assert single.chunk_samples == MAX_CHUNK_SAMPLES and single.forward_samples == 1
    assert chunked.chunk_samples < single.chunk_samples and chunked.forward_samples is None
    assert whole.minimum_bytes == single.minimum_bytes  # one sample in flight either way
