"""Round-to-nearest without calibration: `streamq run --mode rtn` on a random LLaMA (hidden 2048,
MLP 5632, 16 blocks, fp16), timed and its peak RSS read from streamq.json, against the same
command run by an earlier streamq checkout (`--old`, whose RTN still ran the calibration
passes), and the two outputs compared byte for byte.

    git worktree add /tmp/streamq-old <commit before data-free RTN>
    python tools/bench_rtn.py --work /tmp/bench-rtn --old /tmp/streamq-old --json docs/results/rtn-llama2048-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
GiB = 2**30


def run(tree: Path, model: Path, out: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "streamq", "run", "--model", str(model), "--output", str(out), "--overwrite",
           "--mode", "rtn", "--device", "cpu", "--calib", str(args.calib), "--n-samples", str(args.n_samples),
           "--seqlen", str(args.seqlen)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    info = json.loads((out / "streamq.json").read_text())
    return {"tree": str(tree), "seconds": round(time.time() - start, 1),
            "block_seconds": [b["seconds"] for b in info["blocks"]],
            "peak_rss_bytes": max(b["peak_rss_bytes"] for b in info["blocks"]),
            "data_free": info.get("data_free", False)}


def same(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.iterdir() if p.is_file() and p.name != "streamq.json")
    return files == sorted(p.name for p in b.iterdir() if p.is_file() and p.name != "streamq.json") and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--old", type=Path, required=True, help="a checkout of streamq before data-free RTN")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=16, help="the calibration the old RTN runs (ignored now)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from make_wide_model import write

    model = args.work / "llama2048"
    if not (model / "config.json").is_file():
        write(model, "llama", args.layers, 2048, 5632, 16, 512, 0)
    ids = args.work / "calib.npy"
    if not ids.is_file():
        import numpy as np

        np.save(ids, np.random.default_rng(0).integers(4, 512, args.n_samples * args.seqlen * 2))
    args.calib = ids  # the old RTN calibrates (no tokenizer in this model): the same ids for both
    results = {}
    for label, tree in (("data-free", ROOT), ("calibrated", args.old)):
        results[label] = run(tree, model, args.work / f"out-{label}", args)
    identical = same(args.work / "out-data-free", args.work / "out-calibrated")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU float32; random LLaMA 2048/5632, "
          f"{args.layers} blocks; the calibrated run: {args.n_samples} x {args.seqlen} tokens")
    print("| RTN | seconds | median s/block | peak RSS |")
    print("|---|---|---|---|")
    for label, r in results.items():
        blocks = sorted(r["block_seconds"])
        print(f"| {label} | {r['seconds']} | {blocks[len(blocks) // 2]:.2f} | {r['peak_rss_bytes'] / GiB:.2f} GiB |")
    print(f"outputs byte-identical: {identical}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "identical": identical}, indent=2) + "\n")


if __name__ == "__main__":
    main()
