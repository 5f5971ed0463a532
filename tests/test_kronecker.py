import pytest
import torch

from flatquant_modifier.kronecker import (
    absorb_inverse_into_weight,
    get_decompose_dim,
    kronecker_dense,
    kronecker_matmul,
    random_orthogonal,
)


@pytest.mark.parametrize(
    "n, expected",
    [(576, (24, 24)), (1536, (32, 48)), (4096, (64, 64)), (11008, (86, 128)),
     (64, (8, 8)), (128, (8, 16)), (7, (1, 7))],
)
def test_get_decompose_dim_matches_vllm_ascend(n, expected):
    # values allocated by vllm-ascend's get_decompose_dim (its W4A4 FlatQuant method)
    assert get_decompose_dim(n) == expected


def test_kronecker_matmul_equals_dense_kron():
    g = torch.Generator().manual_seed(0)
    p1 = torch.randn(3, 3, generator=g, dtype=torch.float64)
    p2 = torch.randn(4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    expected = x @ kronecker_dense(p1, p2)
    torch.testing.assert_close(kronecker_matmul(x, p1, p2), expected)
    # per token it is P1^T @ X @ P2 with X = x.view(M, N)
    token = x[0, 0].view(3, 4)
    torch.testing.assert_close(
        kronecker_matmul(x, p1, p2)[0, 0].view(3, 4), p1.T @ token @ p2
    )


def test_absorbed_inverse_preserves_linear():
    g = torch.Generator().manual_seed(1)
    p1 = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    p2 = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    x = torch.randn(7, 24, generator=g, dtype=torch.float64)
    w2 = absorb_inverse_into_weight(w, torch.linalg.inv(p1).T, torch.linalg.inv(p2).T)
    torch.testing.assert_close(kronecker_matmul(x, p1, p2) @ w2.T, x @ w.T)


def test_random_orthogonal():
    q = random_orthogonal(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(16, dtype=torch.float64))


def test_kronecker_matmul_rejects_wrong_size():
    with pytest.raises(ValueError, match="last dim 10"):
        kronecker_matmul(torch.zeros(2, 10), torch.eye(3), torch.eye(4))
