"""Edges shared by the entry points: device choice, compute dtype, tokenizer, output dir."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, OutputError, SettingsError
from .checkpoint import TOKENIZER_FILES
from .families import Family, detect
from .shards import ShardReader
from .journal import resume_command
from .journal import status as journal_status


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


def open_checkpoint(model_dir: Path) -> tuple[ShardReader, Any, Family]:
    """A local checkpoint's reader, config and family: the reader maps the family's published
    name variants to transformers' names and drops tied copies, so no caller sees a variant."""
    hf_config = load_config(model_dir)
    family = detect(hf_config)
    return ShardReader(model_dir, family.checkpoint_prefixes, family.tied_names(hf_config)), hf_config, family


def load_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES[:5]):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory before any work (nothing is deleted here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        run = journal_status(out_dir)
        if run is not None and not run.complete:
            raise OutputError(f"output directory {out_dir} holds an interrupted run ({run.done} of {run.total} "
                              f"blocks done); continue it with: {resume_command(out_dir)} (or pass --overwrite)")
        if run is not None:
            raise OutputError(f"output directory {out_dir} holds a finished run; pass --overwrite to replace it")
        raise OutputError(f"output directory {out_dir} is not empty; pass --overwrite to replace it")


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Empty (with overwrite) and create the output directory, once the inputs are checked."""
    check_output_dir(out_dir, overwrite)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
