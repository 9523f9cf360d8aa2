"""svd_lowrank: Eckart-Young error, randomized vs exact, eps targets, bad input."""

import math

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.core.validate import make_generator, randn
from tensorfold.errors import InvalidArgumentError, InvalidTensorError, RankError


def decaying(m: int, n: int, *, decay: float = 0.7, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """``U diag(decay**k) V^T`` with random orthonormal U, V: a known, geometrically decaying spectrum."""
    gen = make_generator(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(randn(n, k, generator=gen, dtype=torch.float64))
    S = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * S) @ V.T).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rank", [1, 5, 20])
def test_error_equals_eckart_young_tail(dtype, rank):
    M = decaying(60, 40, dtype=dtype)
    approx = tf.svd_lowrank(M, rank)
    S = 0.7 ** np.arange(40)
    tail = math.sqrt((S[rank:] ** 2).sum() / (S**2).sum())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert approx.rank == rank and approx.dtype == dtype
    assert approx.info.details["relative_error"] == pytest.approx(tail, rel=tol, abs=tol)
    M64 = M.double()
    direct = float(torch.linalg.vector_norm(M64 - approx.to_tensor().double()) / torch.linalg.vector_norm(M64))
    assert direct == pytest.approx(tail, rel=1e-3 if dtype == torch.float32 else 1e-8, abs=tol)
    assert torch.allclose(approx.S.double(), torch.tensor(S[:rank]), rtol=tol, atol=tol)


def test_exact_low_rank_recovered():
    gen = make_generator(3)
    M = randn(50, 6, generator=gen) @ randn(6, 30, generator=gen)
    approx = tf.svd_lowrank(M, 6)
    assert tf.relative_error(M, approx) < 1e-12
    assert approx.info.details["relative_error"] < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_randomized_close_to_exact_on_decaying_spectrum(dtype):
    # Stated tolerance: with oversample 10 and 2 power iterations, on a spectrum decaying by 0.7 per
    # index, the randomized error is within 1e-6 (relative) of the optimal Eckart-Young error.
    M = decaying(300, 200, dtype=dtype)
    exact = tf.svd_lowrank(M, 10)
    rand = tf.svd_lowrank(M, 10, method="randomized", seed=1)
    S = 0.7 ** np.arange(200)
    optimal = math.sqrt((S[10:] ** 2).sum() / (S**2).sum())
    M64 = M.double()
    e_exact = tf.relative_error(M64, exact.to(torch.float64))
    e_rand = tf.relative_error(M64, rand.to(torch.float64))
    tol = 1e-10 if dtype == torch.float64 else 1e-5  # float32 rounding of the data itself
    assert e_exact == pytest.approx(optimal, abs=tol)
    assert optimal - tol <= e_rand <= optimal * (1 + 1e-6) + tol
    assert torch.allclose(rand.S, exact.S, rtol=1e-6 if dtype == torch.float64 else 1e-4)
    assert rand.info.method == "svd-randomized"


def test_randomized_same_seed_same_result():
    M = decaying(80, 70)
    a = tf.svd_lowrank(M, 5, method="randomized", seed=7, n_iter=0, oversample=2)
    b = tf.svd_lowrank(M, 5, method="randomized", seed=7, n_iter=0, oversample=2)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)


@pytest.mark.parametrize("eps", [0.5, 0.1, 1e-3])
def test_eps_picks_smallest_rank_meeting_target(eps):
    M = decaying(60, 40)
    approx = tf.svd_lowrank(M, eps=eps)
    S = 0.7 ** np.arange(40)
    tails = np.sqrt(np.cumsum((S**2)[::-1])[::-1] / (S**2).sum())  # tails[k] = error at rank k
    expected = int(np.argmax(tails <= eps))
    assert approx.rank == expected
    assert approx.info.details["relative_error"] <= eps
    assert tails[expected - 1] > eps


def test_eps_and_rank_rank_caps():
    M = decaying(60, 40)
    assert tf.svd_lowrank(M, 3, eps=1e-6).rank == 3


def test_input_not_modified():
    M = decaying(20, 10)
    before = M.clone()
    tf.svd_lowrank(M, 3)
    assert torch.equal(M, before)


def test_numpy_input():
    M = decaying(20, 10).numpy()
    assert tf.svd_lowrank(M, 2).shape == (20, 10)


@pytest.mark.parametrize(
    "M, kwargs, error",
    [
        (torch.full((4, 3), float("nan"), dtype=torch.float64), {"rank": 1}, InvalidTensorError),
        (torch.ones(4, 3).masked_fill(torch.eye(4, 3, dtype=torch.bool), float("inf")), {"rank": 1},
         InvalidTensorError),
        (torch.zeros(0, 3), {"rank": 1}, InvalidTensorError),
        (torch.ones(4, 3, dtype=torch.int64), {"rank": 1}, InvalidTensorError),
        (torch.ones(4, 3, dtype=torch.complex64), {"rank": 1}, InvalidTensorError),
        (torch.ones(4, 3, 2), {"rank": 1}, InvalidTensorError),
        (torch.ones(4, 3), {"rank": 0}, RankError),
        (torch.ones(4, 3), {"rank": 4}, RankError),
        (torch.ones(4, 3), {"rank": 2.5}, RankError),
        (torch.ones(4, 3), {}, InvalidArgumentError),
        (torch.ones(4, 3), {"eps": 0.0}, InvalidArgumentError),
        (torch.ones(4, 3), {"eps": 1.0}, InvalidArgumentError),
        (torch.ones(4, 3), {"eps": -0.1}, InvalidArgumentError),
        (torch.ones(4, 3), {"rank": 1, "method": "qr"}, InvalidArgumentError),
        (torch.ones(4, 3), {"eps": 0.1, "method": "randomized"}, InvalidArgumentError),
        (torch.ones(4, 3), {"rank": 1, "oversample": -1}, InvalidArgumentError),
    ],
)
def test_bad_input(M, kwargs, error):
    with pytest.raises(error):
        tf.svd_lowrank(M, **kwargs)
