"""
The guard that a FlatQuant model in memory computes what its checkpoints hold.

Every quantized or transformed linear is run once on a small probe input through its
real forward (input hooks, the online transform, compressed-tensors' quantized
forward, offloading) and compared with the function its stored tensors define: the
Kronecker transform with its activation quantizer, then the fake-quantized weight of
its quantization scheme. A transform that is missing, detached, left unquantized, a
weight or activation quantizer that does not run, or a transform attached where none
was trained, is an error naming the modules. Called by ``FlatQuantModifier`` at
finalize and before ``save_pretrained``, by :func:`save_ascend_checkpoint` and by
:func:`load_flatquant_model`.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.quantization import QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.utils import align_module_device, get_execution_device
from loguru import logger
from torch import nn

from llmcompressor.modifiers.utils.hooks import HooksMixin

from flatquant_modifier.transform import (
    INT8_TRANSFORM_NAME,
    get_dynamic_int8_quant,
    get_flatquant_transform,
    is_transform_group,
)

__all__ = ["FlatQuantStateError", "recorded_transform_targets", "verify_model"]

# relative L2 difference above which a linear's forward is not its stored function; a
# skipped int4 weight or activation quantizer moves the output by 5-30 %, an int8 one
# by about 0.5 %; the forward and the reference run the same kernels, so agree exactly
RELATIVE_TOLERANCE = 1e-3
PROBE_TOKENS = 4


class FlatQuantStateError(RuntimeError):
    """The model in memory does not compute what its checkpoints would hold."""


def recorded_transform_targets(model: nn.Module) -> list[str] | None:
    """Names of the linears the model's ``transform_config`` gives a FlatQuant
    transform or an int8 input quantizer (what ``save_pretrained`` writes), or None if
    it records neither."""
    groups = getattr(getattr(model, TRANSFORM_CONFIG_NAME, None), "config_groups", {})
    schemes = [scheme for name, scheme in groups.items()
               if is_transform_group(name) or name == INT8_TRANSFORM_NAME]
    if not schemes:
        return None
    return [target for scheme in schemes for args in scheme.apply for target in args.targets]


def _online(module: nn.Module):
    """The online transform or input quantizer FlatQuant attached to ``module``."""
    return get_flatquant_transform(module) or get_dynamic_int8_quant(module)


@torch.no_grad()
def verify_model(
    model: nn.Module, expected: Iterable[str] | None = None, where: str = "the model"
) -> int:
    """
    Check that every transformed or weight-quantized linear of ``model`` computes in
    its forward the function of its stored tensors, and that the transformed linears
    are exactly ``expected`` (default: the model's recorded ``transform_config``).

    :param where: what is being checked, for the message (e.g. "after oneshot")
    :return: number of linears checked
    :raises FlatQuantStateError: naming the missing, unexpected and mismatched modules
    """
    if expected is None:
        expected = recorded_transform_targets(model)
    transformed = {
        name for name, module in model.named_modules() if _online(module) is not None
    }
    problems = []
    if expected is not None:
        expected = set(expected)
        if missing := sorted(expected - transformed):
            problems.append(f"{len(missing)} trained transforms are not attached: "
                            f"{_names(missing)}")
        if unexpected := sorted(transformed - expected):
            problems.append(f"{len(unexpected)} transforms are attached but were not "
                            f"trained: {_names(unexpected)}")
    checked, mismatched = 0, []
    generator = torch.Generator().manual_seed(0)
    with HooksMixin.disable_hooks():  # no calibration hook may observe the probe
        for name, module in model.named_modules():
            if not _checkable(module):
                continue
            difference = _difference(module, generator)
            checked += 1
            if not difference <= RELATIVE_TOLERANCE:  # NaN included
                mismatched.append(f"{name} ({difference:.3g})")
    if mismatched:
        nan = " (nan: a weight or quantization parameter is not finite)" if any(
            entry.endswith("(nan)") for entry in mismatched
        ) else ""
        problems.append(
            f"{len(mismatched)} of {checked} linears do not compute their stored "
            f"function (relative difference): {_names(mismatched)}{nan}"
        )
    if problems:
        raise FlatQuantStateError(
            f"FlatQuant, {where}: the model in memory is not the model its "
            "checkpoints would hold; " + "; ".join(problems) + ". An online transform "
            "or quantizer is detached or disabled (quantization_enabled=False, removed "
            "hooks, a module replaced after oneshot), or the model was changed after "
            "calibration."
        )
    logger.debug(f"FlatQuant, {where}: {checked} linears compute their stored function "
                 f"({len(transformed)} transforms)")
    return checked


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _checkable(module: nn.Module) -> bool:
    """Linears with a FlatQuant transform or a weight scheme, still holding an
    unpacked weight (after ``save_pretrained(save_compressed=True)`` packs a module
    in place, compressed-tensors decompresses it in its forward)."""
    if not isinstance(module, nn.Linear):
        return False
    scheme = getattr(module, "quantization_scheme", None)
    if _online(module) is None and getattr(scheme, "weights", None) is None:
        return False
    status = getattr(module, "quantization_status", None)
    return status is None or status < QuantizationStatus.COMPRESSED


def _difference(module: nn.Linear, generator: torch.Generator) -> float:
    """Relative L2 difference between ``module``'s forward and its stored function on
    a probe input."""
    device = get_execution_device(module)
    if not isinstance(device, torch.device):
        device = torch.device("cpu")
    with align_module_device(module):
        dtype, in_features = module.weight.dtype, module.weight.shape[-1]
    probe = torch.randn(PROBE_TOKENS, in_features, generator=generator)
    probe = probe.to(device=device, dtype=dtype)
    actual = module(probe)
    expected = _stored_function(module, probe)
    difference = (actual.double() - expected.double()).norm()
    return float(difference / expected.double().norm().clamp_min(1e-30))


def _stored_function(module: nn.Linear, value: torch.Tensor) -> torch.Tensor:
    """What a checkpoint of ``module`` computes, from its tensors alone (no hooks, no
    ``quantization_enabled`` flags)."""
    transform = get_flatquant_transform(module)
    if transform is not None:
        with align_module_device(transform):
            value = transform.apply_to(value, transform.quantize)
    if (int8 := get_dynamic_int8_quant(module)) is not None:
        value = int8.apply_to(value)
    scheme = getattr(module, "quantization_scheme", None)
    with align_module_device(module):
        weight = module.weight
        if getattr(scheme, "input_activations", None) is not None:
            value = forward_quantize(module, value, "input", scheme.input_activations)
        if getattr(scheme, "weights", None) is not None:
            weight = forward_quantize(module, weight, "weight", scheme.weights)
        output = F.linear(value, weight, module.bias)
        if getattr(scheme, "output_activations", None) is not None:
            output = forward_quantize(module, output, "output", scheme.output_activations)
    return output
