"""What the planner makes of real mixture-of-experts shapes, from their configs alone (no weights):
one sparse block's size, the smallest --max-gpu-mem with the whole block on the GPU and with its
experts parked (read from the shards at each use, one on the GPU at a time), the host memory
expected and the bytes the parked experts move per block (bf16 and FP8 sources), and the plan at
a few budgets.

    python tools/plan_moe.py                      # 128 x 512 calibration tokens, fp16, on a GPU
    python tools/plan_moe.py --budgets 8GB 24GB --n-samples 128 --seqlen 512

Prints a markdown table; the figures are the planner's estimates (tests/test_budget.py checks
them against measured peaks on tiny blocks, tools/gpu_check.py on a GPU).
"""

from __future__ import annotations

import argparse

import torch
from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from streamq.block import block_groups, captured_inputs
from streamq.budget import BlockShape, format_bytes, forward_samples, host_bytes, parked_reads, plan_block
from streamq.cli import parse_size
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import SettingsError
from streamq.families import detect
from streamq.families.base import meta_block
from streamq.forecast import block_plan

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
    "DeepSeek-V3 / R1": DeepseekV3Config(),  # its defaults are DeepSeek-V3's published shapes
    # Kimi-K2: DeepSeek-V3's architecture with 384 experts, 64 heads, one dense layer
    "Kimi-K2": DeepseekV3Config(n_routed_experts=384, num_attention_heads=64, num_key_value_heads=64,
                                first_k_dense_replace=1, n_group=1, topk_group=1, vocab_size=163840,
                                routed_scaling_factor=2.827),
}
FP8_BYTES = 1 + 4 / (128 * 128)  # an e4m3 value and its share of its 128 x 128 block's float32 scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--budgets", nargs="*", default=["8GB", "16GB", "24GB", "38GB"])
    parser.add_argument("--gptq", action="store_true", help="plan for awq+gptq")
    args = parser.parse_args()
    qcfg = QuantConfig(gptq=args.gptq)
    budgets = [parse_size(b) for b in args.budgets]
    print(f"{args.n_samples} x {args.seqlen} tokens, 16-bit, forward passes of the GPU's fixed size, "
          f"{'awq+gptq' if args.gptq else 'awq'}\n")
    print("| model | sparse block (16-bit) | experts | samples a pass | smallest budget, whole block | "
          "smallest, the model (experts parked) | " + " | ".join(f"plan at {b}" for b in args.budgets) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(budgets))
    calib, cuda = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen), torch.device("cuda")
    for name, config in MODELS.items():
        family = detect(config)
        block = meta_block(config, family.kinds(config)[-1])  # the sparse kind (DeepSeek-V3's first layers are dense)
        shape = BlockShape.of(block, captured_inputs(block, family, config), block_groups(block, family, config),
                              qcfg.group_size, qcfg.clip_tokens)
        micro = forward_samples(cuda, shape, args.n_samples, args.seqlen, 2)

        def plan(budget, park=None):
            return plan_block(shape, args.n_samples, args.seqlen, 2, budget, micro=micro, gptq=args.gptq, park=park)

        cells = []
        for budget in budgets:
            try:  # the whole model's plan, every kind of block, as `streamq plan` makes it
                largest, p = block_plan(config, family, qcfg, calib, cuda, torch.bfloat16, budget)
            except SettingsError:
                cells.append("too small")
                continue
            host = host_bytes(largest, p, args.n_samples, args.seqlen, 2, 2, cuda=True)
            cell = (f"{p.chunk_samples} x {'device' if p.activations_on_device else 'host'}"
                    f"{', parked' if p.experts_parked else ''}: {format_bytes(p.estimated_peak_bytes)} GPU, "
                    f"{format_bytes(host)} host")
            reads = parked_reads(p, args.n_samples, qcfg.n_grid)
            if reads:
                moved = " / ".join(format_bytes(int(shape.parkable_elems * b * reads)) for b in (2, FP8_BYTES))
                cell += f", experts moved {moved}"
            cells.append(cell)
        whole = block_plan(config, family, qcfg, calib, cuda, torch.bfloat16, None)[1].minimum_bytes
        print(f"| {name} | {format_bytes(shape.weight_elems * 2)} | {format_bytes(shape.parkable_elems * 2)} | "
              f"{micro} | "
              f"{format_bytes(plan(None, park=False).minimum_bytes)} | {format_bytes(whole)}"
              " | " + " | ".join(cells) + " |")
    print("\ncells: samples per chunk x where activations live ('parked': experts read from the shards at each use, "
          "one at a time on the GPU): estimated GPU peak, host memory, and the bytes the parked experts move per "
          "block from a bf16 / an FP8 source (read from the shards, uploaded, decoded on the GPU)")


if __name__ == "__main__":
    main()
