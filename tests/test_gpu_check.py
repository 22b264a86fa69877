"""tools/gpu_check.py in its CPU mode (--device cpu --small), so that the one-call GPU check
cannot rot between the sessions that have a GPU: every stage that needs no CUDA device runs
at tiny widths and must pass; the CUDA stages say why they were skipped; one broken stage
does not stop the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


def gpu_check(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out),
                           "--work", str(out / "work"), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = gpu_check(out)
    return proc, json.loads((out / "summary.json").read_text()), out


def test_cpu_mode_passes_every_stage_it_can_run(cpu_run):
    proc, summary, out = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = summary["stages"]
    assert list(stages) == ["env", "build", "gpu-tests", "kernels-run", "ppl", "formats", "wide-opt-30b",
                            "bench-kernels", "bench-matmul", "wide-llama-3-70b", "wide-llama-2-7b", "wide-llama-2-7b-gptq", "wide-mixtral-8x7b",
                            "trace-llama-2-7b", "wide-deepseek-v3", "rtn-llama-2-7b",
                            "parallel-2-ranks"]
    cuda_only = ("build", "gpu-tests", "kernels-run", "bench-kernels", "bench-matmul")
    for name in cuda_only:
        assert stages[name] == {"status": "skipped", "reason": "needs a CUDA device"}
    assert all(stages[name]["status"] == "ok" for name in stages if name not in cuda_only)
    assert stages["env"]["torch"] and stages["env"]["cuda_available"] is False
    assert "| stage | status | seconds | figures |" in proc.stdout  # the summary table, printed last
    assert (out / "gpu_check.log").stat().st_size > 0


def test_trace_stage_profiles_one_block(cpu_run):
    table = cpu_run[1]["stages"]["trace-llama-2-7b"]["table"]
    assert any("under the profiler" in line for line in table) and any("aten::mm" in line for line in table)
    assert "| capture |" in "\n".join(table)  # the phases beside the operators


def test_rtn_stage_runs_without_calibration(cpu_run):
    stage = cpu_run[1]["stages"]["rtn-llama-2-7b"]
    (run,) = stage["runs"].values()  # on a CPU no second device to compare with
    assert run["data_free"] is True and run["device"] == "cpu" and len(run["block_seconds"]) == stage["layers"]
    assert stage["identical"] is None


def test_parallel_stage_splits_the_blocks_over_two_ranks_to_the_same_bytes(cpu_run):
    stage = cpu_run[1]["stages"]["parallel-2-ranks"]
    assert stage["identical"] is True
    ranks = stage["runs"]["torchrun-2"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["blocks"][0] == 0
    assert ranks[0]["blocks"][1] == ranks[1]["blocks"][0] and ranks[1]["blocks"][1] == stage["layers"]


def test_formats_stage_loads_the_output_with_transformers(cpu_run):
    formats = cpu_run[1]["stages"]["formats"]
    for label, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        assert formats[label]["weights_equal"] and formats[label]["max_logit_diff"] == 0.0
        assert formats[label]["model_dtype"] == dtype and formats[label]["linears"] == 14


def test_ppl_stage_compares_float16_with_float32(cpu_run):
    ppl = cpu_run[1]["stages"]["ppl"]
    for label in ("fp16-weights", "awq-int4"):
        figures = ppl[label]
        assert figures["check_dtype"] == "float16" and figures["check_device"] == "cpu"
        assert figures["rel_diff"] <= ppl["tolerance_rel"] and figures["segments"] > 1


@pytest.mark.parametrize("name", ["opt-30b", "llama-2-7b", "llama-3-70b", "llama-2-7b-gptq", "mixtral-8x7b",
                                  "deepseek-v3"])
def test_wide_stages_run_both_budgets_byte_identical(cpu_run, name):
    stage = cpu_run[1]["stages"][f"wide-{name}"]
    assert stage["identical"] is True and stage["layers"] == 2
    roomy, tight = stage["runs"]["roomy"], stage["runs"]["tight"]
    assert roomy["activations_on_device"] and tight["budget_bytes"] < roomy["budget_bytes"]
    # the smallest budget: one chunk of one forward pass (a sample; a mixture's fixed passes
    # even on a CPU, here all 4 samples, so kept on the device), streamed from host memory
    assert tight["chunk_samples"] == (tight["forward_samples"] or 1)
    moe = name in ("mixtral-8x7b", "deepseek-v3")
    assert tight["activations_on_device"] == moe
    for run in (roomy, tight):
        assert len(run["block_seconds"]) == 2 and run["planned_peak_bytes"] <= run["budget_bytes"]
        assert {"capture", "read and upload weights"} <= set(run["phases"])  # gptq alone has no clip phase
        assert sum(run["phases"].values()) <= 1.05 * sum(run["block_seconds"])
        assert run["compute_dtype"] == "float32" and run["kernels"] == "torch"
        assert run["peak_allocated_bytes"] is None and run["peak_rss_bytes"] > 0  # a CPU run
    # a mixture's smallest budget parks its experts in host memory; the roomy one keeps them
    assert (roomy["experts_parked"], tight["experts_parked"]) == (False, moe)
    if name == "deepseek-v3":  # an FP8 source, as DeepSeek-V3 is published
        assert stage["shape"]["fp8"] is True
    if name == "llama-3-70b":
        assert stage["shape"]["kv_heads"] == 2  # grouped-query attention, as LLaMA-3-70B's 8 of 64
    if name == "opt-30b":  # the headline command on the layout facebook/opt-30b is published in
        assert stage["model"] == "facebook/opt-30b" and stage["shape"]["published"] == "facebook/opt-30b"


def test_a_broken_stage_does_not_stop_the_others(tmp_path):
    proc = gpu_check(tmp_path, "--stages", "env,wide-llama-2-7b", env={"STREAMQ_GPU_CHECK_BREAK": "env"})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 1 and summary["ok"] is False
    assert summary["stages"]["env"]["status"] == "CRASH"
    assert "broken on purpose" in summary["stages"]["env"]["error"]
    assert summary["stages"]["wide-llama-2-7b"]["status"] == "ok"
