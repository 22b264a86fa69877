"""streamq's methods side by side on a real model: perplexity, wall time and peak RSS of AWQ,
GPTQ and AWQ+GPTQ (and RTN) at INT4 and INT3, on two calibration/evaluation text pairs whose
roles are swapped (each text calibrates once and is evaluated once); the -seq rows feed each
block the quantized previous block's output (--next-input quantized) instead of the fp16 one.

    python tools/bench_methods.py --model ~/.cache/streamq/smollm2-135m --texts ~/.cache/streamq \\
        --n-samples 16 --seqlen 256 --eval-segments 8 --out docs/results/methods.json

Each run is a fresh `streamq run` process (its own peak RSS), then `streamq ppl --json`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {  # label -> run arguments
    "rtn": ["--mode", "rtn"],
    "awq": ["--method", "awq"],  # the default recipe
    "awq-paper": ["--method", "awq", "--recipe", "paper"],
    # the paper's recipe with one change each: what the default recipe is chosen from
    "awq-paper+duo": ["--recipe", "paper", "--duo-scaling"],
    "awq-paper+alpha1": ["--recipe", "paper", "--alpha-one"],
    "awq-paper+bos": ["--recipe", "paper", "--bos"],
    "awq-paper+clip2048": ["--recipe", "paper", "--clip-tokens", "2048"],
    "awq-paper+duo+identity": ["--recipe", "paper", "--duo-scaling", "--identity"],
    # llm-compressor's grid (duo scaling, s = 1, alpha up to 1), with and without streamq's clip search
    "awq-peer-grid": ["--recipe", "paper", "--duo-scaling", "--identity", "--alpha-one"],
    "awq-peer-grid-noclip": ["--recipe", "paper", "--duo-scaling", "--identity", "--alpha-one", "--no-clip"],
    "gptq": ["--method", "gptq"],
    "awq+gptq": ["--method", "awq+gptq"],
    "gptq-seq": ["--method", "gptq", "--next-input", "quantized"],  # the GPTQ paper's sequential order
    "awq+gptq-seq": ["--method", "awq+gptq", "--next-input", "quantized"],
    "gptq-act": ["--method", "gptq", "--gptq-act-order"],  # act-order, static groups
    "gptq-act-seq": ["--method", "gptq", "--gptq-act-order", "--next-input", "quantized"],
    "awq+gptq-act": ["--method", "awq+gptq", "--gptq-act-order"],
    "awq+gptq-act-seq": ["--method", "awq+gptq", "--gptq-act-order", "--next-input", "quantized"],
}
PAIRS = {  # label -> (calibration text, evaluation text)
    "pyref->docutils": ("calib-python-reference.txt", "eval-docutils-docs.txt"),
    "docutils->pyref": ("eval-docutils-docs.txt", "calib-python-reference.txt"),
}


def streamq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamq", *map(str, args)], capture_output=True, text=True)


def pivot(path: Path, baseline: str = "awq-paper") -> str:
    """The rows of a results file as one markdown table: a method per row, a (pair, bits) column
    each, every figure also as a change against `baseline` in its column, and the mean of the
    log-ratios over the columns (a geometric mean: each setting counts the same, whatever its ppl)."""
    rows = json.loads(path.read_text())["rows"]
    columns = list(dict.fromkeys((r["pair"], r["bits"]) for r in rows if r["method"] != "fp16"))
    ppl = {(r["pair"], r["bits"], r["method"]): r["ppl"] for r in rows}
    fp16 = {r["pair"]: r["ppl"] for r in rows if r["method"] == "fp16"}
    lines = ["| method | " + " | ".join(f"{p} INT{b}" for p, b in columns) + f" | mean vs {baseline} |",
             "|---" * (len(columns) + 2) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "fp16"):
        cells, logs = [], []
        for p, b in columns:
            value, base = ppl.get((p, b, method)), ppl.get((p, b, baseline))
            if value is None:
                cells.append("")
                continue
            logs.append(math.log(value / base))
            cells.append(f"{value:.3f}" if method == baseline else f"{value:.3f} ({(value / base - 1) * 100:+.1f} %)")
        mean = f"{(math.exp(sum(logs) / len(logs)) - 1) * 100:+.1f} %" if len(logs) == len(columns) else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
    lines.append("| fp16 | " + " | ".join(f"{fp16[p]:.3f}" for p, _ in columns) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the model (required unless --table)")
    parser.add_argument("--table", type=Path, help="print the markdown table of a results file and stop")
    parser.add_argument("--baseline", default="awq-paper", help="with --table: the row changes are measured against")
    parser.add_argument("--texts", type=Path, help="folder with the two texts (tools/make_texts.py)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-segments", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="also write every figure here (JSON)")
    parser.add_argument("--append", action="store_true", help="merge into --out: rows of the same pair, method "
                        "and bits are replaced, others kept (the settings must be the same)")
    args = parser.parse_args()
    if args.table:
        print(pivot(args.table, args.baseline))
        return
    if not args.model or not args.texts:
        parser.error("--model and --texts are required to run")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs.split(","):
            calib, evaluation = (args.texts / name for name in PAIRS[pair])
            ppl_args = ["--data", evaluation, "--seqlen", args.eval_seqlen, "--max-segments", args.eval_segments,
                        "--device", "cpu"]
            fp16 = Path(tmp) / f"fp16-{pair}.json"
            done = streamq("ppl", "--model", args.model, *ppl_args, "--json", fp16)
            if done.returncode:
                sys.exit(done.stderr)
            rows.append({"pair": pair, "method": "fp16", "bits": 16, "ppl": json.loads(fp16.read_text())["ppl"]})
            print(f"{pair} fp16: {rows[-1]['ppl']:.4f}", flush=True)
            for bits in args.bits.split(","):
                for method in args.methods.split(","):
                    out = Path(tmp) / f"{pair}-{method}-{bits}"
                    start = time.time()
                    done = streamq("run", "--model", args.model, "--output", out, "--calib", calib, "--n-samples",
                                   args.n_samples, "--seqlen", args.seqlen, "--w-bit", bits, "--group-size",
                                   args.group_size, "--device", "cpu", *METHODS[method])
                    seconds = time.time() - start
                    if done.returncode:
                        sys.exit(done.stderr)
                    info = json.loads((out / "streamq.json").read_text())
                    result = Path(tmp) / f"{pair}-{method}-{bits}.json"
                    done = streamq("ppl", "--model", out, *ppl_args, "--json", result)
                    if done.returncode:
                        sys.exit(done.stderr)
                    rows.append({"pair": pair, "method": method, "bits": int(bits),
                                 "ppl": json.loads(result.read_text())["ppl"], "seconds": round(seconds, 1),
                                 "peak_rss_gib": round(max(b["peak_rss_bytes"] for b in info["blocks"]) / 2**30, 2)})
                    print(f"{pair} {method} INT{bits}: ppl {rows[-1]['ppl']:.4f}, {seconds:.0f} s, "
                          f"peak RSS {rows[-1]['peak_rss_gib']} GiB", flush=True)
    settings = {"model": str(args.model), "group_size": args.group_size, "calibration": f"{args.n_samples} x "
                f"{args.seqlen}", "evaluation": f"{args.eval_segments} x {args.eval_seqlen}",
                "machine": f"{platform.processor() or platform.machine()}, CPU"}
    print(f"\n{settings}")
    print("| pair | method | bits | ppl | seconds | peak RSS GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['method']} | {r['bits']} | {r['ppl']:.4f} | {r.get('seconds', '')} | "
              f"{r.get('peak_rss_gib', '')} |")
    if args.out and args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        if {k: v for k, v in old["settings"].items() if k != "machine"} != \
                {k: v for k, v in settings.items() if k != "machine"}:
            sys.exit(f"--append: {args.out} holds other settings: {old['settings']}")
        new = {(r["pair"], r["method"], r["bits"]) for r in rows}
        rows = [r for r in old["rows"] if (r["pair"], r["method"], r["bits"]) not in new] + rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
