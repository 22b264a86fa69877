"""Host memory of a run from a PyTorch .bin against the same weights in safetensors: a random
OPT of ~200 MB (hidden 1024, FFN 4096, 8 blocks, fp16) written once as one model.safetensors and
once as one pytorch_model.bin laid out as facebook/opt-30b is published (decoder.* names, no
lm_head), each quantized by `streamq run` in a process of its own; prints peak RSS, seconds and
whether the outputs are byte-identical.

    python tools/bench_sources.py --work /tmp/bench-sources
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
MiB = 2**20


def models(work: Path, hidden: int, ffn: int, layers: int) -> dict[str, Path]:
    """The same random weights as one safetensors file and as one published .bin."""
    from make_wide_model import write

    shards = work / "shards"
    if not (shards / "config.json").is_file():
        write(shards, "opt", layers, hidden, ffn, hidden // 64, 512, 0)
    state = {k: v for f in sorted(shards.glob("*.safetensors")) for k, v in load_file(f).items()}
    out = {"safetensors": work / "safetensors", "bin": work / "bin"}
    for path in out.values():
        path.mkdir(exist_ok=True)
        (path / "config.json").write_bytes((shards / "config.json").read_bytes())
    if not (out["safetensors"] / "model.safetensors").is_file():
        save_file(state, str(out["safetensors"] / "model.safetensors"), metadata={"format": "pt"})
    if not (out["bin"] / "pytorch_model.bin").is_file():
        torch.save({k[len("model."):]: v for k, v in state.items()}, out["bin"] / "pytorch_model.bin")
    return out


def run(model: Path, out: Path, args: argparse.Namespace) -> dict:
    ids = out.parent / "calib.npy"
    if not ids.is_file():
        import numpy as np

        np.save(ids, np.random.default_rng(0).integers(4, 512, args.n_samples * args.seqlen * 2))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "streamq", "run", "--model", str(model), "--output", str(out),
                           "--overwrite", "--calib", str(ids), "--n-samples", str(args.n_samples), "--seqlen",
                           str(args.seqlen), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    info = json.loads((out / "streamq.json").read_text())
    return {"seconds": round(time.time() - start, 1),
            "peak_rss_bytes": max(b["peak_rss_bytes"] for b in info["blocks"]),
            "file_bytes": sum(p.stat().st_size for p in model.iterdir() if p.name != "config.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sources = models(args.work, args.hidden, args.ffn, args.layers)
    results = {kind: run(path, args.work / f"out-{kind}", args) for kind, path in sources.items()}
    same = all((args.work / "out-bin" / p.name).read_bytes() == p.read_bytes()
               for p in sorted((args.work / "out-safetensors").glob("model*")))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU float32; "
          f"OPT hidden {args.hidden}, FFN {args.ffn}, {args.layers} blocks; {args.n_samples} x {args.seqlen} tokens")
    print("| source | file | seconds | peak RSS |")
    print("|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['file_bytes'] / MiB:.0f} MiB | {r['seconds']} | {r['peak_rss_bytes'] / MiB:.0f} MiB |")
    diff = (results["bin"]["peak_rss_bytes"] - results["safetensors"]["peak_rss_bytes"]) / MiB
    print(f".bin - safetensors peak RSS: {diff:+.0f} MiB; outputs byte-identical: {same}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"work": str(args.work), "json": str(args.json)},
                                         "results": results, "identical": same}, indent=2) + "\n")


if __name__ == "__main__":
    main()
