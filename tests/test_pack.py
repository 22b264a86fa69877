"""AutoAWQ GEMM packing: nibble order, sign handling, round trips for INT4 and INT3."""

import pytest
import torch

from streamq.formats.awq import AWQ_ORDER, pack_gemm, pack_linear, unpack_gemm


def test_nibble_order_of_one_word():
    codes = torch.arange(8, dtype=torch.uint8)[None]  # column j holds value j
    packed = pack_gemm(codes)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    # nibble i holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i]
    assert packed.item() == 0x75316420
    word = packed.item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(AWQ_ORDER)


def test_high_nibble_gives_negative_int32_and_round_trips():
    codes = torch.full((2, 8), 15, dtype=torch.uint8)
    packed = pack_gemm(codes)
    assert (packed == -1).all()
    assert torch.equal(unpack_gemm(packed), codes)


@pytest.mark.parametrize("w_bit", [3, 4])
@pytest.mark.parametrize("shape", [(128, 256), (64, 8), (7, 48)])
def test_round_trip_random_codes(w_bit, shape):
    g = torch.Generator().manual_seed(w_bit * 100 + shape[0])
    codes = torch.randint(0, 2**w_bit, shape, generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_gemm(pack_gemm(codes)), codes)


def test_unpack_reads_any_int32_word_nibble_by_nibble():
    """Every word, negative ones included, against shifting it in Python: nibble i is column
    AWQ_ORDER[i]; a non-contiguous view reads as its values."""
    g = torch.Generator().manual_seed(7)
    words = torch.randint(-2**31, 2**31, (9, 6), generator=g, dtype=torch.int64).to(torch.int32)
    words[0, :3] = torch.tensor([0, -1, -2**31], dtype=torch.int32)
    for packed in (words, words.t()):
        got = unpack_gemm(packed)
        for r, row in enumerate(packed.tolist()):
            for c, word in enumerate(row):
                nibbles = [((word & 0xFFFFFFFF) >> (4 * i)) & 0xF for i in range(8)]
                assert [got[r, 8 * c + AWQ_ORDER[i]].item() for i in range(8)] == nibbles


def test_pack_linear_layout():
    out_f, in_f, group = 24, 256, 128
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8)
    scales = torch.rand(out_f, in_f // group) + 0.1
    zeros = torch.randint(0, 16, (out_f, in_f // group)).float()
    t = pack_linear(codes, scales, zeros)
    assert t["qweight"].shape == (in_f, out_f // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (in_f // group, out_f // 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (in_f // group, out_f) and t["scales"].dtype == torch.float16
    assert torch.equal(unpack_gemm(t["qweight"]), codes.t())
    assert torch.equal(unpack_gemm(t["qzeros"]).float(), zeros.t())


def test_width_not_multiple_of_eight_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_gemm(torch.zeros(2, 12, dtype=torch.uint8))
