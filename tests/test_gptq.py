"""GPTQ: the algorithm against a straightforward whole-matrix version written here from the
paper, its Hessian's chunk invariance, its error against RTN, and the engine's guarantees
(streamed == reference, resume, one-line errors) for --method gptq and awq+gptq."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from helpers import DEVICES, checkpoint_bytes, killed_run_resumes_byte_identical, needs_gpu
from streamq import engine, reference
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import NumericError
from streamq.gptq import NotPositiveDefinite, gptq_quantize, hessian
from streamq.quant import dequantize, quant_params, quantize

CALIB = CalibConfig(n_samples=6, seqlen=64)


def paper_gptq(w: torch.Tensor, h: torch.Tensor, w_bit: int, group_size: int, damp: float = 0.01):
    """Algorithm 1 of the paper, column by column over the whole matrix (no lazy batches):
    quantize column i, spread its error over every later column through row i of the upper
    Cholesky factor of H^-1. A group's parameters come from its columns when it is reached."""
    w = w.clone()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    scales, zeros = [], []
    for i in range(w.shape[1]):
        if i % group_size == 0:
            s, z = quant_params(w[:, i:i + group_size], w_bit, group_size)
            scales.append(s)
            zeros.append(z)
        s, z = scales[-1][:, 0], zeros[-1][:, 0]
        q = torch.clamp(torch.round(w[:, i] / s) + z, 0, 2**w_bit - 1)
        codes[:, i] = q.to(torch.uint8)
        err = (w[:, i] - (q - z) * s) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    return codes, torch.cat(scales, 1), torch.cat(zeros, 1)


def streamed_equals_reference(path, qcfg: QuantConfig, calib: CalibConfig, tmp_path, budgets=("minimum",),
                              device="cpu"):
    """The engine's output at each budget (None: no limit; "minimum": the smallest the planner
    accepts) is byte-identical to the unstreamed reference's; returns the reference's folder."""
    ref = tmp_path / "ref"
    reference.quantize(path, ref, qcfg, calib, chunk_samples=4, device=device)
    minimum = engine.plan(path, qcfg, calib, device=device).minimum_bytes
    for budget in (minimum if b == "minimum" else b for b in budgets):
        engine.quantize(path, tmp_path / f"s{budget}", qcfg, calib, device=device, max_gpu_mem=budget)
        assert checkpoint_bytes(tmp_path / f"s{budget}") == checkpoint_bytes(ref)
    return ref


def outlier_layer(seed: int, rows: int = 48, cols: int = 256, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x[:, :6] *= 30  # salient input channels, as real activations have
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


@pytest.mark.parametrize("w_bit,group_size", [(4, 64), (3, 128), (4, 32)])
def test_gptq_is_the_papers_algorithm(w_bit, group_size):
    w, x = outlier_layer(w_bit + group_size)
    h = x.t() @ x
    ours = gptq_quantize(w.clone(), h, w_bit, group_size, block=1)
    paper = paper_gptq(w, h, w_bit, group_size)
    for a, b in zip(ours, paper):
        assert torch.equal(a, b)  # one column per lazy batch: the very same operations
    batched = gptq_quantize(w.clone(), h, w_bit, group_size)  # 128-column lazy batches: same math, other order
    assert (batched[0] == paper[0]).float().mean() > 0.99
    deq = dequantize(*batched, torch.float32)
    assert torch.allclose(deq, dequantize(*paper, torch.float32), atol=0.05 * float(deq.abs().max()))


@pytest.mark.parametrize("act_order", [False, True])
def test_linears_of_one_hessian_stacked_round_as_each_alone(act_order):
    """q/k/v (gate/up) share their inputs: stacked by rows through one column loop (parts), each
    gets the very codes, scales and zeros of its own run."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(512, 256, generator=g)
    x[:, :6] *= 30
    h = x.t() @ x
    weights = [torch.randn(rows, 256, generator=g) * 0.05 for rows in (64, 16, 48)]
    alone = [gptq_quantize(w.clone(), h, 4, 64, act_order=act_order) for w in weights]
    stacked = gptq_quantize(torch.cat(weights), h, 4, 64, act_order=act_order, parts=[64, 16, 48])
    for i, (a, b) in enumerate([(0, 64), (64, 80), (80, 128)]):
        for ours, theirs in zip(stacked, alone[i]):
            assert torch.equal(ours[a:b], theirs)


def test_a_block_rounds_sets_of_one_hessian_as_linear_by_linear(tiny_models, tmp_path, monkeypatch):
    """The engine stacks q/k/v and gate/up: the same bytes as rounding every linear alone."""
    import streamq.block as block_mod

    qcfg = QuantConfig(gptq=True, gptq_act_order=True)
    calib = CalibConfig(n_samples=4, seqlen=64)
    engine.quantize(tiny_models["llama"], tmp_path / "sets", qcfg, calib, device="cpu")
    sets, split = [], block_mod.gptq_sets

    def one_by_one(names, key):
        sets.append(split(names, key))  # what the engine would have stacked
        return [[n] for n in names]
    monkeypatch.setattr(block_mod, "gptq_sets", one_by_one)
    engine.quantize(tiny_models["llama"], tmp_path / "alone", qcfg, calib, device="cpu")
    assert ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] in sets[0]
    assert ["mlp.gate_proj", "mlp.up_proj"] in sets[0] and ["mlp.down_proj"] in sets[0]
    assert checkpoint_bytes(tmp_path / "sets") == checkpoint_bytes(tmp_path / "alone")


@needs_gpu
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_cuda_is_the_cpu_algorithm(act_order):
    """The same function on the GPU: float32 Cholesky and products round differently there, so
    the codes agree but at near-ties, and the reconstruction error is the CPU's within 2 %."""
    w, x = outlier_layer(7, rows=256, cols=512, tokens=2048)
    h = x.t() @ x
    cpu = gptq_quantize(w.clone(), h, 4, 64, act_order=act_order)
    gpu = [t.cpu() for t in gptq_quantize(w.cuda(), h.cuda(), 4, 64, act_order=act_order)]
    assert (gpu[0] == cpu[0]).float().mean() > 0.99
    err = [float((x @ (dequantize(*q, torch.float32) - w).t()).square().sum()) for q in (cpu, gpu)]
    assert abs(err[1] - err[0]) < 0.02 * err[0], err


def test_gptq_beats_rtn_on_planted_outliers():
    for seed in range(3):
        w, x = outlier_layer(seed)
        s, z = quant_params(w, 4, 64)
        rtn = dequantize(quantize(w, s, z, 4), s, z, torch.float32)
        gptq = dequantize(*gptq_quantize(w.clone(), x.t() @ x, 4, 64), torch.float32)
        err = {name: float((x @ (q - w).t()).square().sum()) for name, q in (("rtn", rtn), ("gptq", gptq))}
        assert err["gptq"] < 0.7 * err["rtn"], err


def test_hessian_does_not_depend_on_chunking():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(6, 32, 64, generator=g)
    whole = hessian([samples], torch.device("cpu"))
    assert torch.equal(whole, hessian(list(samples.split(2)), torch.device("cpu")))
    assert torch.equal(whole, hessian([samples[:1], samples[1:5], samples[5:]], torch.device("cpu")))
    assert torch.allclose(whole, samples.reshape(-1, 64).t() @ samples.reshape(-1, 64), rtol=1e-4, atol=1e-3)


def test_dead_inputs_and_a_hessian_that_cannot_be_made_definite():
    w, x = outlier_layer(1)
    x[:, 10] = 0  # an input channel that never fires: its weights go to zero
    codes, scales, zeros = gptq_quantize(w.clone(), x.t() @ x, 4, 64)
    assert torch.all(dequantize(codes, scales, zeros, torch.float32)[:, 10] == 0)
    with pytest.raises(NotPositiveDefinite, match="not positive definite after dampening 0.01"):
        gptq_quantize(w.clone(), -torch.eye(256), 4, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
@pytest.mark.parametrize("family", ["opt", "llama_gqa", "phi3"])
def test_gptq_streamed_equals_reference(tiny_models, tmp_path, family, method, device):
    qcfg = QuantConfig(mode="rtn" if method == "gptq" else "awq", gptq=True)
    calib = CALIB if family != "llama_gqa" else None
    if calib is None:  # this model has no tokenizer
        import numpy as np

        ids = tmp_path / "ids.npy"
        np.save(ids, np.random.default_rng(1).integers(2, 512, 5_000))
        calib = CalibConfig(source=str(ids), n_samples=6, seqlen=64)
    path = tiny_models[family]
    streamed_equals_reference(path, qcfg, calib, tmp_path, budgets=(None, "minimum"), device=device)
    rtn = tmp_path / "rtn"
    engine.quantize(path, rtn, QuantConfig(mode=qcfg.mode), calib, device=device)
    assert checkpoint_bytes(rtn) != checkpoint_bytes(tmp_path / "ref")


def test_planner_counts_the_hessians(tiny_models):
    plain = engine.plan(tiny_models["llama"], QuantConfig(), CALIB, device="cpu", max_gpu_mem=10**10)
    gptq = engine.plan(tiny_models["llama"], QuantConfig(gptq=True), CALIB, device="cpu", max_gpu_mem=10**10)
    assert gptq.estimated_peak_bytes >= plain.estimated_peak_bytes


def test_gptq_run_resumes_byte_identical_and_reports_its_method(tiny_models, tmp_path):
    out = killed_run_resumes_byte_identical(["--model", str(tiny_models["llama"]), "--n-samples", "6", "--seqlen", "64",
                                             "--device", "cpu", "--method", "awq+gptq", "--shard-size", "150KB"], tmp_path)
    assert "(awq+gptq, INT4, group 128)" in out


def test_gptq_errors_are_one_line(tiny_models, tmp_path, monkeypatch):
    runner = CliRunner()
    bad = runner.invoke(app, ["run", "--model", str(tiny_models["opt"]), "--output", str(tmp_path / "o"),
                              "--method", "gptq", "--mode", "s2", "--device", "cpu"])
    assert bad.exit_code == 2 and "--mode s2 is an ablation of --method awq" in bad.stderr
    import streamq.block as block_mod

    def failing(*args, **kwargs):
        raise NotPositiveDefinite("not positive definite after dampening 0.01 (Cholesky failed at column 3)")

    monkeypatch.setattr(block_mod, "gptq_quantize", failing)
    at = r"model\.decoder\.layers\.0\.self_attn\."  # k, v and q share their Hessian: rounded together
    with pytest.raises(NumericError, match=rf"GPTQ cannot quantize {at}k_proj, {at}v_proj, {at}q_proj: the "
                                           r"Hessian of their inputs is not positive definite.*--n-samples"):
        engine.quantize(tiny_models["opt"], tmp_path / "p", QuantConfig(mode="rtn", gptq=True), CALIB, device="cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_next_input_from_the_quantized_block(tiny_models, tmp_path, device):
    """--next-input quantized (the GPTQ paper's order): block 1 is calibrated on block 0's
    quantized outputs, so block 0 is unchanged and block 1 differs; engine == reference at the
    smallest budget too."""
    from safetensors.torch import load_file

    qcfg = QuantConfig(mode="rtn", gptq=True, next_input="quantized")
    path = tiny_models["llama"]
    streamed_equals_reference(path, qcfg, CALIB, tmp_path, device=device)
    engine.quantize(path, tmp_path / "fp16", QuantConfig(mode="rtn", gptq=True), CALIB, device=device)

    def tensors(out):
        return {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}

    seq, indep = tensors(tmp_path / "ref"), tensors(tmp_path / "fp16")
    assert all(torch.equal(seq[k], indep[k]) for k in seq if k.startswith("model.layers.0."))
    assert not all(torch.equal(seq[k], indep[k]) for k in seq if k.startswith("model.layers.1.") and "qweight" in k)


def paper_gptq_act_order(w: torch.Tensor, h: torch.Tensor, w_bit: int, group_size: int, damp: float = 0.01):
    """Act-order with static groups, straightforwardly: every group's parameters from the
    original columns, then the permuted matrix column by column, each column rounded with its
    own group's parameters, and the codes put back in the original order."""
    w = w.clone()
    w[:, torch.diag(h) == 0] = 0
    scales, zeros = quant_params(w, w_bit, group_size)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    wp, hp = w[:, perm], h[perm][:, perm].clone()
    dead = torch.diag(hp) == 0
    hp[dead, dead] = 1
    hp += damp * torch.mean(torch.diag(hp)) * torch.eye(hp.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for i in range(w.shape[1]):
        g = int(perm[i]) // group_size
        s, z = scales[:, g], zeros[:, g]
        q = torch.clamp(torch.round(wp[:, i] / s) + z, 0, 2**w_bit - 1)
        codes[:, perm[i]] = q.to(torch.uint8)
        err = (wp[:, i] - (q - z) * s) / hinv[i, i]
        wp[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    return codes, scales, zeros


@pytest.mark.parametrize("w_bit,group_size", [(4, 64), (3, 32)])
def test_act_order_is_static_groups_in_descending_hessian_order(w_bit, group_size):
    w, x = outlier_layer(7 + w_bit)
    x[:, 40] = 0  # a dead input: last in the order, its weights zeroed
    x[:, 100:110] *= 8  # energetic inputs away from the first group: the order is not the identity
    h = x.t() @ x
    ours = gptq_quantize(w.clone(), h, w_bit, group_size, block=1, act_order=True)
    expected = paper_gptq_act_order(w, h, w_bit, group_size)
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)
    assert torch.all(dequantize(*ours, torch.float32)[:, 40] == 0)
    in_order = gptq_quantize(w.clone(), h, w_bit, group_size, block=1)
    assert not torch.equal(ours[0], in_order[0])
    s, z = quant_params(torch.where(x.abs().sum(0) == 0, 0, w), w_bit, group_size)  # static: the original groups
    assert torch.equal(ours[1], s) and torch.equal(ours[2], z)
    batched = gptq_quantize(w.clone(), h, w_bit, group_size, act_order=True)
    assert (batched[0] == ours[0]).float().mean() > 0.99 and torch.equal(batched[1], ours[1])
    rtn = dequantize(quantize(w, s, z, w_bit), s, z, torch.float32)
    act = dequantize(*ours, torch.float32)
    err = {k: float((x @ (q - w).t()).square().sum()) for k, q in (("rtn", rtn), ("act", act))}
    assert err["act"] < 0.7 * err["rtn"], err


@pytest.mark.parametrize("device", DEVICES)
def test_act_order_run_equals_reference_and_needs_gptq(tiny_models, tmp_path, device):
    qcfg = QuantConfig(mode="awq", gptq=True, gptq_act_order=True)
    path = tiny_models["llama"]
    streamed_equals_reference(path, qcfg, CALIB, tmp_path, device=device)
    engine.quantize(path, tmp_path / "plain", QuantConfig(mode="awq", gptq=True), CALIB, device=device)
    assert checkpoint_bytes(tmp_path / "plain") != checkpoint_bytes(tmp_path / "ref")
    result = CliRunner().invoke(app, ["run", "--model", str(path), "--output", str(tmp_path / "x"),
                                      "--gptq-act-order"])
    assert result.exit_code == 2 and "--method gptq or awq+gptq" in result.output
    assert not (tmp_path / "x").exists()
