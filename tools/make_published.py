"""Lay a checkpoint written by save_pretrained out as a model is published on the Hub, and put
it in a Hub cache the way huggingface_hub stores a download (blobs, snapshots/<commit> of links,
refs/main), so streamq can be tested on what users hold. The layouts are those of the real
repositories (DeepSpeed PR #4694 lists OPT's):

- opt-30b (also 6.7b, 13b): PyTorch zip pickles pytorch_model-0000K-of-0000N.bin with
  pytorch_model.bin.index.json, names decoder.* (saved from the base model), no lm_head;
- opt-125m (also 1.3b, 2.7b, 66b): one pytorch_model.bin, names model.decoder.*, lm_head.weight
  saved as the embedding's own storage (tied);
- opt-350m: like opt-30b in one file, the model itself has project_in/project_out and norms
  after attention (build it with make_tiny(config_extra=OPT_350M));
- llama: safetensors shards model-0000K-of-0000N.safetensors with their index, lm_head untied.

OPT repositories carry GPT-2 tokenizer files (vocab.json, merges.txt) and no tokenizer.json.

    python tools/make_published.py --src models/tiny-opt --layout opt-30b --cache /tmp/hub
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPT_350M = {"word_embed_proj_dim": 64, "do_layer_norm_before": False}  # with hidden 128: projections in and out


@dataclass(frozen=True)
class Layout:
    repo: str
    weights: str  # "pytorch" or "safetensors"
    shards: int
    base_model: bool  # names saved from the base model: decoder.* (the "model." prefix and lm_head absent)
    tied_lm_head: bool  # lm_head.weight stored as the embedding's own storage
    gpt2_tokenizer: bool  # vocab.json + merges.txt instead of tokenizer.json


LAYOUTS = {
    "opt-30b": Layout("facebook/opt-30b", "pytorch", 3, base_model=True, tied_lm_head=False, gpt2_tokenizer=True),
    "opt-125m": Layout("facebook/opt-125m", "pytorch", 1, base_model=False, tied_lm_head=True, gpt2_tokenizer=True),
    "opt-350m": Layout("facebook/opt-350m", "pytorch", 1, base_model=True, tied_lm_head=False, gpt2_tokenizer=True),
    "llama": Layout("meta-llama/Llama-2-7b-hf", "safetensors", 2, base_model=False, tied_lm_head=False,
                    gpt2_tokenizer=False),
}


def published_state(src: Path, layout: Layout) -> dict[str, torch.Tensor]:
    """The source's tensors under the layout's names (the dict's order is the files' order)."""
    files = sorted(src.glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    config = json.loads((src / "config.json").read_text())
    embed = next(k for k in state if k.endswith("embed_tokens.weight"))
    if layout.tied_lm_head and config.get("tie_word_embeddings", True):
        state["lm_head.weight"] = state[embed]  # one storage, two names, as torch.save keeps it
    if layout.base_model:
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return dict(sorted(state.items()))


def write_layout(src: Path, layout: Layout, out: Path) -> Path:
    """A folder holding what the layout's repository holds (weights, config, tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    state = published_state(src, layout)
    names = list(state)
    per = -(-len(names) // layout.shards)
    ext = ".bin" if layout.weights == "pytorch" else ".safetensors"
    stem = "pytorch_model" if layout.weights == "pytorch" else "model"
    weight_map: dict[str, str] = {}
    for k in range(layout.shards):
        part = {n: state[n] for n in names[k * per:(k + 1) * per]}
        file = f"{stem}{ext}" if layout.shards == 1 else f"{stem}-{k + 1:05d}-of-{layout.shards:05d}{ext}"
        if layout.weights == "pytorch":
            torch.save(part, out / file)
        else:
            save_file({n: t.contiguous() for n, t in part.items()}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    if layout.shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / f"{stem}{ext}.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=2))
    shutil.copyfile(src / "config.json", out / "config.json")
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True, "bos_token_id": 0,
                                                            "eos_token_id": 1}))
    if (src / "tokenizer.json").is_file():
        if layout.gpt2_tokenizer:
            _gpt2_tokenizer(src, out)
        else:
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (src / f).is_file():
                    shutil.copyfile(src / f, out / f)
    return out


def _gpt2_tokenizer(src: Path, out: Path) -> None:
    """The byte-level BPE of src as GPT-2's slow files, with OPT's tokenizer_config (a BOS token
    in front of every text)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.backend_tokenizer.model.save(str(out))  # vocab.json, merges.txt
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.eos_token,
        "pad_token": tok.eos_token, "errors": "replace", "model_max_length": 1_000_000}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                                                             "unk_token": tok.eos_token, "pad_token": tok.eos_token}))


def blob_name(p: Path) -> str:
    """The file's sha256, as the Hub names a blob; a stand-in from name and size for files of
    more than 64 MB (nothing reads blob names back, and hashing GBs costs a GPU session time)."""
    if p.stat().st_size > 64 << 20:
        return hashlib.sha256(f"{p.name} {p.stat().st_size}".encode()).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


def commit_of(folder: Path) -> str:
    """A stand-in commit hash: 40 hex digits from the folder's files."""
    h = hashlib.sha1()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + blob_name(p).encode())
    return h.hexdigest()


def to_cache(folder: Path, repo: str, cache: Path, revision: str = "main", move: bool = False) -> Path:
    """folder's files in a Hub cache as huggingface_hub lays a download out: blobs named by
    their hash, snapshots/<commit>/<file> linking to them, refs/<revision> holding the commit
    (`move`: the files are moved there, not copied)."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    sha = commit_of(folder)
    snap = storage / "snapshots" / sha
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.iterdir()):
        blob = storage / "blobs" / blob_name(p)
        if not blob.exists():
            shutil.move(p, blob) if move else shutil.copyfile(p, blob)
        link = snap / p.name
        if not link.is_symlink():
            os.symlink(os.path.relpath(blob, snap), link)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(sha)
    return snap


def publish(src: Path, layout: str, cache: Path, work: Path) -> Path:
    """src laid out as `layout`'s repository, in the Hub cache; returns the snapshot folder."""
    spec = LAYOUTS[layout]
    return to_cache(write_layout(src, spec, work / layout), spec.repo, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="a checkpoint written by save_pretrained")
    parser.add_argument("--layout", choices=list(LAYOUTS), required=True)
    parser.add_argument("--cache", type=Path, required=True, help="the Hub cache to add it to (HF_HUB_CACHE)")
    parser.add_argument("--work", type=Path, default=None, help="where the plain layout is written first")
    args = parser.parse_args()
    work = args.work or args.cache.parent / "published"
    snap = publish(args.src, args.layout, args.cache, work)
    print(f"{LAYOUTS[args.layout].repo} -> {snap}")


if __name__ == "__main__":
    main()
