"""
Fake quantizers used for training and for the PyTorch (fake-quant) forward.

Two formulas, on purpose:

* activations follow the Ascend NPU op ``npu_kronecker_quant``: per token,
  ``scale = max|y| * clip_ratio / qmax`` (``qmax = 7`` for int4), values rounded and
  saturated to ``[-qmax - 1, qmax]``. This is what vllm-ascend runs, so it is what we
  train and evaluate.
* weights follow compressed-tensors' symmetric integer quantization
  (``scale = amax / ((qmax - qmin) / 2)``, i.e. ``amax / 7.5`` for int4, clamp to
  ``[qmin, qmax]``), because a following ``QuantizationModifier`` / ``GPTQModifier``
  computes the stored weight scales that way. A learned per-channel clip factor
  ``c`` is trained as ``amax * c`` and baked into the weights as a clamp at
  ``+-c * amax``, which a min-max observer turns into exactly the same scale.

Rounding is ``torch.round`` (half to even) in both, as compressed-tensors does.

For NVFP4 targets (``quant_format="nvfp4"``) both weights and activations use
compressed-tensors' tensor-group FP4 scheme: FP4 E2M1 values in groups of 16, FP8
E4M3 group scales relative to a float32 global scale ``448 * 6 / amax``.

MXFP4 activations follow ``npu_kronecker_quant`` with FP4 output (Ascend 950): groups
of 32 consecutive values share the power of two ``2 ** (floor(log2(amax)) - 2)`` (the
OCP MX rule, E2M1's largest exponent being 2), stored as its E8M0 byte
``floor(log2(amax)) + 127 - 2``; values round half to even onto the E2M1 grid,
saturating at +-6. ``clip_ratio`` plays no part (the FP4 kernels do not read it).
MXFP4 weights follow compressed-tensors' MXFP4 scheme, which stores them: the group
maximum is first rounded to a power of two, up from a mantissa of 1.75
(``round_to_power_2``), so a group never saturates by more than a 7/6 factor;
the values then round as above.
"""

import torch

from flatquant_modifier.formats import (
    E8M0_BIAS,
    FP4_MAX,
    FP8_E4M3_MAX,
    MX_GROUP_SIZE,
    NVFP4_GROUP_SIZE,
    int_range,
)

__all__ = [
    "int_range",
    "round_ste",
    "activation_scale",
    "quantize_activation",
    "fake_quantize_activation",
    "weight_scale",
    "fake_quantize_weight",
    "fake_quantize_nvfp4",
    "round_to_e2m1",
    "mxfp4_scale_byte",
    "quantize_mxfp4",
    "fake_quantize_mxfp4",
    "fake_quantize_mxfp4_weight",
]

FP8_MAX, NVFP4_GROUP = FP8_E4M3_MAX, NVFP4_GROUP_SIZE


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def activation_scale(
    y: torch.Tensor, clip_ratio: torch.Tensor | float, num_bits: int = 4
) -> torch.Tensor:
    """Per-token scale ``max|y| * clip_ratio / qmax`` (NPU formula), shape ``[..., 1]``."""
    _, qmax = int_range(num_bits)
    amax = y.abs().amax(dim=-1, keepdim=True)
    return amax * clip_ratio / qmax


def quantize_activation(
    y: torch.Tensor, clip_ratio: torch.Tensor | float, num_bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Integer activations and per-token scales, as the NPU op returns them.
    A token that is all zeros gets scale 0 and integer values 0.

    :return: ``(q, scale)`` with ``q`` integer-valued (same dtype as ``y``) and
        ``scale`` of shape ``[..., 1]``
    """
    qmin, qmax = int_range(num_bits)
    scale = activation_scale(y, clip_ratio, num_bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(y / safe), qmin, qmax)
    return q, scale


def fake_quantize_activation(
    y: torch.Tensor, clip_ratio: torch.Tensor | float, num_bits: int = 4,
    levels_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize-dequantize with the NPU formula; differentiable (STE) in ``y`` and clip.
    ``levels_dtype``: also the integer levels in that dtype (no gradient) and the
    per-token scales ``[..., 1]`` (no gradient) whose product is the result."""
    qmin, qmax = int_range(num_bits)
    scale = activation_scale(y, clip_ratio, num_bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.clamp(round_ste(y / safe), qmin, qmax)
    if levels_dtype is not None:
        return levels * scale, levels.detach().to(levels_dtype), scale.detach()
    return levels * scale


def weight_scale(
    weight: torch.Tensor, clip: torch.Tensor | float = 1.0, num_bits: int = 4
) -> torch.Tensor:
    """Per-output-channel scale ``c * amax / ((qmax - qmin) / 2)``, shape ``[out, 1]``."""
    qmin, qmax = int_range(num_bits)
    amax = weight.abs().amax(dim=-1, keepdim=True)
    if isinstance(clip, torch.Tensor) and clip.ndim == 1:
        clip = clip.unsqueeze(-1)
    return amax * clip / ((qmax - qmin) / 2)


def fake_quantize_weight(
    weight: torch.Tensor, clip: torch.Tensor | float = 1.0, num_bits: int = 4,
    levels_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel symmetric quantize-dequantize (compressed-tensors formula), STE.
    ``levels_dtype``: also the integer levels in that dtype (no gradient) and the
    per-channel scales ``[out, 1]`` (no gradient) whose product is the result."""
    qmin, qmax = int_range(num_bits)
    scale = weight_scale(weight, clip, num_bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.clamp(round_ste(weight / safe), qmin, qmax)
    if levels_dtype is not None:
        return levels * scale, levels.detach().to(levels_dtype), scale.detach()
    return levels * scale


def _round_fp4_ste(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value (ties to even, as compressed-tensors' ``cast_to_fp4``,
    saturating at +-6), straight-through gradient."""
    return x + (round_to_e2m1(x.detach()) - x).detach()


def fake_quantize_nvfp4(x: torch.Tensor, group_size: int = NVFP4_GROUP) -> torch.Tensor:
    """
    Quantize-dequantize with the NVFP4 (tensor-group) scheme over the last dimension:
    global scale ``448 * 6 / amax`` (per tensor), FP8 E4M3 group scales
    ``amax_group / 6 * global``, FP4 E2M1 values; straight-through gradient.
    """
    shape = x.shape
    grouped = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    amax = x.detach().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    global_scale = FP8_MAX * FP4_MAX / amax.float()
    group_amax = grouped.abs().amax(dim=-1, keepdim=True).float()
    scale = (group_amax / FP4_MAX * global_scale).clamp(max=FP8_MAX)
    # the FP8 rounding of the stored scale, straight through
    scale = scale + (scale.to(torch.float8_e4m3fn).float() - scale).detach()
    scale = scale / global_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (_round_fp4_ste(grouped / safe) * scale).reshape(shape).to(x.dtype)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """The E2M1 value nearest to ``x``, ties to the even code (round half to even, as
    the NPU's ``CAST_RINT``), saturating at +-6; same dtype as ``x``. Arithmetic, no
    lookup table (a table copied to the GPU would break CUDA graph capture): the grid
    steps by 0.5 below 2, by 1 up to 4, by 2 up to 6, and within each range the even
    codes are the even multiples of the step, so ``torch.round`` (half to even) of the
    value in steps rounds as the codes do."""
    magnitude = x.abs().clamp(max=FP4_MAX)
    rounded = torch.where(
        magnitude < 2, torch.round(magnitude * 2) / 2,
        torch.where(magnitude < 4, torch.round(magnitude), torch.round(magnitude / 2) * 2),
    )
    return rounded * torch.sign(x)


def mxfp4_scale_byte(x: torch.Tensor, group_size: int = MX_GROUP_SIZE) -> torch.Tensor:
    """
    The E8M0 byte of each group of ``group_size`` consecutive values of the last
    dimension (NPU rule): ``floor(log2(amax)) + 127 - 2``, at least 0.

    :return: int32 tensor ``[..., k / group_size]``
    """
    return _mx_exponents(x, group_size)[0]


def _mx_exponents(x: torch.Tensor, group_size: int, round_up_from: float | None = None):
    """Scale bytes, and which groups have a normal ``amax`` (the others, zero or
    subnormal, quantize to 0 on the NPU). ``round_up_from``: the mantissa in [1, 2)
    from which ``amax`` counts as the next power of two (compressed-tensors: 1.75)."""
    grouped = x.reshape(*x.shape[:-1], -1, group_size)
    amax = grouped.abs().amax(dim=-1)
    amax = amax.to(torch.promote_types(amax.dtype, torch.float32))
    mantissa, exponent = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
    biased = exponent.to(torch.int32) - 1 + E8M0_BIAS  # floor(log2 amax) + 127
    if round_up_from is not None:
        biased = biased + (mantissa >= round_up_from / 2).to(torch.int32)
    normal = (amax > 0) & (biased > 0)
    return torch.where(normal, (biased - 2).clamp(min=0), torch.zeros_like(biased)), normal


def quantize_mxfp4(x: torch.Tensor, group_size: int = MX_GROUP_SIZE):
    """
    MXFP4 values and scale bytes of ``x`` over its last dimension (NPU rule).

    :return: ``(values, scale_byte)``: ``values`` E2M1 values (float, same dtype and
        shape as ``x``), ``scale_byte`` from :func:`mxfp4_scale_byte`; ``x`` is about
        ``values * 2 ** (scale_byte - 127)`` per group
    """
    scale_byte, normal = _mx_exponents(x, group_size)
    dtype = torch.promote_types(x.dtype, torch.float32)  # 2 ** 127 overflows float16
    grouped = x.reshape(*x.shape[:-1], -1, group_size).to(dtype)
    inverse = torch.exp2((E8M0_BIAS - scale_byte).to(dtype)).unsqueeze(-1)
    values = round_to_e2m1(grouped * inverse)
    values = torch.where(normal.unsqueeze(-1), values, torch.zeros_like(values))
    return values.reshape(x.shape).to(x.dtype), scale_byte


def fake_quantize_mxfp4(x: torch.Tensor, group_size: int = MX_GROUP_SIZE) -> torch.Tensor:
    """Quantize-dequantize with the NPU's MXFP4 rule; straight-through gradient."""
    values, scale_byte = quantize_mxfp4(x.detach(), group_size)
    dtype = torch.promote_types(x.dtype, torch.float32)
    scale = torch.exp2((scale_byte - E8M0_BIAS).to(dtype)).unsqueeze(-1)
    grouped = values.reshape(*x.shape[:-1], -1, group_size).to(dtype)
    dequantized = (grouped * scale).reshape(x.shape).to(x.dtype)
    return x + (dequantized - x).detach()


# compressed-tensors' round_to_power_2 adds a quarter of the mantissa range before
# truncating: amax = m * 2**e counts as 2**(e + 1) from m = 1.75
CT_ROUND_UP_FROM = 1.75


def fake_quantize_mxfp4_weight(
    weight: torch.Tensor, clip: torch.Tensor | float = 1.0, group_size: int = MX_GROUP_SIZE
) -> torch.Tensor:
    """
    Quantize-dequantize ``weight`` [out, in] as compressed-tensors' MXFP4 scheme
    stores it (min-max observer per group of 32, E8M0 scale of the group maximum
    rounded to a power of two up from 1.75, E2M1 values half to even). A clip factor
    per output channel ``c`` clamps the weights at ``+-c * amax`` first, as they are
    absorbed. Straight-through gradient in ``weight``; ``c`` gets the clamp's.
    """
    if isinstance(clip, torch.Tensor):
        bound = weight.abs().amax(dim=-1, keepdim=True) * clip.reshape(-1, 1)
        weight = torch.maximum(torch.minimum(weight, bound), -bound)
    scale_byte, _ = _mx_exponents(weight.detach(), group_size, CT_ROUND_UP_FROM)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    scale = torch.exp2((scale_byte - E8M0_BIAS).to(dtype)).unsqueeze(-1)
    grouped = weight.reshape(*weight.shape[:-1], -1, group_size).to(dtype) / scale
    rounded = grouped + (round_to_e2m1(grouped.detach()) - grouped).detach()
    return (rounded * scale).reshape(weight.shape).to(weight.dtype)
