"""Calibration tokens from text, JSONL, .pt and .npy; deterministic cutting; clear errors."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from streamq.calib import builtin_text, cut_blocks, load_tokens, read_text
from streamq.config import CalibConfig
from streamq.errors import CalibrationError


def test_cut_is_seeded_and_in_stream_order():
    tokens = torch.arange(1000)
    cfg = CalibConfig(n_samples=5, seqlen=100)
    a, b = cut_blocks(tokens, cfg), cut_blocks(tokens, cfg)
    assert torch.equal(a, b) and a.shape == (5, 100)
    starts = a[:, 0].tolist()
    assert starts == sorted(starts) and all(s % 100 == 0 for s in starts)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 99, dtype=torch.long))  # contiguous
    assert not torch.equal(a, cut_blocks(tokens, CalibConfig(n_samples=5, seqlen=100, seed=1)))


def test_exactly_enough_tokens_uses_them_all():
    blocks = cut_blocks(torch.arange(300), CalibConfig(n_samples=3, seqlen=100))
    assert torch.equal(blocks.flatten(), torch.arange(300))


def test_too_short_text_is_a_clear_error():
    with pytest.raises(CalibrationError, match=r"has 250 tokens, fewer than --n-samples 3 x --seqlen 100 = 300"):
        cut_blocks(torch.arange(250), CalibConfig(n_samples=3, seqlen=100))


def test_ids_outside_vocab_refused():
    with pytest.raises(CalibrationError, match="outside the model's vocabulary"):
        cut_blocks(torch.arange(300), CalibConfig(n_samples=1, seqlen=100), vocab_size=200)


def test_jsonl_joins_text_fields(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second", "meta": 1}) + "\n")
    assert read_text(f) == "first doc\n\nsecond"
    f.write_text('{"body": "x"}\n')
    with pytest.raises(CalibrationError, match=r"c.jsonl:1 is not a JSON object with a 'text' field"):
        read_text(f)


def test_text_and_ids_give_the_same_blocks(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models["opt"])
    text = builtin_text()[:20000]
    (tmp_path / "c.txt").write_text(text)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    torch.save(ids, tmp_path / "c.pt")
    np.save(tmp_path / "c.npy", ids.numpy())
    cfg = lambda src: CalibConfig(source=str(tmp_path / src), n_samples=4, seqlen=64)
    from_text = cut_blocks(load_tokens(cfg("c.txt"), tok), cfg("c.txt"))
    assert torch.equal(from_text, cut_blocks(load_tokens(cfg("c.pt"), None), cfg("c.pt")))
    assert torch.equal(from_text, cut_blocks(load_tokens(cfg("c.npy"), None), cfg("c.npy")))


def test_builtin_text_is_english_prose():
    text = builtin_text()
    assert len(text) > 300_000 and "the" in text.split()


@pytest.mark.parametrize("content,match", [
    (torch.zeros(3, 4, dtype=torch.long), "1-D integer tensor"),
    (torch.zeros(10), "1-D integer tensor"),
])
def test_bad_id_files(tmp_path, content, match):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(CalibrationError, match=match):
        load_tokens(CalibConfig(source=str(tmp_path / "bad.pt")), None)


def test_missing_file_and_missing_tokenizer(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_tokens(CalibConfig(source=str(tmp_path / "none.txt")), None)
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(CalibrationError, match="no tokenizer files; pass pre-tokenised ids"):
        load_tokens(CalibConfig(source=str(tmp_path / "t.txt")), None)


def test_bos_starts_every_sample():
    from streamq.calib import cut_blocks

    cfg = CalibConfig(n_samples=3, seqlen=100, bos=True)
    blocks = cut_blocks(torch.arange(2, 400), cfg, bos_id=1)
    assert blocks.shape == (3, 100) and torch.all(blocks[:, 0] == 1)
    assert torch.all(blocks[:, 2:] - blocks[:, 1:-1] == 1)  # then 99 consecutive stream tokens
    with pytest.raises(CalibrationError, match="the tokenizer has none"):
        cut_blocks(torch.arange(400), cfg, bos_id=None)
