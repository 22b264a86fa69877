"""Tiny random OPT / LLaMA checkpoints built on the fly (never fetched), shared per session;
the `slow` marker (real-model checks, run with --runslow or STREAMQ_SLOW=1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny_model import make_tiny  # noqa: E402

# Under pytest-xdist (the suite's default: one worker per core) each worker and every process
# it starts computes on one thread: two OpenMP pools spinning on each core slowed the suite
# 3x, while one thread per worker keeps both cores busy through the start-up of the many
# `streamq` processes the tests run (test_resume.py: 247 -> 153 s on 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "opt": make_tiny(root / "opt", "opt", seed=1),
        "llama": make_tiny(root / "llama", "llama", seed=2),
        "llama_gqa": make_tiny(root / "llama_gqa", "llama", kv_heads=2, seed=3, tokenizer=False),
        **{name: make_tiny(root / name, model_type, kv_heads=kv, seed=10 + i)
           for i, (name, (model_type, kv)) in enumerate(ZOO.items())},
    }


# the families beyond OPT and LLaMA: (model type, key/value heads), GQA where the family has it
# and without it where the v -> o group (Phi-3: a row range of qkv_proj) must be exercised
ZOO = {"mistral": ("mistral", 2), "qwen2": ("qwen2", 2), "qwen3": ("qwen3", None), "gemma2": ("gemma2", None),
       "gemma3": ("gemma3_text", 2), "phi3": ("phi3", None)}


@pytest.fixture(params=["opt", "llama", "llama_gqa", *ZOO])
def family_model(request, tiny_models) -> tuple[str, Path]:
    return request.param, tiny_models[request.param]


def pytest_addoption(parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the slow real-model tests")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--runslow") or os.environ.get("STREAMQ_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow real-model test: run with --runslow or STREAMQ_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
