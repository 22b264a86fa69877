"""The command line: a working run, and one clear line (no traceback, exit 2) for bad input."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from streamq.cli import app

runner = CliRunner()
SMALL = ["--n-samples", "4", "--seqlen", "64", "--device", "cpu"]  # facts of a CPU run


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, match):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.stderr.splitlines() if l.startswith("streamq: error:")]
    assert len(lines) == 1 and match in lines[0], result.stderr


def test_run_writes_checkpoint(tiny_models, tmp_path):
    result = invoke("run", "--model", tiny_models["llama"], "--output", tmp_path / "out", *SMALL, "--mode", "rtn")
    assert result.exit_code == 0, result.output
    assert "quantized 2 blocks (rtn, INT4, group 128)" in result.stdout
    info = json.loads((tmp_path / "out" / "streamq.json").read_text())
    assert info["calib"]["n_samples"] == 4 and info["quant"]["mode"] == "rtn"


def test_help_explains_every_option():
    # a wide terminal: at 80 columns rich shortens the longest option names (--gptq-act-ord…)
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--output", "--w-bit", "--group-size", "--mode", "--calib", "--n-samples",
                   "--seqlen", "--device", "--symmetric", "--duo-scaling", "--no-clip", "--shard-size", "--overwrite",
                   "--recipe", "--identity", "--clip-tokens", "--gptq-act-order", "--min-expert-tokens"):
        assert option in result.stdout


def test_recipe_switches_reach_the_run(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--model", tiny_models["llama"], "--output", out, *SMALL, "--recipe", "paper",
                    "--duo-scaling", "--identity", "--alpha-one", "--clip-tokens", "100")
    assert result.exit_code == 0, result.output
    quant = json.loads((out / "streamq.json").read_text())["quant"]
    assert (quant["duo_scaling"], quant["identity"], quant["alpha_one"], quant["clip_tokens"]) == (True, True, True, 100)
    assert (quant["gptq"], quant["gptq_act_order"], quant["next_input"]) == (False, False, "fp16")
    for args, expected in ((["--method", "gptq"], (True, "quantized")),  # the default recipe, as measured
                           (["--method", "gptq", "--recipe", "paper"], (False, "quantized")),
                           (["--method", "awq+gptq", "--next-input", "fp16"], (True, "fp16"))):
        result = invoke("run", "--model", tiny_models["llama"], "--output", out, *SMALL, "--overwrite", *args)
        assert result.exit_code == 0, result.output
        quant = json.loads((out / "streamq.json").read_text())["quant"]
        assert (quant["gptq_act_order"], quant["next_input"]) == expected, args
    assert_clean_error(invoke("run", "--model", tiny_models["llama"], "--output", tmp_path / "o2", "--clip-tokens", 0),
                       "--clip-tokens must be at least 1")
    assert not (tmp_path / "o2").exists()


def test_missing_model_dir(tmp_path):
    assert_clean_error(invoke("run", "--model", tmp_path / "nope", "--output", tmp_path / "o"), "no such directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "opt"}')
    (tmp_path / "empty" / "model.gguf").write_bytes(b"GGUF")
    assert_clean_error(invoke("run", "--model", tmp_path / "empty", "--output", tmp_path / "o"),
                       "holds no weights streamq reads (model.safetensors / model.safetensors.index.json or "
                       "pytorch_model.bin / pytorch_model.bin.index.json); it has model.gguf")
    assert not (tmp_path / "o").exists()


def test_missing_shard(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["opt"], broken)
    next(broken.glob("model-*.safetensors")).unlink()
    assert_clean_error(invoke("run", "--model", broken, "--output", tmp_path / "o", *SMALL), "is missing from")


def test_truncated_shard(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["opt"], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    assert_clean_error(invoke("run", "--model", broken, "--output", tmp_path / "o", *SMALL), "truncated")


def test_summary_reports_memory_and_sizes(tiny_models, tmp_path):
    result = invoke("run", "--model", tiny_models["opt"], "--output", tmp_path / "o", *SMALL, "--max-gpu-mem", "1GB")
    assert result.exit_code == 0, result.output
    assert "activations on the device" in result.stdout
    assert "peak GPU memory n/a (CPU run), peak RSS" in result.stdout
    assert "size on disk: " in result.stdout and " GB -> " in result.stdout and "INT4" in result.stdout


def test_unsupported_architecture(tiny_models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_models["opt"], other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    assert_clean_error(invoke("run", "--model", other, "--output", tmp_path / "o"), "unsupported architecture 'gpt2'")


def test_group_size_not_dividing(tiny_models, tmp_path):
    assert_clean_error(invoke("run", "--model", tiny_models["opt"], "--output", tmp_path / "o", "--group-size", "96", *SMALL),
                       "--group-size 96 does not divide the input width 128")
    assert not (tmp_path / "o").exists()


def test_nonempty_output_refused_and_kept(tiny_models, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious").write_text("keep me")
    assert_clean_error(invoke("run", "--model", tiny_models["opt"], "--output", out), "--overwrite")
    assert (out / "precious").read_text() == "keep me"


@pytest.mark.parametrize("args,match", [
    (["--w-bit", "2"], "--w-bit must be 3 or 4"),
    (["--shard-size", "lots"], "cannot read size 'lots'"),
    (["--n-samples", "100000"], "fewer than --n-samples 100000"),
    (["--max-gpu-mem", "1MB", *SMALL], "--max-gpu-mem 976.56KiB is too small: one block needs at least"),
    (["--max-gpu-mem", "lots"], "cannot read size 'lots'"),
    (["--shard-size", "0"], "--shard-size 0B is too small: shards hold at least 16KiB"),
    (["--seqlen", "2000"], "--seqlen 2000 is longer than the model's 1024 positions"),
])
def test_bad_settings(tiny_models, tmp_path, args, match):
    assert_clean_error(invoke("run", "--model", tiny_models["opt"], "--output", tmp_path / "o", *args), match)
    assert not (tmp_path / "o").exists()


def test_the_smallest_budget_a_refusal_names_works_when_copied(tiny_models, tmp_path):
    """It is rounded up, not down: copied back as --max-gpu-mem it plans."""
    import re

    from streamq import engine
    from streamq.config import CalibConfig, QuantConfig, parse_size

    result = invoke("run", "--model", tiny_models["opt"], "--output", tmp_path / "o", "--max-gpu-mem", "1MB", *SMALL)
    named = re.search(r"needs at least (\S+) ", result.stderr).group(1)
    calib = CalibConfig(n_samples=int(SMALL[SMALL.index("--n-samples") + 1]), seqlen=int(SMALL[SMALL.index("--seqlen") + 1]))
    plan = engine.plan(tiny_models["opt"], QuantConfig(), calib, device="cpu", max_gpu_mem=parse_size(named))
    assert parse_size(named) >= plan.minimum_bytes


def test_non_finite_source_weights_are_refused_by_name_and_earlier_blocks_kept(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_models["opt"], model)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.decoder.layers.1.fc2.weight"
    shard = model / index[name]
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "o"
    assert_clean_error(invoke("run", "--model", model, "--output", out, *SMALL),
                       "block 1: the source's model.decoder.layers.1.fc2.weight holds 1 non-finite values (NaN or inf)")
    assert json.loads((out / ".streamq" / "journal.json").read_text())["done_blocks"] == 1
    text = tmp_path / "text.txt"  # streamq ppl of the same checkpoint: refused by name too, not a NaN figure
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert_clean_error(invoke("ppl", "--model", model, "--data", text, "--seqlen", "64", "--device", "cpu"),
                       "the source's model.decoder.layers.1.fc2.weight holds 1 non-finite values (NaN or inf)")


@pytest.mark.parametrize("command", ["run", "ppl"])
def test_missing_or_corrupt_config_is_one_line(tiny_models, tmp_path, command):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["opt"], model)
    args = ["--output", tmp_path / "out"] if command == "run" else ["--data", tmp_path / "x.txt"]
    (model / "config.json").unlink()
    assert_clean_error(invoke(command, "--model", model, *args), "has no config.json")
    (model / "config.json").write_text('{"model_ty')
    assert_clean_error(invoke(command, "--model", model, *args), "is not a valid JSON file")
    assert not (tmp_path / "out").exists()
