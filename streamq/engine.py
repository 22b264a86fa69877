"""The streaming engine: one decoder block on the device at a time, weights read from the
mmap'd shards, packed shards written as blocks finish, a journal entry after every block.
Output is byte-identical to streamq.reference on the same inputs, and a resumed run is
byte-identical to an uninterrupted one; memory scales with one block, not with the model."""

from __future__ import annotations

import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import faults, parallel
from .block import BlockRecords, capture, check_finite, check_storable, output_tensors, quantize_block
from .budget import Plan, format_bytes
from .calib import calibration_blocks, tokens_digest
from .checkpoint import check_non_block_tensors, write_metadata, write_non_block_tensors
from .config import CalibConfig, QuantConfig, check_shard_bytes
from .errors import InputError, InterruptedRun, OutOfDeviceMemory, ResumeError, SettingsError
from .families import Family, build_block
from .forecast import block_plan, device_budget
from .formats import Format, by_name, settle
from .journal import Journal, parallel_world, resume_command
from .journal import lock as journal_lock
from .kernels import Ops
from .kernels import select as select_kernels
from .lock import FolderLock
from .memory import peak_device, peak_reserved, peak_rss, reset_peaks
from .models import (check_output_dir, claim_output_dir, compute_dtype, dtype_name, load_tokenizer, open_checkpoint,
                     resolve_device)
from .placement import to_store
from .shards import ShardReader
from .sources import resolve
from .timing import Phases
from .writer import DEFAULT_SHARD_BYTES, ShardWriter

OnBlock = Callable[[int, int], None]
MiB = 2**20


@dataclass
class Summary:
    plan: Plan
    qcfg: QuantConfig
    blocks: list[dict] = field(default_factory=list)  # per block: seconds and measured peaks
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0
    resumed_from: int = 0


@dataclass
class Run:
    """Everything the block loop needs, from a fresh start or from a journal."""

    model_dir: Path
    out_dir: Path
    reader: ShardReader
    hf_config: Any
    family: Family
    qcfg: QuantConfig
    calib: CalibConfig
    device: torch.device
    dtype: torch.dtype
    plan: Plan
    max_gpu_mem: int | None
    shard_bytes: int
    ops: Ops
    kernels_note: str
    fmt: Format

    @property
    def store(self) -> torch.device:
        return self.device if self.plan.activations_on_device else torch.device("cpu")

    @property
    def data_free(self) -> bool:
        return self.qcfg.data_free


def _setup(model_dir: Path, qcfg: QuantConfig, calib: CalibConfig, device: str, max_gpu_mem: int | None,
           dtype_request: str) -> tuple[ShardReader, Any, Family, torch.device, torch.dtype, Plan, int | None]:
    """Read and check everything that decides the plan; nothing is written."""
    reader, hf_config, family = open_checkpoint(model_dir)
    dev = resolve_device(device)
    dtype = compute_dtype(dev, dtype_request, reader.float_dtype())
    max_gpu_mem = device_budget(dev, max_gpu_mem)
    plan = block_plan(hf_config, family, qcfg, calib, dev, dtype, max_gpu_mem)[1]
    return reader, hf_config, family, dev, dtype, plan, max_gpu_mem


def plan(model: str | Path, qcfg: QuantConfig = QuantConfig(), calib: CalibConfig = CalibConfig(),
         device: str = "auto", max_gpu_mem: int | None = None, compute: str = "auto",
         revision: str | None = None) -> Plan:
    """The plan a run with these settings would follow (chunking, where activations live, the
    estimated peak and the smallest budget that fits), without reading any weight."""
    return _setup(resolve(model, revision).path, qcfg, calib, device, max_gpu_mem, compute)[5]


def _prepare(model_dir: Path, out_dir: Path, qcfg: QuantConfig, calib: CalibConfig, device: str,
             max_gpu_mem: int | None, shard_bytes: int, kernels: str, dtype_request: str, fmt: Format) -> Run:
    """Read and check everything that can be checked before any output is written."""
    reader, hf_config, family, dev, dtype, the_plan, max_gpu_mem = _setup(model_dir, qcfg, calib, device,
                                                                          max_gpu_mem, dtype_request)
    qcfg = settle(fmt, qcfg, reader.float_dtype())
    check_non_block_tensors(reader, family, qcfg.storage_torch_dtype)
    ops, note = select_kernels(kernels, dev, dtype)
    return Run(model_dir, out_dir, reader, hf_config, family, qcfg, calib, dev, dtype, the_plan,
               max_gpu_mem, shard_bytes, ops, note, fmt)


def _calibration_ids(run: Run) -> torch.Tensor | None:
    if run.data_free:
        return None
    return calibration_blocks(run.calib, load_tokenizer(run.model_dir), run.hf_config.vocab_size)


def _first_block_inputs(run: Run, ids: torch.Tensor | None) -> list[torch.Tensor]:
    """Block 0's inputs per chunk, from the mmap'd embedding tables, kept where the plan says
    (none for a data-free run)."""
    if ids is None:
        return []
    chunks = [to_store(run.family.embed(run.reader.get, run.hf_config, c, run.device, run.dtype), run.store)
              for c in ids.split(run.plan.chunk_samples)]
    run.reader.release()
    return chunks


@torch.no_grad()
def quantize(
    model: str | Path,
    out_dir: str | Path,
    qcfg: QuantConfig = QuantConfig(),
    calib: CalibConfig = CalibConfig(),
    device: str = "auto",
    max_gpu_mem: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    on_block: OnBlock | None = None,
    kernels: str = "auto",
    compute: str = "auto",
    format: str = "awq",
    revision: str | None = None,
) -> Summary:
    """Quantize `model` (a checkpoint directory, a Hub id at `revision` or a short name:
    streamq.sources) into out_dir, streaming one block at a time; `kernels` (auto, torch,
    cuda) picks what runs the search's hot loops, `compute` the compute dtype (auto, float16,
    bfloat16, float32), `format` the output format (awq, compressed-tensors). Under torchrun
    with several processes, each quantizes its own range of blocks (streamq.parallel)."""
    start = time.time()
    out_dir = Path(out_dir)
    fmt = by_name(format)
    world = parallel.from_env()
    comm = _join(world, out_dir, device)

    def setup() -> tuple[Run, torch.Tensor, list | None]:
        if world and qcfg.next_input == "quantized":
            raise SettingsError("several processes quantize blocks at the same time, so each block is calibrated "
                                "on the unquantized model's activations: --next-input quantized (the default of "
                                "--method gptq and awq+gptq) chains the blocks; pass --next-input fp16")
        check_shard_bytes(shard_bytes)
        check_output_dir(out_dir, overwrite)
        source = resolve(model, revision)
        run = _prepare(source.path, out_dir, qcfg, calib, device, max_gpu_mem, shard_bytes, kernels, compute, fmt)
        ranges = parallel.split_blocks(run.family.n_layers(run.hf_config), world.size) if world else None
        return source, run, _calibration_ids(run), ranges

    source, run, ids, ranges = comm.agree(setup) if comm else setup()
    with ExitStack() as held:  # the output folder's lock, released however the run ends
        if not world or world.first:
            held.callback(claim_output_dir(out_dir, overwrite).release)
        settings = {"model_dir": str(source.path), "source": source.to_json(), "quant": run.qcfg.to_json(),
                    "format": fmt.name, "calib": calib.to_json(), "shard_bytes": shard_bytes,
                    "fingerprint": run.reader.fingerprint(),
                    "tokens_sha256": tokens_digest(ids) if ids is not None else None,
                    "compute_dtype": str(run.dtype), "compute_dtype_requested": compute,
                    "forward_samples": run.plan.forward_samples, "kernels": run.ops.name}
        n_layers = run.family.n_layers(run.hf_config)
        if not world:
            journal = Journal.start(out_dir, settings, n_layers)
            x_chunks = _first_block_inputs(run, ids)
            return _blocks(run, journal, journal.new_writer(shard_bytes), x_chunks, 0, start, on_block)
        comm.barrier()  # the output directory is there, empty
        settings.update(world_size=world.size, rank=world.rank, ranges=ranges)
        journal = Journal.start(out_dir, settings, n_layers, world.rank, first=ranges[world.rank][0])
        if not world.first:  # each rank its own folder; rank 0 holds the top level
            held.callback(journal_lock(out_dir, world.rank).acquire().release)
        x_chunks = _first_block_inputs(run, ids) if world.first or run.data_free else None
        return _parallel_blocks(run, comm, journal, journal.new_writer(shard_bytes), x_chunks, start)


def _join(world: parallel.World | None, out_dir: Path, device: str) -> parallel.Comm | None:
    if world is None:
        return None
    parallel.start(resolve_device(device))
    return parallel.Comm(world, out_dir)


def _reopen(journal: Journal, device: str, max_gpu_mem: int | None, kernels: str, compute: str | None,
            warn: bool = True) -> Run:
    """The run a journal describes, checked against the source model as it is now."""
    state, out_dir = journal.state, journal.out_dir
    settings = state["settings"]
    model_dir = Path(settings["model_dir"])
    if not model_dir.is_dir():
        raise ResumeError(f"the source model {model_dir} recorded in the journal is gone")
    qcfg, calib = QuantConfig.from_json(settings["quant"]), CalibConfig(**settings["calib"])
    compute = compute or settings.get("compute_dtype_requested", "auto")
    run = _prepare(model_dir, out_dir, qcfg, calib, device, max_gpu_mem, settings["shard_bytes"], kernels, compute,
                   by_name(settings.get("format", "awq")))
    if run.reader.fingerprint() != settings["fingerprint"]:
        raise ResumeError(f"the source model {model_dir} changed since the run started "
                          "(shard headers or sizes differ); start over with --overwrite")
    if warn and str(run.dtype) != settings["compute_dtype"]:
        print(f"streamq: warning: the run started computing in {settings['compute_dtype']} and continues in "
              f"{run.dtype}; the output will not be byte-identical to an uninterrupted run", file=sys.stderr)
    if warn and run.plan.forward_samples != settings.get("forward_samples"):
        was, now = (f"{n} sample(s)" if n else "whole chunks" for n in (settings.get("forward_samples"),
                                                                       run.plan.forward_samples))
        print(f"streamq: warning: the run started with forward passes of {was} and continues with {now}; the "
              "output may differ in the last bits from an uninterrupted run", file=sys.stderr)
    if warn and run.ops.name != settings.get("kernels", "torch"):
        print(f"streamq: warning: the run started with kernels {settings.get('kernels', 'torch')} and continues "
              f"with {run.ops.name}; clip choices may differ at near-ties", file=sys.stderr)
    return run


def _placed(run: Run, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Host activations [n, T, C] chunked and placed as the plan says (pinned host memory for a
    GPU that streams them)."""
    pin = run.device.type == "cuda" and run.store.type == "cpu"
    return [c.pin_memory() if pin else to_store(c, run.store) for c in hidden.split(run.plan.chunk_samples)]


def _saved_inputs(run: Run, journal: Journal) -> list[torch.Tensor]:
    """The journal's inputs of the next block, chunked and placed as the plan says."""
    return _placed(run, journal.load_hidden().to(run.dtype))


@torch.no_grad()
def resume(out_dir: str | Path, device: str = "auto", max_gpu_mem: int | None = None,
           on_block: OnBlock | None = None, kernels: str = "auto", compute: str | None = None) -> Summary:
    """Continue an interrupted run from its journal; settings come from the journal, the
    compute dtype too (as it was asked for: `auto` resolves again on this device) unless
    `compute` overrides it. A block-parallel run resumes under torchrun with as many processes
    as it started with, each from its own journal."""
    start = time.time()
    out_dir = Path(out_dir)
    world = parallel.from_env()
    started = parallel_world(out_dir)
    if world is None and started is not None:
        raise ResumeError(f"{out_dir} was started by {started} processes; continue it with: "
                          f"{resume_command(out_dir)}")
    if world is not None:
        return _parallel_resume(world, out_dir, device, max_gpu_mem, kernels, compute, start)
    Journal.open(out_dir)  # says what the folder lacks when it is no run (before a lock file is made)
    with journal_lock(out_dir):
        journal = Journal.open(out_dir)  # as it is now that no other process writes it
        state = journal.state
        _refuse_complete(out_dir, state)
        run = _reopen(journal, device, max_gpu_mem, kernels, compute)
        journal.verify_and_clean()
        done = state["done_blocks"]
        fresh = done == 0 or run.data_free
        x_chunks = _first_block_inputs(run, _calibration_ids(run)) if fresh else _saved_inputs(run, journal)
        writer = journal.load_writer(state["settings"]["shard_bytes"])
        summary = _blocks(run, journal, writer, x_chunks, done, start, on_block)
    summary.resumed_from = done
    return summary


def _refuse_complete(out_dir: Path, state: dict) -> None:
    if state["complete"]:
        raise ResumeError(f"{out_dir} is already complete ({state['n_layers']} of {state['n_layers']} blocks); "
                          "nothing to resume")


def _parallel_resume(world: parallel.World, out_dir: Path, device: str, max_gpu_mem: int | None, kernels: str,
                     compute: str | None, start: float) -> Summary:
    comm = _join(world, out_dir, device)

    def setup() -> tuple[Run, Journal, FolderLock]:
        started = parallel_world(out_dir)
        if started is None:
            Journal.open(out_dir)  # says what the directory lacks, if it is no run at all
            raise ResumeError(f"{out_dir} was started by one process; continue it with: streamq resume {out_dir}")
        if started != world.size:
            raise ResumeError(f"{out_dir} was started by {started} processes, not {world.size}; continue it with: "
                              f"{resume_command(out_dir)}")
        held = journal_lock(out_dir, None if world.first else world.rank).acquire()  # rank 0: the top level
        try:
            _refuse_complete(out_dir, Journal.open(out_dir, 0).state)  # rank 0 completes the run
            journal = Journal.open(out_dir, world.rank)
            run = _reopen(journal, device, max_gpu_mem, kernels, compute, warn=world.first)
            journal.verify_and_clean()
        except BaseException:
            held.release()
            raise
        return run, journal, held

    run, journal, held = comm.agree(setup)
    with held:
        return _parallel_resumed(run, comm, journal, world, out_dir, start)


def _parallel_resumed(run: Run, comm: parallel.Comm, journal: Journal, world: parallel.World, out_dir: Path,
                      start: float) -> Summary:
    if world.first:
        parallel.failure_note(out_dir).unlink(missing_ok=True)
    done = journal.state["done_blocks"]
    if journal.state["hidden"]:
        x_chunks = _saved_inputs(run, journal)
    elif run.data_free:
        x_chunks = []
    else:  # nothing done and no input received yet: rank 0 embeds, the others wait for theirs
        x_chunks = _first_block_inputs(run, _calibration_ids(run)) if world.first else None
    writer = journal.load_writer(journal.state["settings"]["shard_bytes"])
    first = journal.state["settings"]["ranges"][world.rank][0]
    return _parallel_blocks(run, comm, journal, writer, x_chunks, start, resumed=done - first)


def _forward(run: Run, x_chunks: list[torch.Tensor], first: int, stop: int) -> list[torch.Tensor]:
    """The unquantized blocks [first, stop) applied to x_chunks: forward passes only, one block
    on the device at a time, computed as quantize_block computes the next block's inputs."""
    for i in range(first, stop):
        block, kwargs = _build(run, i)
        x_chunks = capture(block, x_chunks, kwargs, set(), run.store, run.plan.forward_samples)[1]
        del block
    return x_chunks


def _parallel_blocks(run: Run, comm: parallel.Comm, journal: Journal, writer: ShardWriter,
                     x_chunks: list[torch.Tensor] | None, start: float, resumed: int = 0) -> Summary:
    """One process's part of a block-parallel run: get the inputs of its first block (rank 0
    has them, the others receive them from the rank before), run the forward pass through its
    blocks and hand the output to the next rank (if that one still needs it), quantize its blocks,
    then rank 0 writes what belongs to the whole model (non-block tensors, the index, metadata)."""
    world = comm.world
    ranges = journal.state["settings"]["ranges"]
    a, b = ranges[world.rank]
    done = journal.state["done_blocks"]

    def say(message: str) -> None:
        print(f"streamq: rank {world.rank}: {message}", file=sys.stderr, flush=True)

    if world.first:
        _announce(run, f"{world.size} processes, blocks {' '.join(f'{x}-{y - 1}' for x, y in ranges)}; ")
    needs = comm.all_gather(x_chunks is None)
    t0 = time.time()
    if x_chunks is None:
        x_chunks = _placed(run, comm.recv(3, run.dtype, world.rank - 1))
        journal.save_input(x_chunks)
        say(f"received the inputs of block {a} after {time.time() - t0:.1f} s")
    t1 = time.time()
    if not world.last and needs[world.rank + 1]:
        out = _forward(run, x_chunks, done, b)
        comm.send(torch.cat([c.cpu() for c in out]), world.rank + 1)
        del out
        say(f"forward pass of blocks {done}-{b - 1} handed to rank {world.rank + 1} in {time.time() - t1:.1f} s")
    waited, forwarded = t1 - t0, time.time() - t1
    summary = _loop(run, journal, writer, x_chunks, done, b, None, say)
    del x_chunks
    writer.flush()
    journal.record_writer(writer)
    gpu = [s["peak_gpu_bytes"] for s in summary.blocks if s.get("peak_gpu_bytes") is not None]
    mine = {"rank": world.rank, "blocks": [a, b], "wait_seconds": round(waited, 3),
            "forward_seconds": round(forwarded, 3), "seconds": round(time.time() - start, 3),
            "peak_rss_bytes": peak_rss(), "peak_gpu_bytes": max(gpu) if gpu else None,
            "weight_map": writer.weight_map, "total_bytes": writer.total_bytes, "stats": summary.blocks,
            "resumed": resumed}
    everyone = comm.all_gather(mine)
    summary.resumed_from = sum(e.pop("resumed") for e in everyone)  # blocks done before this run, all ranks
    summary.blocks = sorted((s for e in everyone for s in e["stats"]), key=lambda s: s["block"])
    if world.first:
        write_non_block_tensors(run.reader, run.family, writer, run.qcfg.storage_torch_dtype)
        writer.finish([(e["weight_map"], e["total_bytes"]) for e in everyone[1:]])
        ranks = [{k: v for k, v in e.items() if k not in ("weight_map", "stats")} for e in everyone]
        _write_metadata(run, journal, summary.blocks, {"world_size": world.size, "ranks": ranks})
        journal.complete()
        writer.drop_written_spools()
    comm.barrier()  # the index is written: the run is complete
    if not world.first:
        journal.complete()
    parallel.stop()
    return _totals(run, summary, start)


class _Stop:
    """SIGINT/SIGTERM ask the loop to stop at the next safe point (after a journal entry);
    a second SIGINT stops at once (the journal still allows resuming)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nstreamq: {signal.Signals(signum).name} received: stopping after the current block "
              "(Ctrl-C again stops at once; the run stays resumable)", file=sys.stderr)


@contextmanager
def _stoppable():
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _blocks(run: Run, journal: Journal, writer: ShardWriter, x_chunks: list[torch.Tensor], first: int,
            start: float, on_block: OnBlock | None) -> Summary:
    _announce(run)
    summary = _loop(run, journal, writer, x_chunks, first, run.family.n_layers(run.hf_config), on_block)
    with _resumable(run):
        write_non_block_tensors(run.reader, run.family, writer, run.qcfg.storage_torch_dtype)
    writer.finish()
    faults.point("final:index")
    _write_metadata(run, journal, summary.blocks)
    faults.point("final:metadata")
    journal.complete()
    writer.drop_written_spools()
    return _totals(run, summary, start)


def _announce(run: Run, before: str = "") -> None:
    """The run's opening lines on stderr: what computes, and the scale groups left out."""
    print(f"streamq: {before}{run.kernels_note}; computing in {dtype_name(run.dtype)}", file=sys.stderr)
    for reason in run.family.skipped_groups(run.hf_config):
        print(f"streamq: note: scale group skipped (cannot be folded exactly): {reason}", file=sys.stderr)


def _write_metadata(run: Run, journal: Journal, blocks: list[dict], extra: dict | None = None) -> None:
    settings = journal.state["settings"]
    write_metadata(run.out_dir, run.model_dir, run.family, run.hf_config, run.qcfg, run.calib,
                   settings["tokens_sha256"], settings["fingerprint"], run.fmt, settings.get("source"),
                   extra={"engine": "stream", "device": str(run.device), "kernels": run.ops.name,
                          "compute_dtype": dtype_name(run.dtype), "max_gpu_mem": run.max_gpu_mem,
                          "plan": run.plan.to_json(), "data_free": run.data_free, **(extra or {}),
                          "blocks": blocks})


def _totals(run: Run, summary: Summary, start: float) -> Summary:
    summary.seconds = time.time() - start
    summary.input_bytes = sum(p.stat().st_size for p in run.reader.shards())
    summary.output_bytes = sum(p.stat().st_size for p in run.out_dir.glob("model-*.safetensors"))
    return summary


def _build(run: Run, i: int):
    block = build_block(run.hf_config, i, run.reader.with_prefix(run.family.block_prefix(i)), run.device, run.dtype,
                        run.plan.experts_parked)
    run.reader.release()
    return block, run.family.block_kwargs(run.hf_config, run.calib.seqlen, run.device, run.dtype, i)


def _quantize_one(run: Run, i: int, x_chunks: list[torch.Tensor], phases: Phases):
    """Block i built from the shards and quantized; a device that runs out of memory on the way
    ends the run with the budget that would fit (the block's partial work dropped, the journal
    left at the last finished block)."""
    try:
        with phases("read and upload weights"):
            block, kwargs = _build(run, i)
            check_finite(block, run.family.block_prefix(i))
        faults.point(f"block{i}:search")
        if run.data_free:  # nothing searched: the weights rounded as they are
            with phases("quantize and pack"):
                records = BlockRecords()
                tensors = output_tensors(block, records, run.qcfg, run.fmt, where=run.family.block_prefix(i))
                return records, tensors, []
        return quantize_block(block, run.family, run.hf_config, x_chunks, kwargs, run.qcfg, run.store, run.ops,
                              run.plan.forward_samples, run.fmt, where=run.family.block_prefix(i), phases=phases)
    except torch.OutOfMemoryError:
        peak = peak_device(run.device)
    # past the except clause the failed work's frames are gone, so the cache can hand its memory back
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    raise OutOfDeviceMemory(out_of_memory_message(run.plan, run.max_gpu_mem, peak, i, run.out_dir))


def out_of_memory_message(plan: Plan, budget: int | None, peak: int | None, block: int, out_dir: Path) -> str:
    """What to run after the device ran out of memory in `block`: a budget 15 % below the one
    it ran out under (the planner's estimate leaves the caching allocator's own reserve out),
    never below the smallest that fits one block."""
    reached = f"its work reached {format_bytes(peak)} " if peak else ""
    under = budget if budget is not None else plan.estimated_peak_bytes
    smallest = -(-plan.minimum_bytes // MiB) * MiB
    target = max(smallest, under * 85 // 100 // MiB * MiB)
    said = (f"out of GPU memory in block {block} ({reached}under --max-gpu-mem {format_bytes(under)}, planned peak "
            f"{format_bytes(plan.estimated_peak_bytes)}); its partial work is dropped and the blocks before it are "
            "kept")
    if target >= under:
        return (f"{said}; no smaller budget fits one block (the smallest is {target // MiB}MiB): free the device's "
                f"memory (is another process using it?), then run: {resume_command(out_dir)}")
    return (f"{said}; a smaller budget changes only the chunking, not the bytes: {resume_command(out_dir)} "
            f"--max-gpu-mem {target // MiB}MiB")


@contextmanager
def _resumable(run: Run, block: int | None = None):
    """A source that cannot be read mid-run (a shard replaced, cut short or unreadable) is one
    line that says the finished blocks are kept and how to continue once it is mended."""
    try:
        yield
    except InputError as exc:
        where = f"block {block}: " if block is not None else ""
        raise InputError(f"{where}{exc}; the finished blocks are kept: once it is mended, continue with: "
                         f"{resume_command(run.out_dir)}") from None


def _loop(run: Run, journal: Journal, writer: ShardWriter, x_chunks: list[torch.Tensor], first: int, stop: int,
          on_block: OnBlock | None, say: Callable[[str], None] | None = None) -> Summary:
    """Quantize blocks [first, stop), each committed to the journal as it finishes."""
    family, hf_config, dev = run.family, run.hf_config, run.device
    n_layers = family.n_layers(hf_config)
    summary = Summary(run.plan, run.qcfg, blocks=list(journal.state["blocks"]))
    if on_block:
        on_block(first, n_layers)
    with _stoppable() as stop_signal:
        for i in range(first, stop):
            t0 = time.time()
            reset_peaks(dev)
            prefix = family.block_prefix(i)
            phases = Phases(dev)
            with _resumable(run, i):
                records, tensors, x_chunks = _quantize_one(run, i, x_chunks, phases)
            check_storable(tensors, prefix)
            for name, t in tensors.items():
                writer.add(prefix + name, t)
            experts = {"tokens": records.tokens, "fallback": records.fallback} if records.tokens else None
            # records are not kept: at OPT-30B shape they are ~13 MB a block, growing with depth
            del records, tensors
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            stats = {"block": i, "seconds": round(time.time() - t0, 3), "phases": phases.to_json(),
                     "peak_rss_bytes": peak_rss(), "peak_gpu_bytes": peak_device(dev),
                     "peak_gpu_reserved_bytes": peak_reserved(dev)}
            if experts:
                stats["experts"] = experts
            journal.commit(i + 1, writer, x_chunks, stats)
            summary.blocks.append(stats)
            if on_block:
                on_block(i + 1, n_layers)
            if say:
                say(f"block {i} quantized in {stats['seconds']:.1f} s ({i + 1 - first} of {stop - first} this run)")
            if stop_signal.signum is not None and i + 1 < stop:
                name = signal.Signals(stop_signal.signum).name
                why = " (torchrun stops every process when one fails; its report names that one)" if say else ""
                raise InterruptedRun(f"stopped by {name} after block {i + 1} of {n_layers}{why}; continue with: "
                                     f"{resume_command(run.out_dir)}")
    return summary
