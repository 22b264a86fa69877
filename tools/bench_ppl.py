"""Peak memory of `streamq ppl` against model depth: evaluates random models of OPT-30B's block
shape with 2, 4 and 8 layers (tools/make_wide_model.py), each in a fresh process, and prints the
process's peak RSS (wait4), the GPU peak and time. Streaming means memory stays flat as layers
are added; only the hidden states of the evaluated segments scale, with the text.

    python tools/bench_ppl.py --work /tmp/wide --layers 2 4 8 --segments 4 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from bench_stream import run
from make_wide_model import by_depth



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where models go (~1.3 GB per layer)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-gpu-mem", default=None)
    parser.add_argument("--host-mem", default=None, help="passed on: beyond it hidden states go to disk")
    args = parser.parse_args()

    models = by_depth(args.work, args.layers)
    ids = args.work / "eval.npy"
    if not ids.is_file():
        import numpy as np

        np.save(ids, np.random.default_rng(1).integers(4, 512, 200_000))
    rows = []
    for n in args.layers:
        model = models[n]
        out = args.work / f"ppl-{n}.json"
        cmd = ["streamq", "ppl", "--model", str(model), "--data", str(ids), "--seqlen", str(args.seqlen),
               "--max-segments", str(args.segments), "--device", args.device, "--json", str(out)]
        for flag, value in (("--max-gpu-mem", args.max_gpu_mem), ("--host-mem", args.host_mem)):
            if value:
                cmd += [flag, value]
        rss, seconds = run(cmd)
        result = json.loads(out.read_text())
        model_gb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
        gpu = result["peak_gpu_bytes"]
        rows.append((n, model_gb, rss / 2**30, gpu / 2**30 if gpu is not None else None, result["chunk_segments"],
                     result["hidden_storage"], seconds))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; device {args.device}; "
          f"budget {args.max_gpu_mem or 'none'}; {args.segments} segments x {args.seqlen} tokens; OPT-30B block shape")
    print("| layers | model GB (fp16) | process peak RSS GiB | peak GPU GiB | chunk | hidden states | time s |")
    print("|---|---|---|---|---|---|---|")
    for n, gb, rss, gpu, chunk, where, sec in rows:
        gpu_s = f"{gpu:.2f}" if gpu is not None else "n/a"
        print(f"| {n} | {gb:.1f} | {rss:.2f} | {gpu_s} | {chunk} | {where} | {sec:.0f} |")


if __name__ == "__main__":
    main()
