"""The Gram-matrix loss: equal to the forward-pass loss up to float32 rounding, the same bits for
any chunking and any block size of G, the same picks on the tiny families, planned within budget."""

import pytest
import torch
from torch import nn

import streamq.gram as gram
from streamq.block import capture, input_source, search_block
from streamq.budget import BlockShape, plan_block
from streamq.config import QuantConfig
from streamq.families.base import meta_block
from streamq.search import act_scale, search_scale, search_scale_gram

from helpers import rechunk, setup_model


def linear_and_inputs(dtype: torch.dtype, outliers: bool, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(256, 192, bias=True).to(dtype)
    x = torch.randn(6, 64, 256)
    if outliers:  # salient channels, as AWQ's activations have them
        x[..., 7] *= 30
        x[..., 100] *= 10
    return lin, x.to(dtype)


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_gram_loss_equals_the_forward_pass_loss(dtype, rel, outliers):
    """Every candidate's loss within float32 rounding of the forward pass's (fp16: the pass rounds
    its outputs to fp16, which the Gram form does not), and the same pick."""
    lin, x = linear_and_inputs(dtype, outliers)
    chunks, qcfg = [x[:4], x[4:]], QuantConfig(group_size=64)
    s_tok, by_tokens = search_scale(lin, [lin], chunks, act_scale(chunks), {}, qcfg)
    s_gram, by_gram = search_scale_gram(lin, chunks, act_scale(chunks), qcfg)
    assert len(by_gram) == len(by_tokens) == 20
    assert max(abs(a - b) / a for a, b in zip(by_tokens, by_gram)) < rel
    assert torch.equal(s_tok, s_gram)
    # a pick that matters: with outliers the best candidate scales, and beats no scaling clearly
    if outliers:
        assert min(by_gram) < 0.9 * by_gram[0]


def test_gram_loss_is_the_same_bits_for_any_chunking_and_equal_for_any_block_size(monkeypatch):
    lin, x = linear_and_inputs(torch.float32, True, seed=1)
    qcfg = QuantConfig(group_size=64)
    x_mean = act_scale([x])
    whole = search_scale_gram(lin, [x], x_mean, qcfg)[1]
    for size in (1, 4):
        assert search_scale_gram(lin, rechunk([x], size), x_mean, qcfg)[1] == whole
    monkeypatch.setattr(gram, "GRAM_BLOCK", 96)  # three blocks a side: off-diagonal blocks count twice
    monkeypatch.setattr(gram, "ROW_ELEMS", 50 * 256)  # the error made and multiplied 50 rows at a time
    assert len(gram.pairs(256)) == 6 and gram.row_spans(192, 256)[-1] == (150, 192)
    blocked = search_scale_gram(lin, [x], x_mean, qcfg)[1]
    assert max(abs(a - b) / a for a, b in zip(whole, blocked)) < 1e-6
    assert search_scale_gram(lin, rechunk([x], 2), x_mean, qcfg)[1] == blocked


def test_gram_blocks_hold_the_upper_triangle_of_xtx(monkeypatch):
    monkeypatch.setattr(gram, "GRAM_BLOCK", 64)
    x = torch.randn(3, 10, 150, dtype=torch.float64).float()
    full = sum(s.double().t() @ s.double() for s in x)
    blocks = gram.gram([x], torch.device("cpu"), torch.device("cpu"))
    for g, (r, c) in zip(blocks, gram.pairs(150)):
        torch.testing.assert_close(g.double(), full[r[0]:r[1], c[0]:c[1]], rtol=1e-5, atol=1e-4)
    assert [tuple(g.shape) for g in blocks] == [(64, 64), (64, 64), (64, 22), (64, 64), (64, 22), (22, 22)]
    assert gram.gram_bytes(150) == sum(g.numel() for g in blocks) * 4


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_search_block_picks_as_the_forward_pass_does(tiny_models, name):
    """On the tiny families every group's pick is the forward pass's; only the groups judged on
    one linear's own output change how their loss is computed."""
    s = setup_model(tiny_models[name])
    block = s.layers[0]
    feats, _ = capture(block, s.x_chunks, s.kwargs, set(input_source(block, s.family, s.config).values()))
    by_gram = search_block(block, s.family, s.config, feats, s.kwargs, QuantConfig())
    by_tokens = search_block(block, s.family, s.config, feats, s.kwargs, QuantConfig(gram_loss=False))
    own = {g.prev_op for g in s.family.scale_groups(s.config) if g.own_output}
    assert own  # fc1 -> fc2 (OPT), up -> down (LLaMA)
    for a, b in zip(by_gram.scales, by_tokens.scales):
        assert a.prev_op == b.prev_op and torch.equal(a.scales, b.scales)
        if a.prev_op in own:
            assert a.losses != b.losses and max(abs(p - q) / q for p, q in zip(a.losses, b.losses)) < 1e-5
        else:
            assert a.losses == b.losses


def test_runs_recorded_before_the_gram_loss_resume_with_the_forward_pass():
    recorded = QuantConfig().to_json()
    del recorded["gram_loss"]
    assert QuantConfig.from_json(recorded).gram_loss is False
    assert QuantConfig.from_json(QuantConfig().to_json()).gram_loss is True


def test_planner_counts_g_on_the_device_or_one_block_of_it():
    from transformers import OPTConfig

    config = OPTConfig(hidden_size=1024, ffn_dim=8192, num_attention_heads=16, num_hidden_layers=2)
    from streamq.families import detect
    from streamq.block import captured_inputs

    family, block = detect(config), meta_block(config)
    groups = family.scale_groups(config)

    def shape(on: bool) -> BlockShape:
        return BlockShape.of(block, captured_inputs(block, family, config), groups, 128, 512, gram_loss=on)

    with_g, without = shape(True), shape(False)
    assert with_g.gram_bytes == gram.gram_bytes(8192) == (2 * 4096 ** 2 + 4096 ** 2) * 4  # fc2's input, 8192 wide
    assert without.gram_bytes == without.gram_device_bytes == 0
    assert with_g.gram_streamed_bytes < with_g.gram_device_bytes
    # G whole is counted where the activations stay on the device
    on_device = plan_block(with_g, 16, 512, 2, budget=10**12)
    assert on_device.activations_on_device
    assert on_device.estimated_peak_bytes > plan_block(without, 16, 512, 2, budget=10**12).estimated_peak_bytes
    smallest = plan_block(with_g, 16, 512, 2, budget=None).minimum_bytes
    assert not plan_block(with_g, 16, 512, 2, budget=smallest).activations_on_device


def test_the_gram_form_is_used_where_it_costs_fewer_products(tiny_models):
    """cheaper(): at OPT-30B's fc2 with the paper's 65536 tokens the Gram form, for an expert the
    router gave 100 tokens at Mixtral's width the forward pass. A block calibrated on 8 tokens
    judges its up -> down group by forward passes: the very losses of --no-gram-loss."""
    assert gram.cheaper(65536, 7168, 28672, 20) and not gram.cheaper(100, 4096, 14336, 20)
    s = setup_model(tiny_models["llama"], n_samples=1, seqlen=8, chunk=1)
    block = s.layers[0]
    feats, _ = capture(block, s.x_chunks, s.kwargs, set(input_source(block, s.family, s.config).values()))
    by_rule = search_block(block, s.family, s.config, feats, s.kwargs, QuantConfig())
    by_tokens = search_block(block, s.family, s.config, feats, s.kwargs, QuantConfig(gram_loss=False))
    assert not gram.cheaper(8, 128, 256, 20)
    assert [r.losses for r in by_rule.scales] == [r.losses for r in by_tokens.scales]
