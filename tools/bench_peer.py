"""streamq against llm-compressor's AWQ, side by side: the same model, the same calibration token
blocks, INT4 with zero point and the same group size, on the same device, runs alternating. For
each run: wall time and peak RSS of the quantizing process (wait4), peak device memory (on GPU),
output size; then perplexity of both outputs with `streamq ppl` on the same evaluation tokens (the
peer's compressed-tensors output is first decompressed to fp16 by its own library).

    bash tools/install_peer.sh .peer                       # llm-compressor in its own venv
    python tools/bench_peer.py --model models/smollm2-135m --work /tmp/peer-bench --section smollm2
    python tools/bench_peer.py --wide 2 4 8 --work /tmp/peer-bench --section depth

--wide builds random LLaMA models of one block shape (tools/make_wide_model.py) with growing
depth, to show how each tool's memory grows with the model (no perplexity: the weights are
random). Each invocation writes its table into --md between markers named by --section.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from bench_stream import run
from make_wide_model import by_depth

from streamq import assets
from streamq.calib import cut_blocks, load_tokens, tokens_digest
from streamq.config import CalibConfig
from streamq.models import load_config, load_tokenizer
from streamq.ppl import eval_tokens, perplexity

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def group_size_for(hf_config) -> int:
    widths = [hf_config.hidden_size, getattr(hf_config, "intermediate_size", None) or hf_config.ffn_dim]
    return 128 if all(w % 128 == 0 for w in widths) else 64


def outputs_digest(path: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(path.glob("*.safetensors")):
        with shard.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def peer_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import llmcompressor, compressed_tensors, transformers, torch;"
                          "print(llmcompressor.__version__, compressed_tensors.__version__,"
                          " transformers.__version__, torch.__version__)"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1].split()
    return f"llmcompressor {out[0]}, compressed-tensors {out[1]}, transformers {out[2]}, torch {out[3]}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {ram:.0f} GiB RAM{gpu}"


class Bench:
    def __init__(self, args: argparse.Namespace, model: Path, work: Path, blocks: torch.Tensor, group_size: int):
        self.args, self.model, self.work, self.group_size = args, model, work, group_size
        work.mkdir(parents=True, exist_ok=True)
        self.flat, self.blocks2d = work / "calib-flat.npy", work / "calib-blocks.npy"
        np.save(self.flat, blocks.reshape(-1).numpy())  # streamq: exactly n_samples blocks, taken in order
        np.save(self.blocks2d, blocks.numpy())
        self.digest = tokens_digest(blocks)
        self.n, self.seqlen = blocks.shape
        self.patched = False  # set when the peer reports its one patch

    def streamq(self, out: Path) -> dict:
        a = self.args
        cmd = ["streamq", "run", "--model", str(self.model), "--output", str(out), "--overwrite",
               "--calib", str(self.flat), "--n-samples", str(self.n), "--seqlen", str(self.seqlen),
               "--group-size", str(self.group_size), "--device", a.device]
        if a.duo_scaling:
            cmd.append("--duo-scaling")
        rss, seconds = run(cmd, out.with_suffix(".log"))
        info = json.loads((out / "streamq.json").read_text())
        if info["calib"]["tokens_sha256"] != self.digest:
            sys.exit("streamq did not quantize with the benchmark's calibration blocks")
        gpu = [b["peak_gpu_bytes"] for b in info["blocks"] if b["peak_gpu_bytes"] is not None]
        return {"tool": "streamq", "seconds": seconds, "rss": rss, "gpu": max(gpu) if gpu else None,
                "bytes": dir_bytes(out), "out": str(out)}

    def peer(self, out: Path) -> dict:
        a = self.args
        shutil.rmtree(out, ignore_errors=True)
        cmd = [a.peer_python, str(HERE / "peer_awq.py"), "quantize", "--model", str(self.model), "--calib",
               str(self.blocks2d), "--out", str(out), "--group-size", str(self.group_size), "--dtype", a.peer_dtype]
        rss, seconds = run(cmd, out.with_suffix(".log"))
        if "pin_memory is a no-op" in out.with_suffix(".log").read_text():
            self.patched = True
        gpu = json.loads((out / "peer_run.json").read_text())["peak_gpu_bytes"]
        return {"tool": "llm-compressor", "seconds": seconds, "rss": rss, "gpu": gpu, "bytes": dir_bytes(out),
                "out": str(out)}

    def runs(self, tag: str, parity: int = 0) -> list[dict]:
        """args.repeats runs of each tool, alternating which goes first (from `parity`)."""
        rows = []
        for r in range(self.args.repeats):
            order = [("streamq", self.streamq), ("peer", self.peer)]
            for name, fn in order if (r + parity) % 2 == 0 else order[::-1]:
                row = fn(self.work / f"{name}-{tag}-r{r}")
                row.update(run=r + 1, tag=tag)
                print(f"{tag} run {r + 1} {row['tool']}: {row['seconds']:.0f} s, peak RSS {row['rss'] / 2**30:.2f} GiB",
                      flush=True)
                rows.append(row)
        return rows


def gib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def write_section(md: Path, section: str, body: str) -> None:
    begin, end = f"<!-- bench_peer:{section} -->", f"<!-- /bench_peer:{section} -->"
    text = md.read_text() if md.is_file() else "# streamq against llm-compressor\n\nWritten by tools/bench_peer.py.\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)


def real_model(args: argparse.Namespace) -> str:
    model = args.model.resolve()
    hf_config = load_config(model)
    tokenizer = load_tokenizer(model)
    calib_src = args.calib or assets.calibration_text()
    blocks = cut_blocks(load_tokens(CalibConfig(source=str(calib_src), n_samples=args.n_samples,
                                                seqlen=args.calib_seqlen), tokenizer),
                        CalibConfig(n_samples=args.n_samples, seqlen=args.calib_seqlen), hf_config.vocab_size)
    g = args.group_size or group_size_for(hf_config)
    bench = Bench(args, model, args.work, blocks, g)
    data = args.data or assets.evaluation_text()
    ids_path = args.work / "eval-ids.pt"
    torch.save(eval_tokens(Path(data), tokenizer), ids_path)
    rows = bench.runs("model")

    def ppl(path: Path) -> float:
        return perplexity(path, ids_path, seqlen=args.seqlen, max_segments=args.max_segments, device=args.device).ppl

    base = ppl(model)
    first: dict[str, dict] = {}
    for row in rows:
        row["sha256"] = outputs_digest(Path(row["out"]))
        same = first.get(row["tool"])
        if same is not None and same["sha256"] == row["sha256"]:
            row["ppl"] = same["ppl"]  # byte-identical output: the same perplexity, not evaluated again
            print(f"{row['tool']} run {row['run']}: output identical to run {same['run']}", flush=True)
            continue
        out = Path(row["out"])
        if row["tool"] == "llm-compressor":
            fp16 = out.with_name(out.name + "-fp16")
            subprocess.run([args.peer_python, str(HERE / "peer_awq.py"), "decompress", "--src", str(out),
                            "--dst", str(fp16)], check=True, capture_output=True)
            out = fp16
        row["ppl"] = ppl(out)
        first.setdefault(row["tool"], row)
        print(f"{row['tool']} run {row['run']}: ppl {row['ppl']:.3f}", flush=True)
    lines = [f"### {args.name or model.name}: INT4, zero point, group size {g}"
             + (", streamq with --duo-scaling" if args.duo_scaling else ""),
             "", f"fp16 perplexity {base:.3f}; model {dir_bytes(model) / 1e9:.3f} GB (fp16).", "",
             "| run | tool | time s | peak RSS GiB | peak GPU GiB | output GB | ppl | ppl vs fp16 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['tool']} | {row['seconds']:.0f} | {gib(row['rss'])} | {gib(row['gpu'])} "
                     f"| {row['bytes'] / 1e9:.3f} | {row['ppl']:.3f} | {row['ppl'] - base:+.3f} |")
    lines += ["", *ratios(rows), "", settings(args, bench, f"Perplexity: `streamq ppl` on {Path(data).name}, "
                                              f"{args.max_segments or 'all'} segments x {args.seqlen} tokens. ")]
    (args.work / "rows-model.json").write_text(json.dumps(rows, indent=2))
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    def mean(tool: str, key: str) -> float:
        values = [r[key] for r in rows if r["tool"] == tool and r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    parts = [f"time {mean('streamq', 'seconds') / mean('llm-compressor', 'seconds'):.2f}",
             f"peak RSS {mean('streamq', 'rss') / mean('llm-compressor', 'rss'):.2f}"]
    if mean("streamq", "gpu") == mean("streamq", "gpu"):  # not NaN
        parts.append(f"peak GPU {mean('streamq', 'gpu') / mean('llm-compressor', 'gpu'):.2f}")
    if any("ppl" in r for r in rows):
        parts.append(f"ppl difference {mean('streamq', 'ppl') - mean('llm-compressor', 'ppl'):+.3f}")
    return ["streamq / llm-compressor (means over runs): " + ", ".join(parts) + "."]


def settings(args: argparse.Namespace, bench: Bench, extra: str) -> str:
    streamq = ("--duo-scaling (scale search with duo scaling on, clip search)" if args.duo_scaling
               else "defaults (scale search with duo scaling off (the paper), clip search)")
    patch = ("llm-compressor patched: `IntermediatesCache.pin_memory` made a no-op, as it raises without an "
             "accelerator (tools/peer_awq.py); nothing else changed." if bench.patched else "llm-compressor unpatched.")
    return "\n".join([
        f"Settings: calibration {bench.n} x {bench.seqlen} tokens (the same blocks for both, sha256 "
        f"{bench.digest[:12]}), device {args.device}, {args.repeats} run(s) per tool alternating; streamq "
        f"{streamq}; llm-compressor AWQModifier defaults "
        f"(duo scaling, n_grid 20, no clip search, min/max observer) + QuantizationModifier, model loaded as "
        f"{args.peer_dtype}. {extra}{patch}",
        "", f"Machine: {machine()}; {datetime.date.today().isoformat()}. Peer: {peer_version(args.peer_python)}; "
        f"streamq under torch {torch.__version__}.",
        "", "Command: `python tools/bench_peer.py " + " ".join(sys.argv[1:]) + "`",
    ])


def wide_models(args: argparse.Namespace) -> str:
    models = by_depth(args.work, args.wide, family="llama", hidden=args.hidden, ffn=args.ffn, heads=args.heads)
    blocks = torch.from_numpy(np.random.default_rng(0).integers(4, 512, (args.n_samples, args.calib_seqlen)))
    rows, bench = [], None
    for i, n in enumerate(sorted(args.wide)):
        model = models[n]
        bench = Bench(args, model, args.work / f"runs-{n}", blocks, args.group_size or 128)
        for row in bench.runs(f"wide{n}", parity=i):
            row.update(layers=n, model_gb=dir_bytes(model) / 1e9)
            rows.append(row)
    lines = [f"### Depth: random LLaMA blocks (hidden {args.hidden}, MLP {args.ffn}, {args.heads} heads), "
             f"INT4 g{args.group_size or 128}", "",
             "| layers | model GB (fp16) | run | tool | time s | s/block | peak RSS GiB | peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['model_gb']:.2f} | {r['run']} | {r['tool']} | {r['seconds']:.0f} "
                     f"| {r['seconds'] / r['layers']:.0f} | {gib(r['rss'])} | {gib(r['gpu'])} |")
    lines += ["", *ratios(rows), "", settings(args, bench, "")]
    (args.work / "rows-wide.json").write_text(json.dumps(rows, indent=2))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="a local checkpoint with tokenizer files")
    what.add_argument("--wide", type=int, nargs="+", help="depths of random wide LLaMA models to build and compare")
    parser.add_argument("--name", help="model name for the table")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--peer-python", default=str(ROOT / ".peer" / "bin" / "python"),
                        help="interpreter of the venv tools/install_peer.sh made")
    parser.add_argument("--calib", type=Path, help="calibration text (default: the built-in Python reference)")
    parser.add_argument("--data", type=Path, help="evaluation text (default: the docutils docs text)")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=2048, help="evaluation segment length")
    parser.add_argument("--max-segments", type=int, default=16)
    parser.add_argument("--group-size", type=int, help="default 128, or 64 where 128 does not divide the widths")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; both tools run there")
    parser.add_argument("--peer-dtype", help="dtype the peer loads the model in (default float32 on cpu, "
                        "where fp16 matmuls are >10x slower, else auto)")
    parser.add_argument("--duo-scaling", action="store_true", help="streamq with duo scaling, as the peer's default")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--section", required=True, help="name of this table's section in --md")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if not Path(args.peer_python).is_file():
        sys.exit(f"no peer interpreter at {args.peer_python}: run tools/install_peer.sh first")
    args.peer_dtype = args.peer_dtype or ("float32" if args.device == "cpu" else "auto")
    body = real_model(args) if args.model else wide_models(args)
    write_section(args.md, args.section, body)
    print(body)


if __name__ == "__main__":
    main()
