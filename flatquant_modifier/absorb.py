"""
The trained state of a group written into the model, in float64: the weights absorb
``diag(s) P^-T`` and the learned weight clipping, the producer of the input absorbs
``1/s``. Nothing is written here: the new values are collected in
:class:`PendingWrites`, which :mod:`flatquant_modifier.calibrate` writes once per
layer (:func:`flatquant_modifier.distributed.write_parameters`).
"""

import torch
from torch import nn

from flatquant_modifier.kronecker import kronecker_matmul
from flatquant_modifier.mappings import ResolvedGroup
from flatquant_modifier.modules import GroupParams

__all__ = ["PendingWrites", "absorb_group", "fold_into_producer"]


class PendingWrites:
    """
    New values of existing parameters, collected before one write. A value read
    through :meth:`read` is the pending one when there is one: groups absorbed later
    in a layer see the earlier ones (o_proj's smoothing folds into the v_proj rows
    that q/k/v's transform rewrote; down_proj's into up_proj).
    """

    def __init__(self):
        self.updates: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._pending: dict[tuple[int, str], torch.Tensor] = {}

    def read(self, module: nn.Module, name: str) -> torch.Tensor:
        pending = self._pending.get((id(module), name))
        return pending if pending is not None else getattr(module, name).detach()

    def write(self, module: nn.Module, name: str, value: torch.Tensor):
        self.updates.append((module, name, value))
        self._pending[(id(module), name)] = value


@torch.no_grad()
def absorb_group(
    group: ResolvedGroup, params: GroupParams, dtype: torch.dtype, writes: PendingWrites
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """
    Absorb one group's training result, in float64:
    ``W <- clamp(W diag(s) P^-T, +-c_w * amax)`` for every linear, the smoothing
    vector divided out of the smooth layer (into ``writes``).

    :return: ``(P1, P2, act_clip)`` of the online transform, in ``dtype``
    """
    ((p1, p1_inv_t), (p2, p2_inv_t)) = params.kron.export()
    smooth = params.smooth_vector()
    for li, (_, linear) in enumerate(group.linears):
        weight = writes.read(linear, "weight").double()
        if smooth is not None:
            weight = weight * smooth.double().to(weight.device)
        weight = kronecker_matmul(
            weight, p1_inv_t.to(weight.device), p2_inv_t.to(weight.device)
        )
        if params.weight_clips is not None:
            clip = params.weight_clips[li]().double().to(weight.device).unsqueeze(-1)
            bound = weight.abs().amax(dim=-1, keepdim=True) * clip
            weight = torch.maximum(torch.minimum(weight, bound), -bound)
        writes.write(linear, "weight", weight.to(linear.weight.dtype))
    if smooth is not None:
        fold_into_producer(group.smooth[1], params.smooth.detach().double(), writes)
    return p1.to(dtype), p2.to(dtype), float(params.activation_clip())


def fold_into_producer(module: nn.Module, smooth: torch.Tensor, writes: PendingWrites):
    """Fold ``1/s`` into the producer of the input: a norm's weight or a linear's rows
    (and its bias)."""
    weight = writes.read(module, "weight")
    s = smooth.to(weight.device)
    if weight.ndim == 1:
        writes.write(module, "weight", (weight.double() / s).to(weight.dtype))
    else:
        writes.write(module, "weight", (weight.double() / s.unsqueeze(-1)).to(weight.dtype))
    if getattr(module, "bias", None) is not None:
        bias = writes.read(module, "bias")
        writes.write(module, "bias", (bias.double() / s).to(bias.dtype))
