"""Mixtures of experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE), on tiny random
models of 4 experts, top-2: streamed perplexity equals transformers', the output equals the
unstreamed reference byte for byte at any budget (the smallest parks the experts in host
memory, one at a time on the device), the routers stay unquantized and absorb the
norm's scales, an expert without calibration tokens is quantized round-to-nearest, resume after
SIGKILL is byte-identical."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from dequant import dequantize_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import checkpoint_bytes, killed_run_resumes_byte_identical, mixture_streams_as_reference
from make_tiny_model import make_tiny
from streamq import engine, reference
from streamq.block import quantize_block
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig, parse_size
from streamq.errors import SettingsError
from streamq.families import build_block, detect
from streamq.formats.awq import AWQ
from streamq.models import load_config
from streamq.ppl import perplexity
from streamq.quant import quant_params, quantize
from streamq.shards import ShardReader
from test_ppl import SEQLEN, eval_text, reference_ppl, text_ids  # noqa: F401 (eval_text is a fixture)

CALIB = CalibConfig(n_samples=6, seqlen=64)
MOE = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: make_tiny(root / name, name, hidden=128, ffn=128, kv_heads=2 if name == "mixtral" else None,
                            seed=40 + i) for i, name in enumerate(MOE)}


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("name", list(MOE))
def test_moe_streams_what_transformers_computes(moe_models, eval_text, tmp_path, name):  # noqa: F811
    """The original's streamed ppl equals transformers' (fused experts); the AWQ output's equals
    transformers' on the independently dequantized checkpoint (one tensor per expert, as read)."""
    model_dir = moe_models[name]
    ids = text_ids(model_dir, eval_text)
    assert perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu").ppl == \
        pytest.approx(reference_ppl(model_dir, ids, SEQLEN), rel=1e-5)
    out = tmp_path / "awq"
    engine.quantize(model_dir, out, QuantConfig(), CALIB, device="cpu")
    dequantize_checkpoint(out, tmp_path / "dequantized")
    assert perplexity(out, eval_text, seqlen=SEQLEN, device="cpu").ppl == \
        pytest.approx(reference_ppl(tmp_path / "dequantized", ids, SEQLEN), rel=1e-5)
    written = tensors(out)
    prefix = f"model.layers.0.{MOE[name]}"
    assert f"{prefix}.gate.weight" in written and f"{prefix}.gate.qweight" not in written  # the router: fp16
    assert f"{prefix}.experts.3.{'w2' if name == 'mixtral' else 'down_proj'}.qweight" in written
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert f"{prefix}.gate" in ignore and "lm_head" in ignore


@pytest.mark.parametrize("name,method", [("mixtral", "awq"), ("qwen2_moe", "awq"), ("qwen3_moe", "awq"),
                                         ("qwen2_moe", "awq+gptq")])
def test_moe_streamed_equals_reference(moe_models, tmp_path, name, method):
    """Experts' inputs are kept per calibration sample and forward passes take a fixed number of
    samples (4 of the 6 here, on a CPU too: an expert's product has as many rows as tokens were
    routed to it in a pass, and a CPU's GEMM may round another row count otherwise), so chunking
    (the reference's, the engine's whole set or its smallest chunk) never changes a byte; nor
    does parking the experts in host memory, one at a time on the device (the smallest budget)."""
    path = moe_models[name]
    qcfg = QuantConfig(gptq=method == "awq+gptq", next_input="quantized" if method == "awq+gptq" else "fp16")
    reference.quantize(path, tmp_path / "ref", qcfg, CALIB, chunk_samples=4, device="cpu")
    expected = checkpoint_bytes(tmp_path / "ref")
    minimum = engine.plan(path, qcfg, CALIB, device="cpu").minimum_bytes
    for budget in (None, minimum):
        out = tmp_path / f"s{budget}"
        summary = engine.quantize(path, out, qcfg, CALIB, device="cpu", max_gpu_mem=budget)
        assert checkpoint_bytes(out) == expected
        assert summary.plan.experts_parked == (budget is not None)  # the smallest budget parks the experts
        assert summary.plan.forward_samples == 4
    routed = summary.blocks[0]["experts"]["tokens"]
    assert sum(routed.values()) == 2 * 2 * CALIB.n_samples * CALIB.seqlen  # top-2, gate/up and down inputs


def test_the_quantized_copy_of_a_parked_block_holds_no_expert(moe_models):
    """--next-input quantized runs the block's quantized copy: with its experts parked, the
    copy's experts are storage-less too (their packed tensors dequantized on the device at each
    use, not the whole block dequantized at once), and its output is the unparked copy's."""
    from streamq.block import quantized_copy
    path = moe_models["qwen2_moe"]
    config, cpu = load_config(path), torch.device("cpu")
    family = detect(config)
    x = list((torch.rand(4, 64, config.hidden_size, generator=torch.Generator().manual_seed(0)) - 0.5).split(2))
    kwargs = family.block_kwargs(config, 64, cpu, torch.float32)
    qcfg = QuantConfig(gptq=True, next_input="quantized")
    runs = {}
    for park in (False, True):
        block = build_block(config, 0, ShardReader(path).with_prefix("model.layers.0."), cpu, torch.float32, park=park)
        _, out, x_next = quantize_block(block, family, config, x, kwargs, qcfg)
        runs[park] = out, x_next, quantized_copy(block, out, qcfg, AWQ)
    (out, x_next, whole), (out_parked, x_next_parked, twin) = runs[False], runs[True]
    assert all(p.is_meta for e in twin.mlp.experts for p in e.parameters())
    assert not any(p.is_meta for p in twin.mlp.shared_expert.parameters())
    assert out.keys() == out_parked.keys() and all(torch.equal(out[k], out_parked[k]) for k in out)
    assert len(x_next) == len(x_next_parked) and all(torch.equal(a, b) for a, b in zip(x_next, x_next_parked))


def test_router_absorbs_the_norm_scale(moe_models, tmp_path):
    """The post-attention norm is divided by s, so the router (fp16, unquantized) is multiplied
    by s along its inputs: it computes what it computed before."""
    path = moe_models["qwen2_moe"]
    result = reference.quantize(path, tmp_path / "ref", QuantConfig(), CALIB, chunk_samples=4, device="cpu")
    record = next(r for r in result.records[0].scales if r.prev_op == "post_attention_layernorm")
    assert record.absorbers == ("mlp.gate", "mlp.shared_expert_gate")
    original = ShardReader(path).with_prefix("model.layers.0.")
    written = tensors(tmp_path / "ref")
    for name in record.absorbers:
        expected = (original[f"{name}.weight"].float() * record.scales.view(1, -1)).half()
        assert torch.equal(written[f"model.layers.0.{name}.weight"], expected)
    norm = (original["post_attention_layernorm.weight"].float() / record.scales).half()
    assert torch.equal(written["model.layers.0.post_attention_layernorm.weight"], norm)


def test_an_expert_without_tokens_is_quantized_round_to_nearest(moe_models):
    """Inputs all positive and a router row that only ever loses: expert 3 gets no token. Its
    gate/up still take the norm's scale (the norm is shared), but it has no scale, clip or GPTQ
    of its own: its codes are RTN of its folded weights; the others are searched as usual."""
    path = moe_models["qwen3_moe"]
    config = load_config(path)
    family, cpu = detect(config), torch.device("cpu")
    block = build_block(config, 0, ShardReader(path).with_prefix("model.layers.0."), cpu, torch.float32)
    with torch.no_grad():
        block.mlp.gate.weight.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0])[:, None].expand(4, 128))
        block.mlp.gate.weight[:3] += torch.randn(3, 128) * 0.01  # the first three share the tokens
    x = torch.rand(6, 64, 128, generator=torch.Generator().manual_seed(0)) + 0.5
    kwargs = family.block_kwargs(config, 64, cpu, torch.float32)
    qcfg = QuantConfig(gptq=True)
    records, out, _ = quantize_block(block, family, config, list(x.split(4)), kwargs, qcfg)
    assert records.tokens["mlp.experts.3.gate_proj"] == 0 and records.tokens["mlp.experts.0.gate_proj"] > 0
    cold = [f"mlp.experts.3.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(records.fallback) == sorted(cold)
    assert not any(r.prev_op == "mlp.experts.3.up_proj" for r in records.scales)
    assert not any(r.linear in cold for r in records.clips)
    s = next(r for r in records.scales if r.prev_op == "post_attention_layernorm").scales
    for name in cold:
        w = block.get_submodule(name).weight.data.float()
        w = w * s.view(1, -1) if not name.endswith("down_proj") else w
        scales, zeros = quant_params(w, 4, 128)
        packed = AWQ.pack(quantize(w, scales, zeros, 4), scales.half(), zeros.to(torch.uint8), qcfg)
        assert all(torch.equal(out[f"{name}.{k}"], v) for k, v in packed.items())


def test_few_tokens_fall_back_and_are_reported(moe_models, tmp_path):
    """--min-expert-tokens above the coldest expert's count: its three linears are RTN, listed
    per block in streamq.json and counted in the run's summary."""
    path = moe_models["mixtral"]
    args = ["run", "--model", str(path), "--n-samples", "6", "--seqlen", "64", "--device", "cpu"]
    first = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    routed = json.loads((tmp_path / "a" / "streamq.json").read_text())["blocks"][0]["experts"]["tokens"]
    coldest = min(routed, key=routed.get)
    assert "experts: fewest calibration tokens routed to one" in first.output and "0 expert linears" in first.output
    second = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "b"), "--min-expert-tokens",
                                      str(routed[coldest] + 1)])
    assert second.exit_code == 0, second.output
    fallback = json.loads((tmp_path / "b" / "streamq.json").read_text())["blocks"][0]["experts"]["fallback"]
    expert = coldest.rsplit(".", 1)[0]
    assert sorted(fallback) == sorted(f"{expert}.{w}" for w in ("w1", "w2", "w3"))
    assert checkpoint_bytes(tmp_path / "a") != checkpoint_bytes(tmp_path / "b")
    bad = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "c"), "--min-expert-tokens", "0"])
    assert bad.exit_code == 2 and "--min-expert-tokens must be at least 1" in bad.output


def test_moe_resume_after_sigkill_is_byte_identical(moe_models, tmp_path):
    out = killed_run_resumes_byte_identical(["--model", str(moe_models["qwen2_moe"]), "--n-samples", "6", "--seqlen",
                                             "64", "--device", "cpu", "--shard-size", "100KB"], tmp_path)
    assert "experts: fewest calibration tokens routed to one" in out


def test_a_mixture_is_the_same_bytes_chunked_by_one_pass_or_by_all_samples(tmp_path):
    """Found by gpu_check's Mixtral stage in its CPU mode: with whole-chunk passes on a CPU, a
    random Mixtral at 256/512 quantized in chunks of 4 and of 1 differed in one scale's last bit
    (experts' products of other row counts). With passes of a fixed size, 12 samples in chunks of
    4 (the smallest budget) and in one chunk give the same bytes."""
    from make_wide_model import write

    model, ids = tmp_path / "mixtral", tmp_path / "ids.npy"
    write(model, "mixtral", 2, 256, 512, 4, 512, 0, 2, "cpu")
    np.save(ids, np.random.default_rng(0).integers(2, 512, 12 * 32))
    calib = CalibConfig(source=str(ids), n_samples=12, seqlen=32)
    minimum = engine.plan(model, QuantConfig(), calib, device="cpu").minimum_bytes
    plans = []
    for budget in (None, minimum):
        plans.append(engine.quantize(model, tmp_path / f"o{budget}", QuantConfig(), calib, device="cpu",
                                     max_gpu_mem=budget).plan)
    assert [(p.forward_samples, p.chunk_samples) for p in plans] == [(8, 12), (8, 8)]
    assert checkpoint_bytes(tmp_path / "oNone") == checkpoint_bytes(tmp_path / f"o{minimum}")


@pytest.mark.parametrize("name,extra,layers,dense", [("qwen2_moe", {"mlp_only_layers": [0]}, 3, [0]),
                                                     ("qwen3_moe", {"decoder_sparse_step": 2}, 4, [0, 2])])
def test_dense_and_sparse_layers_in_one_model(eval_text, tmp_path, name, extra, layers, dense):  # noqa: F811
    """Qwen-MoE configs whose mlp_only_layers or decoder_sparse_step make some layers dense (as
    DeepSeek-V3's first layers are): each block gets the groups of the MLP it has, the plan covers
    both kinds (the smallest budget parks the sparse blocks' experts); the streamed ppl is
    transformers', the output the unstreamed reference's at every budget, and the plan the run's."""
    model_dir = make_tiny(tmp_path / name, name, hidden=128, ffn=128, layers=layers, seed=7, config_extra=extra)
    config = load_config(model_dir)
    family = detect(config)
    assert [i for i in range(layers) if family.layer_kind(config, i) == 0] == dense
    ids = text_ids(model_dir, eval_text)
    assert perplexity(model_dir, eval_text, seqlen=SEQLEN, device="cpu").ppl == \
        pytest.approx(reference_ppl(model_dir, ids, SEQLEN), rel=1e-5)
    out = mixture_streams_as_reference(model_dir, tmp_path, CALIB)
    minimum = engine.plan(model_dir, QuantConfig(), CALIB, device="cpu").minimum_bytes
    with pytest.raises(SettingsError, match=r"a block of each kind needs at least (\S+) ") as refused:
        engine.plan(model_dir, QuantConfig(), CALIB, device="cpu", max_gpu_mem=minimum - 1)
    named = re.search(r"needs at least (\S+) ", str(refused.value)).group(1)  # copied back, it plans
    assert engine.plan(model_dir, QuantConfig(), CALIB, device="cpu", max_gpu_mem=parse_size(named)).experts_parked
    written = tensors(out)
    assert "model.layers.0.mlp.down_proj.qweight" in written and "model.layers.0.mlp.gate.weight" not in written
    sparse = next(i for i in range(layers) if i not in dense)
    assert f"model.layers.{sparse}.mlp.experts.1.down_proj.qweight" in written
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert f"model.layers.{sparse}.mlp.gate" in ignore and "model.layers.0.mlp.gate" not in ignore
