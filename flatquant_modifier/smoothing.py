"""
Smoothing that cannot be folded exactly is turned off before training.

FlatQuant's smoothing divides a group's input by ``s`` and folds ``1/s`` into the
module producing that input (a norm, or v_proj's rows for o_proj). Where that module
is not exactly the producer (Gemma2's ``post_attention_layernorm`` normalises the
attention output, not the MLP input), the folded model is not the trained one.
:class:`SmoothingCheck` finds such groups once per decoder-layer structure, on a
float64 copy of the layer.
"""

from copy import deepcopy
from typing import Any

import torch
from compressed_tensors.offload import OffloadCache
from loguru import logger
from torch import nn

from flatquant_modifier.absorb import PendingWrites, fold_into_producer
from flatquant_modifier.distributed import all_reduce_
from flatquant_modifier.emulation import layer_output
from flatquant_modifier.mappings import ResolvedGroup, relative_name

__all__ = ["SmoothingCheck", "unfoldable_smoothing"]


class SmoothingCheck:
    """
    Verdicts of :func:`unfoldable_smoothing` per decoder-layer structure (layer class
    and group/smooth-layer names), computed at the first layer of each structure and
    applied to every layer of it.

    :param forced: smoothing was asked for explicitly: an unfoldable group is an error
        instead of a logged line
    """

    def __init__(self, forced: bool):
        self.forced = forced
        self._verdicts: dict[tuple, list[str]] = {}

    def apply(
        self,
        name: str,
        layer: nn.Module,
        groups: list[ResolvedGroup],
        probe: dict[str, Any],
        device: torch.device,
    ):
        """Turn smoothing off (``group.smooth = None``) for the groups of ``layer``
        whose smoothing cannot be folded exactly; ``probe`` is one cached call.

        :raises ValueError: naming the groups and the fix, when ``forced``
        """
        structure = (type(layer).__name__, tuple(
            (relative_name(name, g.name), g.smooth and relative_name(name, g.smooth[0]))
            for g in groups
        ))
        if structure not in self._verdicts:
            found = unfoldable_smoothing(name, layer, groups, probe, device)
            flags = torch.tensor([float(g.name in found) for g in groups])
            all_reduce_(flags, op=torch.distributed.ReduceOp.MAX)  # one verdict
            unfoldable = [relative_name(name, g.name) for g, f in zip(groups, flags) if f]
            self._verdicts[structure] = unfoldable
            if unfoldable:
                smooth_layers = [relative_name(name, g.smooth[0])
                                 for g, f in zip(groups, flags) if f]
                message = (
                    f"FlatQuant: the smoothing of {unfoldable} cannot be folded exactly "
                    f"into {smooth_layers} in {name} (the layer's output changes), so "
                    "the model would not be the one trained"
                )
                if self.forced:
                    raise ValueError(
                        f"{message}. Point the mapping's smooth_layer at the module that "
                        "produces exactly these linears' input, or set it to None."
                    )
                logger.warning(f"{message}; smoothing off for these inputs.")
        for group in groups:
            if relative_name(name, group.name) in self._verdicts[structure]:
                group.smooth, group.smooth_index = None, None


@torch.no_grad()
def unfoldable_smoothing(
    layer_name: str,
    layer: nn.Module,
    groups: list[ResolvedGroup],
    kwargs: dict[str, Any],
    device: torch.device,
) -> list[str]:
    """
    Names of the groups whose smoothing cannot be folded exactly into their smooth
    layer (e.g. a norm that does not produce the group's input, as Gemma2's
    ``post_attention_layernorm`` for its MLP): on a float64 copy of ``layer``, run on
    one cached call, dividing the smooth layer by a random ``s`` and multiplying the
    group's weights by ``s`` must leave the layer's output unchanged (what training
    emulates by dividing the linears' input by ``s``).
    """
    candidates = [group for group in groups if group.smooth is not None]
    if not candidates:
        return []
    copy = _float64_copy(layer, device)
    probe = _to_float64(kwargs, device)
    reference = layer_output(copy(**probe))
    generator = torch.Generator().manual_seed(0)
    unfoldable = []
    for group in candidates:
        producer = copy.get_submodule(relative_name(layer_name, group.smooth[0]))
        linears = [copy.get_submodule(relative_name(layer_name, n)) for n, _ in group.linears]
        s = torch.empty(producer.weight.shape[0], dtype=torch.float64).uniform_(
            0.5, 2.0, generator=generator
        ).to(device)
        columns = s if group.smooth_index is None else s[group.smooth_index.to(device)]
        writes = PendingWrites()
        fold_into_producer(producer, s, writes)
        for linear in linears:
            writes.write(linear, "weight", linear.weight * columns)
        saved = [(module, name, getattr(module, name).clone())
                 for module, name, _ in writes.updates]
        for module, name, value in writes.updates:
            getattr(module, name).copy_(value)
        folded = layer_output(copy(**probe))
        for module, name, value in saved:
            getattr(module, name).copy_(value)
        error = (folded - reference).norm() / reference.norm().clamp_min(1e-300)
        # an exact fold moves the output by rounding only (1e-7 where a module computes
        # in float32 internally, as llm-compressor's offset-norm replacement does); a
        # fold into the wrong module moves it by about s - 1, i.e. O(1)
        if not float(error) <= 1e-3:
            unfoldable.append(group.name)
    return unfoldable


def _float64_copy(layer: nn.Module, device: torch.device) -> nn.Module:
    """
    A float64 copy of ``layer`` on ``device``: its onloaded tensors (not
    compressed-tensors' offload storage, which a copy cannot share, e.g. files on
    disk), without hooks (they reference the modifiers and their caches) and without
    the offload wrappers of ``forward``.
    """
    hook_dicts = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                  "_backward_pre_hooks")
    saved = []
    try:
        for module in layer.modules():
            state = {key: getattr(module, key)
                     for key in (*hook_dicts, "_parameters", "_buffers")}
            saved.append((module, state))
            for key in hook_dicts:
                setattr(module, key, type(state[key])())
            if isinstance(module._parameters, OffloadCache):
                module._parameters = dict(module._parameters.items())
                module._buffers = dict(module._buffers.items())
        copy = deepcopy(layer)
    finally:
        for module, state in saved:
            for key, value in state.items():
                setattr(module, key, value)
    for module in copy.modules():
        if hasattr(module, "_original_forward_func"):  # compressed-tensors' offload wrapper
            module.forward = module._original_forward_func.__get__(module)
            del module._original_forward_func
    return copy.to(device=device, dtype=torch.float64)


def _to_float64(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float64(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to_float64(v, device) for key, v in value.items()}
    return value
