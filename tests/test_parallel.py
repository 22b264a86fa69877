"""Block-parallel runs under torchrun (gloo, CPU): every output tensor is byte-identical to a
one-process run's, for 2 and 3 processes, awq and rtn, with and without a tight budget; a
SIGKILLed rank resumes under torchrun to the same bytes; errors are one line naming the rank;
the block split puts fewer blocks on later ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from make_tiny_model import make_tiny
from streamq import engine
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import SettingsError
from streamq.parallel import split_blocks

CALIB = CalibConfig(n_samples=6, seqlen=64)
ARGS = ["--n-samples", "6", "--seqlen", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    return {family: make_tiny(root / family, family, layers=4, seed=70 + i) for i, family in enumerate(("opt", "llama"))}


def tensors(out: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor the index lists, read from the shard it names: dtype, shape, bytes."""
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    found = {}
    for shard in sorted(set(index.values())):
        for name, t in load_file(out / shard).items():
            assert index[name] == shard
            found[name] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert found.keys() == index.keys()
    return found


def torchrun(n: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "streamq",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_process(path: Path, out: Path, method: str, tight: bool) -> dict:
    qcfg = QuantConfig(mode=method)
    budget = engine.plan(path, qcfg, CALIB, device="cpu").minimum_bytes if tight else None
    engine.quantize(path, out, qcfg, CALIB, device="cpu", max_gpu_mem=budget)
    return tensors(out)


@pytest.mark.parametrize("family,n,method,tight", [("llama", 2, "awq", False), ("llama", 3, "rtn", True),
                                                   ("opt", 3, "awq", True), ("opt", 2, "rtn", False)])
def test_block_parallel_equals_one_process(models, tmp_path, family, n, method, tight):
    path = models[family]
    expected = one_process(path, tmp_path / "one", method, tight)
    budget = ["--max-gpu-mem", str(engine.plan(path, QuantConfig(mode=method), CALIB, device="cpu").minimum_bytes)
              ] if tight else []
    run = torchrun(n, "run", "--model", str(path), "--output", str(tmp_path / "par"), "--mode", method, *ARGS, *budget)
    assert run.returncode == 0, run.stderr[-3000:]
    assert tensors(tmp_path / "par") == expected
    for name in ("config.json", "quant_config.json"):
        if (tmp_path / "one" / name).is_file():
            assert (tmp_path / "par" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    info = json.loads((tmp_path / "par" / "streamq.json").read_text())
    assert info["world_size"] == n and [r["rank"] for r in info["ranks"]] == list(range(n))
    ranges = [tuple(r["blocks"]) for r in info["ranks"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 4 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert [b["block"] for b in info["blocks"]] == [0, 1, 2, 3]
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "par").glob("model-*.safetensors"))[0] == "rank0"
    assert "quantized 4 blocks" in run.stdout and run.stdout.count("quantized 4 blocks") == 1  # rank 0 reports


def test_killed_rank_resumes_under_torchrun(models, tmp_path):
    """Rank 2 of 3 is SIGKILLed as its block starts; torchrun stops the others; resume under
    torchrun continues every rank from its journal: the same bytes as one process."""
    path = models["llama"]
    expected = one_process(path, tmp_path / "one", "awq", False)
    out = tmp_path / "par"
    cut = torchrun(3, "run", "--model", str(path), "--output", str(out), *ARGS, env={"STREAMQ_KILL_AT": "block3:search"})
    assert cut.returncode != 0 and not (out / "model.safetensors.index.json").exists()
    refused = CliRunner().invoke(app, ["run", "--model", str(path), "--output", str(out), *ARGS])
    assert refused.exit_code == 2 and "torchrun --nproc-per-node 3 -m streamq resume" in refused.output
    alone = CliRunner().invoke(app, ["resume", str(out), "--device", "cpu"])
    assert alone.exit_code == 2 and "started by 3 processes" in alone.output
    resumed = torchrun(3, "resume", str(out), "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tensors(out) == expected
    assert "resumed with" in resumed.stdout


def test_a_refused_setting_is_one_line_naming_the_rank(models, tmp_path):
    """GPTQ's default calibrates each block on the quantized blocks before it, which chains them:
    refused by every rank, said once (by rank 0), nothing written."""
    run = torchrun(2, "run", "--model", str(models["opt"]), "--output", str(tmp_path / "g"), "--method", "gptq", *ARGS)
    lines = [line for line in run.stderr.splitlines() if line.startswith("streamq: error:")]
    assert lines == [lines[0]] and lines[0].startswith("streamq: error: rank 0: ") and "--next-input fp16" in lines[0]
    assert not (tmp_path / "g").exists()


def finish_time(ranges: list[tuple[int, int]], share: float) -> float:
    """When the last rank is done: rank r starts quantizing after the forward passes of blocks
    [0, b) and then quantizes b - a blocks (a block's quantization is 1, its forward `share`)."""
    return max(b * share + (b - a) for a, b in ranges)


def test_the_split_finishes_first_and_gives_later_ranks_fewer_blocks():
    """Against every split of up to 10 blocks over 2-4 ranks: none finishes earlier."""
    from itertools import combinations

    assert split_blocks(8, 2, 0.0) == [(0, 4), (4, 8)]
    for n_layers in range(4, 11):
        for world in range(2, 5):
            for share in (0.02, 0.1, 0.5):
                ranges = split_blocks(n_layers, world, share)
                assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
                assert all(x[1] == y[0] and y[1] > y[0] for x, y in zip(ranges, ranges[1:])) and ranges[0][1] > 0
                best = min(finish_time(list(zip((0, *cuts), (*cuts, n_layers))), share)
                           for cuts in combinations(range(1, n_layers), world - 1))
                assert finish_time(ranges, share) == pytest.approx(best)
    sizes = [b - a for a, b in split_blocks(80, 8, 0.05)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    with pytest.raises(SettingsError, match="at least one block"):
        split_blocks(4, 5)
