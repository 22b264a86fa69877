"""The results table: fp16, RTN, s=2 and AWQ at INT4 and INT3 on one model, each perplexity
measured with `streamq ppl` on the same evaluation text. Writes results.md (the seed tables'
shape plus the paper's ablation rows), results.json and ppl_vs_bits.png (needs matplotlib).

    python tools/results_table.py --model models/smollm2-135m --name SmolLM2-135M --group-size 64 \\
        --work /tmp/results --out docs/results
    python tools/results_table.py --model opt-1.3b --name OPT-1.3B --data wikitext2 --calib pileval ...

--model takes what `streamq run` takes (a directory, a Hub id, a short name); --data and --calib
a file or a data set by name.

Finished entries are kept in WORK/entries.json and skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from streamq import assets, engine
from streamq.config import CalibConfig, QuantConfig
from streamq.ppl import perplexity
from streamq.sources import resolve

MODES = ("rtn", "s2", "awq")
LABELS = {"fp16": "FP16", "rtn": "RTN", "s2": "s=2 (1% salient)", "awq": "AWQ"}


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))


def describe(data: str) -> str:
    """A text file by name and hash, a data set by name."""
    path = Path(data)
    return f"`{path.name}` (sha256 {assets.sha256_text(path)[:16]}…)" if path.is_file() else f"data set `{data}`"


def run_entries(args: argparse.Namespace) -> dict[str, dict]:
    args.work.mkdir(parents=True, exist_ok=True)
    entries_path = args.work / "entries.json"
    entries = json.loads(entries_path.read_text()) if entries_path.is_file() else {}
    calib = CalibConfig(source=str(args.calib), n_samples=args.n_samples, seqlen=args.calib_seqlen)
    jobs = [("fp16", 16)] + [(mode, bits) for bits in args.bits for mode in args.modes]
    for mode, bits in jobs:
        key = f"{mode}-int{bits}" if mode != "fp16" else "fp16"
        if key in entries:
            print(f"{key}: kept from {entries_path}")
            continue
        t0 = time.time()
        model_dir = args.source.path
        if mode != "fp16":
            model_dir = args.work / key
            engine.quantize(args.source.path, model_dir, QuantConfig(w_bit=bits, group_size=args.group_size, mode=mode),
                            calib, device=args.device, overwrite=True)
        quant_seconds = time.time() - t0
        result = perplexity(model_dir, args.data, seqlen=args.seqlen, max_segments=args.max_segments,
                            device=args.device)
        entries[key] = {"mode": mode, "bits": bits, "ppl": result.ppl, "bytes": checkpoint_bytes(model_dir),
                        "quant_seconds": round(quant_seconds, 1), "ppl_seconds": round(result.seconds, 1),
                        "segments": result.segments, "seqlen": result.seqlen}
        print(f"{key}: ppl {result.ppl:.3f}, {entries[key]['bytes'] / 1e9:.3f} GB, "
              f"quantized in {quant_seconds:.0f} s, evaluated in {result.seconds:.0f} s")
        entries_path.write_text(json.dumps(entries, indent=2))
    return entries


def markdown(args: argparse.Namespace, entries: dict[str, dict]) -> str:
    gb = lambda key: f"{entries[key]['bytes'] / 1e9:.3f}"  # noqa: E731
    ppl = lambda key: f"{entries[key]['ppl']:.2f}" if key in entries else "—"  # noqa: E731
    any_entry = entries["fp16"]
    lines = [
        f"# Results: {args.name}",
        "",
        f"Perplexity on {any_entry['segments']} segments x {any_entry['seqlen']} tokens of {describe(args.data)}; "
        f"calibration {args.n_samples} x {args.calib_seqlen} tokens of {describe(args.calib)}, a different "
        f"source; group size {args.group_size}, zero point; model {args.model}. "
        f"Measured by `tools/results_table.py` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPUs, device {args.device}, torch {torch.__version__}), {time.strftime('%Y-%m-%d')}.",
        "",
        "| model | ppl FP16 | ppl INT4 (AWQ) | ppl INT3 (AWQ) | size FP16 GB | size INT4 GB |",
        "|---|---|---|---|---|---|",
        f"| {args.name} | {ppl('fp16')} | {ppl('awq-int4')} | {ppl('awq-int3')} | {gb('fp16')} | "
        f"{gb('awq-int4') if 'awq-int4' in entries else '—'} |",
        "",
        "The paper's ablation rows (perplexity, lower is better):",
        "",
        "| method | " + " | ".join(f"INT{b} ppl" for b in args.bits) + " | " +
        " | ".join(f"INT{b} quantize s" for b in args.bits) + " |",
        "|---|" + "---|" * (2 * len(args.bits)),
        "| FP16 | " + " | ".join(ppl("fp16") for _ in args.bits) + " | " + " | ".join("—" for _ in args.bits) + " |",
    ]
    for mode in args.modes:
        keys = [f"{mode}-int{b}" for b in args.bits]
        lines.append(f"| {LABELS[mode]} | " + " | ".join(ppl(k) for k in keys) + " | " +
                     " | ".join(str(entries[k]["quant_seconds"]) if k in entries else "—" for k in keys) + " |")
    lines += ["", "INT3 is stored in the 4-bit slots of the GEMM layout, so its checkpoint is the size of INT4's.", ""]
    return "\n".join(lines)


def plot(args: argparse.Namespace, entries: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    bits = sorted(args.bits)
    for mode in args.modes:
        xs = [b for b in bits if f"{mode}-int{b}" in entries]
        ax.plot(xs, [entries[f"{mode}-int{b}"]["ppl"] for b in xs], marker="o", label=LABELS[mode])
    ax.axhline(entries["fp16"]["ppl"], color="gray", linestyle="--", label="FP16")
    ax.set_xticks(bits)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{args.name}: perplexity against bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory, a Hub id or a short name")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id")
    parser.add_argument("--name", required=True, help="the model's name in the table")
    parser.add_argument("--work", type=Path, required=True, help="quantized checkpoints and finished entries")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.md/.json and the plot")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--calib", default=None, help="a file or a data set by name; default: the built-in "
                        "Python reference text")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--data", default=None, help="a file or a data set by name (wikitext2); default: the "
                        "docutils documentation text")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-segments", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.calib = args.calib or str(assets.calibration_text())
    args.data = args.data or str(assets.evaluation_text())
    args.source = resolve(args.model, args.revision)
    entries = run_entries(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown(args, entries))
    (args.out / "results.json").write_text(json.dumps(entries, indent=2) + "\n")
    try:
        plot(args, entries, args.out / "ppl_vs_bits.png")
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
