"""The fast paths of Tucker/HOOI give the same answers as the plain ones."""

import torch

import tensorfold as tf
from tensorfold.decomp.tucker import _leading_subspace
from tensorfold.testing import add_noise


def test_thin_unfolding_subspace_matches_svd():
    # (150, 10, 10): a 150 x 100 unfolding, the shape every HOOI step on a projected 3-way tensor sees.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(150, 10, 10, generator=gen, dtype=torch.float64)
    U, tail = _leading_subspace(X, 0, 7)
    Uf, S, _ = torch.linalg.svd(X.reshape(150, 100), full_matrices=False)
    assert torch.allclose(U.T @ U, torch.eye(7, dtype=torch.float64), atol=1e-12)
    # same subspace (projectors agree) and the same discarded energy
    assert torch.allclose(U @ U.T, Uf[:, :7] @ Uf[:, :7].T, atol=1e-9)
    assert abs(tail - float((S[7:] ** 2).sum())) < 1e-9 * float((S**2).sum())


def test_hooi_reaches_the_hosvd_optimum_on_planted_tucker():
    X = add_noise(tf.testing.random_tucker((40, 30, 20), (4, 3, 2), seed=3).to_tensor(), 0.05)
    approx = tf.tucker(X, (4, 3, 2), n_iter_max=5, tol=0)
    # the planted noise level bounds the best Tucker error from above; HOOI must be at most there
    assert tf.relative_error(X, approx) < 0.05
    assert abs(approx.info.fit_history[-1] - (1 - tf.relative_error(X, approx))) < 1e-10
