"""Block-parallel runs against one process: wall time, per-rank peak RSS and the speed-up, on a
random LLaMA (2048 wide, 8 blocks by default), each output checked byte for byte against the
one-process run's; then the cost model for N processes on a deep model.

    python tools/bench_parallel.py --work /tmp/par-bench                 # 1 thread per process
    python tools/bench_parallel.py --work /tmp/par-bench --threads 2     # and the machine's threads

Runs, one after another: one process with 1 thread, torchrun 2 processes with 1 thread each;
with --threads T also one process with T threads and torchrun 2 processes with T/2 each.
From the runs' streamq.json: a block's quantization (seconds per block) and its forward pass
(the hand-off's forward seconds per block), whose ratio is what streamq.parallel.FORWARD_SHARE
stands for. --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_wide_model import write  # noqa: E402

GiB = 2**30


def tensors(out: Path) -> dict[str, bytes]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    found = {}
    for shard in sorted(set(index.values())):
        for name, t in load_file(out / shard).items():
            found[name] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return found


def run(cmd: list[str], threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])}... failed ({done.returncode}): {done.stderr[-3000:]}")
    return wall, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="the machine's threads: also compare at this count")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = args.work / f"llama-{args.hidden}-{args.ffn}-{args.layers}"
    if not (model / "config.json").is_file():
        write(model, "llama", args.layers, args.hidden, args.ffn, args.heads, 512, 0, args.kv_heads)
    ids = args.work / "calib-ids.npy"
    np.save(ids, np.random.default_rng(0).integers(2, 512, args.n_samples * args.seqlen * 2))
    common = ["run", "--model", str(model), "--calib", str(ids), "--n-samples", str(args.n_samples), "--seqlen",
              str(args.seqlen), "--device", "cpu", "--overwrite"]
    settings = [(1, 1), (args.procs, 1)]
    if args.threads > 1:
        settings += [s for s in ((1, args.threads), (args.procs, max(1, args.threads // args.procs)))
                     if s not in settings]
    rows, reference = [], None
    for procs, threads in settings:
        out = args.work / f"out-{procs}p-{threads}t"
        launcher = [sys.executable, "-m", "streamq"] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m",
             "streamq"]
        wall, _ = run([*launcher, *common, "--output", str(out)], threads)
        info = json.loads((out / "streamq.json").read_text())
        got = tensors(out)
        reference = reference or got
        ranks = info.get("ranks") or [{"rank": 0, "blocks": [0, args.layers], "peak_rss_bytes":
                                       max(b["peak_rss_bytes"] for b in info["blocks"]), "forward_seconds": None,
                                       "wait_seconds": 0.0, "seconds": wall}]
        per_block = float(np.mean([b["seconds"] for b in info["blocks"]]))
        forwards = [r["forward_seconds"] / (r["blocks"][1] - r["blocks"][0]) for r in ranks
                    if r.get("forward_seconds")]
        row = {"processes": procs, "threads_each": threads, "wall_seconds": round(wall, 1),
               "seconds_per_block": round(per_block, 2),
               "forward_seconds_per_block": round(float(np.mean(forwards)), 3) if forwards else None,
               "identical_to_one_process": got == reference, "ranks": ranks}
        rows.append(row)
        print(f"{procs} process(es) x {threads} thread(s): wall {wall:.1f} s, {per_block:.1f} s per block, "
              f"identical: {row['identical_to_one_process']}", flush=True)
        for r in ranks:
            print(f"    rank {r['rank']}: blocks {r['blocks'][0]}-{r['blocks'][1] - 1}, waited {r['wait_seconds']:.1f} s, "
                  f"forward {r.get('forward_seconds') or 0:.1f} s, done at {r['seconds']:.1f} s, peak RSS "
                  f"{r['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    print(f"\nrandom LLaMA {args.hidden} wide (FFN {args.ffn}, {args.heads} heads, {args.kv_heads} KV), {args.layers} "
          f"blocks, {args.n_samples} x {args.seqlen} tokens, awq, CPU float32\n")
    print("| processes x threads | wall s | speed-up vs 1 x 1 | vs 1 process, same threads | s per block | "
          "forward s per block | peak RSS per rank GiB | identical |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["threads_each"]: r["wall_seconds"] for r in rows if r["processes"] == 1}
    for r in rows:
        same = base.get(r["processes"] * r["threads_each"])
        vs_same = f"{same / r['wall_seconds']:.2f}x" if same else ""
        print(f"| {r['processes']} x {r['threads_each']} | {r['wall_seconds']} | {base[1] / r['wall_seconds']:.2f}x | "
              f"{vs_same} | {r['seconds_per_block']} | "
              f"{r['forward_seconds_per_block'] or ''} | "
              f"{' / '.join(format(k['peak_rss_bytes'] / GiB, '.2f') for k in r['ranks'])} | "
              f"{r['identical_to_one_process']} |")
    measured = [r for r in rows if r["forward_seconds_per_block"]]
    if measured:
        share = measured[0]["forward_seconds_per_block"] / measured[0]["seconds_per_block"]
        print(f"\nforward pass / quantization of a block: {share:.3f} (streamq.parallel.FORWARD_SHARE is the "
              "split's assumption)")
        from streamq.parallel import split_blocks
        for n_layers, world in ((80, 8), (80, 4), (61, 8)):
            ranges = split_blocks(n_layers, world, share)
            finish = max(b * share + (b - a) for a, b in ranges)
            print(f"  {n_layers} blocks on {world} ranks: {[b - a for a, b in ranges]} blocks each, done after "
                  f"{finish:.1f} block-quantizations instead of {n_layers}: {n_layers / finish:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
