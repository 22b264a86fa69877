"""Peak memory of `streamq run` against model depth: quantizes random models of OPT-30B's block
shape with 2, 4 and 8 layers (tools/make_wide_model.py) and prints, per depth, the whole
process's peak RSS, the largest per-block peak RSS and GPU memory, and time. Streaming means
every column but time stays flat as layers are added.

    python tools/bench_stream.py --work /tmp/wide --layers 2 4 8 --n-samples 2 --seqlen 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from make_wide_model import by_depth



# The child's peak RSS is taken by a small launcher, not by this process: Linux starts an exec'd
# child's ru_maxrss at the RSS of the process that forked it, so a parent that has imported torch
# would report its own size for any child smaller than itself.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str], log: Path | None = None) -> tuple[int, float]:
    """Run cmd (its output to `log` when given); return its own peak RSS in bytes (wait4, via a
    ~10 MB launcher) and wall seconds."""
    start = time.time()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as peak, open(log or os.devnull, "w") as out:
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, peak.name, *cmd],
                              stdout=out if log else None, stderr=subprocess.STDOUT if log else None)
        if proc.returncode != 0:
            sys.exit(f"failed{f' (see {log})' if log else ''}: {' '.join(cmd)}")
        return int(peak.read()), time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where models and outputs go (~1.3 GB per layer)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--n-samples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mode", default="awq", help="awq, or rtn to measure the streaming alone (no search)")
    parser.add_argument("--max-gpu-mem", default=None)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--ffn", type=int, default=28672)
    parser.add_argument("--heads", type=int, default=56)
    args = parser.parse_args()

    models = by_depth(args.work, args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads)
    ids = args.work / "calib.npy"
    if not ids.is_file():
        import numpy as np

        np.save(ids, np.random.default_rng(0).integers(4, 512, 100_000))
    rows = []
    for n in args.layers:
        model = models[n]
        out = args.work / f"out-{args.mode}-{n}"
        cmd = ["streamq", "run", "--model", str(model), "--output", str(out), "--overwrite", "--calib", str(ids),
               "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen), "--device", args.device,
               "--mode", args.mode]
        if args.max_gpu_mem:
            cmd += ["--max-gpu-mem", args.max_gpu_mem]
        rss, seconds = run(cmd)
        info = json.loads((out / "streamq.json").read_text())
        blocks = info["blocks"]
        gpu = [b["peak_gpu_bytes"] for b in blocks if b["peak_gpu_bytes"] is not None]
        model_gb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
        rows.append((n, model_gb, rss / 2**30, max(b["peak_rss_bytes"] for b in blocks) / 2**30,
                     max(gpu) / 2**30 if gpu else None, info["plan"]["estimated_peak_bytes"] / 2**30,
                     info["plan"]["chunk_samples"], seconds, seconds / n))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"mode {args.mode}; device {args.device}; budget {args.max_gpu_mem or 'none'}; calibration {args.n_samples} x {args.seqlen} tokens; "
          f"block shape hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}")
    print("| layers | model GB (fp16) | process peak RSS GiB | block peak RSS GiB | block peak GPU GiB "
          "| planned peak GiB | chunk | time s | s/block |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, gb, rss, brss, gpu, planned, chunk, sec, per in rows:
        gpu_s = f"{gpu:.2f}" if gpu is not None else "n/a"
        print(f"| {n} | {gb:.1f} | {rss:.2f} | {brss:.2f} | {gpu_s} | {planned:.2f} | {chunk} | {sec:.0f} | {per:.0f} |")


if __name__ == "__main__":
    main()
