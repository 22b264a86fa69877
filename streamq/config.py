"""Frozen settings of a quantization run, with a JSON round-trip for streamq.json."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import SettingsError

MODES = ("awq", "rtn", "s2", "keep1")
STORAGE_DTYPES = ("float16", "bfloat16")  # names of torch dtypes: torch is imported where a tensor is made
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'38GB' -> 38e9 bytes, '512MiB' -> 512 * 2^20 (decimal and binary units, any case)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise SettingsError(f"cannot read size {text!r}; write it like 38GB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


MIN_SHARD_BYTES = 16 << 10  # below this a shard holds a tensor or two: thousands of files, no use


def check_shard_bytes(n: int) -> None:
    if n < MIN_SHARD_BYTES:
        raise SettingsError(f"--shard-size {n}B is too small: shards hold at least {MIN_SHARD_BYTES // 1024}KiB "
                            "(checkpoints use 1-10GB; the default is 4GB)")


# Recipes: the papers' exactly (AWQ's ablation rows and GPTQ's in-order rounding stay
# reproducible), and the defaults chosen by measured perplexity (docs/benchmarks.md, "Defaults by
# measurement"). gptq_act_order only acts where GPTQ rounds (--method gptq, awq+gptq).
RECIPES = {
    "paper": {"duo_scaling": False, "alpha_one": False, "identity": False, "bos": False, "clip_tokens": 512,
              "gptq_act_order": False, "gram_loss": True},
    "default": {"duo_scaling": False, "alpha_one": False, "identity": False, "bos": False, "clip_tokens": 512,
                "gptq_act_order": True, "gram_loss": True},
}


def recipe(name: str, **overrides: object) -> tuple[dict, dict]:
    """(QuantConfig fields, CalibConfig fields) of recipe `name`, with the switches given (None
    values ignored) overriding it: the command line and the demo build their settings from here."""
    if name not in RECIPES:
        raise SettingsError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    chosen = {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}}
    bos = chosen.pop("bos")
    return chosen, {"bos": bos}


@dataclass(frozen=True)
class QuantConfig:
    """What decides the quantized weights (everything here changes the output bytes)."""

    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True  # asymmetric min/max with an integer zero point, as AWQ
    mode: str = "awq"  # awq | rtn | s2 | keep1 (the rows of the paper's ablation table)
    duo_scaling: bool = False  # s = mean|x|^a / mean|w|^(1-a); off to match the paper
    clip: bool = True  # awq mode: search clipping ranges after scaling (off: the scale-only ablation)
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    alpha_one: bool = False  # the grid also tries alpha = 1 (llm-compressor and AutoAWQ do; the paper's does not)
    # the grid also tries s = 1, no scaling (llm-compressor's duo grid does): without duo scaling
    # alpha = 0 is s = 1 already, so this adds a candidate only with duo_scaling
    identity: bool = False
    # a group judged on its one linear's own output (v -> o, up -> down, fc1 -> fc2) computes each
    # candidate's loss from the inputs' Gram matrix instead of a forward pass (gram.py): the same
    # quantity up to float32 rounding, ~2-40x fewer products; off: every candidate runs the linear
    gram_loss: bool = True
    max_shrink: float = 0.5  # clip candidates: max * (1 - i/n_grid) for i < max_shrink*n_grid
    clip_tokens: int = 512  # tokens sampled at a fixed stride for the clip search
    # an expert given fewer calibration tokens is quantized round-to-nearest: no scale of its own
    # (its gate/up still take the norm's), no clip, no GPTQ
    min_expert_tokens: int = 16
    salient_frac: float = 0.01  # share of input channels treated as salient by s2 and keep1
    # every floating tensor written (scales, norms, biases, embeddings): fp16, or bf16 for the
    # compressed-tensors output of a bf16 model; scales are rounded to it before codes are computed
    storage_dtype: str = "float16"
    gptq: bool = False  # round with GPTQ (after AWQ's scales and clips in awq mode) instead of to nearest
    gptq_damp: float = 0.01  # GPTQ's dampening, a share of the Hessian's mean diagonal
    gptq_act_order: bool = False  # GPTQ's columns by descending Hessian diagonal, static groups (gptq.py)
    # the next block's calibration inputs: this block's unquantized outputs (fp16, as llm-awq; blocks
    # stay independent) or its quantized outputs (quantized, as the GPTQ paper)
    next_input: str = "fp16"

    def __post_init__(self) -> None:
        if self.w_bit not in (3, 4):
            raise SettingsError(f"--w-bit must be 3 or 4, got {self.w_bit}")
        if self.group_size <= 0 or self.group_size % 8:
            raise SettingsError(f"--group-size must be a positive multiple of 8, got {self.group_size}")
        if self.mode not in MODES:
            raise SettingsError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.gptq and self.mode not in ("awq", "rtn"):
            raise SettingsError(f"GPTQ rounds after awq or alone (--method gptq); not with --mode {self.mode}")
        if self.next_input not in ("fp16", "quantized"):
            raise SettingsError(f"--next-input must be auto, fp16 or quantized, got {self.next_input!r}")
        if self.clip_tokens < 1:
            raise SettingsError(f"--clip-tokens must be at least 1, got {self.clip_tokens}")
        if self.min_expert_tokens < 1:
            raise SettingsError(f"--min-expert-tokens must be at least 1, got {self.min_expert_tokens}")
        if not 0 < self.gptq_damp < 1:
            raise SettingsError(f"--gptq-damp must be between 0 and 1, got {self.gptq_damp}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise SettingsError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")

    @property
    def method(self) -> str:
        """awq, gptq or awq+gptq (rtn, s2, keep1: the ablation modes)."""
        if self.gptq:
            return "awq+gptq" if self.mode == "awq" else "gptq"
        return self.mode

    @property
    def storage_torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.storage_dtype)

    @property
    def data_free(self) -> bool:
        """Round-to-nearest without GPTQ reads no activation: no tokenizer, no calibration pass,
        no activations to plan or keep, and the same output (it depends on the weights alone)."""
        return self.mode == "rtn" and not self.gptq

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "QuantConfig":
        # runs recorded before the Gram loss existed judged every candidate by a forward pass
        return cls(**{"gram_loss": False, **data})


@dataclass(frozen=True)
class CalibConfig:
    """Where the calibration tokens come from and how many."""

    source: str | None = None  # a text/JSONL/.pt/.npy file; None = the built-in text
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    bos: bool = False  # each sample starts with the tokenizer's BOS token (then seqlen - 1 text tokens)

    def __post_init__(self) -> None:
        if self.n_samples <= 0 or self.seqlen <= 1:
            raise SettingsError("--n-samples must be >= 1 and --seqlen >= 2")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
