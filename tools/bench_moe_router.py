"""Should the router absorb the post-attention norm's AWQ scale? streamq folds s into the router
(its weight times s along its inputs, unquantized), so that routing is what the unscaled model
routes; AutoAWQ's Mixtral recipe leaves the router out (it then reads x / s). This runs both on
tiny random MoE models with planted salient channels (tools/make_tiny_model.py) and reports the
perplexity of each output and how many of block 0's top-k choices equal the fp16 model's.

    python tools/bench_moe_router.py --work /tmp/moe-router
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_model import make_tiny  # noqa: E402

from streamq import assets, engine  # noqa: E402
from streamq.calib import load_tokens  # noqa: E402
from streamq.config import CalibConfig, QuantConfig  # noqa: E402
from streamq.families import build_block, detect  # noqa: E402
from streamq.formats import by_name, dense_state  # noqa: E402
from streamq.models import load_config, load_tokenizer  # noqa: E402
from streamq.ppl import perplexity  # noqa: E402
from streamq.shards import ShardReader  # noqa: E402


def without_absorbers(family):
    def groups(config):
        return [dataclasses.replace(g, absorbers=()) for g in family.scale_groups(config)]
    return dataclasses.replace(family, scale_groups=groups)


def routing(model: Path, raw: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Block 0's top-k expert choices [tokens, k] (sorted) for these token ids."""
    config = load_config(model)
    family = detect(config)
    block = build_block(config, 0, raw, torch.device("cpu"), torch.float32)
    emb = ShardReader(model).get(family.embed_weight).float()
    x = emb[ids][None]
    moe = next(m for n, m in block.named_modules() if type(m).__name__ == "SparseMoe")
    seen = []
    hook = moe.gate.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        block(x, **family.block_kwargs(config, x.shape[1], torch.device("cpu"), torch.float32))
    hook.remove()
    return torch.topk(seen[0], moe.top_k, dim=-1).indices.sort(dim=-1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()
    evals = {"docutils": assets.evaluation_text(), "pyref": assets.calibration_text()}
    print("| family | router | ppl docutils | ppl pyref | block-0 top-k choices equal to fp16 |")
    print("|---|---|---|---|---|")
    for i, name in enumerate(("mixtral", "qwen2_moe", "qwen3_moe")):
        model = args.work / name
        if not (model / "config.json").is_file():
            make_tiny(model, name, hidden=256, ffn=256, layers=2, heads=4, seed=70 + i)
        tok = load_tokenizer(model)
        ids = load_tokens(CalibConfig(source=str(evals["docutils"])), tok)[:512]
        base = routing(model, ShardReader(model).with_prefix("model.layers.0."), ids)
        fp16 = [perplexity(model, text, seqlen=128, device="cpu", max_segments=16).ppl for text in evals.values()]
        print(f"| {name} | fp16 | {fp16[0]:.3f} | {fp16[1]:.3f} | |", flush=True)
        family = detect(load_config(model))
        for label, fam in (("absorbs s (streamq)", family), ("left out (AutoAWQ)", without_absorbers(family))):
            out = args.work / f"{name}-{label.split()[0]}"
            original = engine.detect
            engine.detect = lambda config, fam=fam: fam
            try:
                engine.quantize(model, out, QuantConfig(), CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen),
                                device="cpu", overwrite=True)
            finally:
                engine.detect = original
            raw = dense_state(by_name("awq"), ShardReader(out).with_prefix("model.layers.0."), 4, torch.device("cpu"))
            same = (routing(model, raw, ids) == base).all(dim=-1).float().mean()
            ppl = [perplexity(out, text, seqlen=128, device="cpu", max_segments=16).ppl for text in evals.values()]
            print(f"| {name} | {label} | {ppl[0]:.3f} | {ppl[1]:.3f} | {same:.1%} |", flush=True)


if __name__ == "__main__":
    main()
