"""An AWQ GEMM dequantizer written independently of streamq's quant/pack code (numpy bit
operations straight from the format description), used to check what streamq writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8c + ORDER[i]


def unpack_words(packed: np.ndarray) -> np.ndarray:
    words = packed.astype(np.int64) & 0xFFFFFFFF
    rows, n = words.shape
    out = np.zeros((rows, n * 8), dtype=np.int64)
    for i, col in enumerate(ORDER):
        out[:, col::8] = (words >> (4 * i)) & 0xF
    return out


def dequantize_linear(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """nn.Linear weight [out, in] as float32 from the GEMM tensors."""
    q = unpack_words(qweight)  # [in, out]
    z = unpack_words(qzeros)  # [in/g, out]
    group = q.shape[0] // z.shape[0]
    z_full = np.repeat(z, group, axis=0)
    s_full = np.repeat(scales.astype(np.float32), group, axis=0)
    return np.ascontiguousarray(((q - z_full).astype(np.float32) * s_full).T)


def dequantize_checkpoint(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """Write an fp16 Hugging Face checkpoint rebuilt from a streamq output directory; returns
    the float32 weights of the dequantized linears."""
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(src / shard))
    linears = {}
    out = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            w = dequantize_linear(t, tensors[base + ".qzeros"], tensors[base + ".scales"])
            linears[base] = w
            out[base + ".weight"] = w.astype(np.float16)
        elif not name.endswith((".qzeros", ".scales")):
            out[name] = t
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    return linears


def as_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))
