"""A mixture-of-experts block at real width, streamed: peak RSS against the block's size and
seconds per block, from `streamq run` on a random Mixtral-shaped model (hidden 4096, experts
14336 wide, 8 experts, top-2, 32 heads, 8 key/value heads by default; one tensor per expert on
disk, as Mixtral's checkpoints).

    python tools/bench_moe.py --work /tmp/moe-bench --layers 2 --n-samples 4 --seqlen 256
    python tools/bench_moe.py --work /tmp/moe-bench --device cuda --n-samples 128 --seqlen 512 --max-gpu-mem 38GB

Prints one row per block and a summary line; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_wide_model import write  # noqa: E402

GB = 1e9
GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336, help="one expert's width")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-gpu-mem", default=None)
    parser.add_argument("--method", default="awq")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = args.work / f"mixtral-{args.hidden}-{args.ffn}-{args.layers}"
    if not (model / "config.json").is_file():
        t0 = time.time()
        write(model, "mixtral", args.layers, args.hidden, args.ffn, args.heads, 512, 0, args.kv_heads)
        print(f"wrote {model} in {time.time() - t0:.0f} s", flush=True)
    block_bytes = sum(p.stat().st_size for p in model.glob("model-block*.safetensors")) / args.layers
    ids = args.work / "calib-ids.npy"
    np.save(ids, np.random.default_rng(0).integers(2, 512, args.n_samples * args.seqlen * 2))
    out = args.work / "out"
    cmd = [sys.executable, "-m", "streamq", "run", "--model", str(model), "--output", str(out), "--overwrite",
           "--calib", str(ids), "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen), "--device",
           args.device, "--method", args.method]
    if args.max_gpu_mem:
        cmd += ["--max-gpu-mem", args.max_gpu_mem]
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if run.returncode != 0:
        sys.exit(f"streamq run failed ({run.returncode}): {run.stderr[-2000:]}")
    info = json.loads((out / "streamq.json").read_text())
    print(run.stdout.strip())
    print(f"\n{args.layers} Mixtral-shaped blocks (hidden {args.hidden}, experts 8 x {args.ffn}), "
          f"{args.n_samples} x {args.seqlen} tokens, {args.method}, {args.device}, compute {info.get('compute_dtype')}")
    print("| block | block GB (fp16) | seconds | peak RSS GiB | RSS / block | peak GPU GiB | fewest tokens to one expert |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for b in info["blocks"]:
        gpu = b.get("peak_gpu_bytes")
        fewest = min(b["experts"]["tokens"].values()) if b.get("experts") else None
        row = {"block": b["block"], "block_bytes": block_bytes, "seconds": b["seconds"],
               "peak_rss_bytes": b["peak_rss_bytes"], "peak_gpu_bytes": gpu, "fewest_tokens": fewest}
        rows.append(row)
        print(f"| {b['block']} | {block_bytes / GB:.2f} | {b['seconds']:.1f} | {b['peak_rss_bytes'] / GiB:.2f} | "
              f"{b['peak_rss_bytes'] / block_bytes:.2f} | {'' if gpu is None else f'{gpu / GiB:.2f}'} | {fewest} |")
    print(f"\nwall {wall:.0f} s; plan: {info['plan']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "wall_seconds": wall,
                                         "plan": info["plan"], "blocks": rows}, indent=1))


if __name__ == "__main__":
    main()
