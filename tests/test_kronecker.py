import pytest
import torch

from flatquant_modifier.kronecker import (
    absorb_inverse_into_weight,
    get_decompose_dim,
    kronecker_dense,
    kronecker_matmul,
    kronecker_matmul_factor_major,
    random_hadamard,
    random_orthogonal,
    to_factor_major,
    transformed_second_moment,
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


def test_factor_major_rows_give_kronecker_matmul_and_its_gradients():
    g = torch.Generator().manual_seed(2)
    p1 = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p2 = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64)
    xs = to_factor_major(x, 3, 4)
    assert xs.shape == (3, 7, 4) and xs.is_contiguous()
    assert torch.equal(xs[1, 5], x[5, 4:8])  # row 5, second block of N
    out = kronecker_matmul_factor_major(xs, p1, p2)
    expected = kronecker_matmul(x, p1, p2)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    upstream = torch.randn(7, 12, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), [p1, p2])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [p1, p2])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="do not match"):
        kronecker_matmul_factor_major(xs, p2, p1)


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


def test_random_hadamard():
    h = random_hadamard(20, torch.Generator().manual_seed(0))
    torch.testing.assert_close(h @ h.T, torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full((20, 20), 20**-0.5, dtype=torch.float64))
    # the signs are drawn from the generator
    assert not torch.equal(h, random_hadamard(20, torch.Generator().manual_seed(1)))
    assert random_hadamard(9) is None  # no Hadamard matrix of order 9 is known


def test_kronecker_matmul_rejects_wrong_size():
    with pytest.raises(ValueError, match="last dim 10"):
        kronecker_matmul(torch.zeros(2, 10), torch.eye(3), torch.eye(4))


def test_mxfp4_transform_sizes_are_vllm_ascends():
    """W4A4_MXFP4_FLATQUANT's left_trans/right_trans sizes: column-parallel linears as
    get_decompose_dim, row-parallel ones split by max_supported_tp (vllm-ascend's
    get_decompose_dim(n, m) of that method)."""
    from flatquant_modifier.kronecker import mxfp4_trans_dims

    expected = {  # in_features: column, row (max TP 4), row (max TP 8)
        4096: ((64, 64), (128, 32), (128, 32)),
        5120: ((64, 80), (128, 40), (160, 32)),
        14336: ((112, 128), (224, 64), (256, 56)),
        25600: ((160, 160), (256, 100), (256, 100)),
    }
    for n, dims in expected.items():
        got = (mxfp4_trans_dims(n, False), mxfp4_trans_dims(n, True, 4),
               mxfp4_trans_dims(n, True, 8))
        assert got == dims, n
    with pytest.raises(ValueError, match="at most 256"):
        mxfp4_trans_dims(3 * 257, False)  # 3 x 257


def test_sizes_with_no_decomposition_are_refused_not_looped_on():
    from flatquant_modifier.kronecker import get_decompose_dim

    with pytest.raises(ValueError, match="cannot decompose a feature size of 514"):
        get_decompose_dim(514)  # 2 mod 4: not a difference of two squares


@pytest.mark.parametrize("smooth", [False, True])
def test_transformed_second_moment_is_that_of_the_transformed_rows(smooth):
    """T^T (X^T X) T == (X T)^T (X T) for T = diag(1/s) kron(P1, P2), in float64, and
    returned in the moment's dtype (a float32 GPTQ Hessian)."""
    g = torch.Generator().manual_seed(0)
    m, n = 4, 6
    x = torch.randn(50, m * n, generator=g, dtype=torch.float64)
    p1 = torch.randn(m, m, generator=g, dtype=torch.float64)
    p2 = torch.randn(n, n, generator=g, dtype=torch.float64)
    s = torch.rand(m * n, generator=g, dtype=torch.float64) + 0.5 if smooth else None
    xt = kronecker_matmul(x / s if smooth else x, p1, p2)
    expected = xt.T @ xt
    got = transformed_second_moment(x.T @ x, p1, p2, s)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * expected.abs().max())
    assert torch.equal(got, got.T)
    single = transformed_second_moment((x.T @ x).float(), p1.float(), p2.float(),
                                       None if s is None else s.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max())
