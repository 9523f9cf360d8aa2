"""Generalized CP: planted factors recovered under Poisson and Bernoulli losses, Gaussian GCP equals CP-ALS."""

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.decomp.gcp import LOSSES, factor_match_score
from tensorfold.decomp.sparse import COOTensor


def poisson_problem(shape=(30, 35, 40), rank=3, seed=0):
    return tf.testing.poisson_cp_problem(shape, rank, seed=seed)


def bernoulli_problem(shape=(30, 35, 40), rank=3, seed=1):
    return tf.testing.bernoulli_cp_problem(shape, rank, seed=seed)


def test_poisson_counts_recover_planted_factors():
    Y, truth = poisson_problem()
    approx = tf.gcp(Y, 3, loss="poisson")
    assert factor_match_score(approx, truth) >= 0.95
    assert all(bool((f >= 0).all()) for f in approx.factors)
    hist = approx.info.fit_history
    assert hist[-1] <= hist[0]  # the objective went down


def test_bernoulli_logit_recovers_planted_factors():
    Y, truth = bernoulli_problem()
    approx = tf.gcp(Y, 3, loss="bernoulli-logit")
    assert factor_match_score(approx, truth, weight_penalty=False) >= 0.95


def test_gaussian_gcp_equals_cp_als():
    X = tf.testing.add_noise(tf.testing.random_cp((15, 16, 17), 3, seed=2).to_tensor(), 0.05)
    als = tf.cp(X, 3, tol=1e-12, n_iter_max=500)
    for init in ("auto", "random"):
        g = tf.gcp(X, 3, loss="gaussian", init=init)
        assert abs(tf.relative_error(X, g) - tf.relative_error(X, als)) < 1e-6


def test_sparse_poisson_with_stratified_adam():
    Y, truth = poisson_problem(seed=3)
    nz = Y.nonzero()
    coo = COOTensor(nz, Y[tuple(nz.T)], tuple(Y.shape))
    start = tf.gcp(Y, 3, loss="poisson", n_iter_max=5)  # a rough start; Adam must improve it
    approx = tf.gcp(coo, 3, loss="poisson", solver="adam", init=start, lr=1e-2, epochs=15, epoch_iters=30,
                    n_samples=(2000, 2000), seed=1)
    exact = tf.gcp(coo, 3, loss="poisson", init=start, n_iter_max=0 + 1)  # densified L-BFGS-B path runs too
    assert exact.shape == Y.shape
    assert factor_match_score(approx, truth) > factor_match_score(start, truth)
    assert factor_match_score(approx, truth, weight_penalty=False) >= 0.9


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_lowers_its_objective(loss):
    gen = torch.Generator().manual_seed(0)
    M = tf.testing.random_cp((8, 9, 10), 2, seed=4).to_tensor().abs() + 0.5
    data = {"bernoulli-logit": torch.bernoulli(torch.sigmoid(M - 1), generator=gen),
            "poisson": torch.poisson(M, generator=gen), "poisson-log": torch.poisson(M, generator=gen)}
    X = data.get(loss, M * (1 + 0.1 * torch.rand(M.shape, generator=gen, dtype=M.dtype)))
    approx = tf.gcp(X, 2, loss=loss, init="random", n_iter_max=50)
    hist = approx.info.fit_history
    assert np.isfinite(hist[-1]) and hist[-1] < hist[0]


def test_gcp_rejects_bad_input():
    X = torch.rand(4, 5, 6, dtype=torch.float64)
    with pytest.raises(tf.InvalidTensorError, match="binary"):
        tf.gcp(X, 2, loss="bernoulli-logit")
    with pytest.raises(tf.InvalidTensorError, match="counts"):
        tf.gcp(X, 2, loss="poisson")
    with pytest.raises(tf.InvalidArgumentError, match="loss"):
        tf.gcp(X, 2, loss="cauchy")
    with pytest.raises(tf.ShapeError, match="mask"):
        tf.gcp(X, 2, mask=torch.ones(4, 5, dtype=torch.bool))


def test_factor_match_score_is_permutation_and_scale_invariant():
    a = tf.testing.random_cp((6, 7, 8), 3, seed=5)
    perm = [2, 0, 1]
    b = tf.CPTensor(a.weights[perm], [f[:, perm] * torch.tensor([1.0, -1.0, 1.0], dtype=f.dtype) ** i
                                      for i, f in enumerate(a.factors)])
    assert factor_match_score(a, b, weight_penalty=False) == pytest.approx(1.0)
    c = tf.testing.random_cp((6, 7, 8), 3, seed=6)
    assert factor_match_score(a, c) < 0.5
