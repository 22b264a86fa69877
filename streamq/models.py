"""Edges shared by the entry points: device choice, compute dtype, the checkpoint and its
tokenizer, the output folder (checked, then claimed under its lock)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, OutputError, SettingsError
from .checkpoint import TOKENIZER_FILES
from .families import Family, detect
from .shards import ShardReader
from .sources.fp8 import block_scaled
from .journal import journal_dir, resume_command, writer_of
from .journal import lock as journal_lock
from .journal import status as journal_status
from .lock import LOCK_NAME, FolderLock, busy_message


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise SettingsError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


COMPUTE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def compute_dtype(device: torch.device, requested: str = "auto", source: torch.dtype | None = None) -> torch.dtype:
    """The dtype blocks compute in. `auto`: float32 on CPU (fp16 matmuls are >10x slower
    there); on a GPU the source's half precision, bfloat16 for a bf16 checkpoint (LLaMA-3 and
    Qwen activations can exceed fp16's range) and float16 otherwise, as AWQ does. An explicit
    dtype runs that math anywhere: --compute-dtype float16 on a CPU is the GPU's arithmetic.
    Storage is fp16 either way."""
    if requested != "auto":
        if requested not in COMPUTE_DTYPES:
            raise SettingsError(f"--compute-dtype must be auto, {', '.join(COMPUTE_DTYPES)}; got {requested!r}")
        return COMPUTE_DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if source == torch.bfloat16 else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def load_config(model_dir: Path) -> Any:
    """The Hugging Face config of a local checkpoint, or one clear line about what is wrong."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no config.json; --model must be a Hugging Face checkpoint directory")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read {path}: {first}") from None


def check_seqlen(hf_config: Any, seqlen: int) -> None:
    """Samples no longer than the model's positions (beyond them OPT's position table has no row,
    and rotary models leave what they were trained on)."""
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and seqlen > positions:
        raise SettingsError(f"--seqlen {seqlen} is longer than the model's {positions} positions")


def open_checkpoint(model_dir: Path, headers_only: bool = False) -> tuple[ShardReader, Any, Family]:
    """A local checkpoint's reader, config and family: the reader maps the family's published
    name variants to transformers' names and drops tied copies, so no caller sees a variant.
    `headers_only` (streamq plan) never reads a weight: tied copies are then not compared."""
    refuse_unfinished(model_dir)
    hf_config = load_config(model_dir)
    family = detect(hf_config)
    tied = {} if headers_only else family.tied_names(hf_config)
    return ShardReader(model_dir, family.checkpoint_prefixes, tied, block_scaled(hf_config)), hf_config, family


def load_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES[:5]):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _contents(out_dir: Path) -> list[Path]:
    """What an output folder holds besides a lock file alone (a lock taken by a process that
    stopped before writing anything)."""
    lock_only = [journal_dir(out_dir) / LOCK_NAME]
    return [p for p in out_dir.iterdir()
            if not (p == journal_dir(out_dir) and p.is_dir() and sorted(p.iterdir()) == lock_only)]


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder another process is writing, or a non-empty output directory, before any
    work (nothing is deleted here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a directory")
    who = writer_of(out_dir) if out_dir.is_dir() else None
    if who is not None:
        raise OutputError(busy_message(out_dir, who, resume_command(out_dir)))
    if out_dir.exists() and _contents(out_dir) and not overwrite:
        run = journal_status(out_dir)
        if run is not None and not run.complete:
            raise OutputError(f"output directory {out_dir} holds an interrupted run ({run.done} of {run.total} "
                              f"blocks done); continue it with: {resume_command(out_dir)} (or pass --overwrite)")
        if run is not None:
            raise OutputError(f"output directory {out_dir} holds a finished run; pass --overwrite to replace it")
        raise OutputError(f"output directory {out_dir} is not empty; pass --overwrite to replace it")


def claim_output_dir(out_dir: Path, overwrite: bool) -> FolderLock:
    """Lock the output folder (OUTPUT/.streamq/lock), then check it again and empty it (with
    overwrite) but for the lock: from here on it is this process's alone. The caller releases
    the lock when it is done."""
    made_folder, created = not out_dir.exists(), not journal_dir(out_dir).exists()
    held = journal_lock(out_dir).acquire()
    try:
        check_output_dir(out_dir, overwrite)
        for path in _contents(out_dir):
            if path != journal_dir(out_dir):
                _remove(path)
                continue
            for inner in path.iterdir():  # the journal folder: all but the lock just taken
                if inner.name != LOCK_NAME:
                    _remove(inner)
    except BaseException:
        held.release(remove=created)  # leave the folder as it was found: no lock in someone else's directory
        if made_folder:
            out_dir.rmdir()
        raise
    return held


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def refuse_unfinished(model_dir: Path) -> None:
    """A streamq output folder whose run is still being written, or was interrupted, is no
    checkpoint yet: one line saying which, before anything reads it."""
    run = journal_status(model_dir)
    if run is None or run.complete:
        return
    who = writer_of(model_dir)
    if who is not None:
        raise InputError(f"{model_dir} is not finished: it is being written by {who.describe()}")
    raise InputError(f"{model_dir} holds an unfinished run ({run.done} of {run.total} blocks); finish it first: "
                     f"{resume_command(model_dir)}")
