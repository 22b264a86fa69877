"""The peer side of tools/bench_peer.py, run with the peer's own interpreter (tools/install_peer.sh):
quantize with llm-compressor's AWQ, GPTQ or both, or decompress its output to a plain fp16 checkpoint.

    PEER/bin/python tools/peer_awq.py quantize --model M --calib ids.npy --out OUT --group-size 64
    PEER/bin/python tools/peer_awq.py quantize --method gptq ... ; --method awq+gptq ...
    PEER/bin/python tools/peer_awq.py decompress --src OUT --dst OUT-fp16

`quantize` feeds the given [n_samples, seqlen] token blocks as they are (no shuffling, no
truncation), with the recipes llm-compressor documents: AWQModifier + QuantizationModifier,
GPTQModifier, or AWQModifier + GPTQModifier (INT4 or INT3, asymmetric, group quantization;
GPTQModifier's own defaults: dampening 0.01, 128-column blocks, act-order "static" unless
--actorder none), and saves compressed-tensors. Only this process
is measured by the benchmark; it imports nothing from streamq.

One patch, printed when applied: llm-compressor 0.14 pins the cached block inputs with
`Tensor.pin_memory()` unconditionally before each AWQ grid search, which raises without an
accelerator. Pinning only speeds host-to-device copies, so on a CPU-only machine it is
replaced by a no-op; nothing else in the peer is changed.

For attribution only (never in the benchmark's table), `--grid streamq` replaces the peer's
scale-search grid by streamq's (alpha = i/20 for i < 20, one kind of candidate throughout) so that
a difference in perplexity can be traced to the grid or away from it; also printed when applied.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


N_GRID = 20  # grid points of the scale search: the peer's recipe sets it, streamq's default is the same


def patch_pinning() -> None:
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    print("peer patch: IntermediatesCache.pin_memory is a no-op (no accelerator)", flush=True)


def patch_grid(n_grid: int) -> None:
    """The peer's grid is alpha = i/(n-1), i < n, without duo scaling, and with it the identity
    (alpha 0, no weight term) plus alpha = i/(n-2), i < n-1. streamq's, as llm-awq's code, is
    alpha = i/n, i < n, for either kind."""
    from llmcompressor.modifiers.transform.awq import AWQModifier

    AWQModifier._get_grid_search_params = lambda self: [(i / n_grid, bool(self.duo_scaling)) for i in range(n_grid)]
    print(f"peer patch: AWQ grid is streamq's, alpha = i/{n_grid} for i < {n_grid} (attribution run)", flush=True)


def processor(model_dir: str, vocab_size: int):
    """The model's tokenizer, or for a random model without one a word-level tokenizer over its
    vocabulary: oneshot insists on a processor even when given token ids, but never uses it then."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        vocab = {f"t{i}": i for i in range(vocab_size)}
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), unk_token="t0")


def quantize(args: argparse.Namespace) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    patch_pinning()
    if args.grid == "streamq":
        patch_grid(N_GRID)
    blocks = np.load(args.calib)
    data = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": np.ones_like(blocks).tolist()})
    start = time.time()
    dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    weights = QuantizationArgs(num_bits=args.bits, type="int", strategy="group", group_size=args.group_size,
                               symmetric=False, dynamic=False)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    recipe = [AWQModifier(duo_scaling=args.duo_scaling, n_grid=N_GRID)] if args.method != "gptq" else []
    if args.method == "awq":
        recipe.append(QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    else:
        extra = {} if args.actorder == "default" else {"actorder": None if args.actorder == "none" else args.actorder}
        recipe.append(GPTQModifier(config_groups=groups, ignore=["lm_head"], **extra))
    counts = count_quantized_forwards(model) if args.probe else None
    oneshot(model=model, processor=processor(args.model, model.config.vocab_size), dataset=data, recipe=recipe, num_calibration_samples=len(blocks),
            max_seq_length=blocks.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
            output_dir=None)
    if counts is not None:
        print(f"peer probe: linear forwards during calibration with fake quantization enabled: "
              f"{counts[True]}, disabled: {counts[False]}", flush=True)
    model.save_pretrained(args.out, save_compressed=True)
    seconds = time.time() - start
    (Path(args.out) / "peer_run.json").write_text(json.dumps({"seconds": seconds, **_peak_gpu()}, indent=2))
    print(f"peer: quantized in {seconds:.1f} s", flush=True)


def count_quantized_forwards(model) -> dict:
    """Count the linear forwards that run with compressed-tensors' fake quantization enabled
    (`quantization_enabled` and a scheme attached) and those that run without: with
    propagate_error on, the outputs the next layer calibrates on are those of the last
    forward of each layer, so this says whether they saw quantized weights."""
    counts = {True: 0, False: 0}

    def hook(module, args):
        on = getattr(module, "quantization_enabled", True) and getattr(module, "quantization_scheme", None) is not None
        counts[bool(on)] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook)
    return counts


def _peak_gpu() -> dict:
    if not torch.cuda.is_available():
        return {"peak_gpu_bytes": None}
    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated()}


QUANT_PARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight_packed")


def decompress(args: argparse.Namespace) -> None:
    """Load the compressed-tensors checkpoint with transformers' compressed-tensors support,
    decompressed (run_compressed=False), and save it as a plain fp16 checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float16,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith(QUANT_PARAMS)}
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((Path(args.src) / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    print(f"peer: decompressed {args.src} -> {dst}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--model", required=True)
    q.add_argument("--calib", required=True, help=".npy of [n_samples, seqlen] token ids")
    q.add_argument("--out", required=True)
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16, bfloat16")
    q.add_argument("--method", default="awq", choices=["awq", "gptq", "awq+gptq"])
    q.add_argument("--actorder", default="default", choices=["default", "static", "none"],
                   help="GPTQModifier's act-order (default: its own default, static in 0.14)")
    q.add_argument("--duo-scaling", default="true", choices=["true", "false", "both"])
    q.add_argument("--grid", default="peer", choices=["peer", "streamq"],
                   help="streamq: search the scale over streamq's alpha grid (attribution only)")
    q.add_argument("--probe", action="store_true", help="count linear forwards run with fake quantization "
                   "enabled/disabled during calibration (adds hooks; not for timing)")
    d = sub.add_parser("decompress")
    d.add_argument("--src", required=True)
    d.add_argument("--dst", required=True)
    args = parser.parse_args()
    if args.cmd == "quantize":
        args.duo_scaling = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
        if args.grid == "streamq" and args.duo_scaling == "both":
            parser.error("--grid streamq has one kind of candidate: --duo-scaling true or false")
        quantize(args)
    else:
        decompress(args)


if __name__ == "__main__":
    main()
