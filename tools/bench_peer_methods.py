"""streamq against llm-compressor 0.14 for every method both have, in one run: AWQ, GPTQ and
AWQ+GPTQ at each bit width, each tool with its defaults and then both at equal settings; per run
the perplexity of the output, wall time and peak RSS of the quantizing process. Same model, same
calibration token blocks, same evaluation tokens, same device; fresh processes, one at a time.

    bash tools/install_peer.sh .peer
    python tools/bench_peer_methods.py --model ~/.cache/streamq/smollm2-135m --work /tmp/pm \\
        --bits 4 3 --n-samples 8 --calib-seqlen 256 --section methods

"Equal settings" means the same algorithm choices, so that a difference in perplexity is an
implementation's, not a recipe's:
- AWQ: duo scaling, alpha = i/20 for i < 20, no clip search (the peer has none), on both sides
  (the peer's grid replaced by streamq's through tools/peer_awq.py --grid streamq, printed).
- GPTQ: act-order with static groups and each block calibrated on the quantized previous blocks'
  output (the peer's sequential pipeline propagates quantized outputs), dampening 0.01.
- AWQ+GPTQ: both of the above.
"bf16" runs each tool's defaults in bfloat16 (streamq --compute-dtype bfloat16, the peer's model
loaded as bfloat16; its --dtype is otherwise float32).
The peer's output (compressed-tensors) is decompressed to fp16 by its own library before
`streamq ppl` evaluates it; streamq's output is evaluated as written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from bench_peer import HERE, ROOT, dir_bytes, machine, peer_version, write_section
from bench_stream import run

from streamq import assets
from streamq.calib import cut_blocks, load_tokens, tokens_digest
from streamq.config import CalibConfig
from streamq.models import load_config, load_tokenizer
from streamq.ppl import eval_tokens, perplexity

# (method, setting) -> (streamq run arguments, peer quantize arguments)
RUNS = {
    ("awq", "defaults"): (["--method", "awq"], ["--method", "awq"]),
    ("awq", "equal"): (["--method", "awq", "--recipe", "paper", "--duo-scaling", "--no-clip"],
                       ["--method", "awq", "--grid", "streamq", "--duo-scaling", "true"]),
    ("gptq", "defaults"): (["--method", "gptq"], ["--method", "gptq"]),
    ("gptq", "equal"): (["--method", "gptq", "--gptq-act-order", "--next-input", "quantized"],
                        ["--method", "gptq", "--actorder", "static"]),
    # bf16: each tool's defaults computing in bfloat16 (a CPU with AMX multiplies bf16 ~7x faster)
    ("awq", "bf16"): (["--method", "awq", "--compute-dtype", "bfloat16"], ["--method", "awq", "--dtype", "bfloat16"]),
    ("gptq", "bf16"): (["--method", "gptq", "--compute-dtype", "bfloat16"], ["--method", "gptq", "--dtype", "bfloat16"]),
    ("awq+gptq", "defaults"): (["--method", "awq+gptq"], ["--method", "awq+gptq"]),
    ("awq+gptq", "equal"): (["--method", "awq+gptq", "--recipe", "paper", "--duo-scaling", "--no-clip",
                             "--gptq-act-order", "--next-input", "quantized"],
                            ["--method", "awq+gptq", "--grid", "streamq", "--duo-scaling", "true",
                             "--actorder", "static"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", help="model name for the table")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--peer-python", default=str(ROOT / ".peer" / "bin" / "python"))
    parser.add_argument("--calib", type=Path, help="calibration text (default: the built-in Python reference)")
    parser.add_argument("--data", type=Path, help="evaluation text (default: the docutils docs text)")
    parser.add_argument("--runs", nargs="+", default=[f"{m}:{s}" for m, s in RUNS],
                        help="method:settings pairs to run (default: all of " + ", ".join(f"{m}:{s}" for m, s in RUNS)
                        + ")")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=512, help="evaluation segment length")
    parser.add_argument("--max-segments", type=int, default=8)
    parser.add_argument("--section", required=True, help="name of this table's section in --md")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    args.runs = [tuple(r.split(":", 1)) for r in args.runs]
    if unknown := [r for r in args.runs if r not in RUNS]:
        parser.error(f"unknown --runs {unknown}")
    if not Path(args.peer_python).is_file():
        sys.exit(f"no peer interpreter at {args.peer_python}: run tools/install_peer.sh first")

    model, work = args.model.resolve(), args.work
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, hf_config = load_tokenizer(model), load_config(model)
    ccfg = CalibConfig(source=str(args.calib or assets.calibration_text()), n_samples=args.n_samples,
                       seqlen=args.calib_seqlen)
    blocks = cut_blocks(load_tokens(ccfg, tokenizer), ccfg, hf_config.vocab_size)
    flat, blocks2d = work / "calib-flat.npy", work / "calib-blocks.npy"
    np.save(flat, blocks.reshape(-1).numpy())
    np.save(blocks2d, blocks.numpy())
    data = args.data or assets.evaluation_text()
    ids = work / "eval-ids.pt"
    torch.save(eval_tokens(Path(data), tokenizer), ids)

    def ppl(path: Path) -> float:
        return perplexity(path, ids, seqlen=args.seqlen, max_segments=args.max_segments, device="cpu").ppl

    base = ppl(model)
    print(f"fp16 ppl {base:.4f}", flush=True)
    rows = []
    for bits in args.bits:
        for method, setting in args.runs:
            ours, theirs = RUNS[(method, setting)]
            for tool in ("streamq", "llm-compressor"):
                out = work / f"{tool}-{method}-{setting}-{bits}"
                if tool == "streamq":
                    cmd = ["streamq", "run", "--model", str(model), "--output", str(out), "--overwrite",
                           "--calib", str(flat), "--n-samples", str(args.n_samples), "--seqlen",
                           str(args.calib_seqlen), "--w-bit", str(bits), "--group-size", str(args.group_size),
                           "--device", "cpu", *ours]
                else:
                    cmd = [args.peer_python, str(HERE / "peer_awq.py"), "quantize", "--model", str(model),
                           "--calib", str(blocks2d), "--out", str(out), "--bits", str(bits), "--group-size",
                           str(args.group_size), "--dtype", "float32", *theirs]
                rss, seconds = run(cmd, out.with_suffix(".log"))
                evaluated = out
                if tool == "streamq":
                    info = json.loads((out / "streamq.json").read_text())
                    if info["calib"]["tokens_sha256"] != tokens_digest(blocks):
                        sys.exit("streamq did not quantize with the benchmark's calibration blocks")
                else:
                    evaluated = out.with_name(out.name + "-fp16")
                    subprocess.run([args.peer_python, str(HERE / "peer_awq.py"), "decompress", "--src", str(out),
                                    "--dst", str(evaluated)], check=True, capture_output=True)
                row = {"bits": bits, "method": method, "setting": setting, "tool": tool, "ppl": ppl(evaluated),
                       "seconds": round(seconds, 1), "rss": rss, "bytes": dir_bytes(out),
                       "command": " ".join(cmd[cmd.index("--output" if tool == "streamq" else "--out") + 2:])}
                rows.append(row)
                print(f"INT{bits} {method} {setting} {tool}: ppl {row['ppl']:.4f}, {seconds:.0f} s, "
                      f"peak RSS {rss / 2**30:.2f} GiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"fp16": base, "rows": rows}, indent=1) + "\n")
    write_section(args.md, args.section, table(args, rows, base, blocks))


def table(args: argparse.Namespace, rows: list[dict], base: float, blocks: torch.Tensor) -> str:
    lines = [f"### {args.name or args.model.name}: AWQ, GPTQ, AWQ+GPTQ against llm-compressor, group size "
             f"{args.group_size}", "", f"fp16 perplexity {base:.3f}.", "",
             "| bits | method | settings | tool | ppl | ppl vs peer | time s | time vs peer | peak RSS GiB "
             "| RSS vs peer |", "|---|---|---|---|---|---|---|---|---|---|"]
    peer = {(r["bits"], r["method"], r["setting"]): r for r in rows if r["tool"] == "llm-compressor"}
    for r in rows:
        p = peer[(r["bits"], r["method"], r["setting"])]
        vs = (f"{(r['ppl'] / p['ppl'] - 1) * 100:+.1f} %", f"{r['seconds'] / p['seconds']:.2f}",
              f"{r['rss'] / p['rss']:.2f}") if r["tool"] == "streamq" else ("", "", "")
        lines.append(f"| {r['bits']} | {r['method']} | {r['setting']} | {r['tool']} | {r['ppl']:.3f} | {vs[0]} "
                     f"| {r['seconds']:.0f} | {vs[1]} | {r['rss'] / 2**30:.2f} | {vs[2]} |")
    settings = "; ".join(f"{m} {s}: streamq `{' '.join(RUNS[(m, s)][0])}`, peer `{' '.join(RUNS[(m, s)][1])}`"
                         for m, s in args.runs)
    lines += ["", f"Calibration {args.n_samples} x {args.calib_seqlen} tokens of "
              f"{Path(args.calib or assets.calibration_text()).name} (the same blocks for both, sha256 "
              f"{tokens_digest(blocks)[:12]}); perplexity `streamq ppl` on "
              f"{Path(args.data or assets.evaluation_text()).name}, {args.max_segments} x {args.seqlen} tokens; CPU, "
              "float32 compute on both sides (the peer loads the model as float32) unless a run says otherwise. "
              "Runs: " + settings + ".",
              "", f"Machine: {machine()}; {datetime.date.today().isoformat()}. Peer: {peer_version(args.peer_python)}; streamq under torch "
              f"{torch.__version__}.", "", "Command: `python tools/bench_peer_methods.py " + " ".join(sys.argv[1:]) + "`"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
