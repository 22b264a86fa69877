"""Model-family adapters; `detect` picks one from a Hugging Face config."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .base import Family, ScaleGroup, build_block
from .deepseek import DEEPSEEK_V3, GLM4_MOE
from .gemma import GEMMA2, GEMMA3
from .llama import LLAMA, MISTRAL, QWEN2, QWEN3
from .moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from .opt import OPT
from .phi3 import PHI3

FAMILIES: tuple[Family, ...] = (OPT, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, MIXTRAL, QWEN2_MOE, QWEN3_MOE,
                               DEEPSEEK_V3, GLM4_MOE)

__all__ = ["Family", "ScaleGroup", "FAMILIES", "detect", "build_block"]


def detect(config: Any) -> Family:
    """The adapter for config.model_type, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r} (config.json model_type); supported: {supported}"
    )
