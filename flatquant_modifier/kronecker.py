"""
Pure math for Kronecker-structured transforms; no modules, no lifecycle.

Convention used everywhere in this package: a transform is a pair ``(P1, P2)`` of
square matrices, ``P1`` of size ``M`` and ``P2`` of size ``N`` with ``M * N`` equal to
the feature size, and it maps a row vector ``x`` to ``x @ kron(P1, P2)``. For one
token, with ``X = x.view(M, N)`` (row-major), that is ``P1.T @ X @ P2``. This is
exactly what vllm-ascend computes from a checkpoint that stores
``left_trans = P1`` and ``right_trans = P2`` (it transposes ``left_trans`` at load
and calls ``npu_kronecker_quant(X, left_trans.T, right_trans)`` = ``P1.T @ X @ P2``).
"""

import math

import torch
from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

__all__ = [
    "get_decompose_dim",
    "mx_decompose_dim",
    "mxfp4_trans_dims",
    "kronecker_matmul",
    "kronecker_matmul_factor_major",
    "transformed_second_moment",
    "to_factor_major",
    "kronecker_dense",
    "absorb_inverse_into_weight",
    "random_orthogonal",
    "random_hadamard",
]


def get_decompose_dim(n: int) -> tuple[int, int]:
    """
    Split ``n`` into ``(M, N)`` with ``M * N == n`` and ``M <= N``, as vllm-ascend
    allocates ``left_trans``/``right_trans`` (same algorithm: the smallest ``a`` with
    ``a*a - n`` a perfect square ``b*b`` gives ``(a - b, a + b)``).

    >>> get_decompose_dim(576), get_decompose_dim(1536), get_decompose_dim(11008)
    ((24, 24), (32, 48), (86, 128))
    """
    if n < 1 or n % 4 == 2:  # n = (a - b)(a + b): both factors odd, or both even
        raise ValueError(
            f"cannot decompose a feature size of {n} as vllm-ascend does "
            "(a difference of two squares)"
        )
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    while True:
        rest = a * a - n
        b = math.isqrt(rest)
        if b * b == rest:
            return a - b, a + b
        a += 1


# vllm-ascend's W4A4_MXFP4_FLATQUANT: largest Kronecker factor npu_kronecker_quant takes
MX_MAX_FACTOR = 256


def mx_decompose_dim(n: int, m: int = 1) -> tuple[int, int]:
    """
    vllm-ascend's ``get_decompose_dim(n, m)`` of its ``W4A4_MXFP4_FLATQUANT`` method:
    :func:`get_decompose_dim`'s ``(a - b, a + b)``, refused when ``a + b > 256``, and
    ``(256, m * n // 256)`` when ``(a - b) * m > 256``.

    :raises ValueError: when the right factor would exceed 256
    """
    left, right = get_decompose_dim(n)
    if right > MX_MAX_FACTOR:
        raise ValueError(f"{n} decomposes as {left} x {right}; the factors must be at "
                         f"most {MX_MAX_FACTOR}")
    if left * m > MX_MAX_FACTOR:
        return MX_MAX_FACTOR, m * n // MX_MAX_FACTOR
    return left, right


def mxfp4_trans_dims(in_features: int, row_parallel: bool, max_supported_tp: int = 4):
    """
    ``(L, R)``: the sizes of ``left_trans`` and ``right_trans`` vllm-ascend's
    ``W4A4_MXFP4_FLATQUANT`` allocates for a linear. A row-parallel linear (o_proj,
    down_proj) is split by ``max_supported_tp``: ``R`` from the decomposition of
    ``in_features / max_supported_tp``, ``L = in_features / R``, so each of up to
    ``max_supported_tp`` ranks keeps a diagonal block of ``left_trans``.
    """
    if not row_parallel:
        return mx_decompose_dim(in_features, 1)
    _, right = mx_decompose_dim(in_features // max_supported_tp, max_supported_tp)
    return in_features // right, right


def kronecker_matmul(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """
    ``x @ kron(p1, p2)`` over the last dimension of ``x`` without forming the
    Kronecker product: per row, ``p1.T @ x.view(M, N) @ p2``. Costs
    ``M*N*(M+N)`` multiply-adds per row instead of ``(M*N)**2``.

    :param x: tensor of shape ``[..., M * N]``
    :param p1: ``[M, M]``
    :param p2: ``[N, N]``
    :return: tensor of the same shape as ``x``
    """
    m, n = p1.shape[0], p2.shape[0]
    shape = x.shape
    if shape[-1] != m * n:
        raise ValueError(
            f"kronecker_matmul: last dim {shape[-1]} != {m} * {n} (P1 {tuple(p1.shape)}"
            f", P2 {tuple(p2.shape)})"
        )
    x3 = x.reshape(-1, m, n)
    # right factor as one large GEMM, then the left factor as a batched GEMM
    y = (x3.reshape(-1, n) @ p2).reshape(-1, m, n)
    y = torch.matmul(p1.transpose(0, 1), y)
    return y.reshape(shape)


def transformed_second_moment(
    moment: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    From ``moment = sum_x x^T x`` over rows ``x``, the same sum over the rows
    ``x' = (x / smooth) @ kron(p1, p2)``: ``T^T @ moment @ T`` with ``T = diag(1 / smooth)
    @ kron(p1, p2)``, computed in float64 with two Kronecker products (``2 (M N)^2 (M +
    N)`` multiply-adds, not ``(M N)^3``), returned in ``moment``'s dtype and device.
    A GPTQ Hessian (``2 / n`` times this sum) is carried through an online transform
    so, without running the transformed layer again.

    :param moment: ``[M * N, M * N]``, symmetric
    :param smooth: ``[M * N]`` divisor of the inputs, or None
    """
    t = moment.to(torch.float64)
    if smooth is not None:
        inverse = 1.0 / smooth.to(device=t.device, dtype=torch.float64)
        t = t * inverse.unsqueeze(0) * inverse.unsqueeze(1)
    p1 = p1.to(device=t.device, dtype=torch.float64)
    p2 = p2.to(device=t.device, dtype=torch.float64)
    t = kronecker_matmul(t, p1, p2)  # moment @ T
    t = kronecker_matmul(t.transpose(0, 1), p1, p2).transpose(0, 1)  # T^T @ moment @ T
    return ((t + t.transpose(0, 1)) / 2).to(moment.dtype)


def to_factor_major(x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """
    ``x`` (``[rows, M * N]``) rearranged as ``[M, rows, N]`` (contiguous): the layout in
    which :func:`kronecker_matmul_factor_major` applies both factors as plain matrix
    products.
    """
    return x.reshape(x.shape[0], m, n).transpose(0, 1).contiguous()


def kronecker_matmul_factor_major(
    xs: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor
) -> torch.Tensor:
    """
    :func:`kronecker_matmul` of rows stored factor-major (``xs`` = :func:`to_factor_major`
    of ``x``), returned as ``[rows, M * N]``. Both factors are then one 2-D matrix
    product each, forward and backward: :func:`kronecker_matmul`'s left factor acts on
    the middle axis of ``[rows, M, N]``, which costs a transposed copy of the whole
    tensor before and after its product (and two more in the backward). For weights,
    stored once in this layout; the last transpose fuses into what reads the result.

    :param xs: ``[M, rows, N]``
    :param p1: ``[M, M]``
    :param p2: ``[N, N]``
    """
    m, rows, n = xs.shape
    if p1.shape[0] != m or p2.shape[0] != n:
        raise ValueError(
            f"kronecker_matmul_factor_major: rows stored as {tuple(xs.shape)} do not match"
            f" P1 {tuple(p1.shape)}, P2 {tuple(p2.shape)}"
        )
    y = (xs.reshape(m * rows, n) @ p2).reshape(m, rows * n)
    y = (p1.transpose(0, 1) @ y).reshape(m, rows, n)
    return y.transpose(0, 1).reshape(rows, m * n)


def kronecker_dense(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """The dense ``kron(p1, p2)``: for tests and small reference computations."""
    return torch.kron(p1, p2)


def absorb_inverse_into_weight(
    weight: torch.Tensor, p1_inv_t: torch.Tensor, p2_inv_t: torch.Tensor
) -> torch.Tensor:
    """
    Weight of a linear ``y = x @ W.T`` whose input is transformed online by
    ``x -> x @ kron(P1, P2)``: ``W' = W @ kron(P1, P2)^-T`` so that
    ``(x @ P) @ W'.T == x @ W.T``. Since ``kron(P1, P2)^-T = kron(P1^-T, P2^-T)``,
    this is a Kronecker matmul of each weight row.

    :param weight: ``[out, M * N]``
    :param p1_inv_t: ``P1^-T`` (``[M, M]``)
    :param p2_inv_t: ``P2^-T`` (``[N, N]``)
    """
    return kronecker_matmul(weight, p1_inv_t, p2_inv_t)


def random_orthogonal(
    size: int, generator: torch.Generator | None = None, dtype=torch.float64
) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix)."""
    g = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    # LAPACK returns Q column-major; a row-major parameter is what collectives take
    return q.to(dtype).contiguous()


def random_hadamard(
    size: int, generator: torch.Generator | None = None, dtype=torch.float64
) -> torch.Tensor | None:
    """
    A random orthonormal Hadamard matrix ``H diag(±1) / sqrt(size)`` (compressed-tensors'
    construction, as QuaRot and SpinQuant rotate), or None where no Hadamard matrix of
    ``size`` is known (sizes ``k * 2^j`` for the orders compressed-tensors ships).
    """
    try:
        h = random_hadamard_matrix(size, torch.float64, gen=generator)
    except ValueError:  # no known Hadamard matrix of this order
        return None
    return (h / math.sqrt(size)).to(dtype).contiguous()
