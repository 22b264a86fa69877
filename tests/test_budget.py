"""The planner against measured memory: every tensor one block's quantization holds at once
stays within the plan's estimate (measured on the CPU allocator, in the GPU's float16 and in
float32, with forward passes of whole chunks and of one sample), and the plan's terms follow
the block's real shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig

from helpers import peak_allocated_during
from make_tiny_model import make_tiny
from streamq.block import captured_inputs, quantize_block
from streamq.budget import MAX_CHUNK_SAMPLES, SLACK_BYTES, BlockShape, plan_block
from streamq.config import QuantConfig
from streamq.errors import SettingsError
from streamq.families import build_block, detect, moe
from streamq.families.base import meta_block
from streamq.placement import is_parked
from streamq.search import run_module
from streamq.shards import ShardReader

N_SAMPLES, SEQLEN = 8, 64


@pytest.fixture(scope="module")
def one_block_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return {name: make_tiny(root / name, family, hidden=256, ffn=1024, layers=1, heads=4, kv_heads=kv, vocab=512,
                            tokenizer=False, max_shard_size="100MB")
            for name, family, kv in (("opt", "opt", None), ("llama", "llama", None), ("llama_gqa", "llama", 2),
                                     ("mixtral", "mixtral", 2), ("qwen2_moe", "qwen2_moe", None),
                                     ("deepseek_v3", "deepseek_v3", None))}


def shape_of(config, qcfg=QuantConfig()):
    family = detect(config)
    block = meta_block(config)
    captured = captured_inputs(block, family, config)
    return BlockShape.of(block, captured, family.scale_groups(config), qcfg.group_size, qcfg.clip_tokens)


@pytest.mark.parametrize("name,park", [("opt", False), ("llama", False), ("llama_gqa", False), ("mixtral", False),
                                       ("qwen2_moe", False), ("qwen2_moe", True), ("deepseek_v3", False),
                                       ("deepseek_v3", True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("micro", [None, 1])
def test_measured_peak_stays_within_the_estimate(one_block_models, name, park, dtype, micro):
    """Activations resident on the (CPU) device, as a roomy GPU budget plans them: weights,
    inputs and everything quantize_block allocates peak below the estimate without its slack.
    With the experts parked (Qwen2-MoE: routed experts parked, the shared one on the device),
    their weights are in host memory: not counted as held, and every copy of them that comes to
    the device is (each load is a real copy, on a CPU too)."""
    config = AutoConfig.from_pretrained(one_block_models[name])
    family, cpu, elem = detect(config), torch.device("cpu"), torch.finfo(dtype).bits // 8
    plan = plan_block(shape_of(config), N_SAMPLES, SEQLEN, elem, budget=10**12, micro=micro, park=park)
    assert plan.activations_on_device and plan.chunk_samples == N_SAMPLES and plan.experts_parked == park
    block = build_block(config, 0, ShardReader(one_block_models[name]).with_prefix(family.block_prefix(0)), cpu, dtype,
                        park=park)
    x = torch.randn(N_SAMPLES, SEQLEN, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    chunks = list(x.split(4))
    kwargs = family.block_kwargs(config, SEQLEN, cpu, dtype)
    on_device = [p for m in block.modules() if not is_parked(m) for p in m.parameters(recurse=False)]
    assert len(on_device) < len(list(block.parameters())) if park else len(on_device) == len(list(block.parameters()))

    def upload_and_quantize():
        # the device's weights, allocated where the profiler sees them: the search replaces a
        # group's weights by their clones and candidates, and the allocator's frees of tensors
        # made before profiling are not counted (a GPU's are), which counted those weights twice
        for p in on_device:
            p.data = p.data.clone()
        quantize_block(block, family, config, chunks, kwargs, QuantConfig(), cpu, micro=micro)
    measured = x.numel() * elem + peak_allocated_during(upload_and_quantize)
    assert measured <= plan.estimated_peak_bytes - SLACK_BYTES, (measured, plan)


def test_parked_experts_compute_the_same_bytes(one_block_models, monkeypatch):
    """The sparse MLP and its decoder layer with parked experts (each expert loaded once for all
    the forward passes of a chunk) compute what they compute with every expert on the device,
    and so do the records, tensors and next inputs of the block's quantization; parking is what
    a budget too small for the whole block but large enough for one expert at a time plans."""
    config = AutoConfig.from_pretrained(one_block_models["qwen2_moe"])
    family, cpu = detect(config), torch.device("cpu")
    x = torch.randn(N_SAMPLES, SEQLEN, config.hidden_size, generator=torch.Generator().manual_seed(1))
    kwargs = family.block_kwargs(config, SEQLEN, cpu, torch.float32)
    results = []
    for park in (False, True):
        block = build_block(config, 0, ShardReader(one_block_models["qwen2_moe"]).with_prefix(family.block_prefix(0)),
                            cpu, torch.float32, park=park)
        batches = list(x[:3, None])  # three batches of one sample, as a GPU runs them
        assert all(torch.equal(a, block.mlp(b)) for a, b in zip(block.mlp.forward_batches(batches), batches))
        if park:  # the whole layer too, each parked expert loaded once for the three batches
            loads, real = [], moe.loaded
            monkeypatch.setattr(moe, "loaded", lambda module: (loads.append(module), real(module))[1])
            together = list(block.forward_batches(batches, kwargs))
            assert 0 < len(loads) <= len(block.mlp.experts) and len(set(map(id, loads))) == len(loads)
            monkeypatch.setattr(moe, "loaded", real)
            assert all(torch.equal(a, run_module(block, b, kwargs)) for a, b in zip(together, batches))
        results.append(quantize_block(block, family, config, list(x.split(4)), kwargs, QuantConfig(), cpu, micro=1))
    (whole, parked) = results
    assert len(whole[0].scales) == len(parked[0].scales) and len(whole[0].clips) == len(parked[0].clips)
    assert all(torch.equal(a.scales, b.scales) for a, b in zip(whole[0].scales, parked[0].scales))
    assert all(torch.equal(a.max_val, b.max_val) for a, b in zip(whole[0].clips, parked[0].clips))
    assert whole[1].keys() == parked[1].keys() and all(torch.equal(whole[1][k], parked[1][k]) for k in whole[1])
    assert all(torch.equal(a, b) for a, b in zip(whole[2], parked[2]))
    shape = shape_of(config)
    fits_parked = plan_block(shape, N_SAMPLES, SEQLEN, 4, budget=None, park=True).minimum_bytes
    assert plan_block(shape, N_SAMPLES, SEQLEN, 4, budget=fits_parked).experts_parked
    assert not plan_block(shape, N_SAMPLES, SEQLEN, 4, budget=10**12).experts_parked
    with pytest.raises(SettingsError, match="one expert of"):
        plan_block(shape, N_SAMPLES, SEQLEN, 4, budget=fits_parked - 1)


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


def test_a_gpu_passes_a_fixed_number_of_samples_and_chunks_in_multiples_of_it(one_block_models):
    """forward_samples: a power of two decided by the model and calibration shape (at most 4096
    tokens, intermediates under 256 MiB, no more than there are samples), never by the budget; the
    plan's chunks are multiples of it (or every sample), down to one pass at the smallest budget."""
    from streamq.budget import chunk_sizes, forward_bytes, forward_samples

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    shape = shape_of(AutoConfig.from_pretrained(one_block_models["opt"]))
    assert forward_samples(cpu, shape, 128, 512, 2) is None
    assert forward_samples(cuda, shape, 128, 512, 2) == 8 and forward_samples(cuda, shape, 128, 2048, 2) == 2
    assert forward_samples(cuda, shape, 5, 512, 2) == 4 and forward_samples(cuda, shape, 1, 512, 2) == 1
    wide = dataclasses.replace(shape, widest=28672, hidden=7168)  # OPT-30B: 161 MB a sample at 512 tokens
    assert forward_bytes(wide, 512, 2) == 512 * 2 * (4 * 28672 + 6 * 7168)
    assert forward_samples(cuda, wide, 128, 512, 2) == 1
    assert forward_samples(cuda, dataclasses.replace(shape, widest=11008, hidden=4096), 128, 512, 2) == 2  # LLaMA-2-7B
    assert chunk_sizes(10, 64, 4) == [4, 8, 10] and chunk_sizes(10, 64, None) == list(range(1, 11))
    plans = [plan_block(shape, 20, 512, 2, budget=b, micro=4) for b in (None, 10**12)]
    smallest = plan_block(shape, 20, 512, 2, budget=plans[1].minimum_bytes, micro=4)
    assert [p.chunk_samples for p in plans + [smallest]] == [16, 20, 4]
    assert smallest.minimum_bytes > plan_block(shape, 20, 512, 2, budget=None, micro=1).minimum_bytes
    with pytest.raises(SettingsError, match="4 calibration samples of 512 tokens in flight"):
        plan_block(shape, 20, 512, 2, budget=smallest.minimum_bytes - 1, micro=4)


def test_resident_says_where_activations_may_live(one_block_models):
    """plan_block(resident=...): True only on the device, False only streamed (what a model with
    two kinds of blocks asks of each), None either; the smallest budget is that of the places
    allowed."""
    shape = shape_of(AutoConfig.from_pretrained(one_block_models["opt"]))
    assert plan_block(shape, 16, 512, 2, budget=10**12).activations_on_device
    assert not plan_block(shape, 16, 512, 2, budget=10**12, resident=False).activations_on_device
    on_device = plan_block(shape, 16, 512, 2, budget=None, resident=True).minimum_bytes
    streamed = plan_block(shape, 16, 512, 2, budget=None, resident=False).minimum_bytes
    assert on_device != streamed
    assert plan_block(shape, 16, 512, 2, budget=None).minimum_bytes == min(on_device, streamed)
    with pytest.raises(SettingsError, match="is too small"):
        plan_block(shape, 16, 512, 2, budget=on_device - 1, resident=True)
