"""`streamq demo` end to end on a cache that already holds its assets (tests never fetch)."""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager

from streamq import assets
from streamq.demo import DemoSettings, demo


def test_demo_quantizes_and_evaluates_from_a_prepared_cache(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_models["llama"], cache / "smollm2-135m")  # stands in for the PyPI build
    # any English-like text other than the calibration text will do: the reference, reversed
    (cache / "eval-docutils-docs.txt").write_text(assets.calibration_text(cache).read_text()[::-1])
    lines, bars = [], []

    @contextmanager
    def progress(desc):
        bars.append((desc, []))
        yield lambda done, total: bars[-1][1].append((done, total))

    settings = DemoSettings(calib_samples=4, calib_seqlen=64, eval_seqlen=128, eval_segments=3, new_tokens=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = demo(lines.append, progress, cache=cache, device="cpu", settings=settings)
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    assert [line[:5] for line in lines] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert [desc for desc, _ in bars] == ["quantizing", "ppl fp16", "ppl INT4"]
    assert all(calls[-1][0] == calls[-1][1] for _, calls in bars)  # every bar reached its end
    assert result.int4.weights == "compressed-tensors-int4" and result.fp16.weights == "fp16"
    assert result.fp16.segments == result.int4.segments == 3
    assert 0 < result.int4_bytes < result.fp16_bytes
    row = result.table().splitlines()[-1]
    assert row.startswith("| SmolLM2-135M-Instruct | ") and f"{result.int4.ppl:.2f}" in row
    assert (result.out_dir / "streamq.json").is_file()
    # both answers exist, the quantized one from transformers loading the compressed-tensors output
    assert set(result.completions) == {"fp16", "INT4"} and all(result.completions.values())
    assert json.loads((result.out_dir / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
