"""What the planner makes of real mixture-of-experts shapes, from their configs alone (no weights):
one block's size, the smallest --max-gpu-mem with the whole block on the GPU and with its
experts parked in host memory (one on the GPU at a time), and the plan at a few budgets.

    python tools/plan_moe.py                      # 128 x 512 calibration tokens, fp16, on a GPU
    python tools/plan_moe.py --budgets 8GB 24GB --n-samples 128 --seqlen 512

Prints a markdown table; the figures are the planner's estimates (tests/test_budget.py checks
them against measured peaks on tiny blocks, tools/gpu_check.py on a GPU).
"""

from __future__ import annotations

import argparse

import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from streamq.block import captured_inputs
from streamq.budget import BlockShape, format_bytes, forward_samples, plan_block
from streamq.cli import parse_size
from streamq.config import QuantConfig
from streamq.errors import SettingsError
from streamq.families import detect
from streamq.families.base import meta_block

MODELS = {  # the published configs' shapes (one decoder layer is all the planner reads)
    "Mixtral-8x7B": MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                  num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8,
                                  num_hidden_layers=32, vocab_size=32000),
    "Mixtral-8x22B": MixtralConfig(hidden_size=6144, intermediate_size=16384, num_local_experts=8,
                                   num_experts_per_tok=2, num_attention_heads=48, num_key_value_heads=8,
                                   num_hidden_layers=56, vocab_size=32768),
    "Qwen2-57B-A14B": Qwen2MoeConfig(hidden_size=3584, moe_intermediate_size=2560, num_experts=64,
                                     num_experts_per_tok=8, shared_expert_intermediate_size=20480,
                                     intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                                     num_hidden_layers=28, vocab_size=151936),
    "Qwen3-30B-A3B": Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                    num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                                    head_dim=128, num_hidden_layers=48, vocab_size=151936),
    "Qwen3-235B-A22B": Qwen3MoeConfig(hidden_size=4096, moe_intermediate_size=1536, num_experts=128,
                                      num_experts_per_tok=8, num_attention_heads=64, num_key_value_heads=4,
                                      head_dim=128, num_hidden_layers=94, vocab_size=151936),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--budgets", nargs="*", default=["8GB", "16GB", "24GB", "38GB"])
    parser.add_argument("--gptq", action="store_true", help="plan for awq+gptq")
    args = parser.parse_args()
    qcfg = QuantConfig(gptq=args.gptq)
    budgets = [parse_size(b) for b in args.budgets]
    print(f"{args.n_samples} x {args.seqlen} tokens, fp16, forward passes of the GPU's fixed size, "
          f"{'awq+gptq' if args.gptq else 'awq'}\n")
    print("| model | block (fp16) | experts | samples a pass | smallest budget, whole block | smallest, experts parked | "
          + " | ".join(f"plan at {b}" for b in args.budgets) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(budgets))
    for name, config in MODELS.items():
        family = detect(config)
        block = meta_block(config)
        shape = BlockShape.of(block, captured_inputs(block, family, config), family.scale_groups(config),
                              qcfg.group_size, qcfg.clip_tokens)
        micro = forward_samples(torch.device("cuda"), shape, args.n_samples, args.seqlen, 2)

        def plan(budget, park=None):
            return plan_block(shape, args.n_samples, args.seqlen, 2, budget, micro=micro, gptq=args.gptq, park=park)

        cells = []
        for budget in budgets:
            try:
                p = plan(budget)
                cells.append(f"{p.chunk_samples} x {'device' if p.activations_on_device else 'host'}"
                             f"{', parked' if p.experts_parked else ''} ({format_bytes(p.estimated_peak_bytes)})")
            except SettingsError:
                cells.append("too small")
        print(f"| {name} | {format_bytes(shape.weight_elems * 2)} | {format_bytes(shape.parkable_elems * 2)} | {micro} | "
              f"{format_bytes(plan(None, park=False).minimum_bytes)} | {format_bytes(plan(None, park=True).minimum_bytes)}"
              f" | " + " | ".join(cells) + " |")
    print("\ncells: samples per chunk x where activations live, 'parked': experts in host memory, "
          "one at a time on the GPU (estimated peak)")


if __name__ == "__main__":
    main()
