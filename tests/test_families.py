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
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'.*opt, llama, mistral, qwen2"):
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
