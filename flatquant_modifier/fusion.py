"""
Shared weight global scales of fused siblings for tensor-group schemes (NVFP4).

vLLM fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj; with
TENSOR_GROUP quantization (FP4 values, FP8 group scales, one FP32 global scale per
tensor) the siblings must share one ``weight_global_scale``. FlatQuant changes the
weights (they absorb the inverse transforms), so the shared value is taken from the
final weights, at finalize.

* :func:`flatquant_modifier.compat.update_fused_layer_weight_global_scales`: the
  helper llm-compressor had before 0.14, same semantics: attention (class name
  contains "attention", has k/v/qkv) and MLP (class name contains "mlp", has gate/up)
  submodules, only when all siblings are TENSOR_GROUP quantized, the minimum of their
  global scales (= the maximum of their amax).
* :func:`fuse_global_scales`: its generalisation, sibling groups found by regex over
  module names (the capture groups form the group key: q/k/v and gate/up per parent,
  w1/w3 and gate/up per MoE expert, DeepSeek MLA q_a_proj/kv_a_proj_with_mqa), the
  group amax MAX-reduced across ranks when torch.distributed is initialised, and the
  group scales of a member recomputed when its global scale changed (they are stored
  relative to it).
"""

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils import (
    align_module_device,
    align_modules,
    update_offload_parameter,
)
from loguru import logger
from torch.nn import Linear, Module

from flatquant_modifier.formats import FUSED_SIBLINGS

__all__ = [
    "DEFAULT_SIBLING_PATTERNS",
    "find_sibling_groups",
    "fuse_global_scales",
    "is_tensor_group",
]

# what vLLM fuses (one regex per fused layer); the captured prefix is the group key
DEFAULT_SIBLING_PATTERNS = tuple(
    rf"(.*)\.(?:{'|'.join(members)})" for members in FUSED_SIBLINGS.values()
)


def is_tensor_group(layer: Module | None) -> bool:
    scheme = getattr(layer, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    return weights is not None and weights.strategy == QuantizationStrategy.TENSOR_GROUP


def find_sibling_groups(
    model: Module, patterns: Iterable[str] = DEFAULT_SIBLING_PATTERNS
) -> list[tuple[tuple, list[tuple[str, Module]]]]:
    """
    Group linear modules by regex over their names: each pattern is ``re.fullmatch``-ed
    against every ``Linear``'s name and the match's capture groups (plus the pattern)
    are the group key; keep groups of two or more, in model order.
    """
    compiled = [re.compile(p) for p in patterns]
    groups: dict[tuple, list[tuple[str, Module]]] = defaultdict(list)
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        for index, pattern in enumerate(compiled):
            match = pattern.fullmatch(name)
            if match:
                groups[(index, *match.groups())].append((name, module))
                break
    return [(key, members) for key, members in groups.items() if len(members) > 1]


@torch.no_grad()
def fuse_global_scales(
    model: Module,
    patterns: Sequence[str] | None = None,
    process_group=None,
) -> int:
    """
    Share one ``weight_global_scale`` in every sibling group whose members are all
    TENSOR_GROUP quantized: the minimum of the members' global scales (the maximum of
    their amax), MIN-reduced across ranks when torch.distributed is initialised, so
    every rank writes the same value. Members whose global scale changed get their
    group scales recomputed from their weights with the new global scale.

    :param patterns: regexes with capture groups (default
        :data:`DEFAULT_SIBLING_PATTERNS`); user patterns are tried first
    :return: number of groups whose scale was written
    """
    patterns = list(patterns or []) + [
        p for p in DEFAULT_SIBLING_PATTERNS if p not in (patterns or [])
    ]
    groups = [
        (key, members)
        for key, members in find_sibling_groups(model, patterns)
        if all(is_tensor_group(module) for _, module in members)
        and all(hasattr(module, "weight_global_scale") for _, module in members)
    ]
    if not groups:
        return 0
    shared = []
    for _, members in groups:
        with align_modules([m for _, m in members]):
            shared.append(
                torch.cat([m.weight_global_scale.detach().reshape(-1).float().cpu()
                           for _, m in members]).min()
            )
    shared = torch.stack(shared)
    if dist.is_available() and dist.is_initialized():
        device = _collective_device(process_group)
        reduced = shared.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MIN, group=process_group)
        shared = reduced.cpu()
    for (_, members), value in zip(groups, shared):
        for name, module in members:
            _write_global_scale(name, module, value)
    return len(groups)


def _write_global_scale(name: str, module: Module, value: torch.Tensor):
    with align_module_device(module):
        old = module.weight_global_scale.detach().clone()
        new = value.to(dtype=old.dtype, device=old.device).reshape(old.shape)
        if torch.equal(old, new):
            return
        update_offload_parameter(module, "weight_global_scale", new)
        if hasattr(module, "weight") and hasattr(module, "weight_scale"):
            _recompute_group_scales(module, new)
    logger.debug(f"{name}: weight_global_scale {old.item():.6g} -> {new.item():.6g}")


def _recompute_group_scales(module: Module, global_scale: torch.Tensor):
    """Group scales are stored relative to the global scale: recompute them (min-max)."""
    args = module.quantization_scheme.weights
    weight = module.weight.detach()
    grouped = weight.unflatten(-1, (-1, args.group_size))
    scale, zero_point = calculate_qparams(
        grouped.amin(dim=-1), grouped.amax(dim=-1), args, global_scale=global_scale
    )
    update_offload_parameter(module, "weight_scale", scale.to(module.weight_scale.dtype))
    if hasattr(module, "weight_zero_point"):
        update_offload_parameter(
            module, "weight_zero_point", zero_point.to(module.weight_zero_point.dtype)
        )


def _collective_device(process_group) -> torch.device:
    backend = dist.get_backend(process_group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
