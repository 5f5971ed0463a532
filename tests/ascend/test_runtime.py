"""The reference of vllm-ascend's W4A4_FLATQUANT_DYNAMIC linear method (load_ascend_model's
linears) against the learned transform."""

import pytest
import torch
from compressed_tensors.transform import TransformArgs, TransformScheme

from flatquant_modifier.ascend.ops import (
    KRONECKER_QUANT_MAX_BATCH_SIZE,
    kronecker_quant,
    quant_matmul,
)
from flatquant_modifier.ascend.runtime import AscendW4A4FlatQuantLinear
from flatquant_modifier.quantize import (
    fake_quantize_weight,
    weight_scale,
)
from flatquant_modifier.transform import KroneckerQuantTransform


def _ascend_linear(in_features, out_features, p1, p2, clip, weight, bias=None):
    """An AscendW4A4FlatQuantLinear loaded as vllm-ascend loads our export."""
    layer = AscendW4A4FlatQuantLinear(in_features, out_features, bias is not None,
                                      params_dtype=torch.float32)
    scale = weight_scale(weight)  # compressed-tensors: amax / 7.5
    with torch.no_grad():
        layer.weight.copy_(torch.clamp(torch.round(weight / scale), -8, 7).to(torch.int8))
        layer.weight_scale.copy_(scale)
        layer.weight_offset.zero_()
        layer.left_trans.copy_(p1)  # stored as P1; the runtime transposes it
        layer.right_trans.copy_(p2)
        layer.clip_ratio.fill_(clip)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.process_weights_after_loading()
    return layer


def test_runtime_reproduces_the_learned_transform_orientation():
    # our online transform (x @ kron(P1, P2), NPU activation quant) + int4 weights
    # must equal vllm-ascend's method run on left_trans = P1, right_trans = P2
    g = torch.Generator().manual_seed(0)
    m, n, out = 4, 8, 6  # kron(P1, P2) on 32 features
    p1, p2 = torch.randn(m, m, generator=g), torch.randn(n, n, generator=g)
    weight, bias = torch.randn(out, m * n, generator=g), torch.randn(out, generator=g)
    x = torch.randn(2, 5, m * n, generator=g)
    transform = KroneckerQuantTransform(
        m * n, TransformScheme(type="flatquant"), TransformArgs(targets=["x"], location="input"),
    )
    with torch.no_grad():
        transform.left_trans.copy_(p1)
        transform.right_trans.copy_(p2)
        transform.clip_ratio.fill_(0.8)
    ours = transform(x) @ fake_quantize_weight(weight).T + bias
    ascend = _ascend_linear(m * n, out, p1, p2, 0.8, weight, bias)(x)
    torch.testing.assert_close(ascend, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        _ascend_linear(m * n, out, p1.T, p2, 0.8, weight, bias)(x), ours, atol=1e-3
    )  # the other orientation is wrong


def test_runtime_chunks_8192_tokens_like_unchunked():
    g = torch.Generator().manual_seed(1)
    layer = _ascend_linear(64, 3, torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g),
                           0.9, torch.randn(3, 64, generator=g))
    x = torch.randn(KRONECKER_QUANT_MAX_BATCH_SIZE + 77, 64, generator=g)
    packed, scale = kronecker_quant(x.view(-1, 8, 8), layer.left_trans, layer.right_trans, 0.9)
    expected = quant_matmul(packed.view(-1, 8), layer.weight_packed.t(),
                            layer.weight_scale.view(-1), scale, output_dtype=torch.float32)
    torch.testing.assert_close(layer(x), expected)


def test_runtime_refuses_sizes_not_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        AscendW4A4FlatQuantLinear(12, 4)
    with pytest.raises(ValueError, match="N % 8 == 0, got N=4"):
        kronecker_quant(torch.zeros(1, 4, 4), torch.eye(4), torch.eye(4))


def test_w8a8_dynamic_linear_is_int8_tokens_times_int8_weights():
    from flatquant_modifier.ascend.runtime import AscendW8A8DynamicLinear
    from flatquant_modifier.quantize import fake_quantize_activation

    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-128, 128, (6, 16), generator=generator, dtype=torch.int8)
    scale = torch.rand(6, 1, generator=generator, dtype=torch.float64) / 100
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    linear = AscendW8A8DynamicLinear(16, 6, bias=True, params_dtype=torch.float64)
    linear.load_state_dict({"weight": weight, "weight_scale": scale,
                            "weight_offset": torch.zeros_like(scale), "bias": bias})
    linear.process_weights_after_loading()
    x = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64)
    expected = torch.nn.functional.linear(
        fake_quantize_activation(x, 1.0, 8), weight.double() * scale, bias
    )
    torch.testing.assert_close(linear(x), expected, atol=1e-12, rtol=0)


def test_mxfp4_flatquant_linear_is_one_function_at_every_tp_up_to_max_supported():
    """vllm-ascend's W4A4_MXFP4_FLATQUANT on a row-parallel linear: each rank keeps
    its diagonal block of left_trans. With left_trans block-diagonal in
    max_supported_tp blocks, the ranks' partial outputs sum to the TP 1 output at TP 2
    and 4 (float64); a dense left_trans does not: what a trained transform must be."""
    from flatquant_modifier.ascend.ops import pack_fp4
    from flatquant_modifier.ascend.runtime import AscendW4A4MXFP4FlatQuantLinear
    from flatquant_modifier.kronecker import kronecker_matmul, mxfp4_trans_dims
    from flatquant_modifier.quantize import fake_quantize_mxfp4, quantize_mxfp4

    torch.manual_seed(0)
    in_f, out_f, f64 = 256, 16, torch.float64
    left_size, right_size = mxfp4_trans_dims(in_f, True, 4)
    assert (left_size, right_size) == (32, 8)
    left = torch.block_diag(*(torch.randn(8, 8, dtype=f64) for _ in range(4)))
    right = torch.randn(right_size, right_size, dtype=f64)
    values, byte = quantize_mxfp4(torch.randn(out_f, in_f, dtype=f64))
    weight, weight_scale = pack_fp4(values), byte.to(torch.uint8)
    bias = torch.randn(out_f, dtype=f64)
    x = torch.randn(5, in_f, dtype=f64)

    def run(tp, left):
        out, part = 0, in_f // tp
        for rank in range(tp):
            linear = AscendW4A4MXFP4FlatQuantLinear(
                part, out_f, bias=True, params_dtype=f64, row_parallel=True, tp_size=tp,
                tp_rank=rank)
            linear.weight.data.copy_(weight[:, rank * part // 2:(rank + 1) * part // 2])
            linear.weight_scale.data.copy_(weight_scale[:, rank * part // 32:(rank + 1) * part // 32])
            linear.left_trans.data.copy_(left)
            linear.right_trans.data.copy_(right)
            linear.clip_ratio.data.fill_(1.0)
            linear.bias.data.copy_(bias if rank == 0 else torch.zeros_like(bias))  # as vLLM
            linear.process_weights_after_loading()
            out = out + linear(x[:, rank * part:(rank + 1) * part])
        return out

    reference = run(1, left)
    scales = torch.exp2(byte.double() - 127).repeat_interleave(32, dim=-1)
    expected = fake_quantize_mxfp4(kronecker_matmul(x, left, right)) @ (values * scales).T + bias
    torch.testing.assert_close(reference, expected, atol=1e-9, rtol=0)
    for tp in (2, 4):
        torch.testing.assert_close(run(tp, left), reference, atol=1e-9, rtol=0)
    dense = left + 0.5 * torch.randn_like(left)
    assert (run(2, dense) - run(1, dense)).abs().max() > 1e-3
    # in bfloat16 the kernels' intermediates are rounded: close, not equal
    half = AscendW4A4MXFP4FlatQuantLinear(in_f, out_f, bias=True, row_parallel=True)
    for name, value in (("weight", weight), ("weight_scale", weight_scale), ("left_trans", left),
                        ("right_trans", right), ("clip_ratio", torch.ones(1)), ("bias", bias)):
        getattr(half, name).data.copy_(value)
    half.process_weights_after_loading()
    approx = half(x.bfloat16()).double()
    assert ((approx - reference).norm() / reference.norm()).item() < 0.1
    with pytest.raises(ValueError, match="exceeds max_supported_tp 4"):
        AscendW4A4MXFP4FlatQuantLinear(32, out_f, row_parallel=True, tp_size=8)
