"""Shared test helpers: a tiny model in memory with calibration inputs for its first block."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from streamq.families import Family, detect
from streamq.reference import first_block_inputs


@dataclass
class Setup:
    model: Any
    family: Family
    config: Any
    layers: Any
    x_chunks: list[torch.Tensor]
    kwargs: dict


def setup_model(model_dir: Path, n_samples: int = 8, seqlen: int = 64, chunk: int = 4, seed: int = 0) -> Setup:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    family = detect(model.config)
    layers = model.get_submodule(family.layers_prefix)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (n_samples, seqlen), generator=g)
    x = first_block_inputs(model, layers[0], ids, chunk, torch.device("cpu"))
    kwargs = family.block_kwargs(model.config, seqlen, torch.device("cpu"), torch.float32)
    return Setup(model, family, model.config, layers, x, kwargs)


def rechunk(chunks: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return list(torch.cat(chunks).split(size))
