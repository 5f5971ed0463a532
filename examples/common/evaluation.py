"""
Evaluation helpers: the fake-quantized model in exact arithmetic, to compare it with
its exported checkpoint.
"""

import contextlib

import torch
from compressed_tensors.quantization.lifecycle.forward import quantize

__all__ = ["exact_fake_quant"]


@contextlib.contextmanager
def exact_fake_quant(model):
    """
    The fake-quantized ``model`` in exact arithmetic, for comparisons with the Ascend
    export: float64, each weight replaced by compressed-tensors' integers or FP4 values
    (what the export stores) times its scale, formed in float64. At 4 bits a model is chaotic
    under float32 rounding (one flipped activation integer changes the next layer's
    input), so only in float64 do the two compute visibly the same function; lifting
    the float32 products ``q * scale`` (1e-7 off) or re-quantizing in float64 (the
    -7.5 ties at each row's negative maximum round differently) would not. The model is
    restored on exit.
    """
    integers = {}
    for module in model.modules():
        # quantization_enabled is unset (on) in a reloaded model
        if getattr(module, "quantization_enabled", True) and hasattr(module, "weight_scale"):
            integers[module] = quantize(
                module.weight.data, module.weight_scale,
                getattr(module, "weight_zero_point", None),
                module.quantization_scheme.weights,
            )
    frozen = {module: module.weight.data.clone() for module in integers}
    model.to(torch.float64)
    for module, q in integers.items():
        scale = module.weight_scale.to(torch.float64)
        if scale.shape[-1] not in (1, q.shape[-1]):  # one scale per group of inputs
            scale = scale.repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1)
        module.weight.data = q.to(torch.float64) * scale
        module.quantization_enabled = False
    try:
        yield model
    finally:
        model.to(torch.float32)
        for module, weight in frozen.items():
            module.weight.data = weight
            module.quantization_enabled = True
