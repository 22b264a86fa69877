"""The unstreamed reference end to end: checkpoint format, loadability, determinism (on the CPU:
the replays below compute in float32)."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from streamq import reference
from streamq.config import CalibConfig, QuantConfig
from streamq.families import detect
from streamq.quant import pseudo_quantize
from streamq.search import apply_clip, apply_scale

from conftest import ZOO
from dequant import dequantize_checkpoint, unpack_words

CALIB = CalibConfig(n_samples=8, seqlen=64)


def output_bytes(out_dir):
    assert not (out_dir / ".streamq").exists()  # the writer's spool is gone
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.name != "streamq.json"}


def load_all(out_dir):
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, shard in index["weight_map"].items():
        with safe_open(out_dir / shard, "pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def logits(model_dir, ids, **kw):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """Each family quantized once with AWQ INT4 (shared by the checks below)."""
    root = tmp_path_factory.mktemp("awq")
    calib = {name: CALIB for name in tiny_models}
    # the GQA model ships no tokenizer: calibrate it on pre-tokenised ids
    ids = root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(2, 512, 10_000))
    calib["llama_gqa"] = CalibConfig(source=str(ids), n_samples=8, seqlen=64)
    return {name: (reference.quantize(path, root / name, calib=calib[name], shard_bytes=150_000, device="cpu"), root / name)
            for name, path in tiny_models.items()}


def test_checkpoint_layout(family_model, quantized):
    name, src = family_model
    result, out = quantized[name]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["lm_head"]}
    info = json.loads((out / "streamq.json").read_text())
    assert info["quant"]["mode"] == "awq" and info["storage"] == "awq-gemm"
    assert len(info["source"]["fingerprint"]) == 64 and info["streamq_version"]
    assert (out / "tokenizer.json").is_file() == (src / "tokenizer.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1  # shard_bytes forced several shards
    assert not list(out.glob("*.tmp"))
    tensors = load_all(out)
    family = detect(AutoModelForCausalLM.from_pretrained(src).config)
    model_tensors = set(safe_open_names(src))
    for tname in model_tensors:
        if tname.endswith("proj.weight") or tname.endswith(("fc1.weight", "fc2.weight")):
            base = tname[: -len(".weight")]
            assert tensors[base + ".qweight"].dtype == torch.int32
            assert tensors[base + ".scales"].dtype == torch.float16
            assert tensors[base + ".qweight"].shape[0] == tensors[base + ".scales"].shape[0] * 128
            assert tname not in tensors
        else:
            assert tensors[tname].dtype == torch.float16, tname
    assert len(result.records) == 2 and all(r.scales for r in result.records)
    n_groups = len(family.scale_groups(AutoModelForCausalLM.from_pretrained(src).config))
    gqa = name == "llama_gqa" or ZOO.get(name, (None, None))[1] is not None
    assert n_groups == (3 if gqa else 4)  # no v->o scaling under GQA


def safe_open_names(model_dir):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return index["weight_map"].keys()


def test_dequantized_checkpoint_matches_replayed_records_and_loads(family_model, quantized, tmp_path):
    """An independent dequantizer rebuilds fp16 weights equal to replaying the search records
    on the original model; transformers loads the result, and its logits stay close."""
    name, src = family_model
    result, out = quantized[name]
    linears = dequantize_checkpoint(out, tmp_path / "deq")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    family = detect(model.config)
    layers = model.get_submodule(family.layers_prefix)
    for i, (block, records) in enumerate(zip(layers, result.records)):
        block = copy.deepcopy(block)
        for r in records.scales:
            apply_scale(block, r)
        for r in records.clips:
            apply_clip(block, r)
        for lname, w in linears.items():
            prefix = family.block_prefix(i)
            if lname.startswith(prefix):
                expected = pseudo_quantize(block.get_submodule(lname[len(prefix):]).weight.data, 4, 128)
                assert torch.equal(torch.from_numpy(w), expected), lname
    ids = torch.randint(2, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = logits(src, ids)
    deq = logits(tmp_path / "deq", ids)
    rtn = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for block in rtn.get_submodule(family.layers_prefix):
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.data = pseudo_quantize(m.weight.data, 4, 128)
        rtn_logits = rtn(ids).logits
    rel = float((deq - ref).norm() / ref.norm())
    rel_rtn = float((rtn_logits - ref).norm() / ref.norm())
    assert 0 < rel < min(rel_rtn, 0.3), (rel, rel_rtn)  # a loaded AWQ model beats plain RTN


def test_two_runs_give_identical_bytes(tiny_models, tmp_path):
    for run in ("a", "b"):
        reference.quantize(tiny_models["opt"], tmp_path / run, calib=CALIB, device="cpu")
    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")


def test_chunk_size_does_not_change_output(tiny_models, tmp_path):
    reference.quantize(tiny_models["llama"], tmp_path / "c1", calib=CALIB, chunk_samples=1, device="cpu")
    reference.quantize(tiny_models["llama"], tmp_path / "c8", calib=CALIB, chunk_samples=8, device="cpu")
    assert output_bytes(tmp_path / "c1") == output_bytes(tmp_path / "c8")


def test_int3_round_trip(tiny_models, tmp_path):
    result = reference.quantize(tiny_models["opt"], tmp_path / "q3", QuantConfig(w_bit=3), CALIB, device="cpu")
    out = tmp_path / "q3"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert "4-bit slots" in json.loads((out / "streamq.json").read_text())["packing"]
    tensors = load_all(out)
    qw = tensors["model.decoder.layers.0.fc1.qweight"].numpy()
    assert unpack_words(qw).max() <= 7 and unpack_words(tensors["model.decoder.layers.0.fc1.qzeros"].numpy()).max() <= 7
    linears = dequantize_checkpoint(out, tmp_path / "deq3")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["opt"], dtype=torch.float32)
    block = copy.deepcopy(model.model.decoder.layers[0])
    for r in result.records[0].scales:
        apply_scale(block, r)
    for r in result.records[0].clips:
        apply_clip(block, r)
    expected = pseudo_quantize(block.fc1.weight.data, 3, 128)
    assert torch.equal(torch.from_numpy(linears["model.decoder.layers.0.fc1"]), expected)


@pytest.mark.parametrize("mode", ["rtn", "s2"])
def test_ablation_modes_write_gemm_checkpoints(tiny_models, tmp_path, mode):
    result = reference.quantize(tiny_models["llama"], tmp_path / mode, QuantConfig(mode=mode), CALIB, device="cpu")
    assert json.loads((tmp_path / mode / "streamq.json").read_text())["quant"]["mode"] == mode
    assert all(not r.clips for r in result.records)
    assert all(bool(r.scales) == (mode == "s2") for r in result.records)
    dequantize_checkpoint(tmp_path / mode, tmp_path / "deq")


def test_no_clip_keeps_the_scales_and_skips_the_clip_search(tiny_models, tmp_path):
    full = reference.quantize(tiny_models["opt"], tmp_path / "clip", calib=CALIB, device="cpu")
    scale_only = reference.quantize(tiny_models["opt"], tmp_path / "noclip", QuantConfig(clip=False), CALIB, device="cpu")
    assert json.loads((tmp_path / "noclip" / "streamq.json").read_text())["quant"]["clip"] is False
    assert all(r.clips for r in full.records) and all(not r.clips for r in scale_only.records)
    for a, b in zip(full.records, scale_only.records):  # the scale search runs before clipping
        assert [torch.equal(x.scales, y.scales) for x, y in zip(a.scales, b.scales)] == [True] * len(a.scales)
    assert output_bytes(tmp_path / "clip") != output_bytes(tmp_path / "noclip")


def test_keep1_writes_loadable_fp16(tiny_models, tmp_path):
    out = tmp_path / "keep1"
    result = reference.quantize(tiny_models["opt"], out, QuantConfig(mode="keep1"), CALIB, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((out / "streamq.json").read_text())["storage"] == "fake-quant-fp16"
    tensors = load_all(out)
    w = tensors["model.decoder.layers.0.fc1.weight"].float()
    original = AutoModelForCausalLM.from_pretrained(tiny_models["opt"], dtype=torch.float32).model.decoder.layers[0].fc1.weight
    kept = result.records[0].salient["fc1"]
    assert len(kept) == 1  # 1% of 128 input channels, rounded, at least one
    assert torch.equal(w[:, kept], original[:, kept].half().float())
    assert not torch.equal(w, original.half().float())
    ids = torch.randint(2, 512, (1, 32))
    assert torch.isfinite(logits(out, ids)).all()
