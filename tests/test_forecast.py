"""`streamq plan`: the plan a run would follow, from the config and the headers alone, equal to
the plan the run records; the size on disk equal to what the run writes; what to change where a
run would not fit; a Hub id planned from its config alone; --help that fits a terminal."""

from __future__ import annotations

import json
import struct

import pytest
from typer.testing import CliRunner

from streamq import engine
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import SettingsError
from streamq.forecast import forecast

CALIB = CalibConfig(n_samples=4, seqlen=64)


def tensor_bytes(out) -> int:
    """The bytes of every tensor a run wrote (the shards' data, headers aside)."""
    total = 0
    for shard in out.glob("model-*.safetensors"):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        total += sum(end - begin for begin, end in (v["data_offsets"] for v in header.values()))
    return total


@pytest.mark.parametrize("name,qcfg,fmt,budget", [
    ("opt", QuantConfig(), "awq", None),
    ("llama", QuantConfig(w_bit=3, zero_point=False), "compressed-tensors", "min"),
    ("qwen2_moe", QuantConfig(group_size=64), "awq", "parked"),
])
def test_the_plan_is_the_runs_and_the_size_is_what_it_writes(tiny_models, tmp_path, monkeypatch, name, qcfg, fmt,
                                                               budget):
    from make_tiny_model import make_tiny
    from streamq.sources import safetensors

    # experts wide enough against a pass's activations that parking them saves memory
    model = tiny_models[name] if name in tiny_models else make_tiny(tmp_path / name, name, hidden=64, ffn=1024, seed=4)
    if budget is not None:
        minimum = engine.plan(model, qcfg, CALIB, device="cpu").minimum_bytes
        budget = minimum if budget == "min" else minimum + 1
    def no_reading(self, path):  # the forecast reads headers only: opening a shard for its tensors is a bug
        raise AssertionError(f"{path} opened for its tensors")

    with monkeypatch.context() as patched:
        patched.setattr(safetensors._Handle, "__init__", no_reading)
        told = forecast(model, qcfg, CALIB, device="cpu", max_gpu_mem=budget, format=fmt)
    engine.quantize(model, tmp_path / "out", qcfg, CALIB, device="cpu", max_gpu_mem=budget, format=fmt)
    info = json.loads((tmp_path / "out" / "streamq.json").read_text())
    assert told.fits and told.plan == info["plan"]
    assert told.plan["experts_parked"] == (budget is not None and name == "qwen2_moe")
    assert told.output_bytes == tensor_bytes(tmp_path / "out")


def test_a_run_that_does_not_fit_is_told_the_smallest_budget(tiny_models):
    result = CliRunner().invoke(app, ["plan", "--model", str(tiny_models["opt"]), "--device", "cpu", "--max-gpu-mem",
                                      "1MB", "--n-samples", "4", "--seqlen", "64"])
    assert result.exit_code == 0, result.output
    minimum = engine.plan(tiny_models["opt"], QuantConfig(), CALIB, device="cpu").minimum_bytes
    from streamq.budget import format_bytes
    from streamq.config import parse_size

    named = format_bytes(minimum, up=True)
    assert f"fits: no: one block needs at least {named}; run with --max-gpu-mem {named} or more" in result.stdout
    assert parse_size(named) >= minimum
    as_json = CliRunner().invoke(app, ["plan", "--model", str(tiny_models["opt"]), "--device", "cpu", "--max-gpu-mem",
                                       "1MB", "--n-samples", "4", "--seqlen", "64", "--json"])
    told = json.loads(as_json.stdout)
    assert told["fits"] is False and told["plan"]["minimum_bytes"] == minimum and told["budget"] == 10**6


def test_a_gpu_run_is_planned_on_a_machine_without_one(tiny_models):
    """What a 40 GB card would do: forward passes of a fixed size (here all 4 samples of 64
    tokens), half-precision compute; without the budget there is no device to ask, so it is one line."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU: the plan would read its free memory")
    told = forecast(tiny_models["llama"], QuantConfig(), CALIB, device="cuda", max_gpu_mem=40 * 10**9)
    assert told.device == "cuda" and told.compute_dtype == "float16" and told.plan["forward_samples"] == 4
    assert told.plan["activations_on_device"] and told.fits
    with pytest.raises(SettingsError, match="planning for a CUDA device on a machine without one needs --max-gpu-mem"):
        forecast(tiny_models["llama"], QuantConfig(), CALIB, device="cuda")


def test_a_hub_id_is_planned_from_its_config_alone(tmp_path, monkeypatch):
    """Online, not in the cache: only config.json is fetched; the size on disk, from the
    config on the meta device, equals the one from the shards' headers."""
    from huggingface_hub import constants

    from fakehub import FakeHub
    from make_published import LAYOUTS, write_layout
    from make_tiny_model import make_tiny

    src = make_tiny(tmp_path / "opt", "opt", hidden=64, ffn=128, vocab=512, seed=6)
    served = write_layout(src, LAYOUTS["opt-30b"], tmp_path / "repo")
    with FakeHub({"facebook/opt-30b": served}) as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # as HF_ENDPOINT sets both at import
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            fake.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        quant = QuantConfig(group_size=64)
        told = forecast("opt-30b", quant, CALIB, device="cpu")
        assert fake.fetched()[0] == ["config.json"]
    assert told.source_bytes is None and told.source["repo"] == "facebook/opt-30b"
    local = forecast(served, quant, CALIB, device="cpu")
    assert (told.output_bytes, told.plan) == (local.output_bytes, local.plan)
    assert local.source_bytes == sum(p.stat().st_size for p in served.glob("*.bin"))


@pytest.mark.parametrize("command", [[], ["run"], ["plan"], ["ppl"], ["resume"], ["convert"], ["demo"]])
def test_help_fits_an_80_column_terminal(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERM": "xterm"},
                                terminal_width=80)
    assert result.exit_code == 0
    assert "…" not in result.stdout, result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    if command == ["run"]:
        assert len(result.stdout.splitlines()) < 90  # panels of one-line options, not 278 lines
        for panel in ("Model and output", "Method and recipe", "Calibration", "Memory and device", "Format"):
            assert panel in result.stdout
