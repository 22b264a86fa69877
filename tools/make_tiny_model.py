"""Write a tiny random checkpoint of any supported family (sharded safetensors + a BPE tokenizer
trained on the built-in text) for tests and the quick start, from the family's own transformers
config class. Never fetches anything.

    python tools/make_tiny_model.py --family opt --out models/tiny-opt
    python tools/make_tiny_model.py --family gemma3_text --hidden 640 --ffn 2048 --layers 18 --heads 4 --kv-heads 1 \\
        --vocab 49152 --set head_dim=256 sliding_window=512 query_pre_attn_scalar=256 layer_types=null \\
        --tokenizer-from ~/.cache/streamq/smollm2-135m --shard-size 1GB --out models/gemma3-270m-shape
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the Python language reference shipped with Python."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from streamq.calib import builtin_text

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([builtin_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


WINDOW = 48  # shorter than the tests' 64-token samples: sliding-window masks matter
# model_type -> (config settings beyond the shared ones, the norms feeding scale groups)
OTHER_FAMILIES = {
    "mistral": ({"sliding_window": WINDOW}, ("input_layernorm", "post_attention_layernorm")),
    "qwen2": ({"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
              ("input_layernorm", "post_attention_layernorm")),
    "qwen3": ({}, ("input_layernorm", "post_attention_layernorm")),
    "gemma2": ({"sliding_window": WINDOW, "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0}, ("input_layernorm", "pre_feedforward_layernorm")),
    "gemma3_text": ({"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                     "query_pre_attn_scalar": 32}, ("input_layernorm", "pre_feedforward_layernorm")),
    "phi3": ({"sliding_window": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0},
             ("input_layernorm", "post_attention_layernorm")),
    # mixtures of experts: 4 experts, top-2 (the expert width is --ffn)
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None, "router_jitter_noise": 0.0},
                ("input_layernorm", "post_attention_layernorm")),
    "qwen2_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": None,
                   "shared_expert_intermediate_size": None, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "norm_topk_prob": False, "use_sliding_window": False},
                  ("input_layernorm", "post_attention_layernorm")),
    "qwen3_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": None, "decoder_sparse_step": 1,
                   "mlp_only_layers": [], "norm_topk_prob": True, "use_sliding_window": False},
                  ("input_layernorm", "post_attention_layernorm")),
    # DeepSeek-V3: MLA (ranks 128, heads of 32 + 16 rotary key dims and 32 value dims), 8 experts
    # in 2 groups (top-2 from the best group) and one shared expert, the first half of the layers
    # dense; bf16 with the router's correction bias in float32 (random), as DeepSeek-V3 publishes it
    "deepseek_v3": ({"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                     "moe_intermediate_size": None, "n_shared_experts": 1, "q_lora_rank": 128, "kv_lora_rank": 128,
                     "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "head_dim": 16,
                     "num_nextn_predict_layers": 1},
                    ("input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm",
                     "self_attn.kv_a_layernorm")),
    # GLM-4.5: DeepSeek-V3's MLPs and router under grouped-query attention with q/k biases
    "glm4_moe": ({"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                  "moe_intermediate_size": None, "n_shared_experts": 1, "attention_bias": True, "use_qk_norm": True,
                  "num_nextn_predict_layers": 1},
                 ("input_layernorm", "post_attention_layernorm")),
}
BF16 = {"deepseek_v3", "glm4_moe"}  # families written in bf16 (the rest in fp16)


def make_tiny(
    out: str | Path,
    family: str = "opt",
    hidden: int = 128,
    ffn: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab: int = 512,
    outlier_channels: int = 4,
    outlier_gain: float = 20.0,
    seed: int = 0,
    tokenizer: bool = True,
    max_shard_size: str = "200KB",
    config_extra: dict | None = None,
) -> Path:
    """A random fp16 model. `outlier_channels` input channels of every norm get `outlier_gain`
    times the weight, planting the salient activation channels AWQ is designed around. The
    families beyond OPT and LLaMA use a sliding window shorter than the tests' samples (48
    tokens) where they have one, so their masks are exercised. `config_extra` overrides config
    settings (OPT: word_embed_proj_dim, do_layer_norm_before, as opt-350m has them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    if family == "opt":
        config = OPTConfig(**{"hidden_size": hidden, "ffn_dim": ffn, "num_hidden_layers": layers,
                              "num_attention_heads": heads, "vocab_size": vocab, "max_position_embeddings": 1024,
                              "word_embed_proj_dim": hidden, "bos_token_id": 0, "eos_token_id": 1,
                              "pad_token_id": 1, **(config_extra or {})})
        model = OPTForCausalLM(config)
        norms = ("self_attn_layer_norm", "final_layer_norm")
        blocks = model.model.decoder.layers
    elif family == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                             vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=False,
                             bos_token_id=0, eos_token_id=1)
        model = LlamaForCausalLM(config)
        norms = ("input_layernorm", "post_attention_layernorm")
        blocks = model.model.layers
    elif family in OTHER_FAMILIES:
        extra, norms = OTHER_FAMILIES[family]
        extra = {k: ffn if v is None else v for k, v in extra.items()}  # expert widths: --ffn
        settings = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads or heads, head_dim=hidden // heads, vocab_size=vocab,
                        max_position_embeddings=1024, tie_word_embeddings=family.startswith("gemma"), bos_token_id=0,
                        eos_token_id=1, pad_token_id=1)
        if family in ("deepseek_v3", "glm4_moe"):
            settings["first_k_dense_replace"] = layers // 2
        config = AutoConfig.for_model(family, **{**settings, **extra, **(config_extra or {})})
        model = AutoModelForCausalLM.from_config(config)
        blocks = model.model.layers
    else:
        raise ValueError(f"unknown family {family!r}")
    with torch.no_grad():
        for block in blocks:
            for norm in norms:
                weight = block.get_submodule(norm).weight
                weight.normal_(1.0, 0.1)
                channels = torch.randperm(weight.numel())[:outlier_channels]
                weight[channels] *= outlier_gain
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    for router in routers:
        router.e_score_correction_bias.normal_(0.0, 0.05)
    model = model.to(torch.bfloat16 if family in BF16 else torch.float16)
    for router in routers:
        router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer:
        train_tokenizer(vocab).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", choices=["opt", "llama", *OTHER_FAMILIES], default="opt")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="config settings, e.g. head_dim=256 sliding_window=512 (a published model's shapes)")
    parser.add_argument("--shard-size", default="1MB")
    parser.add_argument("--tokenizer-from", type=Path, help="copy this model folder's tokenizer (vocab must fit it)")
    args = parser.parse_args()
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    path = make_tiny(args.out, args.family, args.hidden, args.ffn, args.layers, args.heads,
                     args.kv_heads, args.vocab, max_shard_size=args.shard_size,
                     tokenizer=args.tokenizer_from is None, config_extra=extra)
    if args.tokenizer_from:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.tokenizer_from).save_pretrained(path)
    print(f"wrote a random {args.family} model to {path}")


if __name__ == "__main__":
    main()
