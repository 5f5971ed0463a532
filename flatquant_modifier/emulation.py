"""
A decoder layer run with its target linears replaced by transformed, fake-quantized
ones whose parameters are the learnable :class:`~flatquant_modifier.modules.GroupParams`:
the forward FlatQuant trains and evaluates (:mod:`flatquant_modifier.train`).
"""

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from compressed_tensors.utils import patch_attr

from flatquant_modifier.kronecker import kronecker_matmul
from flatquant_modifier.mappings import ResolvedGroup
from flatquant_modifier.modules import GroupParams, matrices_and_inverses
from flatquant_modifier.options import FlatQuantOptions, Precision
from flatquant_modifier.quantize import (
    fake_quantize_activation,
    fake_quantize_mxfp4,
    fake_quantize_mxfp4_weight,
    fake_quantize_nvfp4,
    fake_quantize_weight,
)

__all__ = ["FakeQuantizedLayer", "layer_output"]


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone or first of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class FakeQuantizedLayer:
    """
    Runs a decoder layer with its target linears replaced by transformed,
    fake-quantized ones whose parameters are the :class:`GroupParams`.
    Matrices are computed once per step; the transformed input of linears that
    share an input (q/k/v, gate/up) is computed once per forward.
    """

    def __init__(
        self,
        groups: list[ResolvedGroup],
        params: list[GroupParams],
        options: FlatQuantOptions,
        precision: Precision,
        device: torch.device,
    ):
        self.groups = groups
        self.params = params
        self.options = options
        self.dtype = precision.dtype
        # the linears of a group stacked by rows: transformed and quantized in one go
        self.weights = [
            torch.cat(
                [linear.weight.detach().to(device=device, dtype=self.dtype)
                 for _, linear in group.linears]
            )
            for group in groups
        ]
        self.out_features = [[linear.out_features for _, linear in g.linears] for g in groups]
        self.biases = [
            [
                None
                if linear.bias is None
                else linear.bias.detach().to(device=device, dtype=self.dtype)
                for _, linear in group.linears
            ]
            for group in groups
        ]
        self._step: dict[int, tuple] = {}
        self._quantized: dict[int, tuple[torch.Tensor, ...]] = {}
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_step(self):
        self._step.clear()
        self._quantized.clear()
        self._inputs.clear()

    def _matrices(self, gi: int):
        """``(P1, P1^-T, P2, P2^-T, act_clip, smooth)`` of group ``gi``; all groups'
        matrices are computed together, once per step (batched inverses)."""
        if not self._step:
            factors = matrices_and_inverses(
                [m for p in self.params for m in (p.kron.left, p.kron.right)]
            )
            for index, p in enumerate(self.params):
                (p1, p1_inv_t), (p2, p2_inv_t) = factors[2 * index : 2 * index + 2]
                self._step[index] = (
                    p1, p1_inv_t, p2, p2_inv_t, p.activation_clip(), p.smooth_vector()
                )
        return self._step[gi]

    def _group_weights(self, gi: int) -> tuple[torch.Tensor, ...]:
        """The group's transformed, fake-quantized weights (once per step)."""
        if gi not in self._quantized:
            _, p1_inv_t, _, p2_inv_t, _, smooth = self._matrices(gi)
            weight = self.weights[gi]
            if smooth is not None:
                weight = weight * smooth
            weight = kronecker_matmul(weight, p1_inv_t, p2_inv_t)
            cfg = self.options
            if cfg.quant_format == "nvfp4":  # one global scale per linear
                parts = [fake_quantize_nvfp4(w) for w in weight.split(self.out_features[gi])]
            elif cfg.quant_format == "mxfp4":
                if cfg.w_bits is not None:
                    weight = fake_quantize_mxfp4_weight(weight, self.params[gi].weight_clip())
                parts = weight.split(self.out_features[gi])
            else:
                if cfg.w_bits is not None:
                    weight = fake_quantize_weight(weight, self.params[gi].weight_clip(), cfg.w_bits)
                parts = weight.split(self.out_features[gi])
            self._quantized[gi] = tuple(parts)
        return self._quantized[gi]

    def _forward(self, gi: int, li: int, x: torch.Tensor) -> torch.Tensor:
        p1, _, p2, _, act_clip, smooth = self._matrices(gi)
        cfg = self.options
        cached = self._inputs.get(gi)
        if cached is not None and cached[0] is x:
            h = cached[1]
        else:
            h = x.to(self.dtype)
            if smooth is not None:
                h = h / smooth
            h = kronecker_matmul(h, p1, p2)
            if cfg.quant_format == "nvfp4":
                h = fake_quantize_nvfp4(h.to(self.dtype))
            elif cfg.quant_format == "mxfp4":
                h = fake_quantize_mxfp4(h.to(self.dtype))
            elif cfg.a_bits is not None:
                h = fake_quantize_activation(h.to(self.dtype), act_clip, cfg.a_bits)
            self._inputs[gi] = (x, h)
        weight = self._group_weights(gi)[li]
        return F.linear(h, weight, self.biases[gi][li]).to(x.dtype)

    @contextlib.contextmanager
    def patched(self):
        with contextlib.ExitStack() as stack:
            for gi, group in enumerate(self.groups):
                for li, (_, linear) in enumerate(group.linears):
                    stack.enter_context(
                        patch_attr(linear, "forward", self._make_forward(gi, li))
                    )
            yield

    def _make_forward(self, gi: int, li: int) -> Callable:
        return lambda x: self._forward(gi, li, x)
