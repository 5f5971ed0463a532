"""
Learnable pieces of FlatQuant, used only while a decoder layer is trained:
Kronecker transforms, clip factors and the smoothing vector.
"""

from typing import Literal

import torch
from torch import nn

from flatquant_modifier.kronecker import random_orthogonal

__all__ = [
    "Parametrization",
    "TransformInit",
    "LearnableMatrix",
    "LearnableKronecker",
    "ClipFactor",
    "matrices_and_inverses",
]

Parametrization = Literal["orthogonal", "dense"]
TransformInit = Literal["identity", "random"]


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

    Both start at ``P = Q`` with ``Q`` the identity or a random orthogonal matrix.
    """

    def __init__(
        self,
        size: int,
        parametrization: Parametrization = "orthogonal",
        init: TransformInit = "identity",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.size = size
        self.parametrization = parametrization
        base = (
            random_orthogonal(size, generator, torch.float32)
            if init == "random"
            else torch.eye(size)
        )
        if parametrization == "orthogonal":
            self.register_buffer("u0", base)
            self.register_buffer("v0", torch.eye(size))
            self.skew_u = nn.Parameter(torch.zeros(size, size))
            self.skew_v = nn.Parameter(torch.zeros(size, size))
            self.singular = nn.Parameter(torch.ones(size))
        elif parametrization == "dense":
            self.matrix = nn.Parameter(base.clone())
        else:
            raise ValueError(f"unknown parametrization {parametrization!r}")

    def _factors(self, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthogonal ``(U, V)``, computed in ``dtype`` (default: the parameters')."""
        dtype = dtype or self.skew_u.dtype
        su = self.skew_u.to(dtype).tril(-1)
        sv = self.skew_v.to(dtype).tril(-1)
        u = self.u0.to(dtype) @ torch.linalg.matrix_exp(su - su.T)
        v = self.v0.to(dtype) @ torch.linalg.matrix_exp(sv - sv.T)
        return u, v

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:return: ``(P, P^-T)``, in the parameters' dtype"""
        if self.parametrization == "orthogonal":
            u, v = self._factors()
            p = (u * self.singular) @ v.T
            p_inv_t = (u / self.singular) @ v.T
            return p, p_inv_t
        p = self.matrix
        # inv_ex: no error check, hence no device sync in every training step
        return p, torch.linalg.inv_ex(p).inverse.T

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, P^-T)`` computed in float64, for absorbing into weights."""
        if self.parametrization == "orthogonal":
            u, v = self._factors(torch.float64)
            s = self.singular.double()
            return (u * s) @ v.T, (u / s) @ v.T
        p = self.matrix.double()
        return p, torch.linalg.inv(p).T


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
        if matrix.parametrization == "dense":
            by_size.setdefault(matrix.size, []).append(index)
        else:
            results[index] = matrix()
    for indices in by_size.values():
        stacked = torch.stack([matrices[i].matrix for i in indices])
        # inv_ex: no error check, hence no device sync in every training step
        inverses = torch.linalg.inv_ex(stacked).inverse.transpose(-1, -2)
        for i, inverse_t in zip(indices, inverses.unbind(0)):
            results[i] = (matrices[i].matrix, inverse_t)
    return results


class LearnableKronecker(nn.Module):
    """``P = kron(P1, P2)`` with sizes ``(M, N)``; see :class:`LearnableMatrix`."""

    def __init__(
        self,
        m: int,
        n: int,
        parametrization: Parametrization = "orthogonal",
        init: TransformInit = "identity",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.left = LearnableMatrix(m, parametrization, init, generator)
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
