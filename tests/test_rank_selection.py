"""Rank selection: budgeted Tucker core shapes (exact knapsack vs greedy), CORCONDIA, select_rank, plots."""

import itertools
import math

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.decomp.rank_selection import core_size, mode_spectra
from tensorfold.errors import InvalidArgumentError, RankError, ShapeError
from tensorfold.report.rank_plots import plot_cp_rank_curve, plot_mode_spectra


def _random_spectra(shape, seed):
    rng = np.random.default_rng(seed)
    # decaying spectra with random rates, like those of real data
    return [np.sort(rng.exponential(1.0, n) * np.exp(-rng.uniform(0.05, 0.6) * np.arange(n)))[::-1] for n in shape]


def _brute_force(spectra, budget):
    shape = [len(s) for s in spectra]
    cum = [np.concatenate([[0.0], np.cumsum(s)]) for s in spectra]
    best = -1.0
    for ranks in itertools.product(*[range(1, n + 1) for n in shape]):
        if core_size(ranks, shape) <= budget:
            best = max(best, sum(c[r] for c, r in zip(cum, ranks)))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [60, 150, 400])
def test_knapsack_is_optimal_on_small_shapes(seed, budget):
    spectra = _random_spectra((6, 7, 8), seed)
    chosen = tf.tucker_core_shape(spectra, budget)
    assert chosen.size <= budget
    assert chosen.energy == pytest.approx(_brute_force(spectra, budget), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(30, 40, 50), (12, 15, 20, 10)])
def test_knapsack_within_budget_and_at_least_greedy(seed, shape):
    spectra = _random_spectra(shape, seed)
    for budget in (core_size([1] * len(shape), shape) + 5, 800, 3000, 20000):
        k = tf.tucker_core_shape(spectra, budget, method="knapsack")
        g = tf.tucker_core_shape(spectra, budget, method="greedy")
        assert k.size <= budget and g.size <= budget
        assert k.size == core_size(k.ranks, shape)
        assert k.energy >= g.energy - 1e-9 * abs(g.energy)
        assert 0 <= k.error_bound <= g.error_bound + 1e-12


def test_exact_tucker_shape_found_and_bound_holds():
    X = tf.testing.random_tucker((15, 16, 17), (2, 3, 4), seed=0).to_tensor()
    shape = tf.tucker_core_shape(X, budget=core_size((2, 3, 4), X.shape))
    assert shape.ranks == (2, 3, 4) and shape.error_bound < 1e-6
    noisy = tf.testing.add_noise(X, 0.05)
    chosen = tf.tucker_core_shape(noisy, budget=300)
    approx = tf.tucker(noisy, chosen.ranks, method="sthosvd")
    assert tf.relative_error(noisy, approx) <= chosen.error_bound + 1e-9


def test_spectra_equal_singular_values_squared():
    X = tf.testing.add_noise(tf.testing.random_tucker((6, 7, 8), (2, 2, 2), seed=1).to_tensor(), 0.1)
    for n, s in enumerate(mode_spectra(X)):
        sv = torch.linalg.svdvals(tf.unfold(X, n)).double() ** 2
        assert torch.allclose(s[: sv.shape[0]], sv, rtol=1e-8, atol=1e-10)


def test_core_shape_bad_input():
    with pytest.raises(RankError, match="too small"):
        tf.tucker_core_shape(_random_spectra((10, 10, 10), 0), budget=30)
    with pytest.raises(RankError):
        tf.tucker_core_shape(_random_spectra((10, 10, 10), 0), budget=0)
    with pytest.raises(InvalidArgumentError):
        tf.tucker_core_shape(_random_spectra((10, 10, 10), 0), budget=100, method="exhaustive")
    with pytest.raises(InvalidArgumentError, match="nonnegative"):
        tf.tucker_core_shape([np.array([1.0, -1.0]), np.array([1.0])], budget=100)
    with pytest.raises(ShapeError):
        tf.tucker_core_shape([np.array([1.0])], budget=100)


def test_core_consistency():
    cp = tf.testing.random_cp((10, 11, 12), rank=3, seed=0)
    X = cp.to_tensor()
    assert tf.core_consistency(X, cp) == pytest.approx(100.0, abs=1e-6)
    noisy = tf.testing.add_noise(X, 0.05)
    with pytest.warns(tf.errors.ConvergenceWarning):
        over = tf.cp(noisy, 5, seed=0, n_iter_max=50)
    assert tf.core_consistency(noisy, over) < 80
    with pytest.raises(ShapeError):
        tf.core_consistency(X[:5], cp)
    with pytest.raises(InvalidArgumentError):
        tf.core_consistency(X, tf.tucker(X, 2))


def test_select_rank_tt_and_tucker_meet_eps():
    X = tf.testing.add_noise(tf.testing.random_tucker((12, 13, 14), (3, 4, 5), seed=2).to_tensor(), 0.01)
    for eps in (0.05, 0.2):
        tt = tf.select_rank(X, "tt", eps=eps)
        assert isinstance(tt, tf.TTTensor) and tf.relative_error(X, tt) <= eps
        tk = tf.select_rank(X, "tucker", eps=eps)
        assert isinstance(tk, tf.TuckerTensor) and tf.relative_error(X, tk) <= eps
    assert tf.select_rank(X, "tucker", eps=0.05).rank == (3, 4, 5)
    budgeted = tf.select_rank(X, "tucker", budget=250)
    assert core_size(budgeted.rank, X.shape) <= 250
    assert budgeted.info.details["selection"]["size"] <= 250
    with pytest.raises(InvalidArgumentError):
        tf.select_rank(X, "tucker")
    with pytest.raises(InvalidArgumentError):
        tf.select_rank(X, "tt")
    tt_budget = tf.select_rank(X, "tt", budget=400)
    assert tt_budget.n_params <= 400
    assert tt_budget.n_params > tf.tensor_train(X, max_rank=1).n_params  # it used the budget
    with pytest.raises(RankError, match="too small"):
        tf.select_rank(X, "tt", budget=10)
    with pytest.raises(InvalidArgumentError):
        tf.select_rank(X, "tt", eps=1.5)
    with pytest.raises(InvalidArgumentError):
        tf.select_rank(X, "hosvd", eps=0.1)


def test_select_rank_cp_suggests_true_rank_and_plots(tmp_path):
    X = tf.testing.add_noise(tf.testing.random_cp((12, 13, 14), rank=3, seed=0).to_tensor(), 0.01)
    result = tf.select_rank(X, "cp", max_rank=5, seed=0)
    selection = result.info.details["selection"]
    assert result.rank == selection["suggested_rank"] == 3
    assert selection["fits"][2] > 0.98 and selection["core_consistency"][2] > 90
    png = plot_cp_rank_curve(selection["ranks"], selection["fits"], selection["core_consistency"],
                             tmp_path / "cp.png", suggested=3)
    assert png.read_bytes()[:4] == b"\x89PNG"
    spectra = mode_spectra(X)
    svg = plot_mode_spectra(spectra, tmp_path / "spectra.svg", ranks=(3, 3, 3))
    assert b"<svg" in svg.read_bytes()[:500]
    assert math.isfinite(selection["seconds"])
