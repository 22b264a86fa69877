"""Family adapters: detection, scale groups, one block built from the shards alone."""

import pytest
import torch
from transformers import AutoConfig

from streamq.errors import UnsupportedModelError
from streamq.families import build_block, detect
from streamq.search import run_module
from streamq.shards import ShardReader

from helpers import setup_model


def test_detect_refuses_unknown_architecture():
    config = AutoConfig.for_model("gpt2")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'.*opt, llama, mistral, qwen2, "
                                                    "qwen3, gemma2, gemma3_text, phi3"):
        detect(config)


def test_scale_groups_reference_real_modules(family_model):
    _, path = family_model
    s = setup_model(path, n_samples=2)
    block = s.layers[0]
    for group in s.family.scale_groups(s.config):
        prev = block.get_submodule(group.prev_op)
        block.get_submodule(group.inspect)
        widths = {block.get_submodule(n).in_features for n in group.linears}
        out_width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.numel()
        if group.prev_rows is not None:  # a fused linear: a row range of it feeds the group
            assert isinstance(prev, torch.nn.Linear) and group.prev_rows[1] <= out_width
            out_width = group.prev_rows[1] - group.prev_rows[0]
        assert widths == {out_width}, group


def test_block_built_from_shards_matches_the_model(family_model):
    """Only block 1's tensors are read (mmap'd), into a block built on the meta device."""
    _, path = family_model
    s = setup_model(path, n_samples=3)
    reader = ShardReader(path)
    config = AutoConfig.from_pretrained(path)
    state = reader.with_prefix(s.family.block_prefix(1))
    assert state and all(not k.startswith("layers.") for k in state)
    block = build_block(config, 1, state, torch.device("cpu"), torch.float32)
    assert all(p.device.type == "cpu" for p in block.parameters())
    with torch.no_grad():
        for x in s.x_chunks:
            assert torch.equal(run_module(block, x, s.kwargs), run_module(s.layers[1], x, s.kwargs))


def test_block_with_missing_tensor_is_refused(tiny_models):
    reader = ShardReader(tiny_models["opt"])
    config = AutoConfig.from_pretrained(tiny_models["opt"])
    state = dict(reader.with_prefix("model.decoder.layers.0."))
    del state["fc2.weight"]
    with pytest.raises(KeyError, match="fc2.weight"):
        build_block(config, 0, state, torch.device("cpu"), torch.float32)


def test_groups_that_cannot_be_folded_are_skipped_and_recorded(tiny_models, tmp_path):
    """Grouped-query attention: v_proj (Phi-3: qkv_proj's v rows) -> o_proj cannot absorb a
    scale; the group is left out of the search and named, with its reason, in streamq.json."""
    from streamq import engine
    from streamq.config import CalibConfig
    import json

    expected = {"qwen2": True, "gemma3": True, "phi3": False, "gemma2": False}
    for name, skipped in expected.items():
        config = AutoConfig.from_pretrained(tiny_models[name])
        family = detect(config)
        groups = family.scale_groups(config)
        assert any(g.linears == ("self_attn.o_proj",) for g in groups) != skipped
        engine.quantize(tiny_models[name], tmp_path / name, calib=CalibConfig(n_samples=2, seqlen=32), device="cpu")
        info = json.loads((tmp_path / name / "streamq.json").read_text())
        assert len(info["scale_groups"]) == len(groups)
        assert bool(info["skipped_scale_groups"]) == skipped
        if skipped:
            assert "grouped-query attention (2 key/value heads for 4 query heads)" in info["skipped_scale_groups"][0]
    phi3 = json.loads((tmp_path / "phi3" / "streamq.json").read_text())["scale_groups"]
    assert "self_attn.qkv_proj[256:384] -> self_attn.o_proj" in phi3 and "mlp.gate_up_proj[256:512] -> mlp.down_proj" in phi3


def test_post_norm_opt_folds_only_what_is_exact(tmp_path):
    """opt-350m normalises after attention and after the MLP: a norm's output also feeds the
    residual sum, so only v -> out_proj and fc1 -> fc2 take scales. Those fold exactly; folding
    one into self_attn_layer_norm (what a pre-norm OPT does) would change the block's output.
    The streamed run equals the unstreamed reference byte for byte."""
    import copy

    from helpers import checkpoint_bytes
    from make_published import OPT_350M
    from make_tiny_model import make_tiny
    from streamq import engine, reference
    from streamq.config import CalibConfig, QuantConfig
    from streamq.search import ScaleRecord, apply_scale

    path = make_tiny(tmp_path / "opt350", "opt", hidden=128, ffn=256, seed=7, config_extra=OPT_350M)
    s = setup_model(path, n_samples=2)
    assert [g.prev_op for g in s.family.scale_groups(s.config)] == ["self_attn.v_proj", "fc1"]
    assert len(s.family.skipped_groups(s.config)) == 2
    block, ref = s.layers[0], copy.deepcopy(s.layers[0])
    g = torch.Generator().manual_seed(5)

    def out(b):
        with torch.no_grad():
            return run_module(b, s.x_chunks[0], s.kwargs)

    for group in s.family.scale_groups(s.config):
        apply_scale(block, ScaleRecord(group.prev_op, group.linears, torch.rand(block.get_submodule(
            group.linears[0]).in_features, generator=g) * 3 + 0.2))
    torch.testing.assert_close(out(block), out(ref), rtol=1e-4, atol=1e-5)
    apply_scale(block, ScaleRecord("self_attn_layer_norm", ("fc1",), torch.rand(128, generator=g) * 3 + 0.2))
    assert not torch.allclose(out(block), out(ref), rtol=1e-2, atol=1e-3)
    calib = CalibConfig(n_samples=4, seqlen=32)
    reference.quantize(path, tmp_path / "ref", QuantConfig(group_size=64), calib, chunk_samples=2, device="cpu")
    engine.quantize(path, tmp_path / "stream", QuantConfig(group_size=64), calib, device="cpu")
    assert checkpoint_bytes(tmp_path / "stream") == checkpoint_bytes(tmp_path / "ref")
