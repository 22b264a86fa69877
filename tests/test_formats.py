"""Output formats: compressed-tensors beside AWQ GEMM, proven against the compressed-tensors
package itself and against transformers; `streamq convert`; bf16 models; a complete folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dequant import dequantize_linear
from helpers import checkpoint_bytes
from make_tiny_model import make_tiny
from streamq import convert as convert_mod
from streamq import engine, reference
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import InputError, NumericError
from streamq.formats import AWQ, COMPRESSED_TENSORS, dense_state, dequantize, linear_tensors
from streamq.formats.compressed_tensors import pack_dense, unpack_dense
from streamq.ppl import perplexity
from streamq.shards import ShardReader

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
CALIB = CalibConfig(n_samples=6, seqlen=64)
SHARD = 300_000  # several shards per tiny model


def stored(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}


def our_weights(out: Path, fmt) -> dict[str, torch.Tensor]:
    """Each packed linear of a streamq output, dequantized by streamq's own reader."""
    reader = ShardReader(out)
    bits = json.loads((out / "streamq.json").read_text())["quant"]["w_bit"]
    return {base: dequantize(fmt, {s: reader.get(n) for s, n in names.items()}, bits)
            for base, names in linear_tensors(fmt, reader.names()).items()}


def dense_twin(out: Path, fmt, dst: Path) -> Path:
    """A plain checkpoint holding streamq's own dequantized weights (what a loader must compute)."""
    bits = json.loads((out / "streamq.json").read_text())["quant"]["w_bit"]
    dense = dense_state(fmt, stored(out), bits, torch.device("cpu"))
    dst.mkdir(parents=True)
    save_file(dense, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def load_ct(path: Path, dequantize_at_load: bool = True):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize_at_load else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(2, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Each tiny family quantized once in each format (same calibration, same settings)."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for family in ("opt", "llama"):
        for fmt in ("awq", "compressed-tensors"):
            path = root / f"{family}-{fmt}"
            engine.quantize(tiny_models[family], path, calib=CALIB, device="cpu", shard_bytes=SHARD, format=fmt)
            out[family, fmt] = path
    return out


@pytest.mark.parametrize("bits", [3, 4])
def test_dense_packing_is_the_librarys(bits):
    """compressed-tensors' own pack_to_int32 (signed values, both packing dimensions) gives our
    bytes; our unpacking inverts both."""
    g = torch.Generator().manual_seed(bits)
    for rows, cols in [(3, 64), (5, 96), (7, 40), (64, 128), (2, 8)]:
        codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
        signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_dense(codes, bits), ct_helpers.pack_to_int32(signed, bits))
        assert torch.equal(pack_dense(codes.t().contiguous(), bits).t(),
                           ct_helpers.pack_to_int32(signed, bits, packed_dim=0))
        assert torch.equal(unpack_dense(pack_dense(codes, bits), bits, cols), codes)
        back = ct_helpers.unpack_from_int32(pack_dense(codes, bits), bits, torch.Size([rows, cols]))
        assert torch.equal(back, signed)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_compressed_tensors_streamed_equals_reference(tiny_models, tmp_path, family):
    """The unstreamed reference and the engine, roomy and at the smallest budget, write the
    same compressed-tensors bytes."""
    path = tiny_models[family]
    reference.quantize(path, tmp_path / "ref", calib=CALIB, chunk_samples=4, shard_bytes=SHARD, device="cpu",
                       format="compressed-tensors")
    minimum = engine.plan(path, QuantConfig(), CALIB, device="cpu").minimum_bytes
    for budget in (None, minimum):
        engine.quantize(path, tmp_path / f"s{budget}", calib=CALIB, device="cpu", max_gpu_mem=budget,
                        shard_bytes=SHARD, format="compressed-tensors")
        assert checkpoint_bytes(tmp_path / f"s{budget}") == checkpoint_bytes(tmp_path / "ref")


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_both_formats_hold_the_same_quantization(runs, family):
    """Same codes, scales and zeros whatever the layout: the dequantized weights are equal, and
    the AWQ reader agrees with an independent numpy reading of the GEMM layout."""
    awq, ct = our_weights(runs[family, "awq"], AWQ), our_weights(runs[family, "compressed-tensors"], COMPRESSED_TENSORS)
    assert awq.keys() == ct.keys() and len(awq) == 2 * (6 if family == "opt" else 7)
    tensors = stored(runs[family, "awq"])
    for base in awq:
        assert torch.equal(awq[base], ct[base])
        independent = dequantize_linear(*(tensors[f"{base}.{s}"].numpy() for s in ("qweight", "qzeros", "scales")))
        assert torch.equal(awq[base], torch.from_numpy(independent).to(torch.float16))
    config = json.loads((runs[family, "compressed-tensors"] / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)  # the library accepts our config as written


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_transformers_loads_compressed_tensors_output(runs, tmp_path, family):
    """transformers with the compressed-tensors package loads the output; its logits equal an
    fp16 model holding streamq's own dequantized weights, exactly (same weights, same ops)."""
    out = runs[family, "compressed-tensors"]
    model = load_ct(out)
    for base, w in our_weights(out, COMPRESSED_TENSORS).items():
        assert torch.equal(model.get_submodule(base).weight.data, w), base
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(dense_twin(out, COMPRESSED_TENSORS, tmp_path / "twin")).eval()
    vocab = model.config.vocab_size
    assert torch.equal(logits(model, vocab), logits(twin, vocab))


def test_symmetric_output_loads_through_the_compressed_path(tiny_models, tmp_path):
    """--symmetric writes no zero points and loads without dequantize=True (transformers keeps
    the weights packed and decompresses them itself), with the same logits."""
    out = tmp_path / "sym"
    engine.quantize(tiny_models["llama"], out, QuantConfig(zero_point=False), CALIB, device="cpu",
                    format="compressed-tensors")
    assert not any(k.endswith("weight_zero_point") for k in stored(out))
    packed, dense = load_ct(out, dequantize_at_load=False), load_ct(out)
    assert torch.equal(logits(packed, 512), logits(dense, 512))


def test_ppl_is_the_same_on_both_formats(runs, eval_ids):
    for family in ("opt", "llama"):
        a = perplexity(runs[family, "awq"], eval_ids, seqlen=64, device="cpu")
        c = perplexity(runs[family, "compressed-tensors"], eval_ids, seqlen=64, device="cpu")
        assert a.ppl == c.ppl and a.weights == "awq-int4" and c.weights == "compressed-tensors-int4"


@pytest.fixture(scope="module")
def eval_ids(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "ids.npy"
    np.save(path, np.random.default_rng(7).integers(2, 512, 64 * 6))
    return path


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_convert_gives_the_bytes_of_a_run_in_the_other_format(runs, tmp_path, family):
    """awq -> compressed-tensors and back: every shard, the index and config.json are the bytes a
    run with that --format writes."""
    awq, ct = runs[family, "awq"], runs[family, "compressed-tensors"]
    convert_mod.convert(awq, tmp_path / "to-ct", "compressed-tensors", shard_bytes=SHARD)
    assert checkpoint_bytes(tmp_path / "to-ct") == checkpoint_bytes(ct)
    convert_mod.convert(tmp_path / "to-ct", tmp_path / "back", "awq", shard_bytes=SHARD)
    assert checkpoint_bytes(tmp_path / "back") == checkpoint_bytes(awq)
    info = json.loads((tmp_path / "back" / "streamq.json").read_text())
    assert info["format"] == "awq" and info["converted_from"]["format"] == "compressed-tensors"


def test_the_librarys_own_awq_converter_reads_our_awq_packing(runs, tmp_path):
    """compressed-tensors' AutoAWQ converter (its entrypoints/convert) turns streamq's AWQ output
    into weights that transformers dequantizes to exactly what streamq's reader gives: an
    independent check of the GEMM packing (nibble order, zeros, scales)."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    src = runs["llama", "awq"]
    convert_checkpoint(src, tmp_path / "ct", AutoAWQConverter.from_pretrained(src), max_workers=1, device="cpu")
    model = load_ct(tmp_path / "ct")
    ours = our_weights(src, AWQ)
    for base, w in ours.items():
        assert torch.equal(model.get_submodule(base).weight.data, w), base


def bf16_model(path: Path, seed: int = 4, big: float | None = None) -> Path:
    src = make_tiny(path, "llama", hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, seed=seed)
    for shard in src.glob("model-*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}
        if big is not None and "model.embed_tokens.weight" in tensors:
            tensors["model.embed_tokens.weight"][3, 7] = big
        save_file(tensors, str(shard), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_a_bf16_model_stays_bf16_in_compressed_tensors_and_loads(tmp_path, eval_ids):
    src = bf16_model(tmp_path / "src")
    out = tmp_path / "ct"
    ref = tmp_path / "ref"
    engine.quantize(src, out, calib=CALIB, device="cpu", format="compressed-tensors")
    reference.quantize(src, ref, calib=CALIB, device="cpu", format="compressed-tensors")
    assert checkpoint_bytes(out) == checkpoint_bytes(ref)
    tensors = stored(out)
    assert {v.dtype for k, v in tensors.items() if v.is_floating_point()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "streamq.json").read_text())["quant"]["storage_dtype"] == "bfloat16"
    model = load_ct(out)
    assert model.dtype == torch.bfloat16
    for base, w in our_weights(out, COMPRESSED_TENSORS).items():
        assert w.dtype == torch.bfloat16 and torch.equal(model.get_submodule(base).weight.data, w)
    result = perplexity(out, eval_ids, seqlen=64, device="cpu")
    assert result.weights == "compressed-tensors-int4" and np.isfinite(result.ppl)
    # as AWQ: fp16 storage (what AWQ kernels take); converting keeps every code, zero and scale
    # (bf16 scales are fp16 values here; only the dequantized product rounds to fp16 instead of bf16)
    engine.quantize(src, tmp_path / "awq", calib=CALIB, device="cpu", format="awq")
    assert {v.dtype for v in stored(tmp_path / "awq").values() if v.is_floating_point()} == {torch.float16}
    convert_mod.convert(out, tmp_path / "conv", "awq")
    a, c = ShardReader(tmp_path / "conv"), ShardReader(out)
    pairs = zip(linear_tensors(AWQ, a.names()).values(), linear_tensors(COMPRESSED_TENSORS, c.names()).values())
    for awq_names, ct_names in pairs:
        q1, s1, z1 = AWQ.unpack({k: a.get(n) for k, n in awq_names.items()}, 4)
        q2, s2, z2 = COMPRESSED_TENSORS.unpack({k: c.get(n) for k, n in ct_names.items()}, 4)
        assert torch.equal(q1, q2) and torch.equal(z1, z2) and torch.equal(s1.float(), s2.float())


def test_awq_refuses_a_bf16_value_beyond_fp16(tmp_path):
    src = bf16_model(tmp_path / "src", big=1e6)
    with pytest.raises(NumericError, match=r"model\.embed_tokens\.weight cannot be stored in torch\.float16.*"
                                           r"--format compressed-tensors"):
        engine.quantize(src, tmp_path / "awq", QuantConfig(mode="rtn"), CalibConfig(n_samples=2, seqlen=32),
                        device="cpu", format="awq")
    engine.quantize(src, tmp_path / "ct", QuantConfig(mode="rtn"), CalibConfig(n_samples=2, seqlen=32),
                    device="cpu", format="compressed-tensors")


def test_the_output_is_a_complete_model_folder(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    extras = {"generation_config.json": '{"do_sample": false}', "chat_template.jinja": "{{ messages }}",
              "README.md": "# card", "LICENSE": "licence text"}
    for name, text in extras.items():
        (src / name).write_text(text)
    (src / "modeling_custom.py").write_text("raise SystemExit")  # remote code: not copied
    (src / "pytorch_model.bin").write_bytes(b"\0" * 16)  # weights in another format: not copied
    out = tmp_path / "out"
    engine.quantize(src, out, calib=CALIB, device="cpu", format="compressed-tensors")
    for name, text in extras.items():
        assert (out / name).read_text() == text
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "modeling_custom.py").exists() and not (out / "pytorch_model.bin").exists()
    assert "chat_template.jinja" in json.loads((out / "streamq.json").read_text())["source"]["files_copied"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("def f(): pass")["input_ids"]


def test_resume_keeps_the_format(tiny_models, runs, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "streamq"]
    run = subprocess.run([*args, "run", "--model", str(tiny_models["llama"]), "--output", str(out), "--device", "cpu",
                          "--n-samples", "6", "--seqlen", "64", "--shard-size", str(SHARD), "--format",
                          "compressed-tensors"], env={**os.environ, "STREAMQ_KILL_AT": "block1:search"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -9, run.stderr
    resumed = subprocess.run([*args, "resume", str(out), "--device", "cpu"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint_bytes(out) == checkpoint_bytes(runs["llama", "compressed-tensors"])


def test_convert_errors_are_one_line(tiny_models, runs, tmp_path):
    runner = CliRunner()
    plain = runner.invoke(app, ["convert", str(tiny_models["opt"]), str(tmp_path / "x"), "--format", "awq"])
    assert plain.exit_code == 2 and "holds no packed weights" in plain.stderr and "Traceback" not in plain.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    busy = runner.invoke(app, ["convert", str(runs["opt", "awq"]), str(tmp_path / "full"), "--format",
                               "compressed-tensors"])
    assert busy.exit_code == 2 and "not empty" in busy.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    ok = runner.invoke(app, ["convert", str(runs["opt", "awq"]), str(tmp_path / "ok"), "--format",
                             "compressed-tensors"])
    assert ok.exit_code == 0 and "converted 12 linears" in ok.stdout
    with pytest.raises(InputError, match="holds no packed weights"):
        convert_mod.convert(tiny_models["llama"], tmp_path / "y", "awq")
    same = runner.invoke(app, ["convert", str(runs["opt", "awq"]), str(tmp_path / "z"), "--format", "awq"])
    assert same.exit_code == 2 and "is in the awq format already; nothing to convert" in same.stderr
    assert not (tmp_path / "z").exists()
    assert not (tmp_path / "ok" / ".streamq").exists()  # the lock goes with the converting process


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe"])
def test_a_symmetric_moe_output_loads_in_transformers_and_an_asymmetric_one_does_not_yet(tmp_path, family):
    """transformers 5.24 fuses a MoE's experts at load and its compressed-tensors path hands the
    library no zero points (upstream PR #47430, open): --symmetric MoE output loads, packed or
    dequantized at load, with the logits of streamq's own dequantization; asymmetric output fails
    there. When this test fails on the second half, upstream is fixed: update docs/formats.md."""
    from transformers import AutoModelForCausalLM

    model = make_tiny(tmp_path / family, family, hidden=64, ffn=64, seed=3)
    for symmetric in (True, False):
        out = tmp_path / f"out-{symmetric}"
        engine.quantize(model, out, QuantConfig(group_size=64, zero_point=not symmetric), CalibConfig(n_samples=4,
                        seqlen=32), device="cpu", format="compressed-tensors")
        if not symmetric:
            with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
                load_ct(out)
            continue
        twin = AutoModelForCausalLM.from_pretrained(dense_twin(out, COMPRESSED_TENSORS, tmp_path / "twin")).eval()
        expected = logits(twin, 512)
        assert torch.equal(logits(load_ct(out, dequantize_at_load=False), 512), expected)
        assert torch.equal(logits(load_ct(out), 512), expected)


def test_int3_compressed_tensors_loads(tiny_models, tmp_path):
    """INT3: 32 codes in three int32 words (elements straddle words); transformers reads them."""
    out = tmp_path / "int3"
    engine.quantize(tiny_models["llama"], out, QuantConfig(w_bit=3), CALIB, device="cpu", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert stored(out)["model.layers.0.mlp.down_proj.weight_packed"].shape == (128, 256 * 3 // 32)
    model = load_ct(out)
    for base, w in our_weights(out, COMPRESSED_TENSORS).items():
        assert torch.equal(model.get_submodule(base).weight.data, w), base


@pytest.mark.slow
def test_smollm2_compressed_tensors_loads_in_transformers(tmp_path):
    """The real model: its compressed-tensors output, loaded by transformers, computes the logits
    of a dense model holding streamq's dequantized weights; ppl is the same on the AWQ output."""
    from test_fp16 import smollm2_and_texts

    model_dir, calib_text, eval_path = smollm2_and_texts()
    out = tmp_path / "ct"
    engine.quantize(model_dir, out, QuantConfig(group_size=64), CalibConfig(source=str(calib_text), n_samples=4,
                    seqlen=128), device="cpu", format="compressed-tensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    model = load_ct(out)
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(dense_twin(out, COMPRESSED_TENSORS, tmp_path / "twin")).eval()
    assert torch.equal(logits(model, model.config.vocab_size), logits(twin, model.config.vocab_size))
    convert_mod.convert(out, tmp_path / "awq", "awq")
    ppl = [perplexity(p, eval_path, seqlen=512, max_segments=4, device="cpu").ppl for p in (out, tmp_path / "awq")]
    assert ppl[0] == ppl[1]
