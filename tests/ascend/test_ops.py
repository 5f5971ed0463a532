"""The PyTorch reference of the NPU ops against hand-computed cases."""

import importlib.util

import pytest
import torch

from flatquant_modifier.ascend.ops import (
    kronecker_quant,
    pack_int4,
    pack_int4_offset_binary,
    quant_matmul,
    unpack_int4,
    unpack_int4_offset_binary,
)
from flatquant_modifier.quantize import (
    fake_quantize_activation,
)


def test_pack_order_low_nibble_first_twos_complement():
    values = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int8)
    # nibbles 1..7 then 0x8 (-8) -> 0x87654321 as int32
    assert pack_int4(values).tolist() == [[0x87654321 - 2**32]]
    assert pack_int4(torch.tensor([[-1, 0, 0, 0, 0, 0, 0, 0]])).tolist() == [[0xF]]
    # vllm-ascend's CPU fallback: v + 8 per nibble -> 0x0FEDCBA9
    assert pack_int4_offset_binary(values).tolist() == [[0x0FEDCBA9]]


def test_pack_unpack_round_trip_both_layouts():
    values = torch.randint(-8, 8, (3, 5, 16), generator=torch.Generator().manual_seed(0))
    values = values.to(torch.int8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    assert torch.equal(unpack_int4_offset_binary(pack_int4_offset_binary(values)), values)
    assert pack_int4(values).shape == (3, 5, 2) and pack_int4(values).dtype == torch.int32


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_int4(torch.zeros(1, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 8), 9, dtype=torch.int8))


def test_kronecker_quant_scale_formula_and_clip_by_hand():
    x = torch.zeros(1, 2, 8)
    x[0, 0, :4] = torch.tensor([7.0, -7.0, 2.4, -2.6])
    x[0, 1, :2] = torch.tensor([0.5, 1.5])
    eye2, eye8 = torch.eye(2), torch.eye(8)
    packed, scale = kronecker_quant(x, eye2, eye8, clip_ratio=1.0)
    assert scale.tolist() == [1.0]  # max|y| * clip / 7
    q = unpack_int4(packed)
    assert q[0, 0, :4].tolist() == [7, -7, 2, -3] and q[0, 1, :2].tolist() == [0, 2]
    packed, scale = kronecker_quant(x, eye2, eye8, clip_ratio=0.5)
    assert scale.tolist() == [0.5]
    assert unpack_int4(packed)[0, 0, :4].tolist() == [7, -8, 5, -5]  # saturated
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kronecker_quant(x, eye2, eye8, clip_ratio=1.5)


def test_kronecker_quant_is_left_times_x_times_right():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=g)
    left, right = torch.randn(3, 3, generator=g), torch.randn(8, 8, generator=g)
    packed, scale = kronecker_quant(x, left, right, clip_ratio=0.9)
    y = left @ x @ right
    expected = fake_quantize_activation(y.reshape(5, -1), 0.9).reshape(5, 3, 8)
    torch.testing.assert_close(unpack_int4(packed).float() * scale[:, None, None], expected)


def test_quant_matmul_by_hand_with_bias():
    a = torch.tensor([[1, -2, 0, 0, 0, 0, 0, 3]], dtype=torch.int8)  # [m=1, k=8]
    w = torch.tensor([[2, 1, 0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.int8)
    out = quant_matmul(
        pack_int4(a), pack_int4(w).t(), scale=torch.tensor([0.5, 2.0]),
        pertoken_scale=torch.tensor([0.1]), bias=torch.tensor([1.0, 0.0]),
        output_dtype=torch.float32,
    )
    # a.w0 = 2 - 2 - 3 = -3, a.w1 = 3
    torch.testing.assert_close(out, torch.tensor([[-3 * 0.5 * 0.1 + 1.0, 3 * 2.0 * 0.1]]))


def test_asking_for_the_npu_without_torch_npu_is_a_clear_error():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed")
    x = torch.zeros(1, 8, 8)
    with pytest.raises(RuntimeError, match=r"use_npu=True needs torch_npu"):
        kronecker_quant(x, torch.eye(8), torch.eye(8), use_npu=True)
    with pytest.raises(RuntimeError, match=r"flatquant-modifier\[npu\]"):
        quant_matmul(torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                     torch.ones(1), torch.ones(1), use_npu=True)
    # left to choose (use_npu=None), a CPU tensor takes the reference
    packed, scale = kronecker_quant(x, torch.eye(8), torch.eye(8))
    assert packed.shape == (1, 8, 1) and scale.tolist() == [0.0]


def test_dynamic_quant_is_per_token_max_over_127_by_hand():
    from flatquant_modifier.ascend.ops import dynamic_quant

    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = dynamic_quant(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, torch.tensor([1.0, 0.0]))
    assert q.tolist() == [[1, -2, 0, 127], [0, 0, 0, 0]]  # 0.5 rounds half to even


def test_int8_quant_matmul_is_exact_beyond_float32_integers():
    x1 = torch.full((1, 4096), 127, dtype=torch.int8)
    x2 = torch.full((4096, 2), -128, dtype=torch.int8)
    x2[0, 1] = -127
    # 127 * -128 * 4096 = -66584576 (beyond float32's exact integers, 2^24); the two
    # columns differ by 127
    out = quant_matmul(x1, x2, torch.ones(2, dtype=torch.float64),
                       torch.ones(1, dtype=torch.float64), output_dtype=torch.float64)
    assert out.tolist() == [[-66584576.0, -66584576.0 + 127]]


# ----------------------------------------------------------------- MXFP4 (Ascend 950)


def test_fp4_packing_puts_the_even_element_in_the_low_nibble():
    from flatquant_modifier.ascend.ops import pack_fp4, unpack_fp4

    values = torch.tensor([[0.5, -6.0, 0.0, 3.0]])
    packed = pack_fp4(values)  # codes 1, 15 (sign bit 3), 0, 5
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF1, 0x50]]
    assert torch.equal(unpack_fp4(packed), values)
    with pytest.raises(ValueError, match="E2M1 grid"):
        pack_fp4(torch.tensor([[0.7, 1.0]]))


def test_mxfp4_kronecker_quant_is_the_transform_then_the_mx_quantizer():
    """Dequantized output of the FP4 npu_kronecker_quant reference = the MXFP4 fake
    quantizer applied to x @ kron(P1, P2) (vllm-ascend passes left_trans transposed),
    in exact arithmetic; scales laid out [K, groups / 2, 2]."""
    from flatquant_modifier.ascend.ops import kronecker_quant_mxfp4, unpack_fp4
    from flatquant_modifier.kronecker import kronecker_matmul
    from flatquant_modifier.quantize import fake_quantize_mxfp4

    torch.manual_seed(0)
    m, n = 4, 24  # 96 = 3 groups of 32: the scale is padded to 2 x 2
    x = torch.randn(5, m * n, dtype=torch.float64) * 3
    p1, p2 = torch.randn(m, m, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    packed, scale = kronecker_quant_mxfp4(x.view(5, m, n), p1.T, p2, clip_ratio=0.5,
                                          intermediate_dtype=None)
    assert packed.shape == (5, m * n // 2) and scale.shape == (5, 2, 2)
    assert torch.all(scale[:, 1, 1] == 0)
    groups = scale.reshape(5, 4)[:, :3].double()
    dequantized = (unpack_fp4(packed, torch.float64).view(5, 3, 32)
                   * torch.exp2(groups - 127).unsqueeze(-1)).view(5, -1)
    expected = fake_quantize_mxfp4(kronecker_matmul(x, p1, p2))
    torch.testing.assert_close(dequantized, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"clip_ratio must be in \(0, 1\]"):
        kronecker_quant_mxfp4(x.view(5, m, n), p1.T, p2, clip_ratio=1.5)


def test_mx_matmul_multiplies_the_dequantized_operands():
    """npu_quant_matmul with group_sizes [1, 1, 32], operands as vllm-ascend passes
    them: the packed weight [n, k/2] and its scale [n, k/32] viewed [n, k/64, 2],
    both transposed."""
    from flatquant_modifier.ascend.ops import kronecker_quant_mxfp4, pack_fp4, quant_mx_matmul
    from flatquant_modifier.quantize import quantize_mxfp4

    torch.manual_seed(1)
    k, n = 128, 6
    w_values, w_byte = quantize_mxfp4(torch.randn(n, k, dtype=torch.float64))
    w_packed, w_scale = pack_fp4(w_values), w_byte.to(torch.uint8)  # [n, k/2], [n, k/32]
    x = torch.randn(3, k, dtype=torch.float64)
    eye = torch.eye(8, dtype=torch.float64)
    x_packed, x_scale = kronecker_quant_mxfp4(x.view(3, 8, 16), eye, torch.eye(16).double(),
                                              intermediate_dtype=None)
    bias = torch.randn(n, dtype=torch.float64)
    out = quant_mx_matmul(x_packed, w_packed.t(), w_scale.view(n, -1, 2).transpose(0, 1),
                          x_scale, bias=bias, output_dtype=torch.float64)

    def dequantize(values, byte):
        return (values.view(values.shape[0], -1, 32)
                * torch.exp2(byte.double() - 127).unsqueeze(-1)).view(values.shape[0], -1)

    x_values, x_byte = quantize_mxfp4(x)
    expected = dequantize(x_values, x_byte) @ dequantize(w_values, w_byte).T + bias
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
