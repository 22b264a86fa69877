"""`streamq convert`: a quantized checkpoint from one format to the other without quantizing
again. Each block's packed linears are unpacked to their integer codes, scales and zeros and
packed in the other layout; tensors go through the mmap'd reader and the spooling writer one
block at a time, in the order a run writes them, so converting a run's output gives the bytes
a run with the other --format writes."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import INT3_PACKING, copy_extras, output_config, storable, write_non_block_tensors
from .config import QuantConfig, check_shard_bytes
from .errors import InputError, NumericError, OutputError
from .formats import Format, by_name, linear_tensors, reading
from .models import claim_output_dir, dtype_name, open_checkpoint
from .writer import DEFAULT_SHARD_BYTES, ShardWriter, write_json_atomic


@dataclass
class ConvertSummary:
    source_format: str
    target_format: str
    linears: int
    tensors: int
    seconds: float
    input_bytes: int
    output_bytes: int


def _exact(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales change dtype only where every value survives exactly: the converted model must be
    the same model (bf16 scales hold 8 significant bits, fp16 11, but fp16 has less range)."""
    out = t.to(dtype)
    if not torch.equal(out.to(t.dtype), t):
        bad = int((out.to(t.dtype) != t).sum())
        raise NumericError(f"{name}: {bad} of {t.numel()} scales are not exactly representable in {dtype_name(dtype)}, "
                           "so the converted model would differ; quantize the source again with the other --format")
    return out


def convert_linear(src: Format, dst: Format, tensors: dict[str, torch.Tensor], qcfg: QuantConfig,
                   name: str) -> dict[str, torch.Tensor]:
    codes, scales, zeros = src.unpack(tensors, qcfg.w_bit)
    if not qcfg.zero_point and not bool((zeros == 2 ** (qcfg.w_bit - 1)).all()):
        raise InputError(f"{name} has data-dependent zero points but its settings say symmetric")
    scales = _exact(f"{name} scales", scales.contiguous(), qcfg.storage_torch_dtype)
    return dst.pack(codes.contiguous(), scales, zeros.contiguous(), qcfg)


def _settings(in_dir: Path, src: Format, found: dict) -> tuple[QuantConfig, dict | None]:
    """The quantization settings: streamq.json's where the input is streamq's output (it
    records what config.json cannot say, e.g. that AWQ codes are symmetric), else the config's."""
    path = in_dir / "streamq.json"
    if path.is_file():
        info = json.loads(path.read_text())
        qcfg = QuantConfig.from_json(info["quant"])
        if (qcfg.w_bit, qcfg.group_size) != (found["w_bit"], found["group_size"]):
            raise InputError(f"{path} and config.json disagree on bits or group size")
        return qcfg, info
    return QuantConfig(w_bit=found["w_bit"], group_size=found["group_size"], zero_point=found["zero_point"]), None


@torch.no_grad()
def convert(in_dir: str | Path, out_dir: str | Path, format: str, shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False, on_block: Callable[[int, int], None] | None = None) -> ConvertSummary:
    start = time.time()
    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir)
    dst = by_name(format)
    check_shard_bytes(shard_bytes)
    if not in_dir.is_dir():
        raise InputError(f"{in_dir} is not a directory")
    if out_dir.exists() and out_dir.resolve() == in_dir:
        raise OutputError("the output directory must differ from the input")
    reader, hf_config, family = open_checkpoint(in_dir)
    found = reading(hf_config)
    if found is None:
        raise InputError(f"{in_dir} holds no packed weights (config.json has no quantization_config); convert "
                         "reads the output of `streamq run`")
    src, settings = found
    if src.name == dst.name:
        raise InputError(f"{in_dir} is in the {dst.name} format already; nothing to convert (copy the folder to "
                         "have a second one)")
    qcfg, info = _settings(in_dir, src, settings)
    qcfg = dataclasses.replace(qcfg, storage_dtype=dtype_name(dst.storage_dtype(reader.float_dtype())))
    if qcfg.w_bit > dst.max_bits:
        raise InputError(f"--format {dst.name} holds at most {dst.max_bits} bits per weight; {in_dir} has {qcfg.w_bit}")
    held = claim_output_dir(out_dir, overwrite)  # the output folder's lock, held to the end
    try:
        writer = ShardWriter(out_dir, shard_bytes)
        n_layers = family.n_layers(hf_config)
        n_linears = n_tensors = 0
        if on_block:
            on_block(0, n_layers)
        for i in range(n_layers):
            prefix = family.block_prefix(i)
            raw = reader.with_prefix(prefix)
            linears = linear_tensors(src, list(raw))
            out: dict[str, torch.Tensor] = {}
            consumed = set()
            for base, names in linears.items():
                tensors = {suffix: raw[name] for suffix, name in names.items()}
                for suffix, t in convert_linear(src, dst, tensors, qcfg, prefix + base).items():
                    out[f"{base}.{suffix}"] = t
                consumed.update(names.values())
            for name, t in raw.items():
                if name not in consumed:
                    out[name] = storable(prefix + name, t, qcfg.storage_torch_dtype)
            for name, t in sorted(out.items()):  # a run's order: each block's tensors sorted
                writer.add(prefix + name, t)
            n_linears, n_tensors = n_linears + len(linears), n_tensors + len(out)
            del raw, out
            reader.release()
            if on_block:
                on_block(i + 1, n_layers)
        write_non_block_tensors(reader, family, writer, qcfg.storage_torch_dtype)
        n_tensors += sum(not name.startswith(family.layers_prefix + ".") for name in reader.names())
        reader.release()
        writer.finish()
        write_json_atomic(out_dir / "config.json", output_config(in_dir, dst, qcfg, family, hf_config))
        copied = copy_extras(in_dir, out_dir)
        record = dict(info or {"family": family.name})
        record.update(format=dst.name, storage=dst.storage, quant=qcfg.to_json(),
                      converted_from={"path": str(in_dir), "format": src.name, "files_copied": copied})
        record.pop("packing", None)
        if qcfg.w_bit == 3 and dst.name == "awq":
            record["packing"] = INT3_PACKING
        write_json_atomic(out_dir / "streamq.json", record)
    finally:
        held.release(remove=True)  # no journal: the folder is left holding the checkpoint only
    return ConvertSummary(src.name, dst.name, n_linears, n_tensors, time.time() - start,
                          sum(p.stat().st_size for p in reader.shards()),
                          sum(p.stat().st_size for p in out_dir.glob("model-*.safetensors")))
