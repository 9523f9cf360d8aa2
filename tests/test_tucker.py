"""Tucker: exact recovery, HOSVD/ST-HOSVD error bounds, HOOI monotone fit, TensorLy as oracle, bad input."""

import math

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.errors import InvalidArgumentError, InvalidTensorError, RankError
from tensorfold.testing import add_noise, random_tucker

CASES = [((8, 9, 10), (2, 3, 4)), ((6, 7, 5, 8), (3, 2, 4, 2))]


def unfolding_tails(X: torch.Tensor, ranks) -> list[float]:
    """Discarded energy of each mode's truncated SVD, from numpy (an independent computation)."""
    Xn = X.double().numpy()
    out = []
    for m, r in enumerate(ranks):
        S = np.linalg.svd(np.moveaxis(Xn, m, 0).reshape(Xn.shape[m], -1), compute_uv=False)
        out.append(float((S[r:] ** 2).sum()))
    return out


@pytest.mark.parametrize("method", ["hosvd", "sthosvd", "hooi"])
@pytest.mark.parametrize("shape, ranks", CASES)
def test_exact_recovery_float64(method, shape, ranks):
    X = random_tucker(shape, ranks, seed=1, orthogonal=False).to_tensor()
    approx = tf.tucker(X, ranks, method=method)
    assert approx.rank == ranks and approx.shape == shape
    assert tf.relative_error(X, approx) < 1e-10
    for U in approx.factors:
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-12)


@pytest.mark.parametrize("method", ["sthosvd", "hooi"])
def test_exact_recovery_float32(method):
    X = random_tucker((10, 11, 12), (3, 4, 2), seed=2).to_tensor().float()
    approx = tf.tucker(X, (3, 4, 2), method=method)
    assert approx.dtype == torch.float32 and approx.core.dtype == torch.float32
    assert tf.relative_error(X, approx) < 2e-6


@pytest.mark.parametrize("shape, ranks", CASES)
def test_sthosvd_error_is_sum_of_tails(shape, ranks):
    X = add_noise(random_tucker(shape, ranks, seed=3).to_tensor(), 0.2)
    approx = tf.tucker(X, ranks, method="sthosvd")
    err_sq = float(torch.linalg.vector_norm(X - approx.to_tensor()) ** 2)
    tails = approx.info.details["tails_sq"]
    # ST-HOSVD: the error is exactly the sum of the sequentially discarded tails, and each of those
    # is at most the corresponding tail of the full unfolding, so also <= the HOSVD bound.
    assert err_sq == pytest.approx(sum(tails), rel=1e-9)
    assert err_sq <= sum(unfolding_tails(X, ranks)) * (1 + 1e-9)


@pytest.mark.parametrize("shape, ranks", CASES)
def test_hosvd_error_bounds(shape, ranks):
    X = add_noise(random_tucker(shape, ranks, seed=4).to_tensor(), 0.2)
    approx = tf.tucker(X, ranks, method="hosvd")
    err_sq = float(torch.linalg.vector_norm(X - approx.to_tensor()) ** 2)
    tails = unfolding_tails(X, ranks)
    assert approx.info.details["tails_sq"] == pytest.approx(tails, rel=1e-8, abs=1e-10)
    # Classic HOSVD bound: max tail <= error^2 <= sum of tails.
    assert max(tails) * (1 - 1e-9) <= err_sq <= sum(tails) * (1 + 1e-9)


@pytest.mark.parametrize("init", ["sthosvd", "hosvd", "random"])
def test_hooi_fit_history_monotone_and_consistent(init):
    X = add_noise(random_tucker((9, 10, 11), (3, 3, 3), seed=5).to_tensor(), 0.3)
    approx = tf.tucker(X, (3, 3, 3), init=init, n_iter_max=15, tol=0)
    hist = approx.info.fit_history
    assert len(hist) == 15 and approx.info.n_iter == 15
    assert all(b >= a - 1e-10 for a, b in zip(hist, hist[1:]))
    assert hist[-1] == pytest.approx(1 - tf.relative_error(X, approx), abs=1e-9)
    sthosvd = tf.tucker(X, (3, 3, 3), method="sthosvd")
    assert tf.relative_error(X, approx) <= tf.relative_error(X, sthosvd) + 1e-10


@pytest.mark.parametrize("shape, ranks", [((9, 10, 11), (3, 4, 2)), ((6, 7, 5, 8), (2, 3, 2, 3))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_tensorly(shape, ranks, dtype):
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    X = add_noise(random_tucker(shape, ranks, seed=6).to_tensor(), 0.2).to(dtype)
    Xn = X.double().numpy()
    core, factors = tl_tucker(Xn, list(ranks), init="svd", n_iter_max=20, tol=0)
    err_tl = np.linalg.norm(Xn - tl.tucker_to_tensor((core, factors))) / np.linalg.norm(Xn)
    ours = tf.tucker(X, ranks, init="hosvd", n_iter_max=20, tol=0)
    err_ours = tf.relative_error(X.double(), ours.to(torch.float64))
    assert abs(err_ours - err_tl) < 1e-6
    default = tf.tucker(X, ranks, n_iter_max=50)
    assert tf.relative_error(X.double(), default.to(torch.float64)) < err_tl + 1e-6


def test_int_rank_and_full_rank():
    X = add_noise(random_tucker((4, 5, 6), (2, 2, 2), seed=7).to_tensor(), 0.1)
    assert tf.tucker(X, 2).rank == (2, 2, 2)
    full = tf.tucker(X, (4, 5, 6), method="hooi", n_iter_max=2)
    assert tf.relative_error(X, full) < 1e-12


def test_rank_above_product_of_others_completes_basis():
    # r_0 = 5 > r_1 * r_2 = 4: the HOOI unfolding has only 4 columns, the basis is completed.
    X = torch.randn(6, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    approx = tf.tucker(X, (5, 2, 2), n_iter_max=3)
    U = approx.factors[0]
    assert U.shape == (6, 5)
    assert torch.allclose(U.T @ U, torch.eye(5, dtype=U.dtype), atol=1e-12)
    assert approx.info.fit_history[-1] == pytest.approx(1 - tf.relative_error(X, approx), abs=1e-9)


def test_matrix_tucker_equals_svd():
    X = add_noise(random_tucker((20, 15), (3, 3), seed=8).to_tensor(), 0.3)
    approx = tf.tucker(X, (3, 3))
    S = torch.linalg.svdvals(X)
    assert tf.relative_error(X, approx) == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-9)


def test_callback_and_early_stop():
    X = add_noise(random_tucker((8, 9, 10), (2, 3, 3), seed=9).to_tensor(), 0.5)
    seen = []

    def cb(iteration, fit):
        seen.append((iteration, fit))
        return iteration == 3

    approx = tf.tucker(X, (2, 3, 3), n_iter_max=10, tol=0, callback=cb)
    assert [i for i, _ in seen] == [1, 2, 3]
    assert approx.info.n_iter == 3 and not approx.info.converged
    assert [f for _, f in seen] == list(approx.info.fit_history)


def test_converges_and_stops_on_tol():
    X = random_tucker((8, 9, 10), (2, 3, 3), seed=10).to_tensor()
    approx = tf.tucker(X, (2, 3, 3), n_iter_max=50, tol=1e-8)
    assert approx.info.converged and approx.info.n_iter < 50


def test_random_init_reproducible_and_input_untouched():
    X = add_noise(random_tucker((8, 9, 10), (2, 3, 3), seed=11).to_tensor(), 0.5)
    before = X.clone()
    a = tf.tucker(X, (2, 3, 3), init="random", seed=3, n_iter_max=2, tol=0)
    b = tf.tucker(X, (2, 3, 3), init="random", seed=3, n_iter_max=2, tol=0)
    assert torch.equal(X, before)
    assert all(torch.equal(u, v) for u, v in zip(a.factors, b.factors))


def test_numpy_and_noncontiguous_input():
    X = random_tucker((8, 9, 10), (2, 3, 3), seed=12).to_tensor()
    Xt = X.permute(2, 0, 1)  # not contiguous
    approx = tf.tucker(Xt, (3, 2, 3))
    assert tf.relative_error(Xt, approx) < 1e-10
    assert tf.relative_error(X, tf.tucker(X.numpy(), (2, 3, 3))) < 1e-10


def test_info_fields():
    X = random_tucker((8, 9, 10), (2, 3, 3), seed=13).to_tensor()
    approx = tf.tucker(X, (2, 3, 3), method="sthosvd")
    assert approx.info.method == "tucker-sthosvd" and approx.info.n_iter == 0
    assert approx.info.details["norm_sq"] == pytest.approx(float(X.norm() ** 2))
    assert approx.n_params == 2 * 3 * 3 + 8 * 2 + 9 * 3 + 10 * 3
    assert math.isclose(approx.compression_ratio, 720 / approx.n_params)


@pytest.mark.parametrize(
    "X, ranks, kwargs, error",
    [
        (torch.full((3, 4, 5), float("nan"), dtype=torch.float64), 2, {}, InvalidTensorError),
        (torch.zeros(3, 0, 5), 1, {}, InvalidTensorError),
        (torch.ones(3, 4, 5, dtype=torch.int32), 2, {}, InvalidTensorError),
        (torch.ones(5), 2, {}, InvalidTensorError),
        (torch.ones(3, 4, 5), (2, 2, 6), {}, RankError),
        (torch.ones(3, 4, 5), 4, {}, RankError),
        (torch.ones(3, 4, 5), (2, 0, 2), {}, RankError),
        (torch.ones(3, 4, 5), (2, 2), {}, RankError),
        (torch.ones(3, 4, 5), (2, 2, 2, 2), {}, RankError),
        (torch.ones(3, 4, 5), "2", {}, RankError),
        (torch.ones(3, 4, 5), 2, {"method": "svd"}, InvalidArgumentError),
        (torch.ones(3, 4, 5), 2, {"init": "svd"}, InvalidArgumentError),
        (torch.ones(3, 4, 5), 2, {"n_iter_max": -1}, InvalidArgumentError),
        (torch.ones(3, 4, 5), 2, {"tol": -1.0}, InvalidArgumentError),
        (torch.ones(3, 4, 5), 2, {"callback": 3}, InvalidArgumentError),
    ],
)
def test_bad_input(X, ranks, kwargs, error):
    with pytest.raises(error):
        tf.tucker(X, ranks, **kwargs)


def test_float32_hooi_reaches_float64_fit():
    # Gram matrices of small float32 tensors are formed in float64, so single precision loses no fit
    # to squared singular values even where the kept spectrum spans two orders of magnitude.
    X = add_noise(random_tucker((30, 31, 32), (6, 6, 6), seed=14).to_tensor(), 0.01)
    ranks = (9, 9, 9)  # keeps 3 noise directions per mode
    e64 = tf.relative_error(X, tf.tucker(X, ranks, n_iter_max=10, tol=0))
    r32 = tf.tucker(X.float(), ranks, n_iter_max=10, tol=0)
    assert r32.dtype == torch.float32
    assert abs(tf.relative_error(X, r32.to(torch.float64)) - e64) < 1e-8  # float32 Grams: 3e-7
