"""The Gram-matrix loss (streamq/gram.py) against the forward pass on a real model, two ways:
per scale group judged on one linear's own output, both searches' seconds and picks, and where
the picks differ how close the forward pass finds the two (a near-tie); then whole runs with
--gram-loss and --no-gram-loss on each calibration/evaluation text pair: seconds and perplexity.

    python tools/bench_gram.py --model ~/.cache/streamq/smollm2-135m --group-size 64 \\
        --pair calib-python-reference.txt eval-docutils-docs.txt --pair eval-docutils-docs.txt calib-python-reference.txt
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from streamq import engine
from streamq.block import capture, captured_inputs, search_input
from streamq.calib import calibration_blocks
from streamq.config import CalibConfig, QuantConfig
from streamq.families import detect
from streamq.models import load_tokenizer
from streamq.ppl import perplexity
from streamq.reference import first_block_inputs
from streamq.search import act_scale, search_scale, search_scale_gram


@torch.no_grad()
def compare_picks(model_dir: Path, qcfg: QuantConfig, calib: CalibConfig) -> list[dict]:
    """Block by block on the unquantized model (float32, CPU), each own-output group searched both ways."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    family = detect(model.config)
    layers = model.get_submodule(family.layers_prefix)
    ids = calibration_blocks(calib, load_tokenizer(model_dir), model.config.vocab_size)
    cpu = torch.device("cpu")
    x_chunks = first_block_inputs(model, layers[0], ids, 16, cpu)
    rows = []
    for i, block in enumerate(layers):
        kwargs = family.block_kwargs(model.config, calib.seqlen, cpu, torch.float32, i)
        feats, outs = capture(block, x_chunks, kwargs, captured_inputs(block, family, model.config))
        for group in family.scale_groups(model.config):
            if not group.own_output:
                continue
            x = feats[search_input(group)]
            linear = block.get_submodule(group.inspect)
            t0 = time.perf_counter()
            _, by_tokens = search_scale(linear, [linear], x, act_scale(x), {}, qcfg)
            t1 = time.perf_counter()
            _, by_gram = search_scale_gram(linear, x, act_scale(x), qcfg)
            t2 = time.perf_counter()
            pick_t, pick_g = (min(range(len(v)), key=v.__getitem__) for v in (by_tokens, by_gram))
            rows.append({"block": i, "group": f"{group.prev_op} -> {group.inspect}", "tokens_s": t1 - t0,
                         "gram_s": t2 - t1, "pick_tokens": pick_t, "pick_gram": pick_g,
                         # how much worse the forward pass finds the Gram's pick than its own
                         "gap": (by_tokens[pick_g] - by_tokens[pick_t]) / by_tokens[pick_t],
                         "max_rel_diff": max(abs(a - b) / a for a, b in zip(by_tokens, by_gram))})
        x_chunks = outs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-gram"))
    parser.add_argument("--pair", nargs=2, action="append", type=Path, metavar=("CALIB", "EVAL"), required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=2048, help="evaluation segment length")
    parser.add_argument("--max-segments", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    qcfg = QuantConfig(group_size=args.group_size)
    calib = CalibConfig(source=str(args.pair[0][0]), n_samples=args.n_samples, seqlen=args.calib_seqlen)
    rows = compare_picks(args.model, qcfg, calib)
    print("| block | group | forward pass s | Gram s | pick (forward) | pick (Gram) | gap | max rel. loss diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['group']} | {r['tokens_s']:.2f} | {r['gram_s']:.2f} | {r['pick_tokens']} | "
              f"{r['pick_gram']} | {r['gap']:.2e} | {r['max_rel_diff']:.1e} |")
    differ = [r for r in rows if r["pick_tokens"] != r["pick_gram"]]
    speed = sum(r["tokens_s"] for r in rows) / sum(r["gram_s"] for r in rows)
    print(f"\n{len(rows)} groups, {len(rows) - len(differ)} same pick, {len(differ)} differ (largest gap "
          f"{max([r['gap'] for r in differ] or [0]):.2e}); these groups' search {speed:.1f}x faster\n")

    runs = []
    for calib_text, eval_text in args.pair:
        for gram_loss in (False, True):
            out = args.work / f"{calib_text.stem}-{'gram' if gram_loss else 'tokens'}"
            t0 = time.perf_counter()
            engine.quantize(args.model, out, QuantConfig(group_size=args.group_size, gram_loss=gram_loss),
                            CalibConfig(source=str(calib_text), n_samples=args.n_samples, seqlen=args.calib_seqlen),
                            device="cpu", overwrite=True)
            seconds = time.perf_counter() - t0
            ppl = perplexity(out, eval_text, seqlen=args.seqlen, max_segments=args.max_segments, device="cpu").ppl
            runs.append({"calib": calib_text.name, "eval": eval_text.name, "gram_loss": gram_loss,
                         "seconds": seconds, "ppl": ppl})
            print(f"calib {calib_text.name}, eval {eval_text.name}, {'--gram-loss' if gram_loss else '--no-gram-loss'}"
                  f": {seconds:.1f} s, ppl {ppl:.4f}", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\n{args.model.name}, AWQ INT4 g{args.group_size}, {args.n_samples} x {args.calib_seqlen} calibration "
          f"tokens, ppl {args.max_segments} x {args.seqlen}; {machine}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model.name, "settings": vars(args) | {"model": str(args.model)},
                                         "groups": rows, "runs": runs, "machine": machine}, indent=1, default=str))


if __name__ == "__main__":
    main()
