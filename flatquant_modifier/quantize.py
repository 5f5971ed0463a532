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
"""

import torch

from flatquant_modifier.formats import FP4_MAX, FP8_E4M3_MAX, NVFP4_GROUP_SIZE, int_range

__all__ = [
    "int_range",
    "round_ste",
    "activation_scale",
    "quantize_activation",
    "fake_quantize_activation",
    "weight_scale",
    "fake_quantize_weight",
    "fake_quantize_nvfp4",
]

FP8_MAX, NVFP4_GROUP = FP8_E4M3_MAX, NVFP4_GROUP_SIZE
_FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


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
    y: torch.Tensor, clip_ratio: torch.Tensor | float, num_bits: int = 4
) -> torch.Tensor:
    """Quantize-dequantize with the NPU formula; differentiable (STE) in ``y`` and clip."""
    qmin, qmax = int_range(num_bits)
    scale = activation_scale(y, clip_ratio, num_bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(round_ste(y / safe), qmin, qmax) * scale


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
    weight: torch.Tensor, clip: torch.Tensor | float = 1.0, num_bits: int = 4
) -> torch.Tensor:
    """Per-channel symmetric quantize-dequantize (compressed-tensors formula), STE."""
    qmin, qmax = int_range(num_bits)
    scale = weight_scale(weight, clip, num_bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(round_ste(weight / safe), qmin, qmax) * scale


def _round_fp4_ste(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value (saturating at +-6), straight-through gradient."""
    grid = torch.tensor(_FP4_GRID, device=x.device, dtype=x.dtype)
    mids = (grid[1:] + grid[:-1]) / 2
    magnitude = x.abs().clamp(max=FP4_MAX)
    rounded = grid[torch.bucketize(magnitude, mids)] * torch.sign(x)
    return x + (rounded - x).detach()


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
