"""The streaming engine equals the unstreamed reference byte for byte, whatever the budget."""

import json

import numpy as np
import pytest

from streamq import engine, forecast, reference
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import SettingsError

from helpers import DEVICES, checkpoint_bytes

CALIB = CalibConfig(n_samples=6, seqlen=64)


def calib_for(name, tmp_path):
    if name != "llama_gqa":
        return CALIB
    ids = tmp_path / "ids.npy"  # this model has no tokenizer
    np.save(ids, np.random.default_rng(1).integers(2, 512, 5_000))
    return CalibConfig(source=str(ids), n_samples=6, seqlen=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["awq", "awq-noclip", "s2", "keep1"])
def test_streamed_equals_reference(family_model, tmp_path, mode, device):
    """On each device, with its own compute dtype, kernels and forward-pass size: the
    reference and the engine under any budget write the same bytes."""
    name, path = family_model
    if mode != "awq" and name != "llama":
        pytest.skip("the ablation modes share every engine path with awq; one family suffices")
    calib = calib_for(name, tmp_path)
    qcfg = QuantConfig(mode="awq", clip=False) if mode == "awq-noclip" else QuantConfig(mode=mode)
    reference.quantize(path, tmp_path / "ref", qcfg, calib, chunk_samples=4, shard_bytes=400_000, device=device)
    expected = checkpoint_bytes(tmp_path / "ref")
    plans = []
    # no budget; a roomy one (activations resident); the smallest that fits (one sample per chunk)
    minimum = engine.plan(path, qcfg, calib, device=device).minimum_bytes
    for i, budget in enumerate([None, 10**10, minimum]):
        out = tmp_path / f"stream{i}"
        summary = engine.quantize(path, out, qcfg, calib, device=device, max_gpu_mem=budget, shard_bytes=400_000)
        plans.append(summary.plan)
        assert checkpoint_bytes(out) == expected, (budget, summary.plan)
    assert plans[1].activations_on_device and not plans[2].activations_on_device
    assert plans[2].chunk_samples == (plans[2].forward_samples or 1)  # a GPU's smallest chunk: one pass


@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_rtn_reads_no_activation_and_writes_the_calibrated_bytes(tiny_models, tmp_path, monkeypatch, name):
    """--mode rtn depends on the weights alone: no tokenizer is loaded, no calibration text read
    (the one named does not even exist), no embedding looked up, no hidden state journaled, and
    the plan holds no sample; the bytes are the calibrated reference's."""
    path = tiny_models[name]
    reference.quantize(path, tmp_path / "ref", QuantConfig(mode="rtn"), calib_for(name, tmp_path), device="cpu",
                       shard_bytes=400_000)

    def never(*args, **kwargs):
        raise AssertionError("a data-free run read activations")

    monkeypatch.setattr(engine, "load_tokenizer", never)
    monkeypatch.setattr(engine, "calibration_blocks", never)
    calib = CalibConfig(source=str(tmp_path / "no-such-text.txt"), n_samples=6, seqlen=64)
    monkeypatch.setattr(engine.Run, "store", property(never))  # where activations would be kept
    summary = engine.quantize(path, tmp_path / "out", QuantConfig(mode="rtn"), calib, device="cpu",
                              shard_bytes=400_000)
    assert checkpoint_bytes(tmp_path / "out") == checkpoint_bytes(tmp_path / "ref")
    info = json.loads((tmp_path / "out" / "streamq.json").read_text())
    assert info["data_free"] and info["calib"]["tokens_sha256"] is None
    assert summary.plan.chunk_samples == 1 and not list((tmp_path / "out" / ".streamq").glob("hidden-*"))


@pytest.mark.parametrize("compute", ["float32", "float16"])
def test_forward_passes_of_a_fixed_size_fall_on_the_same_samples_under_every_budget(tiny_models, tmp_path,
                                                                                    monkeypatch, compute):
    """A GPU runs forward passes of a fixed number of samples (budget.forward_samples, decided by
    the model and the calibration shape) and the plan cuts chunks in multiples of it, so every
    pass has that shape but the last of all, whatever the budget. Checked here by recording every
    pass's size with 4 samples a pass (10 samples: passes of 4, 4 and 2), and the bytes against
    the reference and against whole-chunk passes, in float32 and in the GPU's float16."""
    import streamq.search as search

    calib = CalibConfig(n_samples=10, seqlen=64)
    engine.quantize(tiny_models["llama"], tmp_path / "whole", calib=calib, device="cpu", compute=compute)
    monkeypatch.setattr(forecast, "forward_samples", lambda *args: 4)  # what the engine and reference plan with
    reference.quantize(tiny_models["llama"], tmp_path / "ref", calib=calib, device="cpu", compute=compute)
    split = search.micro_batches
    passes: list[int] = []

    def recorded(x, micro):
        parts = split(x, micro)
        passes.extend(len(p) for p in parts)
        return parts
    monkeypatch.setattr(search, "micro_batches", recorded)
    minimum = engine.plan(tiny_models["llama"], calib=calib, device="cpu", compute=compute).minimum_bytes
    seen = []
    for i, budget in enumerate([None, minimum]):
        passes.clear()
        summary = engine.quantize(tiny_models["llama"], tmp_path / f"b{i}", calib=calib, device="cpu",
                                  compute=compute, max_gpu_mem=budget)
        assert summary.plan.forward_samples == 4
        assert checkpoint_bytes(tmp_path / f"b{i}") == checkpoint_bytes(tmp_path / "whole")
        assert checkpoint_bytes(tmp_path / f"b{i}") == checkpoint_bytes(tmp_path / "ref")
        seen.append((summary.plan.chunk_samples, sorted(passes)))
    (big, passes_big), (small, passes_small) = seen
    assert (big, small) == (10, 4)  # one chunk; chunks of 4, 4 and 2
    assert passes_big == passes_small and set(passes_big) == {4, 2}


def test_streamq_json_records_plan_and_measured_peaks(tiny_models, tmp_path):
    summary = engine.quantize(tiny_models["opt"], tmp_path / "o", calib=CALIB, max_gpu_mem=10**9, device="cpu")
    info = json.loads((tmp_path / "o" / "streamq.json").read_text())
    for block in info["blocks"]:  # where the time went: every phase of the block, inside its seconds
        assert set(block["phases"]) == {"read and upload weights", "capture", "scale self_attn_layer_norm",
                                        "scale self_attn.v_proj", "scale final_layer_norm", "scale fc1", "clip",
                                        "quantize and pack"}
        assert 0 < sum(block["phases"].values()) <= block["seconds"]
    assert info["engine"] == "stream" and info["max_gpu_mem"] == 10**9
    assert info["plan"]["chunk_samples"] == summary.plan.chunk_samples
    assert [b["block"] for b in info["blocks"]] == [0, 1]
    assert all(b["peak_rss_bytes"] > 50 * 2**20 and b["peak_gpu_bytes"] is None for b in info["blocks"])
    assert info["compute_dtype"] == "float32" and info["plan"]["forward_samples"] is None
    assert summary.output_bytes < summary.input_bytes


def test_budget_too_small_is_refused_before_writing(tiny_models, tmp_path):
    with pytest.raises(SettingsError, match=r"--max-gpu-mem 976.56KiB is too small: one block needs at least"):
        engine.quantize(tiny_models["opt"], tmp_path / "o", calib=CALIB, max_gpu_mem=10**6, device="cpu")
    assert not (tmp_path / "o").exists()


def test_group_size_checked_before_any_work(tiny_models, tmp_path):
    with pytest.raises(SettingsError, match="model.decoder.layers.0"):
        engine.quantize(tiny_models["opt"], tmp_path / "o", QuantConfig(group_size=48), CALIB)
    assert not (tmp_path / "o").exists()
