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
