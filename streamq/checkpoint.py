"""The output checkpoint around the packed blocks: config.json with the format's
quantization_config, everything else of the source folder a loader or a chat user needs
(tokenizer, chat template, generation config, ...), the non-block tensors and streamq.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import CalibConfig, QuantConfig
from .errors import NumericError
from .families import Family
from .formats import Format
from .shards import ShardReader
from .writer import ShardWriter, disk_full_guard, write_json_atomic

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
# never copied from the source folder: weights in any format, remote code, what we write ourselves
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
OWN_FILES = ("config.json", "streamq.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
INT3_PACKING = "int3 codes (0..7) in the 4-bit slots of the AWQ GEMM layout"


def source_extras(model_dir: Path) -> list[Path]:
    """The source folder's files that travel with the quantized model: tokenizer files, chat
    template, generation config, model card, licence, ... (top-level regular files that are
    neither weights nor code nor files streamq writes)."""
    return sorted(p for p in Path(model_dir).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in OWN_FILES
                  and not p.name.endswith(WEIGHT_SUFFIXES + (".index.json", ".py")))


def storable(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in the storage dtype, or one clear error when a value does not fit (never inf)."""
    out = t.to(dtype)
    if out.is_floating_point() and not torch.isfinite(out).all() and torch.isfinite(t).all():
        raise NumericError(f"{name} cannot be stored in {dtype}: {int((~torch.isfinite(out)).sum())} values exceed "
                           f"its range (largest magnitude {float(t.abs().max()):.4g}); write this model with "
                           "--format compressed-tensors, which keeps a bf16 model in bf16")
    return out


def check_non_block_tensors(reader: ShardReader, family: Family, dtype: torch.dtype) -> None:
    """Before any work: every non-block tensor fits the storage dtype (a bf16 embedding beyond
    fp16's range is refused now, not after the last block)."""
    block_prefix = family.layers_prefix + "."
    for name in reader.names():
        if not name.startswith(block_prefix) and reader.dtype(name) != dtype:
            storable(name, reader.get(name), dtype)
    reader.release()


def write_non_block_tensors(reader: ShardReader, family: Family, writer: ShardWriter,
                            dtype: torch.dtype = torch.float16) -> None:
    """Embeddings, final norm, lm_head (when not tied), ...: copied one at a time in `dtype`."""
    block_prefix = family.layers_prefix + "."
    for name in reader.names():
        if not name.startswith(block_prefix):
            writer.add(name, storable(name, reader.get(name), dtype))


def output_config(model_dir: Path, fmt: Format, qcfg: QuantConfig, family: Family, hf_config: Any) -> dict:
    """The source's config.json with the format's quantization_config, the storage dtype and
    the family's changes (DeepSeek-V3: no multi-token-prediction layer written)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config.pop("_attn_implementation", None)
    config.update(family.output_config(hf_config))
    ignore = family.extra_linears(hf_config)
    for key in ("torch_dtype", "dtype"):  # transformers 4 reads the first, 5 the second
        config[key] = qcfg.storage_dtype
    if qcfg.mode == "keep1":
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = fmt.quantization_config(qcfg, ignore)
    return config


def copy_extras(model_dir: Path, out_dir: Path) -> list[str]:
    names = []
    for path in source_extras(model_dir):
        shutil.copyfile(path, out_dir / path.name)
        names.append(path.name)
    return names


def write_metadata(
    out_dir: Path,
    model_dir: Path,
    family: Family,
    hf_config: Any,
    qcfg: QuantConfig,
    calib: CalibConfig,
    calib_digest: str,
    source_fingerprint: str,
    fmt: Format,
    source: dict | None = None,
    extra: dict | None = None,
) -> None:
    # a full disk here is one line, and the run stays resumable (the journal is not complete yet)
    with disk_full_guard(out_dir / "config.json.tmp", out_dir):
        write_json_atomic(out_dir / "config.json", output_config(model_dir, fmt, qcfg, family, hf_config))
    with disk_full_guard(out_dir, out_dir, remove=False):
        copied = copy_extras(model_dir, out_dir)
    keep1 = qcfg.mode == "keep1"
    storage = f"fake-quant-{'bf16' if qcfg.storage_dtype == 'bfloat16' else 'fp16'}" if keep1 else fmt.storage
    info = {
        "streamq_version": __version__,
        "family": family.name,
        "format": None if keep1 else fmt.name,
        "quant": qcfg.to_json(),
        "calib": {**calib.to_json(), "tokens_sha256": calib_digest},
        # what was asked for (a path, a Hub id, a short name) and what it resolved to
        "source": {**(source or {}), "path": str(model_dir.resolve()), "fingerprint": source_fingerprint,
                   "files_copied": copied},
        "storage": storage,
        "scale_groups": [f"{g.prev_op}{'[%d:%d]' % g.prev_rows if g.prev_rows else ''} -> {', '.join(g.linears)}"
                         for g in family.scale_groups(hf_config)],
        "skipped_scale_groups": family.skipped_groups(hf_config),
    }
    if keep1:
        info["storage_note"] = ("keep1 keeps 1% of input channels in full precision, which no loader stores "
                                f"mixed: weights are written dequantized in {qcfg.storage_dtype}")
    if qcfg.w_bit == 3 and fmt.name == "awq" and not keep1:
        info["packing"] = INT3_PACKING
    info.update(extra or {})
    with disk_full_guard(out_dir / "streamq.json.tmp", out_dir):
        write_json_atomic(out_dir / "streamq.json", info)
