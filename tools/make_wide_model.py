"""Write a random OPT model with OPT-30B's block shape (hidden 7168, ffn 28672, 56 heads), or a
LLaMA or Mixtral (8 experts, top-2) model of a given shape, or DeepSeek-V3's sparse blocks (MLA,
256 experts x 2048, top-8; bf16, or --fp8 as DeepSeek-V3 publishes it), with N layers, one block
per shard (a DeepSeek-V3 block in shards of 32 experts), generating one block at a time
so the writer never holds the model. A small vocabulary keeps the non-block tensors small: the
blocks are what is measured.

    python tools/make_wide_model.py --layers 8 --out models/opt30b-shape-8
    python tools/make_wide_model.py --from models/opt30b-shape-8 --layers 2 --out models/opt30b-shape-2
    python tools/make_wide_model.py --family llama --hidden 4096 --ffn 11008 --heads 32 --layers 8 --out models/llama7b-shape-8
    python tools/make_wide_model.py --family llama --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --layers 3 \
        --out models/llama3-70b-shape-3 --gen-device cuda   # LLaMA-3-70B's block; random numbers drawn on the GPU
    python tools/make_wide_model.py --family deepseek_v3 --layers 1 --fp8 --out models/deepseek-v3-shape-1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
PUBLISHED_INDEX = "pytorch_model.bin.index.json"


def opt_config(layers: int, hidden: int, ffn: int, heads: int, vocab: int) -> dict:
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
        "hidden_size": hidden, "ffn_dim": ffn, "num_attention_heads": heads, "num_hidden_layers": layers,
        "vocab_size": vocab, "max_position_embeddings": 2048, "word_embed_proj_dim": hidden,
        "do_layer_norm_before": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
        "dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": True, "dtype": "float16",
        "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
    }


def llama_config(layers: int, hidden: int, ffn: int, heads: int, vocab: int, kv_heads: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
    }


def mixtral_config(layers: int, hidden: int, ffn: int, heads: int, vocab: int, kv_heads: int | None = None,
                   experts: int = 8, top_k: int = 2) -> dict:
    return {**llama_config(layers, hidden, ffn, heads, vocab, kv_heads), "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral", "num_local_experts": experts, "num_experts_per_tok": top_k,
            "router_jitter_noise": 0.0, "sliding_window": None, "output_router_logits": False}


# a DeepSeek-V3-layout block small enough for gpu_check --small (16 experts, top-4 from 2 of 4 groups)
DEEPSEEK_SMALL = {"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 256, "kv_lora_rank": 128,
                  "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 16,
                  "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2}


def deepseek_config(layers: int, hidden: int, ffn: int, vocab: int, fp8: bool, shapes: dict | None = None) -> dict:
    """DeepSeek-V3's published shapes (transformers' DeepseekV3Config defaults, or `shapes`), every
    layer sparse, its experts `ffn` wide."""
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": layers,
              "hidden_size": hidden, "moe_intermediate_size": ffn, "first_k_dense_replace": 0, "vocab_size": vocab,
              "dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
              "num_nextn_predict_layers": 0, **(shapes or {})}
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    return config


def salient_norm(hidden: int, g: torch.Generator, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    w = torch.ones(hidden)
    w[torch.randperm(hidden, generator=g, device=g.device)[:8].cpu()] = 20.0  # salient channels, as real models have
    return w.to(dtype)


def random_weight(shape: tuple[int, int], g: torch.Generator, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """N(0, 0.02) in fp16 (or `dtype`) on the host, drawn on the generator's device (a GPU draws a
    70B-width block in milliseconds where a CPU takes seconds)."""
    return (torch.randn(shape, generator=g, device=g.device) * 0.02).to(dtype).cpu()


def fp8_encode(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and one float32 scale per block x block tile (its max |w| / 448; the last
    tiles partial), as DeepSeek-V3's FP8 weights are made."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    tiles = torch.nn.functional.pad(w.float(), (0, nc * block - cols, 0, nr * block - rows)).view(nr, block, nc, block)
    scales = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    values = (tiles / scales[:, None, :, None]).view(nr * block, nc * block)[:rows, :cols]
    return values.to(torch.float8_e4m3fn).contiguous(), scales


def deepseek_block_shards(i: int, config: dict, g: torch.Generator, fp8: bool, per_shard: int = 32):
    """One sparse DeepSeek-V3 block as its checkpoints hold it, in parts (attention, router,
    shared expert and norms; then the experts, `per_shard` at a time), each drawn when asked
    for: bf16, or FP8 linears with weight_scale_inv (router, norms and the float32 correction
    bias as published)."""
    from transformers import DeepseekV3Config

    c = DeepseekV3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type",
                                                                         "quantization_config", "dtype")})
    p, bf16, hidden, ffn = f"model.layers.{i}.", torch.bfloat16, c.hidden_size, c.moe_intermediate_size

    def linears(items):
        out = {}
        for name, shape in items:
            w = random_weight(shape, g, bf16)
            if fp8:
                out[p + name + ".weight"], out[p + name + ".weight_scale_inv"] = fp8_encode(w)
            else:
                out[p + name + ".weight"] = w
        return out

    heads, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    attention = [("self_attn.q_a_proj", (c.q_lora_rank, hidden)), ("self_attn.q_b_proj", (heads * qk, c.q_lora_rank)),
                 ("self_attn.kv_a_proj_with_mqa", (c.kv_lora_rank + c.qk_rope_head_dim, hidden)),
                 ("self_attn.kv_b_proj", (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)),
                 ("self_attn.o_proj", (hidden, heads * c.v_head_dim))]
    expert = [("gate_proj", (ffn, hidden)), ("up_proj", (ffn, hidden)), ("down_proj", (hidden, ffn))]

    def first():
        t = linears(attention + [(f"mlp.shared_experts.{n}", shape) for n, shape in expert])
        t[p + "mlp.gate.weight"] = random_weight((c.n_routed_experts, hidden), g, bf16)
        t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(c.n_routed_experts)
        for norm, width in (("input_layernorm", hidden), ("post_attention_layernorm", hidden),
                            ("self_attn.q_a_layernorm", c.q_lora_rank), ("self_attn.kv_a_layernorm", c.kv_lora_rank)):
            t[p + norm + ".weight"] = salient_norm(width, g, bf16)
        return t

    yield first()
    for start in range(0, c.n_routed_experts, per_shard):
        yield linears([(f"mlp.experts.{e}.{n}", shape) for e in range(start, min(start + per_shard, c.n_routed_experts))
                       for n, shape in expert])


def _llama_layout(i: int, hidden: int, g: torch.Generator, kv: int | None,
                  mlp: list[tuple[str, tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """A LLaMA-layout block: attention, then the `mlp` weights (name, shape), then the norms,
    drawn in that order."""
    p = f"model.layers.{i}."
    kv = kv or hidden  # key/value width: hidden / heads * kv_heads under grouped-query attention
    t: dict[str, torch.Tensor] = {}
    for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                        ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)), *mlp]:
        t[p + name + ".weight"] = random_weight(shape, g)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        t[p + norm + ".weight"] = salient_norm(hidden, g)
    return t


def llama_block_tensors(i: int, hidden: int, ffn: int, g: torch.Generator, kv: int | None = None) -> dict[str, torch.Tensor]:
    return _llama_layout(i, hidden, g, kv, [("mlp.gate_proj", (ffn, hidden)), ("mlp.up_proj", (ffn, hidden)),
                                            ("mlp.down_proj", (hidden, ffn))])


def mixtral_block_tensors(i: int, hidden: int, ffn: int, g: torch.Generator, kv: int | None = None,
                          experts: int = 8) -> dict[str, torch.Tensor]:
    """Mixtral's block as its checkpoints hold it: the router, one tensor per expert weight."""
    mlp = [("block_sparse_moe.gate", (experts, hidden))]
    mlp += [(f"block_sparse_moe.experts.{e}.{name}", shape) for e in range(experts)
            for name, shape in (("w1", (ffn, hidden)), ("w3", (ffn, hidden)), ("w2", (hidden, ffn)))]
    return _llama_layout(i, hidden, g, kv, mlp)


def opt_block_tensors(i: int, hidden: int, ffn: int, g: torch.Generator, kv: int | None = None) -> dict[str, torch.Tensor]:
    p = f"model.decoder.layers.{i}."
    t: dict[str, torch.Tensor] = {}
    for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                        ("self_attn.v_proj", (hidden, hidden)), ("self_attn.out_proj", (hidden, hidden)),
                        ("fc1", (ffn, hidden)), ("fc2", (hidden, ffn))]:
        t[p + name + ".weight"] = random_weight(shape, g)
        t[p + name + ".bias"] = torch.zeros(shape[0], dtype=torch.float16)
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        t[p + norm + ".weight"] = salient_norm(hidden, g)
        t[p + norm + ".bias"] = torch.zeros(hidden, dtype=torch.float16)
    return t


def write_deepseek(out: Path, layers: int, hidden: int, ffn: int, vocab: int, seed: int, gen_device: str = "cpu",
                   fp8: bool = False, shapes: dict | None = None) -> None:
    """DeepSeek-V3-shaped sparse blocks (experts `ffn` wide), each in shards of 32 experts."""
    config = deepseek_config(layers, hidden, ffn, vocab, fp8, shapes)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=gen_device).manual_seed(seed)
    weight_map: dict[str, str] = {}

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})

    save("model-embed.safetensors", {"model.embed_tokens.weight": random_weight((vocab, hidden), g, torch.bfloat16),
                                     "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                                     "lm_head.weight": random_weight((vocab, hidden), g, torch.bfloat16)})
    for i in range(layers):
        for k, part in enumerate(deepseek_block_shards(i, config, g, fp8)):
            save(f"model-block{i:03d}-{k}.safetensors", part)
        print(f"wrote block {i}", flush=True)
    finish(out, config, weight_map)


def write(out: Path, family: str, layers: int, hidden: int, ffn: int, heads: int, vocab: int, seed: int,
          kv_heads: int | None = None, gen_device: str = "cpu", published: bool = False, fp8: bool = False) -> None:
    """The model in `out`, one block per shard. `published` (OPT): as facebook/opt-30b is
    published, PyTorch zip pickles pytorch_model-0000K-of-0000N.bin with their index, names
    decoder.* (saved from the base model), no lm_head (tools/make_published.py's layouts).
    DeepSeek-V3 (`fp8`: as published) takes its attention's shapes from its config: `heads` unused."""
    if family == "deepseek_v3":  # at real widths, or DEEPSEEK_SMALL's below 7168
        return write_deepseek(out, layers, hidden, ffn, vocab, seed, gen_device, fp8,
                              None if hidden == 7168 else DEEPSEEK_SMALL)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=gen_device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    kv = hidden // heads * kv_heads if kv_heads else None
    if family in ("llama", "mixtral"):
        head = {"model.embed_tokens.weight": random_weight((vocab, hidden), g),
                "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
        config, make_block = llama_config(layers, hidden, ffn, heads, vocab, kv_heads), llama_block_tensors
        if family == "mixtral":
            config, make_block = mixtral_config(layers, hidden, ffn, heads, vocab, kv_heads), mixtral_block_tensors
    else:
        head = {"model.decoder.embed_tokens.weight": random_weight((vocab, hidden), g),
                "model.decoder.embed_positions.weight": random_weight((2050, hidden), g),
                "model.decoder.final_layer_norm.weight": torch.ones(hidden, dtype=torch.float16),
                "model.decoder.final_layer_norm.bias": torch.zeros(hidden, dtype=torch.float16)}
        config, make_block = opt_config(layers, hidden, ffn, heads, vocab), opt_block_tensors
    if published and family != "opt":
        raise ValueError("the published layout is OPT's")
    n = layers + 1

    def save(k: int, tensors: dict[str, torch.Tensor]) -> None:
        if published:
            name = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin"
            tensors = {key[len("model."):]: t for key, t in tensors.items()}
            torch.save(tensors, out / name)
        else:
            name = "model-embed.safetensors" if k == 0 else f"model-block{k - 1:03d}.safetensors"
            save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})

    save(0, head)
    for i in range(layers):
        save(i + 1, make_block(i, hidden, ffn, g, kv))
        print(f"wrote block {i}", flush=True)
    finish(out, config, weight_map, PUBLISHED_INDEX if published else INDEX)


def finish(out: Path, config: dict, weight_map: dict[str, str], index: str = INDEX) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def subset(src: Path, out: Path, layers: int) -> None:
    """The first `layers` blocks of an existing wide model, as hard links (no copy)."""
    config = json.loads((src / "config.json").read_text())
    weight_map = json.loads((src / INDEX).read_text())["weight_map"]
    def block_index(name: str) -> int | None:
        parts = name.split(".")
        for prefix in (["model", "decoder", "layers"], ["model", "layers"]):
            if parts[: len(prefix)] == prefix:
                return int(parts[len(prefix)])
        return None

    keep = {k: f for k, f in weight_map.items() if block_index(k) is None or block_index(k) < layers}
    out.mkdir(parents=True, exist_ok=True)
    for f in set(keep.values()):
        if not (out / f).exists():
            os.link(src / f, out / f)
    finish(out, {**config, "num_hidden_layers": layers}, keep)


def by_depth(work: Path, depths: list[int], family: str = "opt", hidden: int = 7168, ffn: int = 28672,
             heads: int = 56, vocab: int = 512, seed: int = 0) -> dict[int, Path]:
    """One model per depth under `work` (wide-N): the deepest written once, the others hard-linked
    prefixes of it; models already there are reused."""
    deepest = max(depths)
    base = work / f"wide-{deepest}"
    if not (base / "config.json").is_file():
        write(base, family, deepest, hidden, ffn, heads, vocab, seed)
    models = {}
    for n in depths:
        models[n] = base if n == deepest else work / f"wide-{n}"
        if not (models[n] / "config.json").is_file():
            subset(base, models[n], n)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--family", choices=["opt", "llama", "mixtral", "deepseek_v3"], default="opt")
    parser.add_argument("--from", dest="src", type=Path, help="take the first --layers blocks of this model")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--ffn", type=int, default=28672)
    parser.add_argument("--heads", type=int, default=56)
    parser.add_argument("--kv-heads", type=int, default=None, help="LLaMA: key/value heads (grouped-query attention)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-device", default="cpu", help="where the random numbers are drawn (cpu or cuda)")
    parser.add_argument("--published", action="store_true", help="OPT: .bin shards, decoder.* names, as opt-30b is "
                        "published")
    parser.add_argument("--fp8", action="store_true", help="DeepSeek-V3: FP8 linears with 128 x 128 block scales")
    args = parser.parse_args()
    if args.src:
        subset(args.src, args.out, args.layers)
    else:
        write(args.out, args.family, args.layers, args.hidden, args.ffn, args.heads, args.vocab, args.seed,
              args.kv_heads, args.gen_device, args.published, args.fp8)


if __name__ == "__main__":
    main()
