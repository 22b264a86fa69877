"""Group quantization: exact codes, error bounds, quantize/dequantize == pseudo-quantize."""

import pytest
import torch

from streamq.errors import SettingsError
from streamq.quant import check_group_size, dequantize, pseudo_quantize, quant_params, quantize


def test_known_group_codes():
    w = torch.linspace(-1.0, 2.0, 8)[None]  # one group of 8: range 3 over 15 steps
    scales, zeros = quant_params(w, 4, 8)
    assert scales.item() == pytest.approx(0.2, rel=1e-3)  # fp16-rounded 0.2
    assert zeros.item() == 5  # -round(-1 / 0.2)
    codes = quantize(w, scales, zeros, 4)
    expected = torch.clamp(torch.round(w / scales) + 5, 0, 15).to(torch.uint8)
    assert torch.equal(codes, expected)
    assert codes[0, 0] == 0 and codes[0, -1] == 15


@pytest.mark.parametrize("w_bit", [3, 4])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("zero_point", [True, False])
def test_error_within_half_step(w_bit, group_size, zero_point):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    scales, zeros = quant_params(w, w_bit, group_size, zero_point)
    codes = quantize(w, scales, zeros, w_bit)
    assert int(codes.max()) <= 2**w_bit - 1
    deq = dequantize(codes, scales, zeros, torch.float32)
    step = scales.repeat_interleave(group_size, dim=1)
    # every group of a normal sample straddles zero, so no value falls outside the grid
    assert ((w - deq).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(deq, pseudo_quantize(w, w_bit, group_size, zero_point))


def test_scales_are_fp16_exact():
    w = torch.randn(8, 128, dtype=torch.float32)
    scales, _ = quant_params(w, 4, 128)
    assert torch.equal(scales, scales.half().float())


def test_symmetric_matches_signed_codes():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    scales, zeros = quant_params(w, 4, 128, zero_point=False)
    assert (zeros == 8).all()
    signed = torch.clamp(torch.round(w.reshape(16, 1, 128) / scales[..., None]), -8, 7)
    assert torch.equal(pseudo_quantize(w, 4, 128, False), (signed * scales[..., None]).reshape(16, 128))


def test_group_size_error_names_layer_and_fitting_sizes():
    check_group_size(576, 64, "x")
    with pytest.raises(SettingsError, match=r"576 of model.layers.0.mlp.gate_proj; sizes that fit: 64, 32, 16, 8"):
        check_group_size(576, 128, "model.layers.0.mlp.gate_proj")
