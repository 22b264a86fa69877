"""Deterministic calibration token blocks from a local file (text, JSONL, .pt or .npy ids) or a
data set by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .config import CalibConfig
from .errors import CalibrationError
from .sources.datasets import SPEC_HELP, calibration_text, named

DOC_SEPARATOR = "\n\n"


def builtin_text() -> str:
    """The default calibration text: the Python language reference that every CPython ships
    (pydoc_data.topics, ~465 kB of English prose). Real models should prefer a corpus close
    to their training data; this one needs no download."""
    from pydoc_data.topics import topics

    return DOC_SEPARATOR.join(topics[k] for k in sorted(topics))


def read_text(path: Path) -> str:
    """Plain text as is; JSONL: the `text` field of each line, joined by blank lines."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration text {path}: {exc}") from None
    if path.suffix.lower() not in (".jsonl", ".json"):
        return raw
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CalibrationError(f"{path}:{n} is not a JSON object with a 'text' field") from None
    return DOC_SEPARATOR.join(docs)


def read_ids(path: Path) -> torch.Tensor:
    """Pre-tokenised ids: a .pt holding a 1-D LongTensor or a 1-D .npy array."""
    try:
        if path.suffix == ".pt":
            ids = torch.load(path, map_location="cpu", weights_only=True)
        else:
            import numpy as np

            ids = torch.from_numpy(np.load(path, allow_pickle=False))
    except Exception as exc:  # any unreadable file is the user's input error
        raise CalibrationError(f"cannot read token ids from {path}: {exc}") from None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise CalibrationError(f"{path} must hold a 1-D integer tensor of token ids")
    return ids.to(torch.long)


def load_tokens(cfg: CalibConfig, tokenizer: Any | None) -> torch.Tensor:
    """The whole calibration stream as one 1-D LongTensor of token ids: from a file, a data set
    by name (sources.datasets), or the built-in text."""
    path = Path(cfg.source) if cfg.source else None
    dataset = named(cfg.source) if path is not None and not path.is_file() else None
    if path is not None and not path.is_file() and dataset is None:
        raise CalibrationError(f"calibration file {path} does not exist (nor is it a data set: {SPEC_HELP})")
    if dataset is None and path is not None and path.suffix in (".pt", ".npy"):
        return read_ids(path)
    if tokenizer is None:
        raise CalibrationError(
            "the model has no tokenizer files; pass pre-tokenised ids with --calib FILE.pt or FILE.npy"
        )
    if dataset is not None:
        text = calibration_text(dataset, tokenizer, cfg.n_samples * cfg.seqlen)
    else:
        text = read_text(path) if path is not None else builtin_text()
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def cut_blocks(tokens: torch.Tensor, cfg: CalibConfig, vocab_size: int | None = None,
               bos_id: int | None = None) -> torch.Tensor:
    """[n_samples, seqlen] blocks: the stream is cut into consecutive blocks, and n_samples of
    them are drawn without replacement by a seeded generator (in stream order). With cfg.bos
    each block is bos_id followed by seqlen - 1 tokens of the stream, as a model sees a document."""
    if cfg.bos and bos_id is None:
        raise CalibrationError("--bos asks for a BOS token at the start of each sample, but the tokenizer has none")
    width = cfg.seqlen - 1 if cfg.bos else cfg.seqlen
    available = tokens.numel() // width
    if available < cfg.n_samples:
        raise CalibrationError(
            f"calibration data has {tokens.numel()} tokens, fewer than --n-samples {cfg.n_samples}"
            f" x --seqlen {cfg.seqlen} = {cfg.n_samples * cfg.seqlen}; give more text or fewer samples"
        )
    if vocab_size is not None and tokens.numel() and int(tokens.max()) >= vocab_size:
        raise CalibrationError(f"token id {int(tokens.max())} is outside the model's vocabulary ({vocab_size})")
    blocks = tokens[: available * width].reshape(available, width)
    generator = torch.Generator().manual_seed(cfg.seed)
    chosen = torch.randperm(available, generator=generator)[: cfg.n_samples].sort().values
    blocks = blocks[chosen]
    if cfg.bos:
        blocks = torch.cat([torch.full((blocks.shape[0], 1), bos_id, dtype=blocks.dtype), blocks], dim=1)
    return blocks.contiguous()


def calibration_blocks(cfg: CalibConfig, tokenizer: Any | None, vocab_size: int) -> torch.Tensor:
    """The run's calibration samples: the stream, cut and drawn, with the tokenizer's BOS token
    in front of each sample where cfg.bos asks for it."""
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    return cut_blocks(load_tokens(cfg, tokenizer), cfg, vocab_size, bos_id)


def tokens_digest(blocks: torch.Tensor) -> str:
    """sha256 of the calibration blocks: recorded so a result can be tied to its inputs."""
    return hashlib.sha256(blocks.to(torch.int64).numpy().tobytes()).hexdigest()
