"""Checkpoints as they are published: Hub ids and short names from a Hub cache laid out as
huggingface_hub lays a download out, PyTorch .bin shards read lazily and safely, OPT's decoder.*
names and missing lm_head, and downloads from a Hub on loopback (tests/fakehub.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fakehub import FakeHub
from helpers import killed_run_resumes_byte_identical
from make_published import LAYOUTS, OPT_350M, publish, to_cache, write_layout
from make_tiny_model import make_tiny
from streamq import engine
from streamq.cli import app
from streamq.config import CalibConfig, QuantConfig
from streamq.errors import InputError
from streamq.models import open_checkpoint
from streamq.ppl import perplexity
from streamq.shards import ShardReader
from streamq.sources import resolve
from streamq.sources.hub import files_to_fetch

CALIB = CalibConfig(n_samples=4, seqlen=32)
QUANT = QuantConfig(group_size=64)
SHORT = {"opt-30b": "opt-30b", "opt-125m": "facebook/opt-125m", "opt-350m": "opt-350m", "llama": "llama-2-7b"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_models) -> dict:
    """Tiny models saved by save_pretrained, and the same weights in a Hub cache in each
    published layout (LAYOUTS)."""
    root = tmp_path_factory.mktemp("hub")
    opt = make_tiny(root / "opt", "opt", hidden=64, ffn=128, vocab=512, seed=21)
    opt350 = make_tiny(root / "opt350", "opt", hidden=128, ffn=256, vocab=512, seed=22, config_extra=OPT_350M)
    sources = {"opt-30b": opt, "opt-125m": opt, "opt-350m": opt350, "llama": tiny_models["llama"]}
    cache = root / "cache"
    snapshots = {name: publish(src, name, cache, root / "published") for name, src in sources.items()}
    ids = root / "ids.pt"
    torch.save(torch.randint(2, 512, (4000,), generator=torch.Generator().manual_seed(0)), ids)
    return {"cache": cache, "sources": sources, "snapshots": snapshots, "ids": ids, "root": root}


@pytest.fixture
def offline_cache(hub, monkeypatch):
    """huggingface_hub pointed at the fixture's cache, offline (as HF_HUB_OFFLINE=1 sets it)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def weights(out: Path) -> dict[str, bytes]:
    """The packed tensors, their index and the config: what must not depend on the layout."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.startswith("model") or p.name == "config.json"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_published_layouts_quantize_to_the_bytes_of_save_pretrained(offline_cache, tmp_path, layout):
    """By short name or Hub id, offline, from .bin shards with decoder.* names and no lm_head
    (or a tied copy), or safetensors: the same packed tensors as from the save_pretrained folder."""
    calib = CalibConfig(source=str(offline_cache["ids"]), n_samples=4, seqlen=32)
    engine.quantize(SHORT[layout], tmp_path / "hub", QUANT, calib, device="cpu")
    engine.quantize(offline_cache["sources"][layout], tmp_path / "local", QUANT, calib, device="cpu")
    assert weights(tmp_path / "hub") == weights(tmp_path / "local")
    source = json.loads((tmp_path / "hub" / "streamq.json").read_text())["source"]
    snapshot = offline_cache["snapshots"][layout]
    assert source["asked"] == SHORT[layout] and source["repo"] == LAYOUTS[layout].repo
    assert (source["revision"], source["sha"], source["path"]) == ("main", snapshot.name, str(snapshot))
    names = json.loads((tmp_path / "hub" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.startswith("decoder.") for n in names)
    assert ("lm_head.weight" in names) == (layout == "llama")  # tied copies are dropped, as save_pretrained does


@pytest.mark.parametrize("layout", ["opt-30b", "opt-350m"])
def test_transformers_loads_the_output_of_a_published_layout(offline_cache, tmp_path, layout):
    """compressed-tensors output of a .bin, decoder.* source (opt-350m: projections in and out,
    norms after attention): transformers' logits equal those of streamq's own dequantization."""
    from test_formats import dense_twin, load_ct, logits

    from streamq.formats import COMPRESSED_TENSORS

    out = tmp_path / "out"
    engine.quantize(SHORT[layout], out, QUANT, CALIB, device="cpu", format="compressed-tensors")
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(dense_twin(out, COMPRESSED_TENSORS, tmp_path / "twin")).eval()
    assert torch.equal(logits(load_ct(out), 512), logits(twin, 512))


@pytest.mark.parametrize("layout", ["opt-125m", "opt-350m"])
def test_ppl_of_a_bin_source_equals_transformers(offline_cache, tmp_path, layout):
    """streamq ppl by Hub id on .bin weights == transformers' whole-model figure on the same
    snapshot (transformers reads the pickle and its names itself); the tokenizer is OPT's GPT-2
    files, which put a BOS token in front."""
    from test_ppl import _RST_SAMPLE, reference_ppl, text_ids

    text = tmp_path / "eval.txt"
    text.write_text(_RST_SAMPLE * 4)
    snapshot = offline_cache["snapshots"][layout]
    ids = text_ids(snapshot, text)
    assert ids[0] == 0  # the BOS token
    result = perplexity(LAYOUTS[layout].repo, text, seqlen=64, device="cpu")
    assert result.ppl == pytest.approx(reference_ppl(snapshot, ids, 64), rel=1e-5)
    assert result.source["repo"] == LAYOUTS[layout].repo and result.weights == "fp16"


def test_offline_run_by_short_name_killed_and_resumed_is_byte_identical(hub, tmp_path, monkeypatch):
    """The command a user types, HF_HUB_OFFLINE=1 streamq run --model opt-30b, SIGKILLed mid-run
    and resumed: byte-identical to an uninterrupted run."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    killed_run_resumes_byte_identical(["--model", "opt-30b", "--calib", str(hub["ids"]), "--n-samples", "4",
                                       "--seqlen", "32", "--group-size", "64", "--device", "cpu"], tmp_path)


def _streamq(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamq", *args], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"})


def test_download_fetches_only_what_a_run_reads_and_continues_after_a_failure(hub, tmp_path):
    """Online against a Hub on loopback: the first run fails on one shard (one line, exit 2,
    nothing written), the second fetches only what the first did not finish and quantizes, the third asks the Hub
    nothing. TensorFlow and Flax weights and code in the repository are never fetched."""
    served = write_layout(hub["sources"]["opt-30b"], LAYOUTS["opt-30b"], tmp_path / "repo")
    for name, size in (("tf_model.h5", 200_000), ("flax_model.msgpack", 1000), ("modeling_opt.py", 10)):
        (served / name).write_bytes(b"x" * size)
    (served / "LICENSE.md").write_text("licence")
    shard = "pytorch_model-00002-of-00003.bin"
    with FakeHub({"facebook/opt-30b": served}, fail={shard: 1}) as fake:
        env = {**os.environ, "HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        args = ["run", "--model", "facebook/opt-30b", "--output", str(tmp_path / "out"), "--calib", str(hub["ids"]),
                "--n-samples", "4", "--seqlen", "32", "--group-size", "64", "--device", "cpu"]
        first = _streamq(*args, env=env)
        errors = [line for line in first.stderr.splitlines() if line.startswith("streamq: error:")]
        assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr
        assert len(errors) == 1 and "the download of facebook/opt-30b stopped" in errors[0]
        assert "run the same command again to continue it" in errors[0] and not (tmp_path / "out").exists()
        asked, sent = fake.fetched()
        assert shard in asked and shard not in sent  # the download stops at it (the others may not all start)
        assert not {"tf_model.h5", "flax_model.msgpack", "modeling_opt.py"} & set(asked)
        second = _streamq(*args, env=env)
        assert second.returncode == 0, second.stderr
        asked_again, sent_again = fake.fetched()
        assert shard in sent_again and not set(sent) & set(asked_again)  # what was finished stays cached
        assert {"config.json", "pytorch_model.bin.index.json", "vocab.json", "merges.txt", "LICENSE.md",
                "pytorch_model-00001-of-00003.bin", "pytorch_model-00003-of-00003.bin"} <= set(sent) | set(sent_again)
        assert not {"tf_model.h5", "flax_model.msgpack", "modeling_opt.py"} & set(asked_again)
        third = _streamq(*args, "--overwrite", env=env)
        assert third.returncode == 0, third.stderr
        assert fake.log == []  # the cache first: the Hub is not asked
    assert weights(tmp_path / "out") == weights_of_local(hub, tmp_path)
    assert "LICENSE.md" in json.loads((tmp_path / "out" / "streamq.json").read_text())["source"]["files_copied"]


def weights_of_local(hub, tmp_path) -> dict[str, bytes]:
    calib = CalibConfig(source=str(hub["ids"]), n_samples=4, seqlen=32)
    engine.quantize(hub["sources"]["opt-30b"], tmp_path / "local", QUANT, calib, device="cpu")
    return weights(tmp_path / "local")


def test_hub_answers_are_one_line(hub, tmp_path, monkeypatch):
    """A repository the Hub does not have; one with no weights streamq reads; a gated one."""
    from huggingface_hub import constants

    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "config.json").write_text("{}")
    (gguf / "model-q4.gguf").write_bytes(b"GGUF")
    with FakeHub({"someone/gguf-only": gguf, "meta-llama/Llama-2-7b-hf": gguf},
                 gated=("meta-llama/Llama-2-7b-hf",)) as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(InputError, match="^nobody/nothing is neither a local directory nor a model on the Hub"):
            resolve("nobody/nothing")
        with pytest.raises(InputError, match=r"^someone/gguf-only on the Hub holds no weights streamq reads .*; it "
                                             r"has model-q4.gguf$"):
            resolve("someone/gguf-only")
        with pytest.raises(InputError, match="^meta-llama/Llama-2-7b-hf is gated: accept its terms on "
                                             "https://huggingface.co/meta-llama/Llama-2-7b-hf, then log in"):
            resolve("llama-2-7b")


def test_offline_errors_name_the_cache_and_what_is_missing(offline_cache, tmp_path):
    cache = offline_cache["cache"]
    with pytest.raises(InputError, match=f"facebook/opt-66b is no local directory, and at main it is not in the Hub "
                                         f"cache {cache}; HF_HUB_OFFLINE is set: run once online .* or: hf download "
                                         "facebook/opt-66b"):
        resolve("opt-66b")
    with pytest.raises(InputError, match="opt-1234 is neither a directory nor a known short name .*opt-30b"):
        resolve("opt-1234")
    with pytest.raises(InputError, match="--revision applies to Hub ids"):
        resolve(offline_cache["sources"]["opt-30b"], revision="main")
    with pytest.raises(InputError, match="at v2 it is not in the Hub cache"):
        resolve("opt-30b", revision="v2")
    snapshot = offline_cache["snapshots"]["opt-30b"]
    assert resolve("facebook/opt-30b", revision=snapshot.name).path == snapshot  # a commit, without refs/
    partial = to_cache(write_layout(offline_cache["sources"]["opt-30b"], LAYOUTS["opt-30b"], tmp_path / "p"),
                       "someone/partial", cache)
    (partial / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(InputError, match=r"holds [0-9a-f]{12} without pytorch_model-00003-of-00003.bin\); "
                                         r"HF_HUB_OFFLINE"):
        resolve("someone/partial")


def test_files_to_fetch_take_one_weight_type_and_the_small_files():
    names = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin.index.json",
             "pytorch_model-00001-of-00002.bin", "tokenizer.model", "tokenizer.json", "LICENSE", "README.md",
             "original/params.json", "tf_model.h5", "modeling.py", "chat_template.jinja", "model.gguf"]
    shards = {"model.safetensors.index.json": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]}
    assert files_to_fetch(names, lambda kind: shards[kind.index_name]) == sorted([
        "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "tokenizer.model", "tokenizer.json", "LICENSE", "README.md",
        "chat_template.jinja"])
    assert files_to_fetch(["config.json", "pytorch_model.bin", "vocab.json"], None) == \
        ["config.json", "pytorch_model.bin", "vocab.json"]
    assert files_to_fetch(["config.json", "model.gguf"], None) == []


def _opt_folder(hub, tmp_path: Path, state: dict) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((hub["sources"]["opt-30b"] / "config.json").read_bytes())
    torch.save(state, folder / "pytorch_model.bin")
    return folder


class _Shell:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(hub, tmp_path):
    marker = tmp_path / "ran"
    state = dict(ShardReader(hub["snapshots"]["opt-125m"]).with_prefix(""))
    state["decoder.version"] = _Shell(f"touch {marker}")
    folder = _opt_folder(hub, tmp_path, state)
    result = CliRunner().invoke(app, ["run", "--model", str(folder), "--output", str(tmp_path / "out")])
    lines = [line for line in result.stderr.splitlines() if line.startswith("streamq: error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"{folder / 'pytorch_model.bin'} is refused: its pickle names posix.system" in lines[0]
    assert "none of its code ran" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_legacy_pickle_is_one_line_saying_what_to_do(hub, tmp_path):
    folder = _opt_folder(hub, tmp_path, {"x": torch.ones(2)})
    torch.save({"x": torch.ones(2)}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="legacy .pre-1.6. format, which cannot be memory-mapped; re-save it once"):
        ShardReader(folder)
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="is not a PyTorch zip pickle"):
        ShardReader(folder)


def _mapped(path: Path) -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_a_blocks_tensors_are_views_into_the_map_of_the_bin(hub):
    """Reading a block from a .bin copies nothing: every tensor's bytes lie in a memory map of
    the file (what keeps host memory at one block whatever the shard size)."""
    snapshot = hub["snapshots"]["opt-125m"]
    reader, _, family = open_checkpoint(snapshot)
    block = dict(reader.with_prefix(family.block_prefix(1)))  # every tensor read
    spans = _mapped(snapshot / "pytorch_model.bin")
    assert block and spans
    for name, t in block.items():
        assert any(lo <= t.data_ptr() < hi for lo, hi in spans), name
    del block
    reader.release()


def test_fingerprint_covers_bin_shards(hub, tmp_path):
    """A changed weight of the same size changes a .bin shard's CRC-32, so resume sees it."""
    state = dict(ShardReader(hub["snapshots"]["opt-125m"]).with_prefix(""))
    folder = _opt_folder(hub, tmp_path, state)
    before = ShardReader(folder).fingerprint()
    name = "model.decoder.layers.0.fc1.weight"
    state[name] = state[name].clone()
    state[name][0, 0] += 1
    torch.save(state, folder / "pytorch_model.bin")
    assert ShardReader(folder).fingerprint() != before


def test_names_as_data_tied_copies_and_collisions(hub, tmp_path):
    """decoder.* safetensors (a conversion that kept the names) read as model.decoder.*; a tied
    lm_head that differs from the embedding is kept (transformers does not tie it then); one tensor
    under both name variants is refused."""
    from safetensors.torch import save_file

    reader, _, _ = open_checkpoint(hub["sources"]["opt-30b"])
    state = {n: reader.get(n) for n in reader.names()}
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_bytes((hub["sources"]["opt-30b"] / "config.json").read_bytes())
    save_file({n.replace("model.decoder.", "decoder."): t for n, t in state.items()}, str(folder / "model.safetensors"))
    assert open_checkpoint(folder)[0].names() == reader.names()
    embed = state["model.decoder.embed_tokens.weight"]
    save_file({**state, "lm_head.weight": embed.clone()}, str(folder / "model.safetensors"))
    assert "lm_head.weight" not in open_checkpoint(folder)[0].names()  # equal values: tied
    save_file({**state, "lm_head.weight": embed + 1}, str(folder / "model.safetensors"))
    assert "lm_head.weight" in open_checkpoint(folder)[0].names()
    save_file({**state, "decoder.final_layer_norm.bias": state["model.decoder.final_layer_norm.bias"].clone()},
              str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="holds both .*final_layer_norm.bias .*one tensor under two names"):
        open_checkpoint(folder)


# ---------------------------------------------------------------- data sets by name

@pytest.fixture(scope="module")
def saved_rows(tmp_path_factory):
    """A small data set in the datasets library's own on-disk format (save_to_disk): the
    paragraphs of the built-in text as rows, with empty rows between, as wikitext has them."""
    datasets = pytest.importorskip("datasets")
    from streamq.calib import builtin_text

    paragraphs = [p for p in builtin_text().split("\n\n") if p.strip()][:400]
    rows = [r for p in paragraphs for r in (p, "")]
    path = tmp_path_factory.mktemp("data") / "rows"
    datasets.Dataset.from_dict({"text": rows, "id": list(range(len(rows)))}).save_to_disk(str(path))
    return path, rows


def test_evaluation_data_by_name_joins_rows_as_the_paper(hub, saved_rows, tmp_path, monkeypatch):
    """--data wikitext2 reads the raw test split (checked by the call it makes) and joins every
    row with blank lines: the same perplexity as that text in a file; a save_to_disk folder too."""
    import datasets

    path, rows = saved_rows
    text = tmp_path / "joined.txt"
    text.write_text("\n\n".join(rows))
    model = hub["sources"]["opt-30b"]
    expected = perplexity(model, text, seqlen=64, max_segments=8, device="cpu").ppl
    assert perplexity(model, str(path), seqlen=64, max_segments=8, device="cpu").ppl == expected
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or datasets.load_from_disk(str(path)))
    assert perplexity(model, "wikitext2", seqlen=64, max_segments=8, device="cpu").ppl == expected
    assert calls == [(("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    perplexity(model, "someone/corpus:en@validation#text", seqlen=64, max_segments=8, device="cpu")
    assert calls[-1] == (("someone/corpus", "en"), {"split": "validation"})
    with pytest.raises(Exception, match="has no field 'body' \\(it has text, id\\)"):
        perplexity(model, "someone/corpus@test#body", seqlen=64, device="cpu")


def test_calibration_by_name_takes_shuffled_documents_until_it_has_enough(saved_rows, monkeypatch):
    """--calib pileval: pile-val's validation split in llm-awq's shuffled order (seed 42), empty
    rows dropped, only as many documents as the samples need; the same stream every time."""
    import datasets
    from make_tiny_model import train_tokenizer

    from streamq.calib import load_tokens

    path, rows = saved_rows
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or datasets.load_from_disk(str(path)))
    tok = train_tokenizer(512)
    cfg = CalibConfig(source="pileval", n_samples=8, seqlen=64)
    ids = load_tokens(cfg, tok)
    assert calls[0] == (("mit-han-lab/pile-val-backup", None), {"split": "validation"})
    assert torch.equal(ids, load_tokens(cfg, tok)) and ids.numel() >= 8 * 64
    shuffled = [r.strip() for r in datasets.load_from_disk(str(path)).shuffle(seed=42)["text"] if r.strip()]
    for n in range(1, len(shuffled)):  # the fewest documents, in that order, that hold the tokens
        if len(tok("\n\n".join(shuffled[:n]), add_special_tokens=False)["input_ids"]) >= 8 * 64:
            break
    expected = tok("\n\n".join(shuffled[:n]), add_special_tokens=False)["input_ids"]
    assert n < 20 and torch.equal(ids, torch.tensor(expected))


def test_data_set_errors_are_one_line(tmp_path, monkeypatch):
    import datasets

    from streamq.errors import CalibrationError
    from streamq.sources import datasets as named_sets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty")
    with pytest.raises(CalibrationError, match=r"^cannot read data set Salesforce/wikitext:wikitext-2-raw-v1@test#"
                                               r"text \(.*\); offline, it must be in the datasets cache"):
        named_sets.evaluation_text(named_sets.named("wikitext2"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CalibrationError, match="needs the datasets library: pip install datasets"):
        named_sets.evaluation_text(named_sets.named("pileval"))
    assert named_sets.named(str(tmp_path / "no-such-file.txt")) is None
