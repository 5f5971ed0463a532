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
"""

import torch

__all__ = [
    "int_range",
    "round_ste",
    "activation_scale",
    "quantize_activation",
    "fake_quantize_activation",
    "weight_scale",
    "fake_quantize_weight",
]


def int_range(num_bits: int) -> tuple[int, int]:
    """Signed integer range ``(qmin, qmax)``, e.g. ``(-8, 7)`` for 4 bits."""
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


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
