"""Shard reader: index or single file, lazy per-block reads, and one clear error per bad input."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from streamq.errors import InputError
from streamq.shards import ShardReader


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def first_shard(d):
    """The shard holding the most tensors (the overlap case needs two)."""
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()), key=lambda f: (-list(index.values()).count(f), f))
    return d / files[0]


def rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_reads_one_block_by_prefix(tiny_models):
    reader = ShardReader(tiny_models["llama"])
    block = reader.with_prefix("model.layers.1.")
    assert "mlp.down_proj.weight" in block and block["mlp.down_proj.weight"].dtype == torch.float16
    assert not any(k.startswith("model.") for k in block)


def test_single_file_model(tmp_path):
    save_file({"a": torch.ones(2, 3, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(ShardReader(tmp_path).get("a"), torch.ones(2, 3, dtype=torch.float16))


def test_fingerprint_changes_with_the_weights_layout(tiny_models, tmp_path):
    d = copy_model(tiny_models["opt"], tmp_path / "m")
    before = ShardReader(d).fingerprint()
    assert ShardReader(d).fingerprint() == before
    rewrite_header(first_shard(d), lambda h: h.setdefault("__metadata__", {}).update(x="1"))
    assert ShardReader(d).fingerprint() != before


@pytest.mark.parametrize("case,match", [
    ("truncated", "the file is truncated"),
    ("garbage_header", "corrupt header"),
    ("huge_header", "corrupt header"),
    ("bad_dtype", "unsupported dtype F8_E5M2"),
    ("wrong_size", "needs"),
    ("overlap", "overlap"),
    ("missing_shard", "is missing from"),
    ("missing_tensor", "is missing from shard"),
])
def test_bad_shards_give_one_clear_error(tiny_models, tmp_path, case, match):
    d = copy_model(tiny_models["opt"], tmp_path / "m")
    shard = first_shard(d)
    if case == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif case == "garbage_header":
        raw = shard.read_bytes()
        shard.write_bytes(raw[:8] + b"x" * (len(raw) - 8))
    elif case == "huge_header":
        shard.write_bytes(struct.pack("<Q", 2**40) + shard.read_bytes()[8:])
    elif case == "bad_dtype":
        rewrite_header(shard, lambda h: next(v for k, v in h.items() if k != "__metadata__").update(dtype="F8_E5M2"))
    elif case == "wrong_size":
        rewrite_header(shard, lambda h: next(v for k, v in h.items() if k != "__metadata__")["shape"].append(2))
    elif case == "overlap":
        def overlap(h):
            entries = sorted((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
            a, b = entries[0], entries[1]
            size = b["data_offsets"][1] - b["data_offsets"][0]
            b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
        rewrite_header(shard, overlap)
    elif case == "missing_shard":
        shard.unlink()
    elif case == "missing_tensor":
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.decoder.ghost.weight"] = shard.name
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=match) as info:
        ShardReader(d)
    assert "\n" not in str(info.value)
