"""CP completion by imputation (EM): exact and noisy recovery, agreement with per-row ALS, method choice."""

import warnings

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.decomp import completion
from tensorfold.decomp.sparse import COOTensor, cp_values
from tensorfold.errors import ConvergenceWarning, InvalidArgumentError


def _held_out_error(X, mask, result):
    idx = (~mask).nonzero()
    truth = X[tuple(idx.T)]
    return float(torch.linalg.vector_norm(cp_values(result.weights, result.factors, idx) - truth)
                 / torch.linalg.vector_norm(truth))


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_em_recovers_exact_low_rank_from_half_the_entries(dtype, bound):
    X = tf.testing.random_cp((30, 32, 34), rank=3, seed=0, dtype=dtype).to_tensor()
    mask = tf.testing.random_mask(X.shape, 0.5, seed=1)
    result = tf.complete(X, mask=mask, rank=3, method="em", seed=0)
    assert result.info.method == "complete-cp-em" and result.info.converged
    assert result.dtype == dtype and result.rank == 3
    assert tf.relative_error(X, result) < bound  # every cell, the unobserved half included
    assert result.info.details["nnz"] == int(mask.sum())
    assert result.info.n_iter == len(result.info.fit_history)
    # Imputation and the extrapolation (kept only when it helps) never raise the observed error.
    history = np.array(result.info.fit_history)
    assert (np.diff(history) >= -1e-12).all()


def test_em_noisy_reaches_the_noise_floor_and_agrees_with_als():
    truth = tf.testing.random_cp((40, 40, 40), rank=4, seed=3).to_tensor()
    X = tf.testing.add_noise(truth, 0.01, seed=4)
    mask = tf.testing.random_mask(X.shape, 0.3, seed=5)
    em = tf.complete(X, mask=mask, rank=4, method="em", seed=0)
    als = tf.complete(X, mask=mask, rank=4, method="als", seed=0)
    err_em, err_als = _held_out_error(X, mask, em), _held_out_error(X, mask, als)
    assert err_em < 0.0125  # the noise is 1% of ||X||: the held-out error cannot go below ~0.01
    assert err_em == pytest.approx(err_als, rel=1e-4)  # both reach the same least-squares optimum
    assert em.info.details["observed_relative_error"] == pytest.approx(
        als.info.details["observed_relative_error"], rel=1e-6)


def test_em_order4_and_nan_in_unobserved_cells_and_numpy_inputs():
    X = tf.testing.random_cp((10, 11, 12, 13), rank=2, seed=3).to_tensor()
    mask = tf.testing.random_mask(X.shape, 0.4, seed=6)
    X_nan = torch.where(mask, X, torch.full_like(X, float("nan")))
    result = tf.complete(X_nan.numpy(), mask=mask.numpy().astype(np.float64), rank=2, method="em", seed=0)
    assert tf.relative_error(X, result) < 1e-8


def test_em_callback_stops_and_warns_at_the_limit():
    X = tf.testing.random_cp((12, 13, 14), rank=2, seed=0).to_tensor()
    mask = tf.testing.random_mask(X.shape, 0.5, seed=1)
    seen = []
    result = tf.complete(X, mask=mask, rank=2, method="em",
                         callback=lambda it, fit: seen.append((it, fit)) or it == 3)
    assert result.info.n_iter == 3 and [it for it, _ in seen] == [1, 2, 3]
    assert seen[-1][1] == pytest.approx(result.info.fit_history[-1])
    with pytest.warns(ConvergenceWarning, match="CP-EM"):
        tf.complete(X, mask=mask, rank=2, method="em", n_iter_max=2)


def test_auto_chooses_em_for_dense_inputs_observed_densely(monkeypatch):
    X = tf.testing.random_cp((30, 30, 30), rank=2, seed=0).to_tensor()
    dense = tf.testing.random_mask(X.shape, 0.5, seed=1)  # 13,500 of 27,000 cells
    sparse = tf.testing.random_mask(X.shape, 0.1, seed=1)
    assert tf.complete(X, mask=dense, rank=2).info.method == "complete-cp-em"
    assert tf.complete(X, mask=sparse, rank=2).info.method == "complete-cp-als"  # below 15% observed
    coo = COOTensor.from_dense(X, dense)
    assert tf.complete(coo=coo, rank=2).info.method == "complete-cp-als"  # COO input is never densified
    assert tf.complete(X, mask=dense, rank=(2, 2, 2), model="tucker").info.method == "complete-tucker-als"
    assert tf.complete(X, mask=dense, rank=2, method="als").info.method == "complete-cp-als"
    monkeypatch.setattr(completion, "_EM_MIN_NNZ", 10**6)  # small problems stay with ALS
    assert tf.complete(X, mask=dense, rank=2).info.method == "complete-cp-als"


def test_em_bad_inputs():
    X = tf.testing.random_cp((10, 10, 10), rank=2, seed=0).to_tensor()
    mask = tf.testing.random_mask(X.shape, 0.5, seed=1)
    with pytest.raises(InvalidArgumentError, match="dense X with a mask"):
        tf.complete(coo=COOTensor.from_dense(X, mask), rank=2, method="em")
    with pytest.raises(InvalidArgumentError, match="tucker"):
        tf.complete(X, mask=mask, rank=2, model="tucker", method="em")
    with pytest.raises(InvalidArgumentError, match="method"):
        tf.complete(X, mask=mask, rank=2, method="imputation")


def test_sparse_order4_single_start_stalls_and_more_starts_recover():
    """A known hard case: from one start ALS ends in a local minimum with a huge "spike" component; the
    observed error exposes it, and the best of 5 starts (chosen by that error) recovers the tensor."""
    X = tf.testing.random_cp((10, 10, 10, 10), rank=3, seed=0).to_tensor()
    mask = tf.testing.random_mask(X.shape, 0.2, seed=100)  # ~2,000 observations for 120 parameters
    with pytest.warns(ConvergenceWarning):
        single = tf.complete(X, mask=mask, rank=3, seed=0)
    assert single.info.details["observed_relative_error"] > 0.1 and tf.relative_error(X, single) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the failed starts' warnings are not re-issued
        best = tf.complete(X, mask=mask, rank=3, seed=0, n_starts=5)
    errors = best.info.details["start_errors"]
    assert len(errors) == 5 and errors[0] == pytest.approx(single.info.details["observed_relative_error"])
    assert best.info.details["observed_relative_error"] == min(errors) < 1e-8
    assert tf.relative_error(X, best) < 1e-6
    with pytest.raises(tf.errors.RankError, match="n_starts"):
        tf.complete(X, mask=mask, rank=3, n_starts=0)
