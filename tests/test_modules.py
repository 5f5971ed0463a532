import pytest
import torch

from flatquant_modifier.modules import (
    ClipFactor,
    LearnableKronecker,
    LearnableMatrix,
    matrices_and_inverses,
)


@pytest.mark.parametrize("parametrization", ["orthogonal", "dense"])
@pytest.mark.parametrize("init", ["identity", "random", "hadamard"])
def test_inverse_transpose_is_exact(parametrization, init):
    g = torch.Generator().manual_seed(0)
    matrix = LearnableMatrix(12, parametrization, init, g)
    with torch.no_grad():  # move away from the init
        for p in matrix.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    p, p_inv_t = matrix()
    torch.testing.assert_close(p @ p_inv_t.T, torch.eye(12), atol=1e-4, rtol=0)
    p64, p_inv_t64 = matrix.export()
    assert p64.dtype == torch.float64
    torch.testing.assert_close(p64 @ p_inv_t64.T, torch.eye(12, dtype=torch.float64))


def test_identity_init_is_identity_and_random_init_is_orthogonal():
    p, _ = LearnableMatrix(8, "orthogonal", "identity")()
    torch.testing.assert_close(p, torch.eye(8))
    p, _ = LearnableMatrix(8, "orthogonal", "random", torch.Generator().manual_seed(0))()
    torch.testing.assert_close(p @ p.T, torch.eye(8), atol=1e-5, rtol=0)


def test_hadamard_init_is_an_orthonormal_hadamard_matrix_or_random_orthogonal():
    g = torch.Generator().manual_seed(0)
    p, _ = LearnableMatrix(24, "dense", "hadamard", g)()  # 24 = 12 x 2 (Paley)
    torch.testing.assert_close(p @ p.T, torch.eye(24), atol=1e-6, rtol=0)
    # every entry +-1/sqrt(24): all rows equally spread over the channels
    torch.testing.assert_close(p.abs(), torch.full((24, 24), 24**-0.5))
    blocks = LearnableMatrix(48, "dense", "hadamard", g, blocks=3)()[0]
    torch.testing.assert_close(blocks[:16, :16].abs(), torch.full((16, 16), 0.25))
    assert not blocks[:16, 16:].any()
    # no Hadamard matrix of order 9 is known: a random orthogonal matrix instead
    p, _ = LearnableMatrix(9, "dense", "hadamard", g)()
    torch.testing.assert_close(p @ p.T, torch.eye(9), atol=1e-5, rtol=0)
    assert p.abs().std() > 0.05


def test_kronecker_has_both_factors_and_gradients():
    kron = LearnableKronecker(4, 6)
    ((p1, _), (p2, _)) = kron()
    assert p1.shape == (4, 4) and p2.shape == (6, 6)
    (p1.sum() + p2.sum()).backward()
    assert all(p.grad is not None for p in kron.parameters())


def test_clip_factor_init_and_shape():
    clip = ClipFactor(5, init_logit=4.0)
    torch.testing.assert_close(clip(), torch.full((5,), torch.sigmoid(torch.tensor(4.0)).item()))
    assert ClipFactor(1)().shape == (1,)


def test_batched_inverses_equal_each_matrix_alone():
    g = torch.Generator().manual_seed(0)
    matrices = [LearnableMatrix(n, p, "random", g)
                for n, p in [(6, "dense"), (4, "dense"), (6, "orthogonal"), (6, "dense"),
                             (4, "dense")]]
    with torch.no_grad():
        for m in matrices:
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    batched = matrices_and_inverses(matrices)
    for m, (p, p_inv_t) in zip(matrices, batched):
        alone_p, alone_inv_t = m()
        torch.testing.assert_close(p, alone_p, atol=0, rtol=0)
        torch.testing.assert_close(p_inv_t, alone_inv_t, atol=1e-6, rtol=0)
    # gradients reach every matrix through the batched inverse
    sum(inv.sum() for _, inv in batched).backward()
    assert all(p.grad is not None for m in matrices for p in m.parameters() if p.requires_grad)


def test_random_init_is_a_row_major_parameter():
    # collectives (broadcast of the learned matrices under torchrun) refuse transposed
    # tensors; LAPACK's QR returns Q column-major
    matrix = LearnableMatrix(24, "dense", "random", torch.Generator().manual_seed(0))
    assert matrix.matrix.is_contiguous()


@pytest.mark.parametrize("parametrization", ["orthogonal", "dense"])
def test_block_diagonal_matrix_keeps_its_off_diagonal_zeros(parametrization):
    g = torch.Generator().manual_seed(0)
    matrix = LearnableMatrix(12, parametrization, "random", g, blocks=3)
    with torch.no_grad():
        for p in matrix.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    mask = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3)
    for p, p_inv_t in (matrix(), matrices_and_inverses([matrix])[0], matrix.export()):
        assert p.shape == (12, 12) and torch.all(p[~mask] == 0) and torch.all(p_inv_t[~mask] == 0)
        torch.testing.assert_close(p @ p_inv_t.T, torch.eye(12, dtype=p.dtype), atol=1e-4, rtol=0)
    p, _ = matrix()
    p.sum().backward()
    assert all(q.grad is not None for q in matrix.parameters())
