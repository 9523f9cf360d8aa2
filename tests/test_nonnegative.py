"""Nonnegative CP (HALS) and nonnegative Tucker: nonnegativity, fit against TensorLy on the same start."""

import warnings

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.errors import ConvergenceWarning, InvalidTensorError, RankError, ShapeError


def _nonnegative_problem(shape, rank, seed, noise=0.05):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.rand(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    X = tf.CPTensor(torch.ones(rank, dtype=torch.float64), factors).to_tensor()
    X = X + noise * X.std() * torch.rand(*shape, generator=gen, dtype=torch.float64)
    init = [torch.rand(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    return X, init


@pytest.mark.parametrize("seed, n_iter", [(0, 10), (1, 40)])
def test_hals_fit_matches_tensorly_at_equal_iterations(seed, n_iter):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import non_negative_parafac_hals

    X, init = _nonnegative_problem((20, 25, 30), 4, seed)
    ours = tf.nonnegative_cp(X, 4, init=tf.CPTensor(torch.ones(4, dtype=torch.float64), init),
                             n_iter_max=n_iter, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w, f = non_negative_parafac_hals(X.numpy(), 4, init=(np.ones(4), [a.numpy().copy() for a in init]),
                                         n_iter_max=n_iter, tol=0)
    theirs = 1 - np.linalg.norm(X.numpy() - tl.cp_to_tensor((w, f))) / np.linalg.norm(X.numpy())
    fit = 1 - tf.relative_error(X, ours)
    assert fit >= theirs - 0.01 * abs(theirs)
    assert all(float(a.min()) >= 0 for a in ours.factors) and float(ours.weights.min()) >= 0
    assert ours.info.n_iter == n_iter
    # the fit the algorithm reports is the true one
    assert abs(ours.info.fit_history[-1] - fit) < 1e-8


def test_hals_recovers_exact_nonnegative_cp_and_fit_is_monotone():
    X, _ = _nonnegative_problem((15, 16, 17), 3, seed=2, noise=0.0)
    result = tf.nonnegative_cp(X, 3, n_iter_max=150, tol=1e-12, seed=0)
    assert tf.relative_error(X, result) < 1e-3
    history = np.array(result.info.fit_history)
    assert (np.diff(history) >= -1e-10).all()


def test_float32_and_random_init_and_callback_stop():
    X, _ = _nonnegative_problem((10, 11, 12), 2, seed=3)
    seen = []
    result = tf.nonnegative_cp(X.float(), 2, init="random", seed=1,
                               callback=lambda it, fit: seen.append(fit) or it == 5)
    assert result.dtype == torch.float32 and result.info.n_iter == 5 == len(seen)
    assert all(float(a.min()) >= 0 for a in result.factors)


def test_nonnegative_tucker_is_nonnegative_and_fits_at_least_like_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import non_negative_tucker_hals

    T = tf.testing.random_tucker((20, 21, 22), (3, 4, 3), seed=3, orthogonal=False)
    X = tf.TuckerTensor(T.core.abs(), [U.abs() for U in T.factors]).to_tensor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = tf.nonnegative_tucker(X, (3, 4, 3), n_iter_max=40)
        core, factors = non_negative_tucker_hals(X.numpy(), (3, 4, 3), n_iter_max=40)
    theirs = 1 - np.linalg.norm(X.numpy() - tl.tucker_to_tensor((core, factors))) / np.linalg.norm(X.numpy())
    fit = 1 - tf.relative_error(X, ours)
    assert float(ours.core.min()) >= 0 and all(float(U.min()) >= 0 for U in ours.factors)
    assert fit >= theirs - 0.01 and fit > 0.975  # 40 sweeps: 0.977 measured
    assert abs(ours.info.fit_history[-1] - fit) < 1e-8
    # the data are exactly nonnegative Tucker of these ranks: more sweeps must approach an exact fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        longer = tf.nonnegative_tucker(X, (3, 4, 3), n_iter_max=300, tol=0)
    assert 1 - tf.relative_error(X, longer) > 0.999  # 0.99941 measured


def test_bad_inputs():
    X, _ = _nonnegative_problem((6, 7, 8), 2, seed=0)
    with pytest.raises(InvalidTensorError, match="negative entries"):
        tf.nonnegative_cp(X - 1.0, 2)
    with pytest.raises(InvalidTensorError, match="negative entries"):
        tf.nonnegative_tucker(X - 1.0, 2)
    with pytest.raises(RankError):
        tf.nonnegative_cp(X, 0)
    with pytest.raises(RankError):
        tf.nonnegative_tucker(X, (2, 2, 9))
    with pytest.raises(ShapeError):
        tf.nonnegative_cp(X, 2, init=tf.testing.random_cp((6, 7, 9), 2))
    X_before = X.clone()
    tf.nonnegative_cp(X, 2, n_iter_max=2, tol=0)
    assert torch.equal(X, X_before)


@pytest.mark.parametrize("order", [3, 4])
def test_partial_mttkrp_equals_mttkrp(order):
    from tensorfold.decomp.nonnegative import _partial_mttkrp

    shape = (4, 5, 6, 7)[:order]
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    factors = [torch.randn(n, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i, n in enumerate(shape)]
    T = (X.reshape(-1, shape[-1]) @ factors[-1]).reshape(*shape[:-1], 3)
    for mode in range(order - 1):
        assert torch.allclose(_partial_mttkrp(T, factors, mode), tf.mttkrp(X, factors, mode), atol=1e-12)
