"""DeepSeek-V3 (MLA, dense then sparse layers, grouped sigmoid routing with a correction bias, a
shared expert), and GLM-4.5 (the same MLPs under grouped-query attention), on tiny random models
from transformers' own config classes: 2 dense + 2 sparse layers, 8 experts in 2 groups, top-2,
q_lora_rank and kv_lora_rank set. DeepSeek-V3's is written as it is published: bf16 with the router's correction bias in float32, a
multi-token-prediction layer after the last block (model.layers.4.*, in its own shard), and
again with every linear in float8_e4m3fn with weight_scale_inv per 128 x 128 block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import checkpoint_bytes, killed_run_resumes_byte_identical, mixture_streams_as_reference
from make_tiny_model import make_tiny
from streamq import engine, reference
from streamq.config import CalibConfig, QuantConfig
from streamq.families import build_block, detect
from streamq.models import load_config, open_checkpoint
from streamq.block import block_groups
from streamq.ppl import perplexity
from streamq.search import ScaleRecord, apply_scale, run_module
from streamq.shards import ShardReader
from test_fp8 import FP8_CONFIG, decoded, encode
from test_ppl import SEQLEN, eval_text, reference_ppl, text_ids  # noqa: F401 (eval_text is a fixture)

CALIB = CalibConfig(n_samples=6, seqlen=64)
LAYERS = 4
MTP = f"model.layers.{LAYERS}."  # the multi-token-prediction layer, after the last block


def mtp_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A multi-token-prediction layer as DeepSeek-V3 publishes it (model.layers.61.*): a sparse
    decoder layer's tensors plus embed_tokens, enorm, hnorm, eh_proj and shared_head."""
    last = f"model.layers.{LAYERS - 1}."
    out = {MTP + k[len(last):]: v.clone() for k, v in state.items() if k.startswith(last)}
    hidden = state["model.norm.weight"].shape[0]
    g = torch.Generator().manual_seed(5)
    out.update({MTP + "embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
                MTP + "enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                MTP + "hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                MTP + "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g).to(torch.bfloat16) * 0.02,
                MTP + "shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                MTP + "shared_head.head.weight": state["lm_head.weight"].clone()})
    return out


def linear(name: str) -> bool:
    """The tensors DeepSeek-V3 publishes in e4m3: every linear's weight in the layers (attention,
    MLPs, experts, the MTP layer's), not the router, norms, embeddings or lm_head."""
    return name.startswith("model.layers.") and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def write(folder: Path, like: Path, state: dict[str, torch.Tensor], extra: dict) -> Path:
    """The tensors in two shards with an index (the MTP layer in the last, as published)."""
    shutil.copytree(like, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if not k.startswith(MTP)},
              "model-00002-of-00002.safetensors": {k: v for k, v in state.items() if k.startswith(MTP)}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    config.update(extra)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> dict[str, Path]:
    """saved: as save_pretrained writes it; bf16: as published (MTP layer, two shards); fp8: as
    published in FP8; plain: bf16 holding exactly the weights the FP8 checkpoint encodes."""
    root = tmp_path_factory.mktemp("deepseek")
    saved = make_tiny(root / "saved", "deepseek_v3", hidden=128, ffn=128, layers=LAYERS, seed=11)
    state = {k: v for f in sorted(saved.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert state["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    state.update(mtp_tensors(state))
    stored, plain = {}, {}
    for name, t in state.items():
        if linear(name):
            values, scales = encode(t)
            stored[name], stored[name + "_scale_inv"] = values, scales
            plain[name] = decoded(values, scales).to(torch.bfloat16)
        else:
            stored[name] = plain[name] = t
    return {"saved": saved, "bf16": write(root / "bf16", saved, state, {}),
            "fp8": write(root / "fp8", saved, stored, {"quantization_config": FP8_CONFIG}),
            "plain": write(root / "plain", saved, plain, {})}


def test_the_family_and_its_two_kinds_of_blocks(deepseek):
    config = load_config(deepseek["bf16"])
    family = detect(config)
    assert family.name == "deepseek_v3"
    assert [family.layer_kind(config, i) for i in range(LAYERS)] == [0, 0, 2, 2]
    dense = build_block(config, 0, ShardReader(deepseek["bf16"]).with_prefix("model.layers.0."), torch.device("cpu"),
                        torch.float32)
    sparse = build_block(config, 2, ShardReader(deepseek["bf16"]).with_prefix("model.layers.2."), torch.device("cpu"),
                         torch.float16)
    assert not hasattr(dense.mlp, "experts") and len(sparse.mlp.experts) == 8
    # the router and its correction bias stay float32 in a float16 block, as transformers keeps them
    assert sparse.mlp.gate.weight.dtype == sparse.mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert sparse.mlp.experts[0].up_proj.weight.dtype == torch.float16


def test_routing_is_transformers_own(deepseek):
    """The grouped sigmoid routing chooses the experts DeepseekV3TopkRouter chooses, with the
    same weights, bit for bit (the bias steers the choice: a large bias on expert 7 makes every
    token take it)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = load_config(deepseek["bf16"])
    block = build_block(config, 2, ShardReader(deepseek["bf16"]).with_prefix("model.layers.2."), torch.device("cpu"),
                        torch.float32)
    theirs = DeepseekV3TopkRouter(config)
    theirs.load_state_dict(block.mlp.gate.state_dict())
    x = torch.randn(300, config.hidden_size)
    for bias in (None, 7):
        if bias is not None:
            with torch.no_grad():
                block.mlp.gate.e_score_correction_bias[bias] += 10.0
                theirs.e_score_correction_bias[bias] += 10.0
        _, weights, chosen = theirs(x)
        ours_w, ours_c = block.mlp.select(block.mlp.gate(x), block.mlp.gate)
        order, ours_order = chosen.sort(dim=-1), ours_c.sort(dim=-1)
        assert torch.equal(order.values, ours_order.values)
        assert torch.equal(weights.gather(1, order.indices), ours_w.gather(1, ours_order.indices))
    assert (chosen == 7).any(dim=-1).all()


@pytest.mark.parametrize("name", ["saved", "bf16"])
def test_streamed_ppl_is_transformers(deepseek, eval_text, name):  # noqa: F811
    """As save_pretrained writes it and as published (the MTP layer beside the blocks, which
    transformers leaves unread)."""
    path = deepseek[name]
    assert perplexity(path, eval_text, seqlen=SEQLEN, device="cpu").ppl == \
        pytest.approx(reference_ppl(path, text_ids(path, eval_text), SEQLEN), rel=1e-5)


def test_fp8_reads_as_transformers_decodes_it(deepseek):
    """transformers' FP8 dequantization (FineGrainedFP8Config(dequantize=True)) gives every
    linear of the blocks whose shape is whole 128 x 128 blocks the weight the reader gives,
    experts included. Where the last blocks are partial (kv_a_proj_with_mqa: 144 rows here, 576
    in DeepSeek-V3, scales [2, 1] and [5, 56]; q_b_proj: 192 rows here) transformers 5.24 takes
    rows / scale rows as the block height (72 and 96 here; for 576 / 5 it raises), while
    DeepSeek's own weight_dequant and the reader take 128-row blocks and a partial last one:
    those equal the independent decoding."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    try:
        model = AutoModelForCausalLM.from_pretrained(deepseek["fp8"], dtype=torch.bfloat16,
                                                     quantization_config=FineGrainedFP8Config(dequantize=True))
    except (ImportError, ValueError, RuntimeError) as exc:
        pytest.skip(f"transformers cannot load FP8 here: {exc}")
    reader, _, _ = open_checkpoint(deepseek["fp8"])
    raw = {k: v for f in sorted(deepseek["fp8"].glob("*.safetensors")) for k, v in load_file(f).items()}
    state = model.state_dict()
    whole, partial = 0, []
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in reader.names():
            if not (name.startswith(p) and linear(name)):
                continue
            if raw[name].shape[0] % 128 or raw[name].shape[1] % 128:
                partial.append(name[len(p):])
                assert torch.equal(reader.get(name), decoded(raw[name], raw[name + "_scale_inv"]).to(torch.bfloat16))
                continue
            if ".experts." in name:  # transformers holds them fused: [experts, 2 * width, hidden], [.., hidden, width]
                e, proj = name[len(p + "mlp.experts."):].split(".")[:2]
                width = state[p + "mlp.experts.down_proj"].shape[-1]
                fused = state[p + ("mlp.experts.down_proj" if proj == "down_proj"
                                   else "mlp.experts.gate_up_proj")][int(e)]
                theirs = {"gate_proj": fused[:width], "up_proj": fused[width:], "down_proj": fused}[proj]
            else:
                theirs = state[name]
            assert torch.equal(theirs, reader.get(name)), name
            whole += 1
    assert partial == ["self_attn.kv_a_proj_with_mqa.weight", "self_attn.q_b_proj.weight"] * LAYERS
    assert whole == 2 * 6 + 2 * (3 + 3 * 8 + 3)  # attention 3 + dense 3; 8 experts x 3 + shared 3


def test_streamed_equals_reference_at_every_budget(deepseek, tmp_path):
    """The unstreamed reference (transformers' whole model) and the engine give the same bytes
    with no budget and at the smallest (the sparse blocks' experts parked in host memory); the
    plan is the forecast's; the routers are float32 and unquantized; the MTP layer is not written."""
    out = mixture_streams_as_reference(deepseek["bf16"], tmp_path, CALIB)
    written = {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert not [k for k in written if k.startswith(MTP)]
    assert written["model.layers.2.mlp.gate.weight"].dtype == torch.float32
    assert written["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for name in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                 "self_attn.o_proj", "mlp.experts.7.down_proj", "mlp.shared_experts.up_proj"):
        assert f"model.layers.3.{name}.qweight" in written
    assert "model.layers.0.mlp.down_proj.qweight" in written
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head", "model.layers.2.mlp.gate",
                                                                         "model.layers.3.mlp.gate"]
    info = json.loads((out / "streamq.json").read_text())
    assert info["scale_groups"][:4] == ["input_layernorm -> self_attn.q_a_proj, self_attn.kv_a_proj_with_mqa",
                                        "self_attn.q_a_layernorm -> self_attn.q_b_proj",
                                        "self_attn.kv_a_layernorm -> self_attn.kv_b_proj",
                                        "post_attention_layernorm -> " + ", ".join(
                                            f"mlp.experts.{e}.{n}" for e in range(8) for n in ("gate_proj", "up_proj"))
                                        + ", mlp.shared_experts.gate_proj, mlp.shared_experts.up_proj"]
    assert "6 % more block-output error" in info["skipped_scale_groups"][0]


def test_the_router_absorbs_the_norm_scale_in_float32(deepseek, tmp_path):
    """The post-attention norm is divided by s, the router (float32) multiplied by s along its
    inputs, both in float32 before storage: it computes what it computed before, up to that
    product's rounding."""
    path = deepseek["bf16"]
    result = reference.quantize(path, tmp_path / "ref", QuantConfig(), CALIB, chunk_samples=4, device="cpu")
    record = next(r for r in result.records[2].scales if r.prev_op == "post_attention_layernorm")
    assert record.absorbers == ("mlp.gate",)
    original = ShardReader(path).with_prefix("model.layers.2.")
    written = {k: v for f in sorted((tmp_path / "ref").glob("model-*.safetensors")) for k, v in load_file(f).items()}
    expected = original["mlp.gate.weight"].float() * record.scales.view(1, -1)
    assert torch.equal(written["model.layers.2.mlp.gate.weight"], expected)
    assert torch.equal(written["model.layers.2.mlp.gate.e_score_correction_bias"],
                       original["mlp.gate.e_score_correction_bias"])


def test_fp8_source_gives_the_bytes_of_its_weights_and_resumes_after_sigkill(deepseek, tmp_path):
    """The FP8 checkpoint quantizes and evaluates as the bf16 checkpoint of the weights it
    encodes; SIGKILLed in the first sparse block and resumed, it writes the same bytes."""
    fp8, plain = deepseek["fp8"], deepseek["plain"]
    for src in (fp8, plain):
        engine.quantize(src, tmp_path / src.name, QuantConfig(), CALIB, device="cpu")
    assert checkpoint_bytes(tmp_path / "fp8") == checkpoint_bytes(tmp_path / "plain")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    assert perplexity(fp8, text, seqlen=64, device="cpu").ppl == perplexity(plain, text, seqlen=64, device="cpu").ppl
    killed_run_resumes_byte_identical(["--model", str(fp8), "--n-samples", "6", "--seqlen", "64", "--device", "cpu",
                                       "--shard-size", "100KB"], tmp_path / "killed", kill_at="block2:search")


def test_parked_experts_hold_no_memory_and_are_read_at_each_use(deepseek, monkeypatch):
    """A parked expert has no storage in the block: each time it comes to the device its
    tensors are read from the shards (an FP8 weight uploaded encoded and decoded there), the
    values the block holds when nothing is parked; afterwards it is storage-less again."""
    from streamq.placement import loaded

    config, cpu = load_config(deepseek["fp8"]), torch.device("cpu")
    reader, _, _ = open_checkpoint(deepseek["fp8"])
    block = build_block(config, 2, reader.with_prefix("model.layers.2."), cpu, torch.float32, park=True)
    whole = build_block(config, 2, reader.with_prefix("model.layers.2."), cpu, torch.float32)
    assert all(p.is_meta for e in block.mlp.experts for p in e.parameters())
    assert not any(p.is_meta for p in block.mlp.shared_experts.parameters())  # the shared expert stays
    reads = []
    real = ShardReader.load
    monkeypatch.setattr(ShardReader, "load",
                        lambda self, name, device: (reads.append(name), real(self, name, device))[1])
    for _ in range(2):
        with loaded(block.mlp.experts[3]) as expert:
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(getattr(expert, name).weight, getattr(whole.mlp.experts[3], name).weight)
    assert reads == [f"model.layers.2.mlp.experts.3.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")] * 2
    assert block.mlp.experts[3].up_proj.weight.is_meta


def test_glm4_moe_streams_what_transformers_computes_and_equals_the_reference(eval_text, tmp_path):  # noqa: F811
    """GLM-4.5's layout (DeepSeek-V3's MLPs and router, q/k/v with biases and q/k norms, 2 key/value
    heads for 4): streamed ppl is transformers', the engine's output the reference's at no budget
    and at the smallest (experts parked), the plan the forecast's, the routers float32 and
    unquantized."""
    path = make_tiny(tmp_path / "glm", "glm4_moe", hidden=128, ffn=128, layers=LAYERS, kv_heads=2, seed=13)
    config = load_config(path)
    assert detect(config).name == "glm4_moe" and detect(config).layer_kind(config, 3) == 2
    assert perplexity(path, eval_text, seqlen=SEQLEN, device="cpu").ppl == \
        pytest.approx(reference_ppl(path, text_ids(path, eval_text), SEQLEN), rel=1e-5)
    out = mixture_streams_as_reference(path, tmp_path, CALIB)
    written = {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert written["model.layers.3.mlp.gate.weight"].dtype == torch.float32
    assert "model.layers.3.self_attn.q_proj.bias" in written
    assert "model.layers.3.mlp.experts.5.up_proj.qweight" in written
    info = json.loads((out / "streamq.json").read_text())
    assert "grouped-query attention" in info["skipped_scale_groups"][0]


@pytest.mark.parametrize("layer", [0, 2])
def test_every_scale_group_folds_exactly(deepseek, layer):
    """Random scales folded into each group's previous op (the MLA norms, the input and
    post-attention norms, the router absorbing the latter's, the experts' up_proj) and the
    linears leave a dense and a sparse block computing what they computed, up to float32 rounding."""
    config, cpu = load_config(deepseek["bf16"]), torch.device("cpu")
    family = detect(config)
    state = ShardReader(deepseek["bf16"]).with_prefix(f"model.layers.{layer}.")
    block, ref = (build_block(config, layer, state, cpu, torch.float32) for _ in range(2))
    g = torch.Generator().manual_seed(3)
    groups = block_groups(block, family, config)
    assert {"self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"} <= {group.prev_op for group in groups}
    for group in groups:
        width = block.get_submodule(group.linears[0]).in_features
        apply_scale(block, ScaleRecord(group.prev_op, group.linears, torch.rand(width, generator=g) * 3 + 0.2,
                                       prev_rows=group.prev_rows, absorbers=group.absorbers))
    x = torch.randn(2, 16, config.hidden_size, generator=g)
    kwargs = family.block_kwargs(config, 16, cpu, torch.float32)
    assert not torch.equal(block.self_attn.kv_a_layernorm.weight, ref.self_attn.kv_a_layernorm.weight)
    with torch.no_grad():
        torch.testing.assert_close(run_module(block, x, kwargs), run_module(ref, x, kwargs), rtol=1e-4, atol=1e-5)
