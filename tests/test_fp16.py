"""The GPU's arithmetic, run on the CPU (--compute-dtype float16 / bfloat16): statistics and
losses accumulate in float32 where half precision would underflow or overflow, a model with
OPT-style outlier channels (~100x the median activation) gives finite scales and clips and the
quality of the float32 path, and values that fp16 storage cannot hold are refused by name."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dequant import dequantize_checkpoint
from helpers import checkpoint_bytes, rechunk, setup_model
from make_tiny_model import make_tiny
from streamq import engine, reference
from streamq.block import capture, check_storable
from streamq.calib import builtin_text
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import NumericError, SettingsError
from streamq.kernels import clip_error
from streamq.models import compute_dtype
from streamq.ppl import perplexity
from streamq.search import _per_sample_sse, act_scale, search_clip
from streamq.shards import ShardReader

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CALIB = CalibConfig(n_samples=8, seqlen=64)


def test_squared_errors_are_taken_in_float32():
    """Differences of 1e-4 square to 0 in fp16 and differences of 300 to inf; the loss sees both."""
    ref = torch.zeros(2, 8, 16, dtype=torch.float16)
    out = ref.clone()
    out[0] += 1e-4
    out[1, 0, 0] = 300
    sse = _per_sample_sse(out, ref)
    assert sse.dtype == torch.float32
    small = float(torch.tensor(1e-4, dtype=torch.float16).float()) ** 2 * 8 * 16
    assert sse[0].item() == pytest.approx(small, rel=1e-5) and sse[1].item() == 300.0**2


def test_mean_abs_activation_of_half_chunks_neither_overflows_nor_depends_on_chunking():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 512, 64, generator=g) * 1000).half()
    x[:, :, 3] = 60000.0  # a channel whose per-sample sum is far beyond fp16's range
    expected = x.double().abs().mean(dim=(0, 1))
    got = act_scale([x])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    for size in (1, 4):
        assert torch.equal(act_scale(rechunk([x], size)), got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_search_of_half_weights_is_the_float32_search(dtype):
    """Outlier input channels (x100) and weights: a half-precision layer is clip-searched in
    float32 (candidates, quantized weights and errors), so it gets exactly the picks of the
    float32 search on the same values, each its group's best candidate in exact terms."""
    g = torch.Generator().manual_seed(1)
    qcfg = QuantConfig()
    w = torch.randn(96, 512, generator=g) * 0.02
    w[:, 7] *= 30
    x = torch.randn(1024, 512, generator=g)
    x[:, [7, 100, 301]] *= 100
    w, x = w.to(dtype), x.to(dtype)
    half = search_clip(w, x, qcfg)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert torch.equal(half, search_clip(w.float(), x.float(), qcfg))
    org_max = w.float().reshape(w.shape[0], -1, qcfg.group_size).abs().amax(dim=-1)
    candidates = torch.stack([clip_error(w, x, org_max * (1 - i / qcfg.n_grid), qcfg)
                              for i in range(int(qcfg.max_shrink * qcfg.n_grid))])
    assert (clip_error(w, x, half, qcfg) <= candidates.min(dim=0).values * (1 + 1e-4)).all()


def test_compute_dtype_follows_the_device_and_the_source():
    assert compute_dtype(CPU) == torch.float32
    assert compute_dtype(CPU, "auto", torch.bfloat16) == torch.float32  # fp16/bf16 products are slow on CPUs
    assert compute_dtype(CUDA, "auto", torch.float16) == torch.float16
    assert compute_dtype(CUDA, "auto", torch.bfloat16) == torch.bfloat16  # LLaMA-3/Qwen activations exceed fp16
    assert compute_dtype(CPU, "float16") == torch.float16 and compute_dtype(CUDA, "float32") == torch.float32
    with pytest.raises(SettingsError, match="--compute-dtype must be auto, float16, bfloat16, float32"):
        compute_dtype(CPU, "half")


@pytest.fixture(scope="module")
def outlier_opt(tmp_path_factory) -> Path:
    """OPT with four input channels of every norm at 100x: activations ~100x the median there."""
    return make_tiny(tmp_path_factory.mktemp("opt100") / "m", "opt", hidden=256, ffn=1024, layers=2, heads=4,
                     outlier_gain=100.0, seed=11)


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp16eval") / "eval.txt"
    path.write_text(builtin_text()[-40_000:])  # the tokenizer's text; the model is random anyway
    return path


@pytest.fixture(scope="module")
def outlier_runs(outlier_opt, tmp_path_factory):
    root = tmp_path_factory.mktemp("opt100runs")
    return {dt: (reference.quantize(outlier_opt, root / dt, calib=CALIB, device="cpu", compute=dt), root / dt)
            for dt in ("float32", "float16")}


def test_outliers_are_really_100x(outlier_opt):
    s = setup_model(outlier_opt)
    x_mean = act_scale([torch.cat(s.x_chunks)])  # block 0's input before its layer norm: no outliers yet
    feats, _ = capture(s.layers[0], s.x_chunks, s.kwargs, {"self_attn.q_proj"})
    q_mean = act_scale(feats["self_attn.q_proj"])
    assert float(q_mean.max() / q_mean.median()) > 50 > float(x_mean.max() / x_mean.median())


def test_float16_path_gives_finite_scales_clips_and_float32_quality(outlier_opt, outlier_runs, eval_text):
    for dt, (result, _) in outlier_runs.items():
        for records in result.records:
            assert all(torch.isfinite(r.scales).all() and r.scales.min() > 0 for r in records.scales), dt
            assert all(math.isfinite(loss) for r in records.scales for loss in r.losses), dt
            assert all(torch.isfinite(c.max_val).all() and c.max_val.min() > 0 for c in records.clips), dt
    info = json.loads((outlier_runs["float16"][1] / "streamq.json").read_text())
    assert info["engine"] == "reference"
    ppl = {dt: perplexity(out, eval_text, seqlen=64, device="cpu").ppl for dt, (_, out) in outlier_runs.items()}
    original = perplexity(outlier_opt, eval_text, seqlen=64, device="cpu").ppl
    assert abs(ppl["float16"] - ppl["float32"]) / ppl["float32"] < 0.01, (ppl, original)
    # and the quantized models are as far from the original in both paths (logits on other tokens)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(2, 512, (4, 64), generator=torch.Generator().manual_seed(3))
    logits = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(ids).logits.detach()
    want = logits(outlier_opt)
    rel = {}
    for dt, (_, out) in outlier_runs.items():
        dequantize_checkpoint(out, out.parent / f"{dt}-deq")
        rel[dt] = float((logits(out.parent / f"{dt}-deq") - want).norm() / want.norm())
    assert rel["float16"] < rel["float32"] * 1.1, rel


def test_engine_equals_reference_in_float16(outlier_opt, outlier_runs, tmp_path):
    """Streamed == unstreamed holds for the GPU's arithmetic too, under a tight budget."""
    minimum = engine.plan(outlier_opt, calib=CALIB, device="cpu", compute="float16").minimum_bytes
    summary = engine.quantize(outlier_opt, tmp_path / "s", calib=CALIB, device="cpu", compute="float16",
                              max_gpu_mem=minimum)
    assert summary.plan.chunk_samples == 1
    ref = outlier_runs["float16"][1]
    assert checkpoint_bytes(tmp_path / "s") == checkpoint_bytes(ref)
    assert json.loads((tmp_path / "s" / "streamq.json").read_text())["compute_dtype"] == "float16"


def test_a_bf16_checkpoint_quantizes_in_bfloat16(tmp_path):
    src = make_tiny(tmp_path / "bf16", "llama", hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, seed=4)
    for shard in src.glob("model-*.safetensors"):  # rewrite the fp16 checkpoint as bf16
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
    assert ShardReader(src).float_dtype() == torch.bfloat16
    ref = reference.quantize(src, tmp_path / "ref", calib=CALIB, device="cpu", compute="bfloat16")
    engine.quantize(src, tmp_path / "eng", calib=CALIB, device="cpu", compute="bfloat16")
    assert checkpoint_bytes(tmp_path / "eng") == checkpoint_bytes(tmp_path / "ref")
    assert all(torch.isfinite(r.scales).all() for rec in ref.records for r in rec.scales)
    stored = {k: v for f in (tmp_path / "eng").glob("model-*.safetensors") for k, v in load_file(f).items()}
    assert {v.dtype for k, v in stored.items() if k.endswith((".scales", "norm.weight"))} == {torch.float16}


def test_a_value_beyond_fp16_is_refused_by_name(tmp_path):
    with pytest.raises(NumericError, match=r"model\.layers\.1\.mlp\.down_proj\.scales cannot be stored in "
                                           r"torch\.float16: 1 of 4 values are not finite"):
        check_storable({"mlp.down_proj.scales": torch.tensor([1.0, float("inf"), 2.0, 3.0]).half(),
                        "mlp.down_proj.qweight": torch.zeros(2, dtype=torch.int32)}, "model.layers.1.")


def test_a_norm_beyond_fp16_stops_the_run_with_one_line_and_keeps_what_was_written(tmp_path):
    """A float32 checkpoint whose block-1 norm holds 1e9: block 0 is written and journaled, block 1
    is refused by name before anything of it is written, exit status 2, no traceback."""
    src = make_tiny(tmp_path / "src", "llama", hidden=256, ffn=512, layers=2, heads=4, seed=6)
    for shard in src.glob("model-*.safetensors"):
        tensors = {k: v.float() for k, v in load_file(shard).items()}
        if "model.layers.1.post_attention_layernorm.weight" in tensors:
            tensors["model.layers.1.post_attention_layernorm.weight"][5] = 1e9
        save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--model", str(src), "--output", str(out), "--device", "cpu",
                                      "--n-samples", "4", "--seqlen", "64", "--mode", "rtn"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "streamq: error: model.layers.1.post_attention_layernorm.weight cannot be stored in torch.float16" \
        in result.stderr
    journal = json.loads((out / ".streamq" / "journal.json").read_text())
    assert journal["done_blocks"] == 1 and not journal["complete"]
    assert not any("layers.1." in name for name in journal["writer"]["pending"])


def test_compute_dtype_is_recorded_and_kept_by_resume(tiny_models, tmp_path):
    import subprocess
    import sys

    args = ["--model", tiny_models["llama"], "--n-samples", "4", "--seqlen", "64", "--device", "cpu",
            "--compute-dtype", "float16", "--shard-size", "150KB"]
    run = lambda *a, kill="": subprocess.run([sys.executable, "-m", "streamq", *map(str, a)], capture_output=True,
                                             text=True, env={**os.environ, "STREAMQ_KILL_AT": kill}, timeout=600)
    assert run("run", "--output", tmp_path / "whole", *args).returncode == 0
    assert json.loads((tmp_path / "whole" / "streamq.json").read_text())["compute_dtype"] == "float16"
    assert run("run", "--output", tmp_path / "cut", *args, kill="block0:journal").returncode == -9
    resumed = run("resume", tmp_path / "cut", "--device", "cpu")
    assert resumed.returncode == 0 and "streamq: warning" not in resumed.stderr, resumed.stderr
    assert "computing in float16" in resumed.stderr
    assert checkpoint_bytes(tmp_path / "cut") == checkpoint_bytes(tmp_path / "whole")


def smollm2_and_texts() -> tuple[Path, Path, Path]:
    """The real model (tools/make_smollm2.py; never fetched by a test) and the calibration and
    evaluation texts, or a skip saying how to build them."""
    from streamq.assets import cache_dir

    model = next((Path(p) for p in (os.environ.get("STREAMQ_SMOLLM2"), cache_dir() / "smollm2-135m")
                  if p and (Path(p) / "config.json").is_file()), None)
    if model is None:
        pytest.skip("no SmolLM2 build: python tools/make_smollm2.py --out DIR, then STREAMQ_SMOLLM2=DIR")
    calib_text, eval_path = cache_dir() / "calib-python-reference.txt", cache_dir() / "eval-docutils-docs.txt"
    if not (calib_text.is_file() and eval_path.is_file()):
        pytest.skip("no texts: python tools/make_texts.py --out $STREAMQ_CACHE")
    return model, calib_text, eval_path


@pytest.mark.slow
def test_smollm2_float16_path_within_one_percent_of_float32(tmp_path):
    """The real model (tools/make_smollm2.py; never fetched by a test): AWQ INT4 g64 through the
    GPU's float16 arithmetic on the CPU, against the float32 path, same calibration and text."""
    model, calib_text, eval_path = smollm2_and_texts()
    calib = CalibConfig(source=str(calib_text), n_samples=int(os.environ.get("STREAMQ_FP16_SAMPLES", "8")), seqlen=256)
    ppl = {}
    for dt in ("float32", "float16"):
        out = tmp_path / dt
        engine.quantize(model, out, QuantConfig(group_size=64), calib, device="cpu", compute=dt)
        ppl[dt] = perplexity(out, eval_path, seqlen=512, max_segments=8, device="cpu").ppl
    print(f"SmolLM2 AWQ INT4 g64, {calib.n_samples} x {calib.seqlen} calibration, 8 x 512 eval tokens: {ppl}")
    assert all(math.isfinite(v) for v in ppl.values())
    assert abs(ppl["float16"] - ppl["float32"]) / ppl["float32"] < 0.01, ppl
