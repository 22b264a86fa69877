"""Weight file types as data: the table of the types streamq reads, and what a checkpoint
folder holds of them. The reader (streamq.shards) and the Hub download (sources.hub) go through
this table and never name a type."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .base import WeightFiles
from .pytorch import PYTORCH
from .safetensors import SAFETENSORS

# preference order where a folder holds both, as transformers' (safetensors first)
FILE_TYPES: tuple[WeightFiles, ...] = (SAFETENSORS, PYTORCH)


def find(model_dir: Path) -> WeightFiles | None:
    """The weight file type of a checkpoint folder (an index or a single file), or None."""
    for kind in FILE_TYPES:
        if (model_dir / kind.index_name).is_file() or (model_dir / kind.single_name).is_file():
            return kind
    return None


def read_index(path: Path) -> dict[str, str]:
    """An index's weight_map: tensor name -> shard file name."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{path} is not a valid weight index (a JSON object with a weight_map)") from None
    return weight_map


def shard_names(model_dir: Path, kind: WeightFiles) -> list[str]:
    """The shard files a checkpoint of this type consists of (the index's, else the single file)."""
    index = model_dir / kind.index_name
    if index.is_file():
        return sorted(set(read_index(index).values()))
    return [kind.single_name]


def missing_files(model_dir: Path) -> list[str] | None:
    """The weight files a folder's index names that are not there ([] when complete); None
    when the folder has no weights streamq reads."""
    kind = find(model_dir)
    if kind is None:
        return None
    return [n for n in shard_names(model_dir, kind) if not (model_dir / n).is_file()]


def no_weights_message(where: str, names: list[str]) -> str:
    """Why a folder or repository cannot be read, naming what it has instead."""
    wanted = " or ".join(f"{k.single_name} / {k.index_name}" for k in FILE_TYPES)
    weightlike = [n for n in names if n.endswith((".gguf", ".h5", ".msgpack", ".pth", ".pt", ".ckpt", ".onnx",
                                                   ".safetensors", ".bin"))]
    found = f"; it has {', '.join(sorted(weightlike)[:6])}" if weightlike else ""
    return f"{where} holds no weights streamq reads ({wanted}){found}"
