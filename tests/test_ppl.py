"""Streamed perplexity against a plain transformers forward of the whole model: for original
checkpoints, and for streamq outputs through the independent dequantizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dequant import dequantize_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import ZOO
from helpers import needs_gpu
from streamq import engine
from streamq.assets import clean_rst
from streamq.calib import builtin_text
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import CalibrationError, SettingsError, UnsupportedModelError
from streamq.families.base import meta_block
from streamq.ppl import cut_segments, eval_tokens, perplexity, plan_chunk

SEQLEN = 64


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    """Text the tiny tokenizers were not trained on (they learnt the Python reference)."""
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(clean_rst(_RST_SAMPLE) * 6)
    return path


_RST_SAMPLE = """
Streaming quantization
======================

A model too large for one accelerator can still be quantized when its blocks are visited one at
a time.  Each block reads its weights from memory-mapped files, searches its scales on a few
hundred calibration sequences, and writes packed integers before the next block is loaded.

Evaluation
----------

Perplexity is the exponential of the mean negative log-likelihood of each token given the
tokens before it; lower is better, and a quantized model is judged by how little it rises.
"""


def reference_ppl(model_dir: Path, ids: torch.Tensor, seqlen: int) -> float:
    """Whole-model transformers forward over all segments at once, float64 NLL."""
    segments = cut_segments(ids, seqlen)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(segments).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), segments[:, 1:].reshape(-1))
    return math.exp(float(nll))


def text_ids(model_dir: Path, text: Path) -> torch.Tensor:
    return torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text.read_text())["input_ids"])


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_streamed_ppl_equals_whole_model_forward(tiny_models, eval_text, name):
    model_dir = tiny_models[name]
    result = perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu")
    expected = reference_ppl(model_dir, text_ids(model_dir, eval_text), SEQLEN)
    assert result.segments >= 8 and result.weights == "fp16"
    assert result.tokens == result.segments * (SEQLEN - 1)
    assert result.ppl == pytest.approx(expected, rel=1e-5)


def test_chunking_and_disk_storage_do_not_change_the_result(tiny_models, eval_text, tmp_path):
    model_dir = tiny_models["llama"]
    in_ram = perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu")
    on_disk = perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu", host_mem=1024, workdir=tmp_path)
    assert on_disk.hidden_storage == "disk" and in_ram.hidden_storage == "host"
    assert on_disk.ppl == in_ram.ppl  # same chunks, same dtype: bit-identical
    assert list(tmp_path.iterdir()) == []  # the hidden-state file is removed
    # 16 segments per chunk instead of 4: products over whole samples, same rows
    big_chunks = perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu", max_gpu_mem=10**10)
    assert big_chunks.chunk_segments > in_ram.chunk_segments
    assert big_chunks.ppl == pytest.approx(in_ram.ppl, rel=1e-6)


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    calib = CalibConfig(n_samples=4, seqlen=64)
    out = {}
    for name, qcfg in [("opt", QuantConfig(w_bit=4, group_size=64)),
                       ("llama", QuantConfig(w_bit=3, group_size=64, mode="rtn"))]:
        out[name] = root / name
        engine.quantize(tiny_models[name], out[name], qcfg, calib, device="cpu")
    return out


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_quantized_ppl_equals_independently_dequantized_model(quantized, eval_text, tmp_path, name):
    result = perplexity(quantized[name], eval_text, seqlen=SEQLEN, device="cpu")
    fp16_dir = tmp_path / "dequantized"
    dequantize_checkpoint(quantized[name], fp16_dir)
    expected = reference_ppl(fp16_dir, text_ids(quantized[name], eval_text), SEQLEN)
    assert result.weights == ("awq-int4" if name == "opt" else "awq-int3")
    assert result.ppl == pytest.approx(expected, rel=1e-5)


@needs_gpu
@pytest.mark.parametrize("name", ["opt", "llama"])
def test_ppl_on_a_gpu_equals_the_cpu_figure_within_fp16_rounding(tiny_models, quantized, eval_text, name):
    """fp16 on the GPU (original weights, and a checkpoint dequantized by the kernels) against
    float32 on the CPU."""
    for model_dir in (tiny_models[name], quantized[name]):
        cpu = perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu")
        gpu = perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cuda")
        assert gpu.compute_dtype == "float16" and gpu.peak_gpu_bytes > 0
        assert gpu.ppl == pytest.approx(cpu.ppl, rel=2e-3)


def test_float16_arithmetic_on_a_cpu_equals_float32_within_fp16_rounding(tiny_models, eval_text):
    fp32 = perplexity(tiny_models["llama"], eval_text, seqlen=SEQLEN, device="cpu")
    fp16 = perplexity(tiny_models["llama"], eval_text, seqlen=SEQLEN, device="cpu", compute="float16")
    assert (fp32.compute_dtype, fp16.compute_dtype) == ("float32", "float16")
    assert fp16.ppl != fp32.ppl and fp16.ppl == pytest.approx(fp32.ppl, rel=2e-3)


def test_token_ids_for_models_without_a_tokenizer(tiny_models, tmp_path):
    model_dir = tiny_models["llama_gqa"]
    ids = torch.randint(0, 512, (10 * SEQLEN + 7,), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    result = perplexity(model_dir, tmp_path / "ids.pt", seqlen=SEQLEN, device="cpu")
    assert (result.segments, result.dropped_tokens, result.data_tokens) == (10, 7, ids.numel())
    assert result.ppl == pytest.approx(reference_ppl(model_dir, ids, SEQLEN), rel=1e-5)
    with pytest.raises(CalibrationError, match="no tokenizer"):
        perplexity(model_dir, _write(tmp_path / "t.txt", "text"), seqlen=SEQLEN, device="cpu")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_segments_drop_the_remainder_and_refuse_too_little_text():
    ids = torch.arange(10)
    assert cut_segments(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cut_segments(ids, 3, max_segments=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(CalibrationError, match="10 tokens, fewer than one segment of --seqlen 11"):
        cut_segments(ids, 11)


def test_jsonl_documents_are_joined_by_blank_lines(tiny_models, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["opt"])
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "first line"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    expected = tokenizer("first line\n\nsecond")["input_ids"]
    assert eval_tokens(tmp_path / "d.jsonl", tokenizer).tolist() == expected


def test_other_quantization_formats_are_refused(tiny_models, eval_text, tmp_path):
    import shutil

    model_dir = tmp_path / "gptq"
    shutil.copytree(tiny_models["opt"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'gptq'"):
        perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu")


def test_chunk_plan_fits_the_budget_or_refuses(tiny_models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models["opt"])
    block = meta_block(config)
    assert plan_chunk(block, config, 100, 2048, 4, None) == 4
    assert plan_chunk(block, config, 100, 2048, 4, 10**12) == 16
    assert plan_chunk(block, config, 3, 2048, 4, 10**12) == 3
    small = plan_chunk(block, config, 100, 2048, 4, 300 * 2**20)
    assert 1 <= small < 16
    with pytest.raises(SettingsError, match="too small to evaluate"):
        plan_chunk(block, config, 100, 2048, 4, 2**20)


def test_cli_ppl_prints_and_writes_json(tiny_models, eval_text, tmp_path):
    out = tmp_path / "r" / "ppl.json"
    result = CliRunner().invoke(app, ["ppl", "--model", str(tiny_models["opt"]), "--data", str(eval_text),
                                      "--seqlen", str(SEQLEN), "--max-segments", "3", "--device", "cpu",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["segments"] == 3 and saved["seqlen"] == SEQLEN
    assert f"ppl {saved['ppl']:.4f}" in result.output


def test_cli_ppl_bad_input_is_one_line(tiny_models, tmp_path):
    for args, message in [
        (["--data", str(tmp_path / "missing.txt"), "--seqlen", "64"], "does not exist"),
        (["--data", str(_write(tmp_path / "short.txt", "too short")), "--seqlen", "64"], "fewer than one segment"),
        (["--data", str(tmp_path / "x.txt"), "--seqlen", "4096"], "longer than the model's 1024 positions"),
    ]:
        result = CliRunner().invoke(app, ["ppl", "--model", str(tiny_models["opt"]), "--device", "cpu", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_clean_rst_drops_heading_rules_only():
    assert clean_rst("Title\n=====\n\nText -- with dashes.\n---\n") == "Title\n\nText -- with dashes."
    assert "Python" in builtin_text()[:100000]


@pytest.mark.parametrize("name", list(ZOO))
def test_every_family_streams_what_transformers_computes(tiny_models, eval_text, tmp_path, name):
    """Each family beyond OPT/LLaMA (sliding windows shorter than the segments, soft-capping,
    scaled embeddings, 1 + w norms, fused projections): the streamed ppl of the original equals
    transformers' whole-model figure, and of the AWQ output the figure of the independently
    dequantized fp16 model run by transformers."""
    model_dir = tiny_models[name]
    ids = text_ids(model_dir, eval_text)
    assert perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu").ppl == \
        pytest.approx(reference_ppl(model_dir, ids, SEQLEN), rel=1e-5)
    out = tmp_path / "awq"
    engine.quantize(model_dir, out, QuantConfig(), CalibConfig(n_samples=4, seqlen=64), device="cpu")
    dequantize_checkpoint(out, tmp_path / "dequantized")
    assert perplexity(out, eval_text, seqlen=SEQLEN, device="cpu").ppl == \
        pytest.approx(reference_ppl(tmp_path / "dequantized", ids, SEQLEN), rel=1e-5)
