"""Shared test helpers: a tiny model in memory with calibration inputs for its first block."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from streamq.families import Family, detect
from streamq.families.base import eager_only
from streamq.reference import first_block_inputs


_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def needs_gpu(test):
    """A test that runs on a CUDA device only (tools/gpu_check.py runs them: pytest -m gpu)."""
    return pytest.mark.gpu(_no_cuda(test))


# a test about behaviour that must hold on every device runs on the CPU, and on the GPU where
# there is one
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _no_cuda])]


@dataclass
class Setup:
    model: Any
    family: Family
    config: Any
    layers: Any
    x_chunks: list[torch.Tensor]
    kwargs: dict


def setup_model(model_dir: Path, n_samples: int = 8, seqlen: int = 64, chunk: int = 4, seed: int = 0) -> Setup:
    config = AutoConfig.from_pretrained(model_dir)
    attn = "eager" if eager_only(config) else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    family = detect(model.config)
    layers = model.get_submodule(family.layers_prefix)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (n_samples, seqlen), generator=g)
    x = first_block_inputs(model, layers[0], ids, chunk, torch.device("cpu"))
    kwargs = family.block_kwargs(model.config, seqlen, torch.device("cpu"), torch.float32)
    return Setup(model, family, model.config, layers, x, kwargs)


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    """Every file of an output directory but streamq.json (which records timings)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "streamq.json"}


def rechunk(chunks: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return list(torch.cat(chunks).split(size))


def peak_allocated_during(fn) -> int:
    """Bytes of CPU tensor memory allocated at the peak of fn() above what was allocated when it
    started, read from the CPU allocator's own running total as the profiler records it at
    every allocation (the peak always follows an allocation): torch.cuda.max_memory_allocated
    for a CPU run. Only what fn allocates is tracked: freeing a tensor made before fn lowers no
    total, so tensors that fn replaces must be made inside it."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    events.sort()
    start = events[0][2] - events[0][1]  # the running total just before the first event
    return max(total for _, _, total in events) - start


def killed_run_resumes_byte_identical(args: list[str], tmp_path: Path, kill_at: str = "block1:search") -> str:
    """`streamq run` with `args` (no --output) whole, and again SIGKILLed at `kill_at` then
    resumed: both outputs are byte-identical. Returns the whole run's stdout."""
    import os
    import subprocess
    import sys

    run = [sys.executable, "-m", "streamq", "run", *args]
    whole = subprocess.run([*run, "--output", str(tmp_path / "whole")], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    cut = subprocess.run([*run, "--output", str(tmp_path / "cut")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "STREAMQ_KILL_AT": kill_at})
    assert cut.returncode == -9
    resumed = subprocess.run([sys.executable, "-m", "streamq", "resume", str(tmp_path / "cut"), "--device", "cpu"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint_bytes(tmp_path / "cut") == checkpoint_bytes(tmp_path / "whole")
    return whole.stdout


def mixture_streams_as_reference(model_dir: Path, out_root: Path, calib) -> Path:
    """A mixture of experts quantized by the unstreamed reference and by the engine with no
    budget and at the smallest (which parks the experts): the same bytes each time, the plan the
    forecast's, the experts parked only under the budget. Returns the smallest budget's output."""
    import json

    from streamq import engine, reference
    from streamq.config import QuantConfig
    from streamq.forecast import forecast

    reference.quantize(model_dir, out_root / "ref", QuantConfig(), calib, chunk_samples=4, device="cpu")
    expected = checkpoint_bytes(out_root / "ref")
    minimum = engine.plan(model_dir, QuantConfig(), calib, device="cpu").minimum_bytes
    for budget in (None, minimum):
        out = out_root / f"s{budget}"
        summary = engine.quantize(model_dir, out, QuantConfig(), calib, device="cpu", max_gpu_mem=budget)
        assert checkpoint_bytes(out) == expected
        assert summary.plan.experts_parked == (budget is not None)
        told = forecast(model_dir, QuantConfig(), calib, device="cpu", max_gpu_mem=budget)
        assert told.plan == json.loads((out / "streamq.json").read_text())["plan"]
    return out
