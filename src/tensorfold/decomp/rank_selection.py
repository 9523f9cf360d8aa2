"""Choosing ranks: Tucker core shapes under a size budget, TT/Tucker ranks by error target, CP rank by
fit curve plus core consistency (CORCONDIA).

Tucker core shape under a budget
--------------------------------
With ``s_{n,i}`` the singular values of the mode-n unfolding, the (truncated) HOSVD with multilinear
rank ``r`` satisfies ``||X - X_r||^2 <= sum_n sum_{i > r_n} s_{n,i}^2`` (De Lathauwer et al.; the same
bound holds for ST-HOSVD, and HOOI only improves on it). Minimising this bound is the same as
maximising the *captured energy* ``E(r) = sum_n sum_{i <= r_n} s_{n,i}^2`` -- the objective used here --
subject to the storage ``prod_n r_n + sum_n I_n r_n <= budget``. This is the knapsack view of Ghadiri,
Fahrbach, Fu and Mirrokni ("Approximately optimal core shapes for tensor decompositions", ICML 2023):
each mode picks one rank (a multiple-choice item with value ``sum_{i <= r_n} s_{n,i}^2``), with a linear
cost ``I_n r_n`` plus a multiplicative one, the core.

``method="knapsack"`` solves it exactly by dynamic programming over the modes: a partial choice is the
triple (core product so far, factor cost so far, energy so far); triples that cannot fit the budget even
with rank 1 in every remaining mode are dropped, and so is any triple dominated by one with the same
product, no more factor cost and no less energy; the last mode simply takes the largest rank that fits
(energy never decreases with rank). ``method="greedy"`` is the usual baseline: start from rank 1
everywhere and repeatedly raise the rank with the best energy gain per unit of size while it fits.

>>> import tensorfold as tf
>>> X = tf.testing.random_tucker((20, 20, 20), (3, 4, 5), seed=0).to_tensor()
>>> tf.tucker_core_shape(X, budget=400).ranks  # exact multilinear rank (3, 4, 5): no larger core
(3, 4, 5)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from tensorfold.core.tenalg import multi_mode_dot
from tensorfold.core.validate import check_choice, check_positive, check_rank, check_tensor
from tensorfold.decomp.results import CPTensor, Decomposition, FitInfo
from tensorfold.errors import InvalidArgumentError, RankError, ShapeError


@dataclass(frozen=True)
class CoreShape:
    """A chosen multilinear rank with its size and the HOSVD energy it keeps.

    ``energy`` is ``sum_n sum_{i <= r_n} s_{n,i}^2``; ``error_bound`` the resulting HOSVD error bound
    ``sqrt(sum_n tail_n) / ||X||`` (a guarantee on the relative error of ST-HOSVD/HOOI at these ranks).
    """

    ranks: tuple[int, ...]
    size: int
    budget: int
    energy: float
    error_bound: float
    method: str

    def to_json(self) -> dict:
        return {"ranks": list(self.ranks), "size": self.size, "budget": self.budget, "energy": self.energy,
                "error_bound": self.error_bound, "method": self.method}


def mode_spectra(X) -> list[torch.Tensor]:
    """Squared singular values of every unfolding, descending, in float64 on the CPU.

    From the SVD (through :func:`tensorfold.core.svd.truncated_svd`) rather than the Gram matrix, so
    small values keep their digits and error targets down to ~1e-14 can be met exactly.
    """
    from tensorfold.core.svd import truncated_svd
    from tensorfold.core.tenalg import unfold

    X = check_tensor(X, "X", min_order=2)
    out = []
    for n in range(X.ndim):
        M = unfold(X, n)
        S = truncated_svd(M, min(M.shape)).S.double().cpu()
        full = torch.zeros(X.shape[n], dtype=torch.float64)
        full[: S.shape[0]] = S**2
        out.append(full)
    return out


def core_size(ranks: Sequence[int], shape: Sequence[int]) -> int:
    """Parameters of a Tucker model: ``prod r_n + sum I_n r_n``."""
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks))


def tucker_core_shape(X_or_spectra, budget: int, *, method: str = "knapsack") -> CoreShape:
    """Multilinear rank maximising the captured HOSVD energy with ``prod r + sum I_n r_n <= budget``.

    Parameters
    ----------
    X_or_spectra:
        The tensor, or per-mode spectra: a sequence of 1-D tensors/arrays of *squared* singular values
        (descending) whose lengths are the mode sizes, as :func:`mode_spectra` returns.
    budget:
        Largest number of parameters (core plus factors) allowed.
    method:
        ``"knapsack"`` (exact dynamic programme) or ``"greedy"`` (best gain per parameter first).

    Raises :class:`RankError` when even rank 1 in every mode exceeds the budget.
    """
    check_choice(method, "method", ("knapsack", "greedy"))
    spectra = _as_spectra(X_or_spectra)
    shape = tuple(len(s) for s in spectra)
    budget = check_rank(budget, "budget")
    smallest = core_size([1] * len(shape), shape)
    if smallest > budget:
        raise RankError(f"budget={budget} is too small: rank 1 in every mode of shape {shape} needs {smallest} "
                        f"parameters")
    cumulative = [np.concatenate([[0.0], np.cumsum(s)]) for s in spectra]  # cumulative[n][r] = energy of rank r
    ranks = _knapsack(cumulative, shape, budget) if method == "knapsack" else _greedy(cumulative, shape, budget)
    energy = float(sum(c[r] for c, r in zip(cumulative, ranks)))
    total = float(cumulative[0][-1]) or 1.0
    tail = sum(float(c[-1] - c[r]) for c, r in zip(cumulative, ranks))
    # The bound can exceed 1 for tiny budgets; the error of the orthogonal projection never does.
    return CoreShape(tuple(int(r) for r in ranks), core_size(ranks, shape), budget, energy,
                     min(1.0, math.sqrt(max(tail, 0.0) / total)), method)


def _as_spectra(X_or_spectra) -> list[np.ndarray]:
    if isinstance(X_or_spectra, (torch.Tensor, np.ndarray)) and X_or_spectra.ndim >= 2:
        return [s.numpy() for s in mode_spectra(X_or_spectra)]
    try:
        spectra = [s.detach().double().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, np.float64)
                   for s in X_or_spectra]
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError("give a tensor or a sequence of per-mode spectra (1-D arrays)") from None
    if len(spectra) < 2 or any(s.ndim != 1 or s.size == 0 for s in spectra):
        raise ShapeError("spectra must be at least two non-empty 1-D arrays, one per mode")
    if any((s < 0).any() or not np.isfinite(s).all() for s in spectra):
        raise InvalidArgumentError("spectra must hold finite, nonnegative squared singular values")
    return [np.sort(s)[::-1].copy() for s in spectra]


def _knapsack(cumulative, shape, budget) -> tuple[int, ...]:
    """Exact DP over modes with dominance pruning (see the module docstring)."""
    d = len(shape)
    # rest_min[k] = factor cost of rank 1 in modes k.. (the least any completion adds)
    rest_min = [sum(shape[k:]) for k in range(d + 1)]
    P = np.ones(1, dtype=np.int64)
    L = np.zeros(1, dtype=np.int64)
    E = np.zeros(1)
    choices = np.zeros((1, 0), dtype=np.int64)
    for k in range(d - 1):
        r = np.arange(1, shape[k] + 1, dtype=np.int64)
        P2 = (P[:, None] * r[None, :]).ravel()
        L2 = (L[:, None] + shape[k] * r[None, :]).ravel()
        E2 = (E[:, None] + cumulative[k][1:][None, :]).ravel()
        keep = P2 + L2 + rest_min[k + 1] <= budget
        parent = np.repeat(np.arange(P.shape[0]), r.shape[0])[keep]
        P, L, E = P2[keep], L2[keep], E2[keep]
        choices = np.concatenate([choices[parent], np.tile(r, P2.shape[0] // r.shape[0])[keep][:, None]], 1)
        P, L, E, choices = _prune(P, L, E, choices)
    # Last mode: the largest rank that fits, per state.
    n_last = shape[-1]
    r_last = np.minimum((budget - L) // (P + n_last), n_last)
    ok = r_last >= 1
    P, L, E, choices, r_last = P[ok], L[ok], E[ok], choices[ok], r_last[ok]
    total = E + cumulative[-1][r_last]
    # Among choices within rounding of the best energy, the smallest (exactly low-rank data has many ties
    # that differ only by energies at the level of rounding errors).
    near_best = total >= total.max() - _energy_resolution(cumulative)
    # For the smallest size, the last mode needs only the rank where its energy stops growing.
    r_min = np.array([_smallest_rank_with(cumulative[-1], cumulative[-1][r]) for r in r_last])
    size = P * r_min + L + n_last * r_min
    best = int(np.flatnonzero(near_best)[np.argmin(size[near_best])])
    return (*(int(c) for c in choices[best]), int(r_min[best]))


def _energy_resolution(cumulative) -> float:
    """Energy differences below this are rounding noise (relative 1e-12 of the total)."""
    return 1e-12 * max(float(c[-1]) for c in cumulative)


def _smallest_rank_with(cum: np.ndarray, energy: float) -> int:
    """Smallest rank whose cumulative energy is within rounding of ``energy``."""
    tol = 1e-12 * float(cum[-1])
    return max(int(np.argmax(cum >= energy - tol)), 1)


def _prune(P, L, E, choices):
    """Drop states dominated by another with the same core product, no more factor cost, no less energy."""
    if P.shape[0] <= 1:
        return P, L, E, choices
    order = np.lexsort((-E, L, P))  # by P, then L ascending, then E descending
    P, L, E, choices = P[order], L[order], E[order], choices[order]
    new_group = np.r_[True, P[1:] != P[:-1]]
    group_id = np.cumsum(new_group) - 1
    # Keep a state iff its energy beats every earlier state of its group (same P, no larger L). Exact
    # integer keys: dense energy ranks offset by group, so one global running maximum serves all groups.
    _, energy_rank = np.unique(E, return_inverse=True)
    key = group_id * (energy_rank.max() + 2) + energy_rank.ravel() + 1
    prev = np.r_[-1, np.maximum.accumulate(key)[:-1]]
    prev[new_group] = -1
    keep = key > prev
    return P[keep], L[keep], E[keep], choices[keep]


def _greedy(cumulative, shape, budget) -> tuple[int, ...]:
    resolution = _energy_resolution(cumulative)
    ranks = [1] * len(shape)
    size = core_size(ranks, shape)
    while True:
        best, best_ratio, best_size = None, -1.0, size
        for n, (c, I) in enumerate(zip(cumulative, shape)):
            if ranks[n] >= I:
                continue
            trial = ranks.copy()
            trial[n] += 1
            new_size = core_size(trial, shape)
            if new_size > budget:
                continue
            gain = c[ranks[n] + 1] - c[ranks[n]]
            if gain <= resolution:
                continue  # nothing left to capture in this mode (rounding noise)
            ratio = gain / (new_size - size)
            if ratio > best_ratio:
                best, best_ratio, best_size = n, ratio, new_size
        if best is None:
            return tuple(ranks)
        ranks[best] += 1
        size = best_size


# --- CORCONDIA ------------------------------------------------------------------------------------

def core_consistency(X, cp_result: CPTensor) -> float:
    """Core consistency diagnostic (Bro and Kiers 2003), in percent; 100 means a perfectly trilinear fit.

    With the weights absorbed into the first factor, the least-squares Tucker core for the CP factors
    is ``G = X x_1 A_1^+ ... x_d A_d^+``; CORCONDIA is ``100 (1 - ||G - T||^2 / R)`` with ``T`` the
    superdiagonal identity. Values near 100 support the rank; low or negative values suggest too many
    components.

    >>> import tensorfold as tf
    >>> cp = tf.testing.random_cp((8, 9, 10), rank=2, seed=0)
    >>> round(tf.core_consistency(cp.to_tensor(), cp), 6)
    100.0
    """
    X = check_tensor(X, "X", min_order=2)
    if not isinstance(cp_result, CPTensor):
        raise InvalidArgumentError(f"core_consistency needs a CPTensor, got {type(cp_result).__name__}")
    if tuple(cp_result.shape) != tuple(X.shape):
        raise ShapeError(f"CP model has shape {cp_result.shape} but X has {tuple(X.shape)}")
    cp_result = cp_result.to(dtype=X.dtype, device=X.device)
    factors = list(cp_result.factors)
    factors[0] = factors[0] * cp_result.weights
    R = cp_result.rank
    pinvs = [_pseudo_inverse(A) for A in factors]
    G = multi_mode_dot(X, pinvs)
    T = torch.zeros_like(G)
    idx = torch.arange(R, device=G.device)
    T[(idx,) * X.ndim] = 1.0
    return float(100.0 * (1.0 - float(((G - T) ** 2).sum()) / R))


def _pseudo_inverse(A: torch.Tensor) -> torch.Tensor:
    """``A^+`` (R x I) from the small normal equations; falls back to the SVD-based pinv when they are singular."""
    gram = A.T @ A
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(A.T, L)
    return torch.linalg.pinv(A)


# --- select_rank ------------------------------------------------------------------------------------

def select_rank(
    X,
    method: str = "tucker",
    *,
    eps: float | None = None,
    budget: int | None = None,
    max_rank: int = 10,
    min_consistency: float = 80.0,
    n_iter_max: int = 200,
    seed: int | torch.Generator | None = 0,
) -> Decomposition:
    """Choose ranks for ``X`` and return the decomposition at the chosen ranks.

    ``method="tt"``: TT-SVD with the error target ``eps`` (``||X - TT|| <= eps ||X||`` guaranteed), or
    with ``budget`` the smallest error target (found by bisection) whose tensor train fits in it.
    ``method="tucker"``: with ``eps``, the smallest per-mode ranks whose discarded HOSVD energy is at
    most ``eps^2 ||X||^2 / d`` per mode (so the HOSVD bound guarantees ``eps``); with ``budget``, the core
    shape of :func:`tucker_core_shape` (knapsack). Then HOOI at those ranks.
    ``method="cp"``: CP-ALS for ranks 1..``max_rank``, recording fit and CORCONDIA; suggests the largest
    rank whose core consistency is at least ``min_consistency`` (and, with ``eps``, the smallest such
    rank reaching fit ``1 - eps``).

    The choice is recorded in ``info.details`` (``"selection"``): spectra/fit curves, the candidates and
    the rule used, ready for :mod:`tensorfold.report.rank_plots`.

    >>> import tensorfold as tf
    >>> X = tf.testing.random_tucker((10, 11, 12), (2, 3, 4), seed=0).to_tensor()
    >>> tf.select_rank(X, "tucker", eps=1e-8).rank
    (2, 3, 4)
    """
    check_choice(method, "method", ("tt", "tucker", "cp"))
    X = check_tensor(X, "X", min_order=2)
    if eps is not None:
        eps = check_positive(eps, "eps")
        if eps >= 1:
            raise InvalidArgumentError(f"eps is a relative error target and must be < 1, got {eps}")
    if budget is not None:
        budget = check_rank(budget, "budget")
    if method == "tt":
        return _select_tt(X, eps, budget)
    if method == "tucker":
        return _select_tucker(X, eps, budget, seed)
    return _select_cp(X, eps, max_rank, min_consistency, n_iter_max, seed)


def _with_selection(result: Decomposition, selection: dict) -> Decomposition:
    info = result.info or FitInfo("select-rank")
    return replace(result, info=replace(info, details={**info.details, "selection": selection}))


def _select_tt(X, eps, budget):
    """TT-SVD at the error target, or at the smallest error target (bisection on log eps) that fits the budget."""
    from tensorfold.decomp.tt import tensor_train

    if (eps is None) == (budget is None):
        raise InvalidArgumentError("select_rank(method='tt') needs exactly one of eps or budget")
    if eps is not None:
        tt = tensor_train(X, eps=eps)
        return _with_selection(tt, {"method": "tt", "eps": eps, "ranks": list(tt.rank)})
    smallest = tensor_train(X, max_rank=1)
    if smallest.n_params > budget:
        raise RankError(f"budget={budget} is too small: a rank-1 tensor train of shape {tuple(X.shape)} needs "
                        f"{smallest.n_params} parameters")
    lo, hi, best = math.log(1e-12), math.log(0.999), smallest
    for _ in range(40):  # the parameter count falls as eps grows; stop when the bracket is within 1%
        mid = (lo + hi) / 2
        tt = tensor_train(X, eps=math.exp(mid))
        if tt.n_params <= budget:
            hi, best = mid, tt
        else:
            lo = mid
        if hi - lo < 0.01:
            break
    reached = best.info.details.get("error_bound") if best.info is not None else None
    selection = {"method": "tt", "budget": budget, "eps": math.exp(hi) if best is not smallest else None,
                 "ranks": list(best.rank), "n_params": best.n_params, "error_bound": reached}
    return _with_selection(best, selection)


def _select_tucker(X, eps, budget, seed):
    from tensorfold.decomp.tucker import tucker

    if (eps is None) == (budget is None):
        raise InvalidArgumentError("select_rank(method='tucker') needs exactly one of eps or budget")
    spectra = mode_spectra(X)
    total = float(spectra[0].sum())
    if eps is not None:
        allowed = eps**2 * total / X.ndim
        ranks = []
        for s in spectra:
            tails = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])  # tails[k] = sum s[k:]
            ok = (tails <= allowed).nonzero()
            ranks.append(max(int(ok[0]) if ok.numel() else len(s), 1))
        rule = f"per-mode HOSVD tail <= eps^2 ||X||^2 / {X.ndim}"
        shape = CoreShape(tuple(ranks), core_size(ranks, X.shape), core_size(ranks, X.shape),
                          float(sum(float(s[:r].sum()) for s, r in zip(spectra, ranks))),
                          math.sqrt(sum(float(s[r:].sum()) for s, r in zip(spectra, ranks)) / (total or 1.0)), "eps")
    else:
        shape = tucker_core_shape([s.numpy() for s in spectra], budget, method="knapsack")
        ranks, rule = list(shape.ranks), "knapsack core shape under the budget"
    result = tucker(X, tuple(ranks), seed=seed)
    selection = {"method": "tucker", "eps": eps, "budget": budget, "rule": rule, **shape.to_json(),
                 "spectra": [s.tolist() for s in spectra]}
    return _with_selection(result, selection)


def _select_cp(X, eps, max_rank, min_consistency, n_iter_max, seed):
    import warnings

    from tensorfold.decomp.cp import cp
    from tensorfold.decomp.error import relative_error
    from tensorfold.errors import ConvergenceWarning

    max_rank = check_rank(max_rank, "max_rank")
    start = time.perf_counter()
    results, fits, consistency = [], [], []
    for r in range(1, max_rank + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = cp(X, r, n_iter_max=n_iter_max, seed=seed)
        results.append(res)
        fits.append(1.0 - relative_error(X, res))
        consistency.append(core_consistency(X, res))
    candidates = [r for r, c in zip(range(1, max_rank + 1), consistency) if c >= min_consistency] or [1]
    if eps is not None:
        reaching = [r for r in candidates if fits[r - 1] >= 1 - eps]
        chosen = min(reaching) if reaching else max(candidates)
        rule = f"smallest rank with fit >= 1 - eps and CORCONDIA >= {min_consistency}"
    else:
        chosen = max(candidates)
        rule = f"largest rank with CORCONDIA >= {min_consistency}"
    selection = {"method": "cp", "ranks": list(range(1, max_rank + 1)), "fits": fits,
                 "core_consistency": consistency, "suggested_rank": chosen, "rule": rule,
                 "seconds": time.perf_counter() - start}
    return _with_selection(results[chosen - 1], selection)


__all__ = ["CoreShape", "core_consistency", "core_size", "mode_spectra", "select_rank", "tucker_core_shape"]
