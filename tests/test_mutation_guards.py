"""Tests that fail when advertised behaviour is broken by a one-line bug (each was a surviving mutant):
objectives the knapsack must tell apart, measured sensitivity ratios, TT-SVD's smallest ranks, the
upstream-correcting least squares, half-precision weights, and the CLI keeping the fine-tuned model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.allocators import allocate
from tensorfold.compression.candidates import Candidate, LayerMenu


# --- the knapsack minimises sum_i s_i e_i^2, not sum e_i^2 nor sum s_i e_i ----------------------
def menus_with_distinct_optima():
    """Two layers and a budget of 80 of their 200 parameters: ranks (2, 2), (3, 1) or (1, 3) fit, and each
    is the optimum of a different objective (s e^2, e^2, s e)."""
    def menu(name, sens, e1, e2, e3):
        opts = [Candidate("dense", None, 100, None, None, 0.0), Candidate("svd", 1, 20, None, None, e1),
                Candidate("svd", 2, 40, None, None, e2), Candidate("svd", 3, 60, None, None, e3)]
        return LayerMenu(name, None, "", None, opts, sensitivity=sens)

    return [menu("a", 1.0, 0.8, 0.77, 0.39), menu("b", 5.0, 0.48, 0.15, 0.14)]


def brute_force(menus, cap, value):
    feasible = [c for c in itertools.product(*(m.options for m in menus)) if sum(x.params for x in c) <= cap]
    return min(feasible, key=lambda combo: sum(value(m, x) for m, x in zip(menus, combo)))


def test_knapsack_menu_whose_optimum_depends_on_the_objective():
    menus = menus_with_distinct_optima()
    cap = 0.4 * 200
    true = brute_force(menus, cap, lambda m, c: m.sensitivity * c.error**2)
    unweighted = brute_force(menus, cap, lambda m, c: c.error**2)
    linear = brute_force(menus, cap, lambda m, c: m.sensitivity * c.error)
    ranks = [tuple(c.rank for c in combo) for combo in (true, unweighted, linear)]
    assert len(set(ranks)) == 3, ranks  # the menu really separates the three objectives
    got = allocate(menus, 0.4, allocator="knapsack")
    assert [c.rank for c in got.choices] == [c.rank for c in true] == [2, 2]
    assert got.objective == pytest.approx(1.0 * 0.77**2 + 5.0 * 0.15**2)


# --- measured sensitivities -----------------------------------------------------------------------
class TwoBranches(nn.Module):
    """Output = [a(x), k * b(x)] with b a copy of a: compressing b moves the output k^2 times as much."""

    def __init__(self, k: float):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(24, 24)
        self.b = nn.Linear(24, 24)
        self.b.load_state_dict(self.a.state_dict())
        self.k = k

    def forward(self, x):
        return torch.cat([self.a(x), self.k * self.b(x)], dim=-1)


@pytest.mark.parametrize("k", [3.0, 0.5])
def test_sensitivities_differ_by_the_known_ratio(k):
    model = TwoBranches(k)
    calib = [torch.randn(64, 24, generator=torch.Generator().manual_seed(1))]
    plan = tf.plan(model, 0.5, methods=("svd",), calib=calib)
    sens = {lp.name: lp.sensitivity for lp in plan.layers}
    assert sens["b"] / sens["a"] == pytest.approx(k**2, rel=1e-6)


# --- TT-SVD picks the smallest ranks its error bound allows, bond by bond --------------------------
def reference_tt_ranks(X: np.ndarray, eps: float) -> list[int]:
    """Independent TT-SVD (numpy): at each bond the smallest rank whose discarded tail is <= delta,
    delta = eps ||X|| / sqrt(d - 1) (Oseledets 2011, Algorithm 1)."""
    d = X.ndim
    delta = eps * np.linalg.norm(X) / math.sqrt(d - 1)
    ranks, C, r_prev = [], X, 1
    for k in range(d - 1):
        C = C.reshape(r_prev * X.shape[k], -1)
        U, S, Vt = np.linalg.svd(C, full_matrices=False)
        tails = np.sqrt(np.concatenate([np.cumsum((S**2)[::-1])[::-1], [0.0]]))
        r = int(np.argmax(tails <= delta))  # first (smallest) rank meeting the bound
        r = max(r, 1)
        ranks.append(r)
        C = S[:r, None] * Vt[:r]
        r_prev = r
    return ranks


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_tt_svd_ranks_are_minimal_bond_by_bond(eps):
    g = torch.Generator().manual_seed(3)
    # a 5-way tensor with graded spectra at every bond: low TT rank plus decaying noise
    core = tf.testing.random_tt((6, 5, 6, 5, 6), (3, 4, 4, 3), seed=3).to_tensor()
    X = core + 0.05 * core.norm() / math.sqrt(core.numel()) * torch.randn(core.shape, generator=g,
                                                                          dtype=core.dtype)
    tt = tf.tensor_train(X, eps=eps)
    assert list(tt.rank[1:-1]) == reference_tt_ranks(X.numpy(), eps)
    assert float(tf.relative_error(X, tt)) <= eps


# --- the upstream correction is the least-squares fit to the original model's outputs -------------
def test_correct_upstream_matches_brute_force_least_squares():
    from tensorfold.compression.calibration import whitened_lowrank

    g = torch.Generator().manual_seed(7)
    n, d_in, d_out = 200, 12, 9
    X_o = torch.randn(n, d_in, generator=g, dtype=torch.float64)  # inputs in the original model
    X = X_o @ (torch.eye(d_in, dtype=torch.float64) + 0.3 * torch.randn(d_in, d_in, generator=g,
                                                                        dtype=torch.float64))  # after upstream cuts
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    fit = whitened_lowrank(W, X.T @ X, d_out, cross=X.T @ X_o, ridge=0.0)
    # full rank: the unconstrained least squares min_A ||X A^T - X_o W^T||
    A_ls = torch.linalg.lstsq(X, X_o @ W.T).solution.T
    assert torch.allclose(fit.second @ fit.first, A_ls, atol=1e-8)
    # rank 3: the best rank-3 fit, error = residual of A_ls plus the tail of X A_ls^T (Eckart-Young)
    fit3 = whitened_lowrank(W, X.T @ X, 3, cross=X.T @ X_o, ridge=0.0)
    err3 = torch.linalg.norm(X @ (fit3.second @ fit3.first).T - X_o @ W.T)
    s = torch.linalg.svdvals(X @ A_ls.T)
    best = torch.sqrt(torch.linalg.norm(X @ A_ls.T - X_o @ W.T) ** 2 + (s[3:] ** 2).sum())
    assert float(err3) == pytest.approx(float(best), rel=1e-8)


# --- half-precision weights are factored in float32, then cast back --------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_upcast_before_the_svd(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(40, 30).to(dtype)
    low = tf.nn.LowRankLinear.from_dense(dense, 8)
    assert all(p.dtype == dtype for p in low.parameters())
    W = dense.weight.detach().double()
    S = torch.linalg.svdvals(W)
    optimal = float(torch.sqrt((S[8:] ** 2).sum()))  # Eckart-Young, in float64
    got = float(torch.linalg.norm(low.to_dense().weight.detach().double() - W))
    unit = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert got == pytest.approx(optimal, abs=4 * unit * float(W.norm()))


# --- the CLI keeps (and saves) the fine-tuned model, unmocked -------------------------------------
def test_cli_saves_the_fine_tuned_model_it_reports(tmp_path, monkeypatch):
    import json
    import sys

    from typer.testing import CliRunner

    from tensorfold.cli.main import app
    from tensorfold.compression.evaluate import output_fidelity

    (tmp_path / "tf_guard_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))\n\n"
        "def calibration(n, seed):\n    return [torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))]\n\n"
        "def data():\n    g = torch.Generator().manual_seed(3)\n"
        "    return [torch.randn(32, 16, generator=g) for _ in range(6)], [torch.randn(64, 16, generator=g)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["compress", "--model", "tf_guard_models:build", "--budget", "0.3", "--calib", "64",
                                   "--methods", "svd", "--no-speed", "--finetune-epochs", "3", "--data",
                                   "tf_guard_models:data", "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    import tf_guard_models as user

    saved = tf.load_compressed(out, factory=user.build)
    again = output_fidelity(user.build(), saved, user.calibration(64, 1))  # the job's held-out batches
    assert again["rel_error"] == pytest.approx(metrics["quality"]["rel_error"], rel=1e-5)
    kept = metrics["finetune"]["quality_after" if metrics["finetune"]["kept"] == "fine-tuned" else "quality_before"]
    assert metrics["quality"] == kept
    sys.modules.pop("tf_guard_models", None)


# --- every allocator's exact choice on a menu worked out by hand ----------------------------------
def hand_menus():
    """A: dense 100, svd ranks 1-4 cost 20r, errors .8 .5 .3 .1 (sensitivity 1);
    B: dense 200, ranks 1-4 cost 30r, errors .6 .4 .2 .05 (sensitivity 4)."""
    def menu(name, unit, dense, errors, sens):
        opts = [Candidate("dense", None, dense, None, None, 0.0)]
        opts += [Candidate("svd", r, unit * r, None, None, e) for r, e in enumerate(errors, start=1)]
        return LayerMenu(name, None, "", None, opts, sensitivity=sens)

    return [menu("a", 20, 100, (0.8, 0.5, 0.3, 0.1), 1.0), menu("b", 30, 200, (0.6, 0.4, 0.2, 0.05), 4.0)]


@pytest.mark.parametrize("budget, allocator, ranks, total", [
    # cap 150: uniform's largest common fraction < 0.6 gives (2, 3) = 130, then the slack upgrades a to 3
    (0.5, "uniform", (3, 3), 150),
    # energy: the smallest error threshold meeting the cap is 0.3 -> (3, 3)
    (0.5, "energy", (3, 3), 150),
    # balanced: sqrt(s / mean s)-weighted errors, threshold 0.253 -> (3, 3)
    (0.5, "balanced", (3, 3), 150),
    # knapsack: 1 * .3^2 + 4 * .2^2 = 0.25 is the least objective within 150
    (0.5, "knapsack", (3, 3), 150),
    # cap 135: uniform (2, 3) = 130 and no upgrade fits
    (0.45, "uniform", (2, 3), 130),
    # energy: threshold 0.4 picks (3, 2) = 120; nothing better fits in the 15 left
    (0.45, "energy", (3, 2), 120),
    # balanced: weighted threshold 0.316 -> (2, 3) = 130
    (0.45, "balanced", (2, 3), 130),
    # knapsack: (2, 3) objective .25 + .16 = 0.41 beats (3, 2) .73, (1, 3) .80, (dense, 1) 1.44
    (0.45, "knapsack", (2, 3), 130),
])
def test_every_allocator_makes_the_choice_worked_out_by_hand(budget, allocator, ranks, total):
    got = allocate(hand_menus(), budget, allocator=allocator)
    assert tuple(c.rank for c in got.choices) == ranks
    assert got.total == total and got.dense_total == 300
    assert got.objective == pytest.approx(sum(m.sensitivity * c.error**2 for m, c in zip(hand_menus(),
                                                                                        got.choices)))
