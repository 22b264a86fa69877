"""The GPU path, proven in one call on a lent machine: install, versions, kernel build, the GPU
tests, a whole run with the CUDA kernels against PyTorch, ppl on the GPU against the CPU,
random models at real widths (OPT-30B, LLaMA-2-7B, LLaMA-3-70B) quantized at the paper's
calibration size under a roomy and a tight --max-gpu-mem (byte-identical, measured peaks beside
the plan), and the kernel timings. Its CPU mode runs the same stages at tiny widths (the test
suite runs it, so the script cannot rot between GPU sessions).

    python tools/gpu_check.py                          # a GPU machine: all stages ~12 min on an H200
    python tools/gpu_check.py --stages env,build,kernels-run,wide-opt-30b   # a subset, in that order
    python tools/gpu_check.py --device cpu --small     # tiny widths on a CPU (tests/test_gpu_check.py)

Every stage runs in a process of its own with its own time cap, inside an overall budget
(--budget-s): a failing or hanging stage costs its cap, not the rest. summary.json and the full
log go to $OUT when set (the device tool's output folder), else to ./gpu-check-out/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # streamq importable even where the install failed
GiB = 2**30


@dataclass(frozen=True)
class Stage:
    name: str
    needs_cuda: bool
    cap_s: float  # seconds, on a GPU machine
    cap_small_s: float  # seconds, in --small mode


# in order of what the 15 minutes of a lent GPU must answer first
STAGES = (
    Stage("env", False, 90, 60),
    Stage("build", True, 240, 0),
    Stage("gpu-tests", True, 150, 0),
    Stage("kernels-run", True, 120, 0),  # four runs of ~15 s each (H200), mostly start-up
    Stage("ppl", False, 60, 120),
    Stage("formats", False, 90, 120),  # compressed-tensors output loaded by transformers on the device
    Stage("wide-opt-30b", False, 240, 120),
    Stage("bench-kernels", True, 90, 0),
    Stage("bench-matmul", True, 60, 0),  # the card's product rate per dtype at OPT-30B fc1's shape: the limit
    Stage("wide-llama-3-70b", False, 240, 120),
    Stage("wide-llama-2-7b", False, 90, 120),
    Stage("wide-llama-2-7b-gptq", False, 150, 120),  # GPTQ's defaults: Hessians up to 11008^2 floats
    Stage("wide-mixtral-8x7b", False, 300, 120),  # 38GB: the whole block; the smallest budget: experts parked
    Stage("trace-llama-2-7b", False, 120, 60),  # one block under torch.profiler: where its time goes, op by op
    # one DeepSeek-V3 sparse block from an FP8 source: 70GB (the whole block) and 40GB (experts
    # parked, read from the shards at each use and decoded on the GPU)
    Stage("wide-deepseek-v3", False, 480, 120),
    Stage("rtn-llama-2-7b", False, 120, 60),  # data-free RTN on the device against the CPU: the same bytes
    Stage("parallel-2-ranks", False, 180, 90),  # torchrun, 2 ranks sharing the device, against one process
    Stage("suite", False, 600, 0),  # the whole test suite (suspect: tests that assume a CPU); --suite only
)


@dataclass(frozen=True)
class Wide:
    family: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int | None = None
    tight: str = "6GB"  # a budget that forces activations to stream from pinned host memory
    # a Hub id: the model is written as that repository is published (.bin, decoder.*, no lm_head)
    # into a local Hub cache and quantized by that id, offline, as a user types it
    published: str | None = None
    roomy: str | None = None  # the roomy budget where 38GB is not (None: the settings')
    layers: int | None = None  # blocks written (None: the settings')
    fp8: bool = False  # linears in FP8 with 128 x 128 block scales, as DeepSeek-V3 is published


# real widths; --small replaces them with tiny ones of the same family and attention layout
WIDE = {
    "opt-30b": Wide("opt", 7168, 28672, 56, published="facebook/opt-30b"),
    "llama-2-7b": Wide("llama", 4096, 11008, 32, tight="3GB"),  # its activations stream from pinned host memory
    "llama-3-70b": Wide("llama", 8192, 28672, 64, 8),
    "mixtral-8x7b": Wide("mixtral", 4096, 14336, 32, 8, tight="min"),
    # tight: 40GB parks the experts with 64-sample chunks on the GPU (47 reads of the experts, ~0.5 TB from FP8;
    # the smallest budget streams 1-sample chunks: 2819 reads, tools/plan_moe.py)
    "deepseek-v3": Wide("deepseek_v3", 7168, 2048, 128, tight="40GB", roomy="70GB", layers=1, fp8=True),
}
WIDE_SMALL = {
    "opt-30b": Wide("opt", 256, 1024, 4, published="facebook/opt-30b"),
    "llama-2-7b": Wide("llama", 256, 512, 4),
    "llama-3-70b": Wide("llama", 256, 768, 8, 2),
    "mixtral-8x7b": Wide("mixtral", 256, 512, 4, 2),
    "deepseek-v3": Wide("deepseek_v3", 256, 128, 4, layers=2, fp8=True),
}


def settings(args: argparse.Namespace) -> dict:
    """Sizes of the runs: the paper's calibration (128 x 512) and 3 blocks on a GPU."""
    if args.small:
        return {"layers": 2, "n_samples": 4, "seqlen": 64, "roomy": "1GB", "tight": "min", "vocab": 512}
    return {"layers": 3, "n_samples": 128, "seqlen": 512, "roomy": "38GB", "tight": "per model", "vocab": 512}


# ---------------------------------------------------------------- helpers used by the stages

def sh(cmd: list[str], timeout: float, log: Path | None = None, env: dict | None = None) -> tuple[int, float, str]:
    """Run cmd; (exit status, seconds, last 3000 characters of its output). 124 on timeout."""
    start = time.time()
    try:
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=max(1.0, timeout),
                              env={**os.environ, "PYTHONPATH": path, **(env or {})}, cwd=ROOT)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        rc = 124
    if log is not None:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(map(str, cmd))}  (exit {rc}, {time.time() - start:.1f} s)\n{out}\n")
    return rc, time.time() - start, out[-3000:]


def streamq(*args, timeout: float, log: Path, env: dict | None = None) -> tuple[int, float, str]:
    return sh([sys.executable, "-m", "streamq", *map(str, args)], timeout, log, env)


def output_digest(out: Path) -> dict[str, str]:
    """sha256 of every checkpoint file (streamq.json, which records timings, aside)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name != "streamq.json"}


def run_figures(out: Path) -> dict:
    """A finished run's per-block figures from its streamq.json: seconds, the peaks (device
    memory allocated and reserved, RSS) and each phase's median over the blocks."""
    blocks = json.loads((out / "streamq.json").read_text())["blocks"]
    alloc = [b["peak_gpu_bytes"] for b in blocks if b.get("peak_gpu_bytes") is not None]
    reserved = [b["peak_gpu_reserved_bytes"] for b in blocks if b.get("peak_gpu_reserved_bytes") is not None]
    per_block = [b["seconds"] for b in blocks]
    return {
        "block_seconds": per_block, "median_block_seconds": statistics.median(per_block),
        "peak_allocated_bytes": max(alloc) if alloc else None, "block_peak_allocated_bytes": alloc,
        "peak_reserved_bytes": max(reserved) if reserved else None,
        "peak_rss_bytes": max(b["peak_rss_bytes"] for b in blocks),
        # where a block's time goes: each phase's median over the blocks
        "phases": {name: round(statistics.median(b.get("phases", {}).get(name, 0.0) for b in blocks), 3)
                   for name in sorted({n for b in blocks for n in b.get("phases", {})})},
    }


def calibration_ids(work: Path, n_tokens: int, vocab: int) -> Path:
    import numpy as np

    path = work / f"calib-{n_tokens}.npy"
    if not path.is_file():
        np.save(path, np.random.default_rng(0).integers(4, vocab, n_tokens))
    return path


def tiny_model(work: Path, family: str, hidden: int = 256, ffn: int = 1024) -> Path:
    from make_tiny_model import make_tiny

    path = work / f"tiny-{family}-{hidden}"
    if not (path / "config.json").is_file():
        make_tiny(path, family, hidden=hidden, ffn=ffn, layers=2, heads=4, vocab=512, seed=1,
                  max_shard_size="100MB")
    return path


def remaining(deadline: float) -> float:
    return deadline - time.time()


# ---------------------------------------------------------------- the stages (each in its own process)

def stage_env(args, work: Path, log: Path, deadline: float) -> dict:
    result: dict = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    if args.install:
        # offline machine: no dependencies, no isolated build environment to download
        rc, secs, tail = sh([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                             "-e", "."], remaining(deadline), log)
        result["install"] = {"exit": rc, "seconds": round(secs, 1)}
        if rc != 0:
            return {**result, "ok": False, "error": tail[-500:]}
    import torch
    import transformers

    result.update(torch=torch.__version__, torch_cuda=torch.version.cuda, transformers=transformers.__version__,
                  cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        result["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
    if shutil.which("nvidia-smi"):
        rc, _, out = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30, log)
        result["nvidia_smi"] = out.strip().splitlines()[-1] if rc == 0 and out.strip() else f"exit {rc}"
    if shutil.which("nvcc"):
        rc, _, out = sh(["nvcc", "--version"], 30, log)
        result["nvcc"] = next((line for line in out.splitlines() if "release" in line), out.strip()[-80:])
    import streamq

    result["streamq"] = streamq.__version__
    result["ok"] = args.device == "cpu" or bool(result.get("cuda_available"))
    return result


def stage_build(args, work: Path, log: Path, deadline: float) -> dict:
    import torch

    from streamq import kernels

    start = time.time()
    ext = kernels.build(verbose=True)  # the compiler's own output goes to the log, for a failed build
    built = time.time() - start
    ops = kernels.cuda_ops(ext)
    checks = {str(d).replace("torch.", ""): kernels.self_check(ops, torch.device("cuda"), d) or "ok"
              for d in (torch.float16, torch.bfloat16, torch.float32)}
    return {"ok": all(v == "ok" for v in checks.values()), "build_seconds": round(built, 1), "self_check": checks}


def stage_gpu_tests(args, work: Path, log: Path, deadline: float) -> dict:
    rc, secs, tail = sh([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
                         "tests"], remaining(deadline), log)
    summary = [line for line in tail.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {"ok": rc == 0, "exit": rc, "seconds": round(secs, 1), "summary": summary[-1] if summary else tail[-300:]}


def stage_suite(args, work: Path, log: Path, deadline: float) -> dict:
    rc, secs, tail = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "tests"],
                        remaining(deadline), log)
    summary = [line for line in tail.splitlines() if " passed" in line or " failed" in line]
    return {"ok": rc == 0, "exit": rc, "seconds": round(secs, 1), "summary": summary[-1] if summary else tail[-300:]}


def linear_agreement(a: Path, b: Path) -> dict:
    """Two outputs of the same model: are the non-linear tensors (norms and biases, which carry
    the folded scales) identical, and what share of the packed linears' groups is identical."""
    import torch
    from safetensors.torch import load_file

    ta = {k: v for f in sorted(a.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    plain = [k for k in ta if not k.endswith((".qweight", ".qzeros", ".scales"))]
    same_plain = all(torch.equal(ta[k], tb[k]) for k in plain)
    groups = equal = 0
    for k in ta:
        if k.endswith(".scales"):
            groups += ta[k].numel()
            base = k[: -len(".scales")]
            s_eq = ta[k] == tb[k]
            z_eq = ta[base + ".qzeros"] == tb[base + ".qzeros"]  # [in/g, out/8] words
            q = (ta[base + ".qweight"] == tb[base + ".qweight"]).reshape(s_eq.shape[0], -1, z_eq.shape[1]).all(1)
            equal += int((s_eq & (z_eq & q).repeat_interleave(8, dim=1)).sum())
    return {"scales_identical": same_plain, "groups": groups, "groups_equal": equal,
            "share_equal": round(equal / max(1, groups), 5)}


def stage_kernels_run(args, work: Path, log: Path, deadline: float) -> dict:
    """A whole run with --kernels cuda against --kernels torch: the same scales (every non-linear
    tensor identical) and the same clips except at near-ties."""
    result: dict = {"ok": True}
    for family in ("opt", "llama"):
        model = tiny_model(work, family, hidden=512, ffn=2048)
        outs = {}
        for k in ("torch", "cuda"):
            outs[k] = work / f"kr-{family}-{k}"
            rc, secs, tail = streamq("run", "--model", model, "--output", outs[k], "--overwrite", "--n-samples", 16,
                                     "--seqlen", 128, "--device", "cuda", "--kernels", k, timeout=remaining(deadline),
                                     log=log)
            if rc != 0:
                return {"ok": False, "error": f"{family} --kernels {k}: exit {rc}: {tail[-400:]}"}
        agree = linear_agreement(outs["torch"], outs["cuda"])
        result[family] = agree
        result["ok"] &= agree["scales_identical"] and agree["share_equal"] >= 0.99
    return result


def stage_ppl(args, work: Path, log: Path, deadline: float) -> dict:
    """streamq ppl of an original and of a quantized tiny model on the check's device against
    the float32 CPU figure (in --small mode: float16 arithmetic on the CPU against float32)."""
    from streamq import engine
    from streamq.calib import builtin_text
    from streamq.config import CalibConfig, QuantConfig
    from streamq.ppl import perplexity

    text = work / "ppl.txt"
    text.write_text(builtin_text()[-(60_000 if not args.small else 20_000):])
    model = tiny_model(work, "llama")
    quant = work / "ppl-rtn"
    engine.quantize(model, quant, QuantConfig(mode="rtn"), CalibConfig(n_samples=4, seqlen=64), device="cpu",
                    overwrite=True)
    check = {"device": "cuda"} if args.device == "cuda" else {"device": "cpu", "compute": "float16"}
    result: dict = {"ok": True, "tolerance_rel": 2e-3}
    for label, path in (("fp16-weights", model), ("awq-int4", quant)):
        ref = perplexity(path, text, seqlen=128, device="cpu")
        got = perplexity(path, text, seqlen=128, **check)
        rel = abs(got.ppl - ref.ppl) / ref.ppl
        result[label] = {"cpu_float32": round(ref.ppl, 5), "check": round(got.ppl, 5), "check_dtype": got.compute_dtype,
                         "check_device": got.device, "rel_diff": float(f"{rel:.3g}"), "kernels": got.kernels,
                         "segments": got.segments}
        result["ok"] &= rel <= result["tolerance_rel"]
    return result


def stage_formats(args, work: Path, log: Path, deadline: float) -> dict:
    """streamq's compressed-tensors output of a tiny fp16 and a tiny bf16 LLaMA, quantized on the
    check's device and loaded there by transformers with the compressed-tensors package: every
    linear equals streamq's own dequantization, and the logits equal those of a dense model
    holding those weights (run the same way)."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        return {"ok": False, "error": "the compressed-tensors package is missing (carry its wheels: docs/gpu.md)"}
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from streamq import engine
    from streamq.config import CalibConfig
    from streamq.formats import COMPRESSED_TENSORS, dequantize, linear_tensors
    from streamq.shards import ShardReader

    result: dict = {"ok": True}
    for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        src = tiny_model(work, "llama")
        if dtype == torch.bfloat16:
            src_bf16 = work / "tiny-llama-bf16"
            if not src_bf16.exists():
                shutil.copytree(src, src_bf16)
                for shard in src_bf16.glob("*.safetensors"):
                    save_file({k: v.to(dtype) for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
            src = src_bf16
        out = work / f"formats-{label}"
        start = time.time()
        engine.quantize(src, out, calib=CalibConfig(n_samples=8, seqlen=128), device=args.device, overwrite=True,
                        format="compressed-tensors")
        seconds = time.time() - start
        reader = ShardReader(out)
        ours = {base: dequantize(COMPRESSED_TENSORS, {k: reader.get(n) for k, n in names.items()}, 4)
                for base, names in linear_tensors(COMPRESSED_TENSORS, reader.names()).items()}
        try:
            load = CompressedTensorsConfig(dequantize=True)
        except TypeError:  # older transformers: the same through run_compressed
            load = CompressedTensorsConfig(run_compressed=False)
        model = AutoModelForCausalLM.from_pretrained(out, quantization_config=load, device_map=args.device).eval()
        same = all(torch.equal(model.get_submodule(b).weight.data.cpu(), w) for b, w in ours.items())
        twin = AutoModelForCausalLM.from_pretrained(src, dtype=model.dtype, device_map=args.device).eval()
        for b, w in ours.items():
            twin.get_submodule(b).weight.data = w.to(args.device)
        for name, t in twin.named_parameters():  # norms and embeddings as written (scales folded in)
            if name in reader.files:
                t.data = reader.get(name).to(args.device, t.dtype)
        ids = torch.randint(4, 512, (2, 64), generator=torch.Generator().manual_seed(0)).to(args.device)
        with torch.no_grad():
            diff = (model(input_ids=ids).logits.float() - twin(input_ids=ids).logits.float()).abs().max().item()
        result[label] = {"quantize_seconds": round(seconds, 1), "model_dtype": str(model.dtype).replace("torch.", ""),
                         "device": str(next(model.parameters()).device), "weights_equal": same,
                         "max_logit_diff": diff, "linears": len(ours)}
        result["ok"] &= same and diff == 0.0
    return result


def budget_bytes(spec: str, model: Path, n_samples: int, seqlen: int, device: str) -> int:
    """A --max-gpu-mem value in bytes; "min" is the smallest budget the planner accepts."""
    from streamq import engine
    from streamq.config import CalibConfig, QuantConfig, parse_size

    if spec != "min":
        return parse_size(spec)
    return engine.plan(model, QuantConfig(), CalibConfig(n_samples=n_samples, seqlen=seqlen), device=device).minimum_bytes


def stage_wide(name: str, method: str = "awq"):
    def run(args, work: Path, log: Path, deadline: float) -> dict:
        from make_wide_model import write

        cfg = settings(args)
        spec = (WIDE_SMALL if args.small else WIDE)[name]
        from make_published import to_cache

        model = work / f"model-{name}"
        t0 = time.time()
        if not (model / "config.json").is_file():
            write(model, spec.family, spec.layers or cfg["layers"], spec.hidden, spec.ffn, spec.heads, cfg["vocab"], 0,
                  spec.kv_heads, "cuda" if args.device == "cuda" else "cpu", published=spec.published is not None,
                  fp8=spec.fp8)
        asked, env = model, None
        if spec.published:  # the headline command on the headline layout: by Hub id, from the cache, offline
            model = to_cache(model, spec.published, work / "hub", move=True)
            asked, env = spec.published, {"HF_HUB_CACHE": str(work / "hub"), "HF_HUB_OFFLINE": "1"}
        written = time.time() - t0
        ids = calibration_ids(work, cfg["n_samples"] * cfg["seqlen"] * 2, cfg["vocab"])
        result: dict = {"shape": vars(spec), "model": str(asked), "method": method, "layers": spec.layers or cfg["layers"],
                        "calibration": f"{cfg['n_samples']} x "
                        f"{cfg['seqlen']}", "write_seconds": round(written, 1), "runs": {}}
        digests = {}
        for label in ("roomy", "tight"):
            spec_budget = cfg[label] if args.small else {"tight": spec.tight, "roomy": spec.roomy or cfg["roomy"]}[label]
            budget = budget_bytes(spec_budget, model, cfg["n_samples"], cfg["seqlen"], args.device)
            out = work / f"out-{name}-{method}-{label}"
            rc, secs, tail = streamq("run", "--model", asked, "--output", out, "--overwrite", "--calib", ids,
                                     "--method", method,
                                     "--n-samples", cfg["n_samples"], "--seqlen", cfg["seqlen"], "--device",
                                     args.device, "--max-gpu-mem", budget, "--kernels", args.kernels,
                                     timeout=remaining(deadline), log=log, env=env)
            if rc != 0:
                result["runs"][label] = {"budget_bytes": budget, "exit": rc, "error": tail[-600:]}
                continue
            info = json.loads((out / "streamq.json").read_text())
            result["runs"][label] = {
                "budget_bytes": budget, "seconds": round(secs, 1), **run_figures(out),
                "planned_peak_bytes": info["plan"]["estimated_peak_bytes"], "chunk_samples": info["plan"]["chunk_samples"],
                "activations_on_device": info["plan"]["activations_on_device"],
                "forward_samples": info["plan"].get("forward_samples"),
                "experts_parked": info["plan"].get("experts_parked"),
                "kernels": info.get("kernels"), "compute_dtype": info.get("compute_dtype"),
            }
            digests[label] = output_digest(out)
        runs = result["runs"]
        result["identical"] = len(digests) == 2 and digests["roomy"] == digests["tight"]
        within = all(r.get("peak_allocated_bytes") is None or r["peak_allocated_bytes"] <= r["budget_bytes"]
                     for r in runs.values())
        planned = all(r.get("peak_allocated_bytes") is None or r["peak_allocated_bytes"] <= r["planned_peak_bytes"]
                      for r in runs.values())
        result.update(within_budget=within, within_plan=planned)
        result["ok"] = result["identical"] and within and all("error" not in r for r in runs.values())
        if not args.keep:
            cache = [work / "hub"] if spec.published else []
            for path in [model, *cache, *(work / f"out-{name}-{method}-{label}" for label in ("roomy", "tight"))]:
                shutil.rmtree(path, ignore_errors=True)
        return result
    return run


def stage_rtn(args, work: Path, log: Path, deadline: float) -> dict:
    """Data-free round-to-nearest (`--mode rtn`: no tokenizer, no calibration) of a random
    LLaMA-2-7B-width model on the run's device and on the CPU: seconds per block each, peak
    device memory and RSS, and whether the outputs are the same bytes (RTN is elementwise
    arithmetic, a max and a min: exact on both, so any difference is a bug)."""
    from make_wide_model import write

    cfg = settings(args)
    spec = (WIDE_SMALL if args.small else WIDE)["llama-2-7b"]
    model = work / "model-rtn"
    if not (model / "config.json").is_file():
        write(model, spec.family, cfg["layers"], spec.hidden, spec.ffn, spec.heads, cfg["vocab"], 0, spec.kv_heads,
              "cuda" if args.device == "cuda" else "cpu")
    result: dict = {"shape": vars(spec), "layers": cfg["layers"], "runs": {}}
    digests = {}
    # the CPU mode has no second device to compare with: its one run checks the stage itself
    for label, device in [(args.device, args.device)] + [("cpu-reference", "cpu")] * (args.device != "cpu"):
        out = work / f"out-rtn-{label}"
        rc, secs, tail = streamq("run", "--model", model, "--output", out, "--overwrite", "--mode", "rtn",
                                 "--device", device, "--kernels", args.kernels if device == "cuda" else "torch",
                                 timeout=remaining(deadline), log=log)
        if rc != 0:
            result["runs"][label] = {"exit": rc, "error": tail[-600:]}
            continue
        info = json.loads((out / "streamq.json").read_text())
        result["runs"][label] = {"device": device, "seconds": round(secs, 1), "data_free": info.get("data_free"),
                                 **run_figures(out)}
        digests[label] = output_digest(out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)
    result["identical"] = (None if len(result["runs"]) == 1 else
                           len(digests) == 2 and digests[args.device] == digests["cpu-reference"])
    result["ok"] = result["identical"] is not False and all("error" not in r and r["data_free"]
                                                             for r in result["runs"].values())
    return result


def stage_parallel(args, work: Path, log: Path, deadline: float) -> dict:
    """Block-parallel AWQ under torchrun, 2 ranks on the one device (gloo; on a GPU both ranks
    share it and split its free memory), against one process: every output tensor the same
    bytes, wall time of each, and the ranks' blocks, waits and peaks (streamq.json's `ranks`).
    A random LLaMA-2-7B-width model of 4 blocks at the paper's calibration (tiny in --small)."""
    from bench_parallel import tensors
    from make_wide_model import write

    cfg = settings(args)
    spec = (WIDE_SMALL if args.small else WIDE)["llama-2-7b"]
    layers = 4
    model = work / "model-parallel"
    if not (model / "config.json").is_file():
        write(model, spec.family, layers, spec.hidden, spec.ffn, spec.heads, cfg["vocab"], 0, spec.kv_heads,
              "cuda" if args.device == "cuda" else "cpu")
    ids = calibration_ids(work, cfg["n_samples"] * cfg["seqlen"] * 2, cfg["vocab"])
    common = ["run", "--model", model, "--calib", ids, "--n-samples", cfg["n_samples"], "--seqlen", cfg["seqlen"],
              "--device", args.device, "--kernels", args.kernels, "--overwrite"]
    threads = {} if args.device == "cuda" else {"OMP_NUM_THREADS": "1"}  # CPU ranks: one thread each
    result: dict = {"shape": vars(spec), "layers": layers, "calibration": f"{cfg['n_samples']} x {cfg['seqlen']}",
                    "runs": {}}
    found = {}
    for label, launcher in (("one-process", [sys.executable, "-m", "streamq"]),
                            ("torchrun-2", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc-per-node", "2", "-m", "streamq"])):
        out = work / f"out-parallel-{label}"
        rc, secs, tail = sh([*launcher, *common, "--output", out], remaining(deadline), log, env=threads)
        if rc != 0:
            result["runs"][label] = {"exit": rc, "error": tail[-600:]}
            continue
        ranks = json.loads((out / "streamq.json").read_text()).get("ranks")
        result["runs"][label] = {"seconds": round(secs, 1), **run_figures(out), "ranks": ranks}
        found[label] = tensors(out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)
    result["identical"] = len(found) == 2 and found["one-process"] == found["torchrun-2"]
    result["ok"] = result["identical"] and all("error" not in r for r in result["runs"].values())
    return result


def stage_trace(args, work: Path, log: Path, deadline: float) -> dict:
    """One LLaMA-2-7B-width block's quantization under torch.profiler (tools/trace_block.py), at
    the paper's calibration as the engine plans it: its phases and top operators by self time;
    the Chrome trace stays in the work folder (tens of MB)."""
    from make_wide_model import write

    cfg = settings(args)
    spec = (WIDE_SMALL if args.small else WIDE)["llama-2-7b"]
    model = work / "model-trace"
    if not (model / "config.json").is_file():
        write(model, spec.family, 1, spec.hidden, spec.ffn, spec.heads, cfg["vocab"], 0, spec.kv_heads,
              "cuda" if args.device == "cuda" else "cpu")
    trace = work / "trace-llama-2-7b.json"
    rc, secs, out = sh([sys.executable, "tools/trace_block.py", "--model", model, "--device", args.device,
                        "--n-samples", cfg["n_samples"], "--seqlen", cfg["seqlen"], "--kernels", args.kernels,
                        "--trace", trace, "--top", "12"], remaining(deadline), log)
    table = [line for line in out.splitlines()
             if line.startswith("|") or "aten::" in line or "time total" in line or "under the profiler" in line]
    return {"ok": rc == 0 and trace.is_file(), "exit": rc, "seconds": round(secs, 1), "table": table}


def stage_bench_kernels(args, work: Path, log: Path, deadline: float) -> dict:
    rc, secs, out = sh([sys.executable, "tools/bench_kernels.py", "--shapes", "opt-13b", "opt-30b", "--repeats", "3"],
                       remaining(deadline), log)
    table = [line for line in out.splitlines() if line.startswith("|") or line.startswith("device:")]
    return {"ok": rc == 0, "exit": rc, "seconds": round(secs, 1), "table": table}


def stage_bench_matmul(args, work: Path, log: Path, deadline: float) -> dict:
    """What the card's products reach per dtype at OPT-30B fc1's shape, one 8-sample pass of 512
    tokens (tools/bench_matmul.py): the rate the blocks' seconds are set against."""
    rc, secs, out = sh([sys.executable, "tools/bench_matmul.py", "--m", "4096", "--k", "7168", "--n", "28672",
                        "--device", args.device], remaining(deadline), log)
    table = [line for line in out.splitlines() if line.startswith("|") or "median of" in line]
    return {"ok": rc == 0, "exit": rc, "seconds": round(secs, 1), "table": table}


RUNNERS = {
    "env": stage_env, "build": stage_build, "gpu-tests": stage_gpu_tests, "kernels-run": stage_kernels_run,
    "ppl": stage_ppl, "formats": stage_formats, "bench-kernels": stage_bench_kernels,
    "bench-matmul": stage_bench_matmul, "suite": stage_suite,
    **{f"wide-{name}": stage_wide(name) for name in WIDE},
    "wide-llama-2-7b-gptq": stage_wide("llama-2-7b", "gptq"),
    "trace-llama-2-7b": stage_trace,
    "rtn-llama-2-7b": stage_rtn,
    "parallel-2-ranks": stage_parallel,
}


# ---------------------------------------------------------------- the driver

def run_stage(stage: Stage, args: argparse.Namespace, work: Path, log: Path, deadline: float) -> dict:
    """The stage in a child process (this script with --stage), bounded by its cap and the
    overall deadline; whatever happens to it, a result dict comes back."""
    cap = stage.cap_small_s if args.small else stage.cap_s
    budget = min(cap, remaining(deadline))
    if budget < 5:
        return {"status": "skipped", "reason": "no time left in --budget-s"}
    result_file = work / f"stage-{stage.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--stage-deadline",
           str(time.time() + budget - 2), "--device", args.device, "--work", str(work), "--log", str(log)]
    cmd += ["--small"] * args.small + ["--install"] * args.install + ["--keep"] * args.keep
    cmd += ["--kernels", args.kernels]
    with open(log, "a") as f:
        f.write(f"\n==== stage {stage.name} (cap {budget:.0f} s) ====\n")
    rc, secs, tail = sh(cmd, budget, log)
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        return {"status": "ok" if result.get("ok") else "FAIL", "seconds": round(secs, 1), **result}
    return {"status": "TIMEOUT" if rc == 124 else "CRASH", "seconds": round(secs, 1), "exit": rc,
            "error": tail[-800:]}


def figures(name: str, r: dict) -> str:
    """One line of the summary table: what the stage measured."""
    if r.get("status") == "skipped":
        return r.get("reason", "")
    if "error" in r:
        return " ".join(r["error"].split())[-160:]
    if name == "env":
        return f"{r.get('gpu', 'no GPU')}; {r.get('nvidia_smi', '')}; torch {r.get('torch')} (CUDA {r.get('torch_cuda')}); {r.get('nvcc', '')}"
    if name == "build":
        return f"built in {r['build_seconds']} s; self-check {r['self_check']}"
    if name in ("gpu-tests", "suite"):
        return r.get("summary", "")
    if name == "kernels-run":
        return "; ".join(f"{f}: scales identical {r[f]['scales_identical']}, groups equal {r[f]['share_equal']:.2%}"
                         for f in ("opt", "llama") if f in r)
    if name == "ppl":
        return "; ".join(f"{k}: {r[k]['cpu_float32']} (cpu fp32) vs {r[k]['check']} ({r[k]['check_device']} "
                         f"{r[k]['check_dtype']}), rel {r[k]['rel_diff']}" for k in ("fp16-weights", "awq-int4") if k in r)
    if name == "formats":
        return "; ".join(f"{k}: {r[k]['linears']} linears equal {r[k]['weights_equal']}, logit diff "
                         f"{r[k]['max_logit_diff']:.3g} ({r[k]['model_dtype']} on {r[k]['device']})"
                         for k in ("fp16", "bf16") if k in r)
    if name.startswith("wide-"):
        parts = []
        for label, run in r.get("runs", {}).items():
            if "error" in run:
                parts.append(f"{label}: exit {run['exit']}")
                continue
            alloc = run["peak_allocated_bytes"]
            mem = f"alloc {alloc / GiB:.2f}" if alloc is not None else f"RSS {run['peak_rss_bytes'] / GiB:.2f}"
            top = sorted(run.get("phases", {}).items(), key=lambda kv: -kv[1])[:3]
            where = f" ({', '.join(f'{k} {v:.1f}' for k, v in top)})" if top else ""
            parts.append(f"{label} {run['budget_bytes'] / GiB:.2f} GiB: plan {run['planned_peak_bytes'] / GiB:.2f}, "
                         f"{mem} GiB, {run['median_block_seconds']:.1f} s/block{where}")
        return f"identical {r.get('identical')}; " + "; ".join(parts)
    if name == "bench-kernels":
        return f"{len(r.get('table', [])) - 3} rows (see summary.json)"
    if name == "bench-matmul":
        rows = [[c.strip() for c in line.split("|")] for line in r.get("table", [])]
        return "; ".join(f"{c[1]} {c[3]} GMAC/s" for c in rows if len(c) > 4 and c[1] in ("float32", "bfloat16", "float16"))
    if name.startswith("parallel-"):
        runs = r.get("runs", {})
        return f"identical {r.get('identical')}; " + "; ".join(
            f"{label}: {run['seconds']} s" if "error" not in run else f"{label}: exit {run['exit']}"
            for label, run in runs.items())
    if name.startswith("rtn-"):
        runs = "; ".join(f"{label}: {run['median_block_seconds']:.2f} s/block, RSS {run['peak_rss_bytes'] / GiB:.2f} GiB"
                         + (f", alloc {run['peak_allocated_bytes'] / GiB:.2f} GiB" if run.get("peak_allocated_bytes") else "")
                         if "error" not in run else f"{label}: exit {run['exit']}" for label, run in r.get("runs", {}).items())
        return f"identical {r.get('identical')}; {runs}"
    if name.startswith("trace-"):
        head = next((line for line in r.get("table", []) if "under the profiler" in line), "")
        return head.split(": ")[-1] + " (phases and top operators in summary.json)"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--small", action="store_true", help="tiny widths and few samples (the CPU mode)")
    parser.add_argument("--budget-s", type=float, default=470, help="overall time budget in seconds")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else ./gpu-check-out")
    parser.add_argument("--work", type=Path, default=None, help="models and outputs (default: a folder in /tmp)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of: " + ", ".join(s.name for s in STAGES))
    parser.add_argument("--suite", action="store_true", help="also run the whole test suite on this machine")
    parser.add_argument("--install", action=argparse.BooleanOptionalAction, default=None,
                        help="pip install --no-deps -e . first (default: on a GPU machine)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--kernels", choices=["auto", "torch", "cuda"], default="auto",
                        help="what the wide runs use; auto builds the kernels in the first run that needs them "
                             "(~95 s on an H200) unless the build stage ran before")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:  # a child: run one stage, write its result
        if os.environ.get("STREAMQ_GPU_CHECK_BREAK") == args.stage:  # tests: a stage that crashes
            raise RuntimeError(f"stage {args.stage} broken on purpose (STREAMQ_GPU_CHECK_BREAK)")
        result = RUNNERS[args.stage](args, args.work, args.log, args.stage_deadline)
        (args.work / f"stage-{args.stage}.json").write_text(json.dumps(result, indent=1))
        return

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.install = args.device == "cuda" if args.install is None else args.install
    out = args.out or Path(os.environ.get("OUT") or "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(f"/tmp/streamq-gpu-check-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text(f"streamq gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} device {args.device} "
                   f"{'small' if args.small else 'full'}\n")
    wanted = set(args.stages.split(",")) if args.stages else None
    deadline = time.time() + args.budget_s
    results: dict[str, dict] = {}
    for stage in STAGES:
        if wanted is not None and stage.name not in wanted:
            continue
        if stage.name == "suite" and not args.suite and not (wanted and "suite" in wanted):
            continue
        if stage.needs_cuda and args.device != "cuda":
            results[stage.name] = {"status": "skipped", "reason": "needs a CUDA device"}
        else:
            results[stage.name] = run_stage(stage, args, work, log, deadline)
        print(f"[{stage.name}] {results[stage.name]['status']} {results[stage.name].get('seconds', '')} s: "
              f"{figures(stage.name, results[stage.name])}", flush=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "small": args.small,
               "budget_s": args.budget_s, "settings": settings(args), "stages": results,
               "ok": all(r["status"] in ("ok", "skipped") for r in results.values())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ngpu_check: device {args.device}{' (small)' if args.small else ''}, "
          f"{results.get('env', {}).get('gpu', platform.processor() or platform.machine())}")
    print("| stage | status | seconds | figures |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['status']} | {r.get('seconds', '')} | {figures(name, r)} |")
    print(f"\nsummary: {out / 'summary.json'}, log: {log}; overall {'ok' if summary['ok'] else 'FAILED'}")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
