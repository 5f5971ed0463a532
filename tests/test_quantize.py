import torch
import pytest
from compressed_tensors.quantization import QuantizationArgs, fake_quantize, preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams

from flatquant_modifier.quantize import (
    fake_quantize_activation,
    fake_quantize_mxfp4_weight,
    fake_quantize_weight,
    quantize_activation,
    weight_scale,
)


def test_activation_quant_npu_formula_by_hand():
    # one token, max|y| = 7 and clip 1.0 -> scale 1.0: plain rounding, saturation at 7
    y = torch.tensor([[7.0, -7.0, 2.4, -2.6, 0.5, 1.5, 0.0, 3.49]])
    q, scale = quantize_activation(y, 1.0)
    assert scale.item() == 1.0
    assert q.tolist() == [[7, -7, 2, -3, 0, 2, 0, 3]]  # half to even: 0.5 -> 0, 1.5 -> 2
    # clip 0.5 -> scale = 7 * 0.5 / 7 = 0.5: +7 saturates at 7, -7 at -8
    q, scale = quantize_activation(y, 0.5)
    assert scale.item() == 0.5
    assert q[0, :4].tolist() == [7, -8, 5, -5]
    torch.testing.assert_close(fake_quantize_activation(y, 0.5), q * 0.5)


def test_activation_quant_is_per_token_and_handles_zero_tokens():
    y = torch.tensor([[1.0, -2.0], [0.0, 0.0], [14.0, 7.0]])
    q, scale = quantize_activation(y, 1.0)
    torch.testing.assert_close(scale, torch.tensor([[2 / 7], [0.0], [2.0]]))
    assert q[1].tolist() == [0, 0]
    assert torch.isfinite(fake_quantize_activation(y, 1.0)).all()


def test_weight_quant_matches_compressed_tensors_channel_int4():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
    amax = w.abs().amax(dim=1, keepdim=True)
    scale, zp = calculate_qparams(-amax, amax, args)
    expected = fake_quantize(w, scale, zp, args)
    torch.testing.assert_close(fake_quantize_weight(w), expected)
    torch.testing.assert_close(weight_scale(w), amax / 7.5)


def test_weight_clip_equals_clamp_then_minmax():
    # training quantizes W with scale c*amax/7.5; a min-max observer on the clamped
    # weight (how the clip is baked in) gives the same scale and the same values,
    # except at the -c*amax bound itself: -bound/scale is the tie -7.5, which
    # compressed-tensors resolves to -8 or -7 by floating-point luck (the same tie
    # any row whose amax is negative has, clipped or not)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 24, generator=g, dtype=torch.float64)
    clip = torch.rand(8, generator=g, dtype=torch.float64) * 0.5 + 0.5
    bound = w.abs().amax(dim=1, keepdim=True) * clip[:, None]
    clamped = torch.maximum(torch.minimum(w, bound), -bound)
    torch.testing.assert_close(weight_scale(w, clip), weight_scale(clamped))
    trained, baked = fake_quantize_weight(w, clip), fake_quantize_weight(clamped)
    tie = clamped == -bound
    torch.testing.assert_close(trained[~tie], baked[~tie])
    step = weight_scale(w, clip).expand_as(w)[tie]
    diff = (baked - trained)[tie]
    assert torch.all(torch.isclose(diff, 0 * step) | torch.isclose(diff, step))


def test_straight_through_gradients_reach_clip():
    y = torch.randn(4, 16, requires_grad=True)
    clip = torch.tensor(0.9, requires_grad=True)
    fake_quantize_activation(y, clip).pow(2).sum().backward()
    assert y.grad is not None and clip.grad is not None and clip.grad != 0


def test_e2m1_rounding_is_half_to_even_and_saturates():
    from flatquant_modifier.quantize import round_to_e2m1

    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.9, 1e9, 0.26, 2.9, -2.5, -5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.5, 3.0, -2.0, -4.0]
    assert round_to_e2m1(x).tolist() == expected


def test_mxfp4_scales_follow_the_npu_rule():
    """Per 32 values: E8M0 byte floor(log2(amax)) + 127 - 2 (OCP MX, E2M1's largest
    exponent 2); all-zero groups get 0 and quantize to 0."""
    from flatquant_modifier.quantize import fake_quantize_mxfp4, quantize_mxfp4

    x = torch.zeros(2, 96)
    x[0, 0], x[0, 1] = 6.0, 1.0  # amax 6: 2 ** 2 -> byte 127, scale 1
    x[0, 40] = 0.3  # amax 0.3: 2 ** -2 -> byte 123, scale 1/16: 4.8 -> 4 -> 0.25
    x[1, 70] = -1000.0  # 2 ** 9 -> byte 134, scale 128: -7.8 -> -6 -> -768
    values, scale_byte = quantize_mxfp4(x)
    assert scale_byte.tolist() == [[127, 123, 0], [0, 0, 134]]
    assert values[0, :2].tolist() == [6.0, 1.0] and values[0, 40].item() == 4.0
    assert values[1, 70].item() == -6.0
    y = fake_quantize_mxfp4(x.requires_grad_())
    assert y[0, 40].item() == 0.25 and y[1, 70].item() == -768.0
    y.sum().backward()  # straight through
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mxfp4_weights_match_compressed_tensors_mxfp4(dtype):
    """The training's MXFP4 weight quantizer is compressed-tensors' MXFP4 scheme (its
    power-of-two rounding of the group maximum up from 1.75, E2M1 ties to even), bit
    for bit, a zero group included."""
    args = preset_name_to_scheme("MXFP4A16", ["Linear"]).weights
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 4).to(dtype)
    w[3, :32] = 0
    w[5, :32] = 1.75 * torch.sign(torch.randn(32, generator=g)) / 4  # mantissa 1.75
    grouped = w.reshape(64, -1, 32)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    assert torch.equal(fake_quantize_mxfp4_weight(w), fake_quantize(w, scale, zero_point, args))


def test_mxfp4_weight_clip_clamps_then_quantizes_with_gradients():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, generator=g, dtype=torch.float64)
    clip = torch.full((4,), 0.7, dtype=torch.float64, requires_grad=True)
    bound = w.abs().amax(-1, keepdim=True) * 0.7
    expected = fake_quantize_mxfp4_weight(w.clamp(-bound, bound))
    out = fake_quantize_mxfp4_weight(w, clip)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    (out * w).sum().backward()  # larger bounds give larger |values|
    assert clip.grad is not None and torch.all(clip.grad > 0)
