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


def streamq(*args, kill_at=None, device="cpu"):
    """The CLI in a child process (so that it can be killed); run and resume on `device`."""
    env = {**os.environ, "STREAMQ_KILL_AT": kill_at or ""}
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
    assert sorted(p.name for p in (out / ".streamq").iterdir()) == ["journal.json"]


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
