"""Tensor ring: TR-SVD (fixed ranks or eps), ALS sweeps, TensorLy as oracle, bad input.

What is guaranteed (and asserted): with ``eps`` the relative error is at most ``eps`` (exact data is
recovered to rounding); at fixed ranks the error is at most the TR-SVD bound
``sqrt(sum of discarded tails) / ||X||`` and never increases over the ALS sweeps. Recovering an exact
TR tensor at its own ranks is a non-convex problem: ALS reaches it on the cases below, not always.
"""

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.errors import InvalidArgumentError, InvalidTensorError, RankError
from tensorfold.testing import add_noise, random_tr


def tensorly_tr_error(X: torch.Tensor, ranks) -> float:
    import tensorly as tl
    from tensorly.decomposition import tensor_ring as tl_tensor_ring

    Xn = X.double().numpy()
    factors = tl_tensor_ring(Xn, rank=[*ranks, ranks[0]])
    return float(np.linalg.norm(Xn - tl.tr_to_tensor(factors)) / np.linalg.norm(Xn))


@pytest.mark.parametrize("shape, ranks", [((6, 7, 8), (2, 2, 2)), ((5, 6, 7, 8), (2, 3, 2, 2)), ((8, 9), (2, 3))])
def test_eps_recovers_exact_tr(shape, ranks):
    X = random_tr(shape, ranks, seed=1).to_tensor()
    tr = tf.tensor_ring(X, eps=1e-12, n_iter_max=0)
    assert tf.relative_error(X, tr) < 1e-10
    assert tr.info.details["svd_error_bound"] < 1e-10


@pytest.mark.parametrize("eps", [0.3, 0.1, 0.05])
def test_eps_bound_on_noisy_data(eps):
    X = add_noise(random_tr((6, 7, 8, 5), (2, 2, 3, 2), seed=2).to_tensor(), 0.05)
    tr = tf.tensor_ring(X, eps=eps, n_iter_max=3)
    err = tf.relative_error(X, tr)
    assert err <= eps
    assert err <= tr.info.details["svd_error_bound"] + 1e-12


def test_fixed_rank_exact_recovery_with_als():
    X = random_tr((6, 7, 8, 9), (2, 2, 2, 2), seed=5).to_tensor()
    tr = tf.tensor_ring(X, (2, 2, 2, 2), n_iter_max=100, tol=1e-12)
    assert tr.rank == (2, 2, 2, 2, 2)
    assert tf.relative_error(X, tr) < 1e-7


def test_svd_only_matches_tensorly():
    X = add_noise(random_tr((6, 7, 8, 9), (2, 3, 2, 2), seed=3).to_tensor(), 0.1)
    ours = tf.tensor_ring(X, (2, 3, 2, 2), n_iter_max=0)
    err = tf.relative_error(X, ours)
    assert err == pytest.approx(tensorly_tr_error(X, (2, 3, 2, 2)), abs=1e-10)
    # TR-SVD's truncations are orthogonal projections: its error is exactly sqrt(sum of tails).
    assert err == pytest.approx(ours.info.details["svd_error_bound"], rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape, ranks", [((6, 7, 8), (2, 2, 2)), ((8, 9, 10), (2, 3, 2)), ((5, 6, 7, 8), (2, 2, 3, 2))]
)
def test_als_never_worse_and_beats_tensorly(shape, ranks, dtype):
    X = add_noise(random_tr(shape, ranks, seed=4).to_tensor(), 0.1).to(dtype)
    tr = tf.tensor_ring(X, ranks, n_iter_max=8, tol=0)
    errors = [1 - f for f in tr.info.fit_history]
    assert len(errors) == 9  # initial TR-SVD + 8 sweeps
    slack = 1e-10 if dtype == torch.float64 else 1e-4
    assert all(b <= a + slack for a, b in zip(errors, errors[1:]))
    final = tf.relative_error(X.double(), tr.to(torch.float64))
    assert final == pytest.approx(errors[-1], abs=1e-8 if dtype == torch.float64 else 1e-4)
    assert final <= tr.info.details["svd_error_bound"] + slack
    assert final <= tensorly_tr_error(X, ranks) + 1e-6


def test_random_init_reproducible_and_improves():
    X = add_noise(random_tr((5, 6, 7), (2, 2, 2), seed=6).to_tensor(), 0.1)
    a = tf.tensor_ring(X, 2, init="random", seed=3, n_iter_max=5, tol=0)
    b = tf.tensor_ring(X, 2, init="random", seed=3, n_iter_max=5, tol=0)
    assert all(torch.equal(x, y) for x, y in zip(a.cores, b.cores))
    errors = [1 - f for f in a.info.fit_history]
    assert errors[-1] < errors[0] and all(y <= x + 1e-10 for x, y in zip(errors, errors[1:]))


def test_order_two_ring():
    X = random_tr((8, 9), (2, 3), seed=7).to_tensor()
    tr = tf.tensor_ring(X, (2, 3), n_iter_max=2)
    assert tf.relative_error(X, tr) < 1e-10


def test_large_later_ranks_are_reduced():
    X = add_noise(random_tr((3, 4, 5), (1, 2, 2), seed=8).to_tensor(), 0.1)
    tr = tf.tensor_ring(X, (1, 3, 50), n_iter_max=1)
    assert tr.rank == (1, 3, 5, 1)  # bond 2 is at most min(r_1 I_2, I_3 r_0) = 5
    assert tf.relative_error(X, tr) < 1e-10  # ranks that large represent X exactly


def test_callback_stops_and_input_untouched():
    X = add_noise(random_tr((5, 6, 7), (2, 2, 2), seed=9).to_tensor(), 0.2)
    before = X.clone()
    seen = []

    def cb(sweep, err):
        seen.append(err)
        return sweep == 2

    tr = tf.tensor_ring(X, 2, n_iter_max=10, tol=0, callback=cb)
    assert len(seen) == 2 and tr.info.n_iter == 2 and not tr.info.converged
    assert torch.equal(X, before)


@pytest.mark.parametrize(
    "X, ranks, kwargs, error",
    [
        (torch.full((3, 4, 5), float("nan"), dtype=torch.float64), 1, {}, InvalidTensorError),
        (torch.zeros(3, 0, 5), 1, {}, InvalidTensorError),
        (torch.ones(3, 4, 5, dtype=torch.int16), 1, {}, InvalidTensorError),
        (torch.ones(5), 1, {}, InvalidTensorError),
        (torch.ones(3, 4, 5), 0, {}, RankError),
        (torch.ones(3, 4, 5), (1, 2), {}, RankError),
        (torch.ones(3, 4, 5), (1, 2, 2, 2), {}, RankError),
        (torch.ones(3, 4, 5), (1, -2, 2), {}, RankError),
        (torch.ones(3, 4, 5), (2, 2, 2), {}, RankError),  # r0 * r1 = 4 > I_1 = 3
        (torch.ones(3, 4, 5), None, {}, InvalidArgumentError),
        (torch.ones(3, 4, 5), 1, {"eps": 0.1}, InvalidArgumentError),
        (torch.ones(3, 4, 5), None, {"eps": 1.5}, InvalidArgumentError),
        (torch.ones(3, 4, 5), None, {"eps": 0.1, "init": "random"}, InvalidArgumentError),
        (torch.ones(3, 4, 5), 1, {"init": "tt"}, InvalidArgumentError),
        (torch.ones(3, 4, 5), 1, {"n_iter_max": 1.5}, InvalidArgumentError),
    ],
)
def test_bad_input(X, ranks, kwargs, error):
    with pytest.raises(error):
        tf.tensor_ring(X, ranks, **kwargs)
