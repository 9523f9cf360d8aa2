"""Details of core/ and decomp/ that the sampled mutation run (docs/testing.md) found unguarded: recorded
diagnostics, helper results worked out by hand, error messages. Known answers only."""

from __future__ import annotations

import math

import pytest
import torch

import tensorfold as tf
from tensorfold.core.norms import tr_norm
from tensorfold.decomp.tr import _balanced_split, _random_cores
from tensorfold.errors import InvalidArgumentError


def matrix(m=30, n=20, rank=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                               dtype=torch.float64)


# --- decomp/svd.py ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_iter", [0, 3])
def test_svd_lowrank_records_its_power_iterations(n_iter):
    r = tf.svd_lowrank(matrix(), 3, method="randomized", n_iter=n_iter)
    assert (r.info.method, r.info.n_iter, r.info.converged) == ("svd-randomized", n_iter, True)
    exact = tf.svd_lowrank(matrix(), 3)
    assert (exact.info.method, exact.info.n_iter) == ("svd-exact", 0)
    assert exact.info.fit_history[0] == pytest.approx(1.0, abs=1e-12)  # rank 3 of a rank-3 matrix


def test_svd_lowrank_eps_with_randomized_names_the_fix():
    with pytest.raises(InvalidArgumentError, match=r"^eps needs method='exact' \(the randomized method works at a "
                                                   r"given rank\)$"):
        tf.svd_lowrank(matrix(), eps=0.1, method="randomized")


# --- decomp/tr.py -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, split", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (6, (2, 3)),
                                         (7, (1, 7)), (12, (3, 4)), (16, (4, 4)), (18, (3, 6))])
def test_balanced_split_is_the_most_square_factor_pair(rank, split):
    assert _balanced_split(rank) == split


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_tr_cores_have_the_data_norm_and_dtype(dtype):
    X = torch.ones(4, 5, 6, dtype=dtype)
    norm_sq = float(torch.sum(X * X))  # 120
    cores = _random_cores(X, (2, 3, 2), seed=0, norm_sq=norm_sq)
    assert [c.shape for c in cores] == [(2, 4, 3), (3, 5, 2), (2, 6, 2)]
    assert all(c.dtype == dtype for c in cores)
    assert float(tr_norm(cores)) == pytest.approx(math.sqrt(120), rel=1e-5)


# --- decomp/tt.py -----------------------------------------------------------------------------------
def test_tt_results_name_their_method():
    X = tf.testing.random_tt((6, 7, 8), (2, 3), seed=0).to_tensor()
    tt = tf.tensor_train(X, eps=0.1)
    assert tt.info.method == "tt-svd" and tt.rank == (1, 2, 3, 1)
    assert tf.tt_round(tt, eps=1e-3).info.method == "tt-round"
