"""
Learnable pieces of FlatQuant, used only while a decoder layer is trained:
Kronecker transforms, clip factors and the smoothing vector, gathered per transformed
input in :class:`GroupParams`.
"""

import functools
from typing import TYPE_CHECKING, Literal

import torch
from loguru import logger
from torch import nn

from flatquant_modifier.kronecker import random_hadamard, random_orthogonal
from flatquant_modifier.mappings import ResolvedGroup

if TYPE_CHECKING:
    from flatquant_modifier.options import FlatQuantOptions

__all__ = [
    "Parametrization",
    "TransformInit",
    "initial_matrix",
    "LearnableMatrix",
    "LearnableKronecker",
    "ClipFactor",
    "matrices_and_inverses",
    "GroupParams",
    "smoothquant_init",
    "build_group_params",
    "identity_params",
]

Parametrization = Literal["orthogonal", "dense"]
TransformInit = Literal["identity", "random", "hadamard"]


def initial_matrix(
    size: int, init: TransformInit, generator: torch.Generator | None = None
) -> torch.Tensor:
    """
    The float32 matrix a transform factor starts at: the identity, a Haar-random
    orthogonal matrix (``"random"``) or a random Hadamard matrix (``"hadamard"``; a
    random orthogonal one, logged once per size, where no Hadamard matrix of ``size``
    is known).
    """
    if init == "identity":
        return torch.eye(size)
    if init == "hadamard":
        hadamard = random_hadamard(size, generator, torch.float32)
        if hadamard is not None:
            return hadamard
        _no_hadamard(size)
    return random_orthogonal(size, generator, torch.float32)


@functools.cache
def _no_hadamard(size: int):
    # cached: one line per size, not one per layer
    logger.info(
        f"FlatQuant: no Hadamard matrix of order {size} is known; transform factors "
        f"of size {size} start at a random orthogonal matrix instead"
    )


class LearnableMatrix(nn.Module):
    """
    One invertible square matrix ``P`` with a cheap ``P^-T``.

    * ``"orthogonal"``: ``P = U diag(s) V^T`` with ``U = U0 exp(A - A^T)`` and
      ``V = V0 exp(B - B^T)`` (``A``, ``B`` strictly lower triangular, as torch's
      ``orthogonal`` parametrization) orthogonal by construction, so
      ``P^-T = U diag(1/s) V^T`` needs no matrix inversion and stays well
      conditioned.
    * ``"dense"``: ``P`` is a free matrix and ``P^-T`` comes from ``torch.linalg.inv_ex``
      (a singular ``P`` shows up as a non-finite loss).

    Both start at ``P = Q``, ``Q`` from :func:`initial_matrix`.
    With ``blocks > 1``, ``P`` is block diagonal: ``blocks`` such matrices of size
    ``size / blocks`` on its diagonal, zeros elsewhere (learned as a batch).
    """

    def __init__(
        self,
        size: int,
        parametrization: Parametrization = "orthogonal",
        init: TransformInit = "identity",
        generator: torch.Generator | None = None,
        blocks: int = 1,
    ):
        super().__init__()
        if size % blocks:
            raise ValueError(f"a matrix of size {size} has no {blocks} equal diagonal blocks")
        self.size, self.blocks = size, blocks
        self.parametrization = parametrization
        block = size // blocks
        bases = [initial_matrix(block, init, generator) for _ in range(blocks)]
        # one block keeps the 2-D layout (and the random draws) of a dense matrix
        base = bases[0] if blocks == 1 else torch.stack(bases)
        if parametrization == "orthogonal":
            self.register_buffer("u0", base)
            self.register_buffer("v0", torch.eye(block).expand_as(base).clone())
            self.skew_u = nn.Parameter(torch.zeros_like(base))
            self.skew_v = nn.Parameter(torch.zeros_like(base))
            self.singular = nn.Parameter(torch.ones(base.shape[:-1]))
        elif parametrization == "dense":
            self.matrix = nn.Parameter(base.clone())
        else:
            raise ValueError(f"unknown parametrization {parametrization!r}")

    def _factors(self, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthogonal ``(U, V)``, computed in ``dtype`` (default: the parameters')."""
        dtype = dtype or self.skew_u.dtype
        su = self.skew_u.to(dtype).tril(-1)
        sv = self.skew_v.to(dtype).tril(-1)
        u = self.u0.to(dtype) @ torch.linalg.matrix_exp(su - su.mT)
        v = self.v0.to(dtype) @ torch.linalg.matrix_exp(sv - sv.mT)
        return u, v

    def _full(self, *matrices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block-diagonal matrices of stacked blocks (unchanged with one block)."""
        if self.blocks == 1:
            return matrices
        return tuple(torch.block_diag(*m.unbind(0)) for m in matrices)

    def _orthogonal(self, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self._factors(dtype)
        s = self.singular.to(u.dtype).unsqueeze(-2)
        return (u * s) @ v.mT, (u / s) @ v.mT

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:return: ``(P, P^-T)``, in the parameters' dtype"""
        if self.parametrization == "orthogonal":
            return self._full(*self._orthogonal())
        p = self.matrix
        # inv_ex: no error check, hence no device sync in every training step
        return self._full(p, torch.linalg.inv_ex(p).inverse.mT)

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, P^-T)`` computed in float64, for absorbing into weights."""
        if self.parametrization == "orthogonal":
            return self._full(*self._orthogonal(torch.float64))
        p = self.matrix.double()
        return self._full(p, torch.linalg.inv(p).mT)


def matrices_and_inverses(
    matrices: list[LearnableMatrix],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    ``(P, P^-T)`` of every matrix, as each one's ``forward`` gives them, with the dense
    matrices of equal size inverted in one batched call: a layer has up to eight
    small matrices, and one small inversion costs about as much as a batch of them.
    """
    results: list = [None] * len(matrices)
    by_size: dict[int, list[int]] = {}
    for index, matrix in enumerate(matrices):
        if matrix.parametrization == "dense" and matrix.blocks == 1:
            by_size.setdefault(matrix.size, []).append(index)
        else:  # orthogonal, or block diagonal (inverted as its own batch of blocks)
            results[index] = matrix()
    for indices in by_size.values():
        stacked = torch.stack([matrices[i].matrix for i in indices])
        # inv_ex: no error check, hence no device sync in every training step
        inverses = torch.linalg.inv_ex(stacked).inverse.transpose(-1, -2)
        for i, inverse_t in zip(indices, inverses.unbind(0)):
            results[i] = (matrices[i].matrix, inverse_t)
    return results


class LearnableKronecker(nn.Module):
    """``P = kron(P1, P2)`` with sizes ``(M, N)``, ``P1`` block diagonal with
    ``left_blocks`` blocks; see :class:`LearnableMatrix`."""

    def __init__(
        self,
        m: int,
        n: int,
        parametrization: Parametrization = "orthogonal",
        init: TransformInit = "identity",
        generator: torch.Generator | None = None,
        left_blocks: int = 1,
    ):
        super().__init__()
        self.left = LearnableMatrix(m, parametrization, init, generator, left_blocks)
        self.right = LearnableMatrix(n, parametrization, init, generator)

    def forward(self):
        """:return: ``((P1, P1^-T), (P2, P2^-T))``"""
        return self.left(), self.right()

    def export(self):
        """Float64 ``((P1, P1^-T), (P2, P2^-T))``."""
        return self.left.export(), self.right.export()


class ClipFactor(nn.Module):
    """
    Clip factors ``sigmoid(logit)`` in (0, 1), one per entry of ``shape`` (one per
    output channel for weights, a single one per quantized input for activations).
    ``init_logit = 4.0`` starts at 0.982, as in the FlatQuant paper.
    """

    def __init__(self, shape: int | tuple[int, ...], init_logit: float = 4.0):
        super().__init__()
        size = (shape,) if isinstance(shape, int) else tuple(shape)
        self.logit = nn.Parameter(torch.full(size, float(init_logit)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)


class GroupParams(nn.Module):
    """Learnable state of one transformed input (one :class:`ResolvedGroup`)."""

    def __init__(
        self,
        group: ResolvedGroup,
        options: "FlatQuantOptions",
        smooth_init: torch.Tensor | None,
        generator: torch.Generator | None,
    ):
        super().__init__()
        self.kron = LearnableKronecker(
            group.m, group.n, options.parametrization, options.transform_init, generator,
            group.left_blocks,
        )
        int_format = options.quant_format == "int"
        self.act_clip = (
            ClipFactor(1, options.clip_init_logit)
            if int_format and options.a_bits is not None and options.learn_activation_clip
            else None
        )
        # MXFP4 weights are clamped like int ones (baked into the weights, where the
        # weight quantizer's group maxima follow them)
        clips_weights = options.quant_format in ("int", "mxfp4")
        self.weight_clips = (
            nn.ModuleList(
                ClipFactor(linear.out_features, options.clip_init_logit)
                for _, linear in group.linears
            )
            if clips_weights and options.w_bits is not None and options.learn_weight_clip
            else None
        )
        # smoothing vector at the granularity of the layer it is folded into
        self.smooth = nn.Parameter(smooth_init.clone()) if smooth_init is not None else None
        if self.smooth is not None and group.smooth_index is not None:
            self.register_buffer("smooth_index", group.smooth_index.clone())
        else:
            self.smooth_index = None

    def smooth_vector(self) -> torch.Tensor | None:
        """Smoothing vector over the linears' input channels (expanded for GQA)."""
        if self.smooth is None:
            return None
        if self.smooth_index is None:
            return self.smooth
        return self.smooth[self.smooth_index]

    def activation_clip(self) -> torch.Tensor | float:
        return self.act_clip() if self.act_clip is not None else 1.0

    def weight_clip(self) -> torch.Tensor | float:
        """Clip factors of the group's output channels, its linears stacked by rows."""
        if self.weight_clips is None:
            return 1.0
        return torch.cat([clip() for clip in self.weight_clips])

    def param_groups(self, options: "FlatQuantOptions") -> list[dict]:
        transform = list(self.kron.parameters())
        if self.smooth is not None:
            transform.append(self.smooth)
        clips = []
        if self.act_clip is not None:
            clips += list(self.act_clip.parameters())
        if self.weight_clips is not None:
            clips += list(self.weight_clips.parameters())
        groups = [{"params": transform, "lr": options.lr}]
        if clips:
            groups.append({"params": clips, "lr": options.clip_lr})
        return groups


@torch.no_grad()
def smoothquant_init(
    act_max: torch.Tensor, group: ResolvedGroup, alpha: float
) -> torch.Tensor:
    """
    SmoothQuant scales ``s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)`` at the
    granularity of the smooth layer (channels tied by ``smooth_index`` share one).
    """
    # float64: pow is computed by CPU-specific kernels, and float32 results would differ
    # in the last bit between machines (the training then diverges at 4 bits)
    w_max = torch.stack(
        [linear.weight.detach().abs().amax(dim=0).double() for _, linear in group.linears]
    ).amax(dim=0)
    act_max = act_max.double().to(w_max.device)
    if group.smooth_index is not None:
        size = int(group.smooth_index.max()) + 1
        index = group.smooth_index.to(w_max.device)
        act_max = act_max.new_zeros(size).scatter_reduce(0, index, act_max, "amax")
        w_max = w_max.new_zeros(size).scatter_reduce(0, index, w_max, "amax")
    scale = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return scale.clamp(min=1e-5)


def build_group_params(
    groups: list[ResolvedGroup],
    act_max: list[torch.Tensor | None],
    options: "FlatQuantOptions",
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> list[GroupParams]:
    """The initial learnable state of every group of a layer (``act_max``: per-channel
    max|input| of each group, for the smoothing init)."""
    params = []
    for group, amax in zip(groups, act_max):
        smooth_init = None
        if options.smooth and group.smooth is not None and amax is not None:
            smooth_init = smoothquant_init(amax, group, options.smooth_alpha).to(dtype)
        params.append(GroupParams(group, options, smooth_init, generator).to(device, dtype))
    return params


def identity_params(
    groups: list[ResolvedGroup],
    options: "FlatQuantOptions",
    dtype: torch.dtype,
    device: torch.device,
) -> list[GroupParams]:
    """Identity transforms, no smoothing, no clipping: the round-to-nearest baseline."""
    plain = options.model_copy(update=dict(
        learn_weight_clip=False, learn_activation_clip=False, smooth=False,
        parametrization="dense", transform_init="identity",
    ))
    return [GroupParams(g, plain, None, None).to(device, dtype) for g in groups]
