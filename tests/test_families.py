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
    state = reader.with_prefix("model.decoder.layers.0.")
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
