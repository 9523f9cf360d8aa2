"""Tensor train: exact recovery, the eps guarantee, TT rounding, TensorLy as oracle, bad input."""

import math

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.errors import InvalidArgumentError, InvalidTensorError, RankError
from tensorfold.testing import add_noise, random_tt

CASES = [((5, 6, 7), (3, 4)), ((4, 5, 6, 7), (2, 3, 2)), ((3, 4, 3, 4, 3), (2, 3, 3, 2))]


def tt_add(a: tf.TTTensor, b: tf.TTTensor) -> tf.TTTensor:
    """The TT of ``a + b`` with block cores (bond ranks add): a redundant TT for rounding to shrink."""
    d = len(a.cores)
    cores = []
    for k, (x, y) in enumerate(zip(a.cores, b.cores)):
        if k == 0:
            cores.append(torch.cat([x, y], dim=2))
        elif k == d - 1:
            cores.append(torch.cat([x, y], dim=0))
        else:
            c = torch.zeros(x.shape[0] + y.shape[0], x.shape[1], x.shape[2] + y.shape[2], dtype=x.dtype)
            c[: x.shape[0], :, : x.shape[2]] = x
            c[x.shape[0] :, :, x.shape[2] :] = y
            cores.append(c)
    return tf.TTTensor(cores)


@pytest.mark.parametrize("shape, ranks", CASES)
def test_exact_recovery_with_eps(shape, ranks):
    X = random_tt(shape, ranks, seed=1).to_tensor()
    tt = tf.tensor_train(X, eps=1e-12)
    assert tt.rank == (1, *ranks, 1)
    assert tf.relative_error(X, tt) < 1e-10


@pytest.mark.parametrize("shape, ranks", CASES)
def test_exact_recovery_with_max_rank(shape, ranks):
    X = random_tt(shape, ranks, seed=2).to_tensor()
    tt = tf.tensor_train(X, max_rank=list(ranks))
    assert tt.rank == (1, *ranks, 1)
    assert tf.relative_error(X, tt) < 1e-10
    assert tt.info.details["error_bound"] < 1e-10


def test_exact_recovery_float32():
    X = random_tt((6, 7, 8, 5), (2, 3, 2), seed=3).to_tensor().float()
    tt = tf.tensor_train(X, max_rank=3)
    assert tt.dtype == torch.float32
    assert tf.relative_error(X, tt) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.3, 0.1, 0.03, 0.01])
def test_eps_bound_on_noisy_data(eps, dtype):
    X = add_noise(random_tt((6, 7, 8, 9), (3, 4, 3), seed=4).to_tensor(), 0.05).to(dtype)
    tt = tf.tensor_train(X, eps=eps)
    err = tf.relative_error(X.double(), tt.to(torch.float64))
    assert err <= eps
    # The reported bound is the exact error (discarded parts are orthogonal).
    assert tt.info.details["error_bound"] == pytest.approx(err, rel=1e-6 if dtype == torch.float64 else 1e-2, abs=1e-6)
    assert tt.info.details["error_bound"] <= eps


def test_eps_ranks_shrink_as_eps_grows():
    X = add_noise(random_tt((6, 7, 8, 9), (3, 4, 3), seed=5).to_tensor(), 0.05)
    params = [tf.tensor_train(X, eps=e).n_params for e in (0.01, 0.05, 0.2, 0.5)]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]


def test_max_rank_int_caps_and_limits():
    X = add_noise(random_tt((3, 4, 5, 6), (2, 2, 2), seed=6).to_tensor(), 0.1)
    tt = tf.tensor_train(X, max_rank=100)
    # Bond limits min(prod left, prod right): 3, 12, 6 -> the full TT, exact.
    assert tt.rank == (1, 3, 12, 6, 1)
    assert tf.relative_error(X, tt) < 1e-12
    assert tf.tensor_train(X, max_rank=2).rank == (1, 2, 2, 2, 1)
    both = tf.tensor_train(X, max_rank=2, eps=0.9)
    assert max(both.rank) <= 2


@pytest.mark.parametrize("shape, ranks", [((5, 6, 7), (2, 3)), ((4, 5, 6, 5), (2, 3, 2))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_tensorly(shape, ranks, dtype):
    import tensorly as tl
    from tensorly.decomposition import tensor_train as tl_tt

    X = add_noise(random_tt(shape, ranks, seed=7).to_tensor(), 0.2).to(dtype)
    Xn = X.double().numpy()
    theirs = tl_tt(Xn, rank=[1, *ranks, 1])
    err_tl = np.linalg.norm(Xn - tl.tt_to_tensor(theirs)) / np.linalg.norm(Xn)
    ours = tf.tensor_train(X, max_rank=list(ranks))
    assert abs(tf.relative_error(X.double(), ours.to(torch.float64)) - err_tl) < 1e-6


def test_order_two_is_truncated_svd():
    X = add_noise(random_tt((12, 10), (3,), seed=8).to_tensor(), 0.3)
    tt = tf.tensor_train(X, max_rank=3)
    S = torch.linalg.svdvals(X)
    assert tf.relative_error(X, tt) == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-10)


def test_input_not_modified():
    X = add_noise(random_tt((4, 5, 6), (2, 2), seed=9).to_tensor(), 0.1)
    before = X.clone()
    tf.tensor_train(X, eps=0.1)
    assert torch.equal(X, before)


# --- rounding ------------------------------------------------------------------------------


def test_round_recovers_redundant_ranks_exactly():
    a = random_tt((4, 5, 6, 7), (2, 3, 2), seed=10)
    doubled = tt_add(a, a)  # bond ranks 4, 6, 4 representing 2a (true ranks 2, 3, 2)
    assert doubled.rank == (1, 4, 6, 4, 1)
    rounded = tf.tt_round(doubled, eps=1e-12)
    assert rounded.rank == (1, 2, 3, 2, 1)
    assert tf.relative_error(2 * a.to_tensor(), rounded) < 1e-10


@pytest.mark.parametrize("eps", [0.3, 0.1, 0.01])
def test_round_eps_bound_relative_to_input(eps):
    a = tf.tensor_train(add_noise(random_tt((6, 7, 8, 9), (3, 3, 3), seed=11).to_tensor(), 0.2), max_rank=8)
    b = random_tt((6, 7, 8, 9), (2, 2, 2), seed=12)
    big = tt_add(a, b)
    full = big.to_tensor()
    rounded = tf.tt_round(big, eps=eps)
    err = tf.relative_error(full, rounded)
    assert err <= eps
    assert rounded.info.details["error_bound"] == pytest.approx(err, rel=1e-6, abs=1e-9)
    assert rounded.n_params < big.n_params


def test_round_max_rank_matches_direct_tt_svd():
    # Rounding an exact (full-rank) TT to max_rank r gives the same error as TT-SVD of the full tensor.
    X = add_noise(random_tt((5, 6, 7, 4), (3, 3, 3), seed=13).to_tensor(), 0.3)
    exact = tf.tensor_train(X, max_rank=1000)
    rounded = tf.tt_round(exact, max_rank=2)
    direct = tf.tensor_train(X, max_rank=2)
    assert rounded.rank == direct.rank
    assert tf.relative_error(X, rounded) == pytest.approx(tf.relative_error(X, direct), rel=1e-9)


def test_round_does_not_modify_input_and_float32():
    a = random_tt((4, 5, 6), (2, 3), seed=14, dtype=torch.float32)
    big = tt_add(a, a)
    before = [c.clone() for c in big.cores]
    rounded = tf.tt_round(big, max_rank=3)
    assert all(torch.equal(c, d) for c, d in zip(big.cores, before))
    assert rounded.dtype == torch.float32
    assert tf.relative_error(2 * a.to_tensor(), rounded) < 1e-5


@pytest.mark.parametrize(
    "X, kwargs, error",
    [
        (torch.full((3, 4, 5), float("nan"), dtype=torch.float64), {"eps": 0.1}, InvalidTensorError),
        (torch.zeros(3, 0, 5), {"eps": 0.1}, InvalidTensorError),
        (torch.ones(3, 4, 5, dtype=torch.int64), {"eps": 0.1}, InvalidTensorError),
        (torch.ones(5), {"eps": 0.1}, InvalidTensorError),
        (torch.ones(3, 4, 5), {}, InvalidArgumentError),
        (torch.ones(3, 4, 5), {"eps": 0.0}, InvalidArgumentError),
        (torch.ones(3, 4, 5), {"eps": 1.0}, InvalidArgumentError),
        (torch.ones(3, 4, 5), {"eps": float("nan")}, InvalidArgumentError),
        (torch.ones(3, 4, 5), {"max_rank": 0}, RankError),
        (torch.ones(3, 4, 5), {"max_rank": (2,)}, RankError),
        (torch.ones(3, 4, 5), {"max_rank": (2, 2, 2)}, RankError),
        (torch.ones(3, 4, 5), {"max_rank": (4, 2)}, RankError),  # bond 1 allows at most 3
        (torch.ones(3, 4, 5), {"max_rank": (2, 6)}, RankError),  # bond 2 allows at most 5
        (torch.ones(3, 4, 5), {"max_rank": 2.0}, RankError),
    ],
)
def test_bad_input(X, kwargs, error):
    with pytest.raises(error):
        tf.tensor_train(X, **kwargs)


def test_round_bad_input():
    tt = random_tt((3, 4, 5), (2, 2), seed=0)
    with pytest.raises(InvalidArgumentError):
        tf.tt_round(tt.to_tensor(), eps=0.1)
    with pytest.raises(InvalidArgumentError):
        tf.tt_round(tt)
    with pytest.raises(InvalidArgumentError):
        tf.tt_round(tt, eps=2.0)
    with pytest.raises(RankError):
        tf.tt_round(tt, max_rank=(2,))
    bad = tf.TTTensor([tt.cores[0], tt.cores[1].clone().fill_(math.inf), tt.cores[2]])
    with pytest.raises(InvalidTensorError):
        tf.tt_round(bad, eps=0.1)
