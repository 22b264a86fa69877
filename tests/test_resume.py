"""Interrupted runs: SIGKILL at named points, resume, byte-identical output; refusals."""

import errno
import json
import os
import subprocess
import sys

import pytest

from helpers import needs_gpu
from streamq import engine, writer
from streamq.config import CalibConfig
from streamq.errors import DiskFullError, ResumeError

ARGS = ["--n-samples", "6", "--seqlen", "64", "--shard-size", "150KB"]


def streamq(*args, kill_at=None, device="cpu", env=None):
    """The CLI in a child process (so that it can be killed); run and resume on `device`."""
    env = {**os.environ, "STREAMQ_KILL_AT": kill_at or "", **(env or {})}
    where = ["--device", device] if args[0] in ("run", "resume") else []
    return subprocess.run([sys.executable, "-m", "streamq", *map(str, args), *where], env=env,
                          capture_output=True, text=True, timeout=600)


def checkpoint(out):
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "streamq.json"}
    assert files, out
    return files


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    out = {}
    for name in ("opt", "llama"):
        result = streamq("run", "--model", tiny_models[name], "--output", root / name, *ARGS)
        assert result.returncode == 0, result.stderr
        assert len(list((root / name).glob("model-*.safetensors"))) >= 3  # several shards
        out[name] = checkpoint(root / name)
    return out


KILL_POINTS = ["block0:search", "block1:search", "shard1:written", "shard2:written", "block0:hidden", "block0:journal",
               "block1:journal"]


# every point on OPT; on LLaMA (the same journal, another family's blocks) one before and one
# after the first commit
@pytest.mark.parametrize("family,kill_at", [("opt", k) for k in KILL_POINTS] + [("llama", "block0:search"),
                                                                                ("llama", "block1:journal")])
def test_sigkill_then_resume_is_byte_identical(tiny_models, uninterrupted, tmp_path, family, kill_at):
    out = tmp_path / "out"
    killed = streamq("run", "--model", tiny_models[family], "--output", out, *ARGS, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr  # really killed at that point
    resumed = streamq("resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint(out) == uninterrupted[family]
    assert sorted(p.name for p in (out / ".streamq").iterdir()) == ["journal.json", "lock"]


@needs_gpu
@pytest.mark.parametrize("kill_at", ["block0:search", "block1:journal"])
def test_sigkill_then_resume_on_a_gpu_is_byte_identical(tiny_models, tmp_path, kill_at):
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert streamq("run", "--model", tiny_models["llama"], "--output", whole, *ARGS, device="cuda").returncode == 0
    killed = streamq("run", "--model", tiny_models["llama"], "--output", out, *ARGS, kill_at=kill_at, device="cuda")
    assert killed.returncode == -9, killed.stderr
    resumed = streamq("resume", out, device="cuda")
    assert resumed.returncode == 0 and "streamq: warning" not in resumed.stderr, resumed.stderr
    assert checkpoint(out) == checkpoint(whole)


def test_two_successive_kills(tiny_models, uninterrupted, tmp_path):
    out = tmp_path / "out"
    assert streamq("run", "--model", tiny_models["llama"], "--output", out, *ARGS,
                   kill_at="block0:hidden").returncode == -9
    assert streamq("resume", out, kill_at="shard2:written").returncode == -9
    assert streamq("resume", out).returncode == 0
    assert checkpoint(out) == uninterrupted["llama"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_stops_at_safe_point_and_says_how_to_resume(tiny_models, uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    result = streamq("run", "--model", tiny_models["opt"], "--output", out, *ARGS, kill_at=f"block0:search:{sig}")
    assert result.returncode == 2
    assert f"stopped by {sig} after block 1 of 2; continue with: streamq resume {out}" in result.stderr
    assert "Traceback" not in result.stderr
    assert streamq("resume", out).returncode == 0
    assert checkpoint(out) == uninterrupted["opt"]


def test_run_onto_interrupted_dir_suggests_resume(tiny_models, tmp_path):
    out = tmp_path / "out"
    streamq("run", "--model", tiny_models["opt"], "--output", out, *ARGS, kill_at="block1:search")
    result = streamq("run", "--model", tiny_models["opt"], "--output", out, *ARGS)
    assert result.returncode == 2
    assert "holds an interrupted run (1 of 2 blocks done); continue it with: streamq resume" in result.stderr


def test_resume_of_complete_run(tiny_models, tmp_path):
    out = tmp_path / "out"
    assert streamq("run", "--model", tiny_models["opt"], "--output", out, *ARGS).returncode == 0
    result = streamq("resume", out)
    assert result.returncode == 2 and "is already complete (2 of 2 blocks); nothing to resume" in result.stderr


def test_resume_of_a_non_run_directory(tmp_path):
    (tmp_path / "x").mkdir()
    result = streamq("resume", tmp_path / "x")
    assert result.returncode == 2 and "is not a streamq run directory" in result.stderr


def test_changed_source_model_refused(tiny_models, tmp_path):
    import shutil

    src = shutil.copytree(tiny_models["opt"], tmp_path / "src")
    out = tmp_path / "out"
    streamq("run", "--model", src, "--output", out, *ARGS, kill_at="block1:search")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0" * 8)  # a different file size
    result = streamq("resume", out)
    assert result.returncode == 2 and "changed since the run started" in result.stderr


def test_tampered_shard_detected(tiny_models, tmp_path):
    out = tmp_path / "out"
    small_shards = [*ARGS[:-1], "20KB"]  # so that shards are recorded before the kill
    streamq("run", "--model", tiny_models["opt"], "--output", out, *small_shards, kill_at="block1:journal")
    assert "model-00001.safetensors" in json.loads((out / ".streamq" / "journal.json").read_text())["writer"]["hashes"]
    shard = out / "model-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = streamq("resume", out)
    assert result.returncode == 2 and "model-00001.safetensors does not match the hash" in result.stderr


def test_options_that_change_the_result_are_refused_on_resume(tmp_path):
    result = streamq("resume", tmp_path, "--w-bit", "3")
    assert result.returncode != 0 and "No such option" in result.stderr


@pytest.mark.parametrize("victim,expected", [("model-", r"model-00002.safetensors.tmp"),
                                             ("journal.json", r"journal.json.tmp")])
def test_disk_full_stops_cleanly_and_resumes(tiny_models, uninterrupted, tmp_path, monkeypatch, victim, expected):
    calls = []
    real = writer.replace_atomic

    def full_on_second_write(tmp, final):
        calls.append(final.name.startswith(victim))
        if sum(calls) == 2 and calls[-1]:  # the fsync of the temporary file reports a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, final)

    monkeypatch.setattr(writer, "replace_atomic", full_on_second_write)
    out = tmp_path / "out"
    calib = CalibConfig(n_samples=6, seqlen=64)
    with pytest.raises(DiskFullError, match=rf"disk full while writing .*{expected}; free space, then run: streamq resume"):
        engine.quantize(tiny_models["opt"], out, calib=calib, shard_bytes=150_000, device="cpu")
    assert not list(out.glob("*.tmp")) and not list((out / ".streamq").glob("*.tmp"))
    monkeypatch.setattr(writer, "replace_atomic", real)
    engine.resume(out, device="cpu")
    assert checkpoint(out) == uninterrupted["opt"]
    with pytest.raises(ResumeError, match="already complete"):
        engine.resume(out, device="cpu")


def test_writer_holds_no_tensor_in_memory(tmp_path):
    """Packed tensors go to the spool as they arrive: pending is metadata only."""
    import torch

    w = writer.ShardWriter(tmp_path, max_bytes=10**9)
    w.add("a", torch.arange(6, dtype=torch.int32).reshape(2, 3))
    w.add("b", torch.ones(5, dtype=torch.float16))
    assert all(not isinstance(x, torch.Tensor) for p in w.pending for x in p)
    assert w.spool().stat().st_size == 6 * 4 + 5 * 2
    w.finish()
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "model-00001.safetensors")
    assert torch.equal(loaded["a"], torch.arange(6, dtype=torch.int32).reshape(2, 3))
    assert torch.equal(loaded["b"], torch.ones(5, dtype=torch.float16))
    assert not (tmp_path / ".streamq").exists()


def test_out_of_device_memory_mid_block_is_one_line_and_resumes_with_a_smaller_budget(
        tiny_models, uninterrupted, tmp_path, monkeypatch):
    """torch.OutOfMemoryError inside block 1's work (injected; a GPU raises it when the
    caching allocator's reserve outgrows the plan): the block's work is dropped, the journal
    stays at block 1, and the line names the block, the budget and the command with a budget
    15 % smaller; that command finishes the run with the bytes of an uninterrupted one."""
    from typer.testing import CliRunner

    from streamq.cli import app
    from streamq.config import QuantConfig, parse_size

    calib = CalibConfig(n_samples=6, seqlen=64)
    minimum = engine.plan(tiny_models["opt"], QuantConfig(), calib, device="cpu").minimum_bytes
    budget = 3 * minimum
    out = tmp_path / "out"
    monkeypatch.setenv("STREAMQ_KILL_AT", "block1:search:OOM")
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_models["opt"]), "--output", str(out), *ARGS,
                                      "--device", "cpu", "--max-gpu-mem", f"{budget}B"])
    lines = [line for line in result.stderr.splitlines() if line.startswith("streamq: error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "out of GPU memory in block 1 (under --max-gpu-mem" in lines[0]
    assert "its partial work is dropped and the blocks before it are kept" in lines[0]
    suggested = lines[0].rsplit("--max-gpu-mem ", 1)[1]
    assert lines[0].endswith(f"not the bytes: streamq resume {out} --max-gpu-mem {suggested}")
    assert minimum <= parse_size(suggested) <= budget * 85 // 100
    assert json.loads((out / ".streamq" / "journal.json").read_text())["done_blocks"] == 1
    monkeypatch.delenv("STREAMQ_KILL_AT")
    engine.resume(out, device="cpu", max_gpu_mem=parse_size(suggested))
    assert checkpoint(out) == uninterrupted["opt"]


def test_out_of_memory_at_the_smallest_budget_says_no_smaller_one_fits():
    from streamq.budget import Plan
    from streamq.engine import out_of_memory_message

    plan = Plan(chunk_samples=1, activations_on_device=False, estimated_peak_bytes=100 << 20, minimum_bytes=100 << 20)
    near = out_of_memory_message(plan, 105 << 20, 104 << 20, 3, __import__("pathlib").Path("OUT"))
    assert "out of GPU memory in block 3 (its work reached 104.00MiB under --max-gpu-mem 105.00MiB" in near
    assert near.endswith("streamq resume OUT --max-gpu-mem 100MiB")  # 15 % less, but not below the smallest
    message = out_of_memory_message(plan, 100 << 20, 100 << 20, 3, __import__("pathlib").Path("OUT"))
    assert message.endswith("no smaller budget fits one block (the smallest is 100MiB): free the device's memory (is "
                            "another process using it?), then run: streamq resume OUT")


@pytest.mark.parametrize("change", ["replaced", "truncated"])
def test_a_source_shard_changed_mid_run_is_one_line_and_the_run_resumes(tiny_models, uninterrupted, tmp_path, change):
    """The shards are checked again each time they are opened: a shard replaced (another
    header) or cut short after block 0 is refused when block 1 opens it, the finished block is
    kept, and with the original back the resume is byte-identical."""
    import shutil

    from streamq.errors import InputError

    src = shutil.copytree(tiny_models["opt"], tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = src / index["model.decoder.layers.1.fc1.weight"]
    original = shard.read_bytes()

    def after(done, total):
        if done == 1:
            assert b'"pt"' in original[:4096]
            shard.write_bytes(original[:-64] if change == "truncated" else original.replace(b'"pt"', b'"PT"', 1))

    out = tmp_path / "out"
    calib = CalibConfig(n_samples=6, seqlen=64)
    with pytest.raises(InputError, match=rf"^block 1: {shard} changed while it was being read .*; put the original "
                                         rf"back; the finished blocks are kept: once it is mended, continue with: "
                                         rf"streamq resume {out}$"):
        engine.quantize(src, out, calib=calib, shard_bytes=150_000, device="cpu", on_block=after)
    shard.write_bytes(original)
    engine.resume(out, device="cpu")
    assert checkpoint(out) == uninterrupted["opt"]


@pytest.mark.parametrize("victim", ["model.safetensors.index.json", "config.json", "streamq.json"])
def test_disk_full_at_the_final_writes_is_one_line_and_resumes(tiny_models, uninterrupted, tmp_path, monkeypatch,
                                                               victim):
    real = writer.replace_atomic

    def full(tmp, final):
        if final.name == victim:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, final)

    monkeypatch.setattr(writer, "replace_atomic", full)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=rf"disk full while writing .*{victim}.tmp; free space, then run: "
                                            rf"streamq resume {out}$"):
        engine.quantize(tiny_models["opt"], out, calib=CalibConfig(n_samples=6, seqlen=64), shard_bytes=150_000,
                        device="cpu")
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(writer, "replace_atomic", real)
    engine.resume(out, device="cpu")
    assert checkpoint(out) == uninterrupted["opt"]


def test_sigkill_at_random_moments_of_run_and_resume(tiny_models, uninterrupted, tmp_path):
    """Seeded random moments among every fault point a run passes (each tensor's append to
    the spool, each shard, each journal entry, the final index and metadata): kill the run
    there, kill its resume at another, resume again: byte-identical, and no .tmp left."""
    import random

    log = tmp_path / "points.log"
    whole = streamq("run", "--model", tiny_models["opt"], "--output", tmp_path / "whole", *ARGS,
                    env={"STREAMQ_FAULT_LOG": str(log)})
    assert whole.returncode == 0, whole.stderr
    names = log.read_text().split()
    moments = [f"{name}#{names[:i + 1].count(name)}" for i, name in enumerate(names)]  # each passing, counted
    assert {"spool:appended#1", "shard1:written#1", "block1:journal#1", "final:index#1",
            "final:metadata#1"} <= set(moments)
    for seed in range(3):
        rng = random.Random(seed)
        out = tmp_path / f"out{seed}"
        first = rng.choice(moments)
        killed = streamq("run", "--model", tiny_models["opt"], "--output", out, *ARGS, kill_at=first)
        assert killed.returncode == -9, (first, killed.stderr)
        again = streamq("resume", out, kill_at=rng.choice(moments))  # a point the resume may not pass
        assert again.returncode in (0, -9), again.stderr
        if again.returncode == -9:
            assert streamq("resume", out).returncode == 0
        assert checkpoint(out) == uninterrupted["opt"], (seed, first)
        assert not [p for p in out.rglob("*.tmp")], seed


def test_a_data_free_rtn_run_killed_and_resumed_is_byte_identical(tiny_models, tmp_path):
    """No hidden states are journaled (there are none); the resume still starts at the first
    unfinished block and writes the same bytes."""
    from helpers import killed_run_resumes_byte_identical

    killed_run_resumes_byte_identical(["--model", str(tiny_models["opt"]), "--mode", "rtn", "--device", "cpu",
                                       "--shard-size", "60KB"], tmp_path, kill_at="block1:journal")
