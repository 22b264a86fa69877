"""The output checkpoint around the packed blocks: config.json with the AWQ GEMM
quantization_config, tokenizer files, the non-block tensors and streamq.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from . import __version__
from .config import CalibConfig, QuantConfig
from .families import Family
from .quant import STORAGE_DTYPE
from .shards import ShardReader
from .writer import ShardWriter, write_json_atomic

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
INT3_PACKING = "int3 codes (0..7) in the 4-bit slots of the AWQ GEMM layout"


def quantization_config(qcfg: QuantConfig, family: Family, hf_config: Any) -> dict:
    """What transformers/vLLM read to load the packed linears (AutoAWQ GEMM format).

    zero_point is true even for --symmetric: symmetric codes are stored unsigned with the
    constant zero 2^(bits-1), which the GEMM format expresses exactly."""
    return {
        "quant_method": "awq",
        "bits": qcfg.w_bit,
        "group_size": qcfg.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": family.extra_linears(hf_config),
    }


def write_non_block_tensors(reader: ShardReader, family: Family, writer: ShardWriter) -> None:
    """Embeddings, final norm, lm_head (when not tied), ...: copied one at a time in fp16."""
    block_prefix = family.layers_prefix + "."
    for name in reader.names():
        if not name.startswith(block_prefix):
            writer.add(name, reader.get(name).to(STORAGE_DTYPE))


def write_metadata(
    out_dir: Path,
    model_dir: Path,
    family: Family,
    hf_config: Any,
    qcfg: QuantConfig,
    calib: CalibConfig,
    calib_digest: str,
    source_fingerprint: str,
    extra: dict | None = None,
) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("_attn_implementation", None)
    for key in ("torch_dtype", "dtype"):  # transformers 4 reads the first, 5 the second
        config[key] = "float16"
    if qcfg.mode == "keep1":
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = quantization_config(qcfg, family, hf_config)
    write_json_atomic(out_dir / "config.json", config)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    storage = "fake-quant-fp16" if qcfg.mode == "keep1" else "awq-gemm"
    info = {
        "streamq_version": __version__,
        "family": family.name,
        "quant": qcfg.to_json(),
        "calib": {**calib.to_json(), "tokens_sha256": calib_digest},
        "source": {"path": str(model_dir.resolve()), "fingerprint": source_fingerprint},
        "storage": storage,
    }
    if storage == "fake-quant-fp16":
        info["storage_note"] = ("keep1 keeps 1% of input channels in fp16, which no loader stores "
                                "mixed: weights are written dequantized in fp16")
    if qcfg.w_bit == 3 and storage == "awq-gemm":
        info["packing"] = INT3_PACKING
    info.update(extra or {})
    write_json_atomic(out_dir / "streamq.json", info)
