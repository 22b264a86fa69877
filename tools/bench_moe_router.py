"""Should the router absorb the post-attention norm's AWQ scale? streamq folds s into the router
(its weight times s along its inputs, unquantized), so that routing is what the unscaled model
routes; AutoAWQ's Mixtral recipe leaves the router out (it then reads x / s). This runs both on
tiny random MoE models with planted salient channels (tools/make_tiny_model.py) and reports the
perplexity of each output and how many of the first sparse block's expert choices equal the
original model's (fp16; DeepSeek-V3 and GLM-4.5 in bf16, their routers float32).

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

from streamq import assets, engine, models  # noqa: E402
from streamq.calib import load_tokens  # noqa: E402
from streamq.config import CalibConfig, QuantConfig  # noqa: E402
from streamq.families import build_block, detect  # noqa: E402
from streamq.formats import by_name, dense_state  # noqa: E402
from streamq.models import load_config, load_tokenizer  # noqa: E402
from streamq.ppl import perplexity  # noqa: E402
from streamq.shards import ShardReader  # noqa: E402


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe")


def without_absorbers(family):
    def groups(config):
        return [dataclasses.replace(g, absorbers=()) for g in family.scale_groups(config)]
    return dataclasses.replace(family, scale_groups=groups)


def sparse_block(model: Path) -> int:
    """The first block with a sparse MLP (DeepSeek-V3's first layers are dense)."""
    config = load_config(model)
    return detect(config).kinds(config)[-1]


def routing(model: Path, raw: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The first sparse block's expert choices [tokens, k] (sorted) for these token ids, the
    block fed their embeddings: the experts its routing rule selects (top-k of the softmax;
    DeepSeek-V3's biased choice among the best groups)."""
    config = load_config(model)
    family = detect(config)
    block = build_block(config, sparse_block(model), raw, torch.device("cpu"), torch.float32)
    emb = ShardReader(model).get(family.embed_weight).float()
    x = emb[ids][None]
    moe = next(m for n, m in block.named_modules() if type(m).__name__ == "SparseMoe")
    seen = []
    hook = moe.gate.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        block(x, **family.block_kwargs(config, x.shape[1], torch.device("cpu"), torch.float32))
    hook.remove()
    return moe.select(seen[0], moe.gate)[1].sort(dim=-1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    evals = {"docutils": assets.evaluation_text(), "pyref": assets.calibration_text()}
    print("| family | router | ppl docutils | ppl pyref | top-k choices equal to the original's |")
    print("|---|---|---|---|---|")
    for i, name in enumerate(FAMILIES):
        if name not in args.families:
            continue
        model = args.work / name
        if not (model / "config.json").is_file():
            make_tiny(model, name, hidden=256, ffn=256, layers=2, heads=4, seed=70 + i)
        tok = load_tokenizer(model)
        ids = load_tokens(CalibConfig(source=str(evals["docutils"])), tok)[:512]
        prefix = f"model.layers.{sparse_block(model)}."
        base = routing(model, ShardReader(model).with_prefix(prefix), ids)
        fp16 = [perplexity(model, text, seqlen=128, device="cpu", max_segments=16).ppl for text in evals.values()]
        print(f"| {name} | original | {fp16[0]:.3f} | {fp16[1]:.3f} | |", flush=True)
        family = detect(load_config(model))
        for label, fam in (("absorbs s (streamq)", family), ("left out (AutoAWQ)", without_absorbers(family))):
            out = args.work / f"{name}-{label.split()[0]}"
            original = models.detect  # the family the engine opens the checkpoint with
            models.detect = lambda config, fam=fam: fam
            try:
                engine.quantize(model, out, QuantConfig(), CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen),
                                device="cpu", overwrite=True)
            finally:
                models.detect = original
            raw = dense_state(by_name("awq"), ShardReader(out).with_prefix(prefix), 4, torch.device("cpu"))
            same = (routing(model, raw, ids) == base).all(dim=-1).float().mean()
            ppl = [perplexity(out, text, seqlen=128, device="cpu", max_segments=16).ppl for text in evals.values()]
            print(f"| {name} | {label} | {ppl[0]:.3f} | {ppl[1]:.3f} | {same:.1%} |", flush=True)


if __name__ == "__main__":
    main()
