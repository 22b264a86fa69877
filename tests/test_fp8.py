"""FP8 block-scaled sources (DeepSeek-V3/R1, Kimi-K2, Qwen3 *-FP8): the linears' weights as
float8_e4m3fn with weight_scale_inv per 128 x 128 block, written here as those checkpoints are
published. The reader decodes them exactly as transformers does, and a run, a perplexity and a
plan of the FP8 checkpoint equal those of the bf16 checkpoint of the weights it encodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import checkpoint_bytes
from streamq import engine
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import UnsupportedModelError
from streamq.models import open_checkpoint
from streamq.ppl import perplexity
from streamq.sources.fp8 import BlockScaled

BLOCK = (128, 128)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
E4M3_MAX = 448.0


def encode(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and the float32 scale of each block (its max |w| / 448), as the FP8 checkpoints
    are made."""
    rows, cols = w.shape
    nb = (-(-rows // block[0]), -(-cols // block[1]))
    scales = torch.empty(nb, dtype=torch.float32)
    values = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nb[0]):
        for j in range(nb[1]):
            tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            scales[i, j] = tile.abs().max().clamp(min=1e-12) / E4M3_MAX
            values[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / scales[i, j]).to(
                torch.float8_e4m3fn)
    return values, scales


def decoded(values: torch.Tensor, scales: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """The weight the pair encodes, block by block (independently of sources.fp8)."""
    out = torch.empty(values.shape, dtype=torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = values[rs, cs].float() * scales[i, j]
    return out


@pytest.fixture(scope="module")
def fp8_pair(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny LLaMA as an FP8 block-scaled checkpoint (bf16 elsewhere, as DeepSeek-V3's), and
    the bf16 checkpoint of the weights it encodes."""
    root = tmp_path_factory.mktemp("fp8")
    fp8, plain = root / "fp8", root / "bf16"
    for d in (fp8, plain):
        shutil.copytree(tiny_models["llama"], d, ignore=shutil.ignore_patterns("*.safetensors*"))
    source = {}
    for f in sorted(Path(tiny_models["llama"]).glob("*.safetensors")):
        source.update(load_file(f))
    stored, dense = {}, {}
    for name, t in source.items():
        if t.dim() == 2 and ".layers." in name:  # the blocks' linears: e4m3 + scales
            values, scales = encode(t)
            stored[name], stored[name + "_scale_inv"] = values, scales
            dense[name] = decoded(values, scales).to(torch.bfloat16)
        else:
            stored[name] = dense[name] = t.to(torch.bfloat16)
    save_file(stored, fp8 / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, plain / "model.safetensors", metadata={"format": "pt"})
    for d, extra in ((fp8, {"quantization_config": FP8_CONFIG}), (plain, {})):
        config = json.loads((d / "config.json").read_text())
        config.update({"torch_dtype": "bfloat16", "dtype": "bfloat16", **extra})
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return fp8, plain


def test_the_reader_hands_out_the_encoded_weights_and_hides_the_scales(fp8_pair):
    fp8, plain = fp8_pair
    reader, _, _ = open_checkpoint(fp8)
    raw = load_file(fp8 / "model.safetensors")
    assert not [n for n in reader.names() if n.endswith("_scale_inv")]
    assert reader.names() == open_checkpoint(plain)[0].names()
    name = "model.layers.0.mlp.down_proj.weight"
    got = reader.get(name)  # the float32 product rounded once to the checkpoint's dtype
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, decoded(raw[name], raw[name + "_scale_inv"]).to(torch.bfloat16))
    assert reader.float_dtype() == torch.bfloat16  # what the unencoded tensors are published in


def test_partial_blocks_and_bad_scales():
    enc = BlockScaled((128, 128))
    w = torch.randn(200, 300)
    values, scales = encode(w)
    assert scales.shape == (2, 3)
    assert torch.equal(enc.decode(values, scales), decoded(values, scales))
    assert (enc.decode(values, scales) - w).abs().max() < 0.07 * w.abs().max()  # e4m3: 3 mantissa bits
    with pytest.raises(UnsupportedModelError, match=r"needs 2 x 3 scales, found \(2, 2\)"):
        enc.decode(values, scales[:, :2])


def test_transformers_decodes_the_same_weights(fp8_pair):
    """transformers' own FP8 dequantization (FineGrainedFP8Config(dequantize=True)) gives the
    weights the reader gives."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    fp8, _ = fp8_pair
    try:
        model = AutoModelForCausalLM.from_pretrained(fp8, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                     dtype=torch.bfloat16)
    except (ImportError, ValueError, RuntimeError) as exc:
        pytest.skip(f"transformers cannot load FP8 here: {exc}")
    reader, _, _ = open_checkpoint(fp8)
    state = model.state_dict()
    linears = [n for n in reader.names() if n.endswith("proj.weight")]
    assert len(linears) == 14
    for name in linears:
        assert torch.equal(state[name], reader.get(name)), name


def test_a_run_and_a_perplexity_of_the_fp8_checkpoint_are_those_of_its_weights(fp8_pair, tmp_path):
    fp8, plain = fp8_pair
    calib = CalibConfig(n_samples=4, seqlen=64)
    assert engine.plan(fp8, QuantConfig(), calib, device="cpu") == engine.plan(plain, QuantConfig(), calib, device="cpu")
    for src in (fp8, plain):
        engine.quantize(src, tmp_path / src.name, QuantConfig(), calib, device="cpu")
    a, b = checkpoint_bytes(tmp_path / "fp8"), checkpoint_bytes(tmp_path / "bf16")
    assert a == b  # packed tensors, index and config alike: the FP8 quantization_config is replaced
    assert json.loads(a["config.json"])["quantization_config"]["quant_method"] == "awq"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    assert perplexity(fp8, text, seqlen=64, device="cpu").ppl == perplexity(plain, text, seqlen=64, device="cpu").ppl


def test_fp8_without_blocks_is_refused_in_one_line(fp8_pair, tmp_path):
    fp8, _ = fp8_pair
    bad = tmp_path / "per-tensor"
    shutil.copytree(fp8, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"this FP8 checkpoint .* is not read yet"):
        engine.quantize(bad, tmp_path / "out", QuantConfig(), CalibConfig(n_samples=2, seqlen=32), device="cpu")


def test_float8_weights_without_scales_are_refused_in_one_line(fp8_pair, tmp_path):
    """FP8 values read without their block scales would be garbage: a checkpoint whose config
    does not name block-scaled FP8 but holds float8 tensors is refused by tensor name."""
    from streamq.errors import InputError

    fp8, _ = fp8_pair
    bad = tmp_path / "no-config"
    shutil.copytree(fp8, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"tensor model\.layers\.0\.\S+ is float8 without a scale beside it"):
        open_checkpoint(bad)
