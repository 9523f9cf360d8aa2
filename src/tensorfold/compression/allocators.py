"""Allocating one global budget over every layer and method.

Each allocator picks one candidate per :class:`~tensorfold.compression.candidates.LayerMenu` (the dense
layer is always a candidate) so that the summed cost (params, FLOPs or latency) of the covered
layers is at most ``budget`` times their dense cost:

- ``uniform``: the same fraction of each layer's cost (the first listed method that applies);
- ``energy``: the same spectral energy threshold in each layer (the first method; the classic
  "keep 90% of the energy" rule, with the threshold searched so the budget is met);
  for both, budget left over by rank granularity is spent on the layers with the largest error;
- ``balanced``: ALDS-style, minimise the largest sensitivity-normalised layer error over all methods,
  then spend any slack on the worst layers;
- ``knapsack`` (= ``auto``): a multiple-choice knapsack minimising the total sensitivity-weighted
  squared error ``sum_i s_i e_i^2`` (dynamic programming over a fine cost grid, costs rounded up so
  the result is always feasible). With ``latency_cap`` it also keeps the summed predicted latency
  of the chosen layers under that fraction of the dense layers' (a second constraint, handled by
  pricing latency in the objective and searching the price), so a FLOP budget becomes a real speedup
  on hardware where fewer FLOPs are not always faster. With ``speed_tolerance`` (and no cap) it
  prices predicted latency too, as a tie-break: the plan may raise the predicted error objective by
  at most that fraction over the knapsack's optimum, and within it takes the fastest choice found.

>>> from tensorfold.compression.candidates import Candidate, LayerMenu
>>> opts = [Candidate("dense", None, 100, None, None, 0.0), Candidate("svd", 1, 30, None, None, 0.5),
...         Candidate("svd", 2, 60, None, None, 0.1)]
>>> menus = [LayerMenu("a", None, "", None, list(opts)), LayerMenu("b", None, "", None, list(opts))]
>>> [c.rank for c in allocate(menus, 0.6, allocator="knapsack").choices]
[2, 2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tensorfold.compression.candidates import Candidate, LayerMenu
from tensorfold.compression.config import ALLOCATORS, TARGETS, check_budget
from tensorfold.errors import InvalidArgumentError, NotCompressibleError

__all__ = ["ALLOCATORS", "TARGETS", "Allocation", "allocate", "check_budget", "fastest_latency", "objective"]
DP_UNITS = 20000


@dataclass(frozen=True)
class Allocation:
    choices: list[Candidate]
    total: float  # summed cost of the chosen candidates
    dense_total: float
    objective: float  # sum of sensitivity-weighted squared errors

    @property
    def fraction(self) -> float:
        return self.total / self.dense_total if self.dense_total > 0 else 1.0


def _cost(c: Candidate, target: str) -> float:
    value = c.cost(target)
    if value is None:
        raise InvalidArgumentError(
            f"target={target!r} needs the input shape of every layer: pass calib batches or example_inputs"
        )
    return float(value)


def usable_options(menu: LayerMenu, target: str, *, no_slower: bool = False) -> list[Candidate]:
    """The menu's options for ``target``. For the latency target, or with ``no_slower`` whatever the
    target, factorisations predicted slower than the dense layer are dropped."""
    if target != "latency" and not no_slower:
        return list(menu.options)
    dense_t = _cost(menu.dense, "latency")
    return [menu.dense] + [c for c in menu.options[1:] if _cost(c, "latency") < dense_t]


def objective(menus: Sequence[LayerMenu], choices: Sequence[Candidate]) -> float:
    return float(sum(m.sensitivity * c.error**2 for m, c in zip(menus, choices)))


def _primary(menu: LayerMenu, options: list[Candidate], methods: Sequence[str] | None) -> list[Candidate]:
    """Options of the first listed method that has any for this layer (plus dense)."""
    order = list(methods) if methods else list(dict.fromkeys(c.method for c in options[1:]))
    for method in order:
        chosen = [c for c in options[1:] if c.method == method]
        if chosen:
            return [options[0], *chosen]
    return [options[0]]


def _bisect(pick, lo: float, hi: float, cap: float, increasing: bool, iters: int = 60):
    """Largest (increasing=True) or smallest (False) parameter whose picked total is <= cap."""
    best = pick(lo if increasing else hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        choice = pick(mid)
        if choice[1] <= cap:
            best = choice
            if increasing:
                lo = mid
            else:
                hi = mid
        elif increasing:
            hi = mid
        else:
            lo = mid
    return best


def _uniform(per_layer, target, cap):
    def pick(f):
        chosen = []
        for opts in per_layer:
            dense = opts[0]
            if f >= 1.0 or len(opts) == 1:
                chosen.append(dense)
                continue
            limit = f * _cost(dense, target)
            fitting = [c for c in opts[1:] if _cost(c, target) <= limit]
            chosen.append(max(fitting, key=lambda c: _cost(c, target)) if fitting
                          else min(opts[1:], key=lambda c: _cost(c, target)))
        return chosen, sum(_cost(c, target) for c in chosen)

    full = pick(1.0)
    return full[0] if full[1] <= cap else _bisect(pick, 0.0, 1.0, cap, increasing=True)[0]


def _threshold(per_layer, weights, target, cap):
    """Cheapest option per layer whose weighted error is <= eps; eps searched to meet the cap."""

    def pick(eps):
        chosen = []
        for opts, w in zip(per_layer, weights):
            ok = [c for c in opts if w * c.error <= eps]
            chosen.append(min(ok, key=lambda c: (_cost(c, target), c.error)))
        return chosen, sum(_cost(c, target) for c in chosen)

    top = max((w * c.error for opts, w in zip(per_layer, weights) for c in opts), default=0.0)
    return _bisect(pick, 0.0, top + 1e-12, cap, increasing=False)[0]


def _fill_slack(per_layer, weights, chosen, target, cap, lat_cap: float | None = None):
    """Greedy: upgrade the layer with the largest weighted error while the budget (and the latency
    cap, when given) allows."""
    chosen = list(chosen)
    total = sum(_cost(c, target) for c in chosen)
    lat = sum(_cost(c, "latency") for c in chosen) if lat_cap is not None else 0.0
    while True:
        order = sorted(range(len(chosen)), key=lambda i: -weights[i] * chosen[i].error)
        upgraded = False
        for i in order:
            cur = chosen[i]
            better = [c for c in per_layer[i] if c.error < cur.error
                      and total - _cost(cur, target) + _cost(c, target) <= cap
                      and (lat_cap is None or lat - _cost(cur, "latency") + _cost(c, "latency") <= lat_cap)]
            if better:
                new = min(better, key=lambda c: (_cost(c, target), c.error))
                total += _cost(new, target) - _cost(cur, target)
                if lat_cap is not None:
                    lat += _cost(new, "latency") - _cost(cur, "latency")
                chosen[i] = new
                upgraded = True
                break
        if not upgraded:
            return chosen


def _knapsack(per_layer, values, target, cap, units: int = DP_UNITS):
    """Multiple-choice knapsack minimising the summed ``values`` (one list per layer, aligned with its
    options) by dynamic programming over ``units`` cost units (costs rounded up, so always feasible)."""
    unit = cap / units
    dp = np.zeros(units + 1)
    back = []
    for opts, vals in zip(per_layer, values):
        new = np.full(units + 1, np.inf)
        arg = np.full(units + 1, -1, dtype=np.int32)
        for j, (c, v) in enumerate(zip(opts, vals)):
            w = int(math.ceil(_cost(c, target) / unit - 1e-9)) if unit > 0 else 0
            if w > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[w:] = dp[: units + 1 - w] + v
            better = cand < new - 1e-15
            new[better] = cand[better]
            arg[better] = j
        dp = new
        back.append(arg)
    if not np.isfinite(dp[units]):
        return None
    chosen, c_units = [], units
    for opts, arg in zip(reversed(per_layer), reversed(back)):
        j = int(arg[c_units])
        c = opts[j]
        chosen.append(c)
        c_units -= int(math.ceil(_cost(c, target) / unit - 1e-9)) if unit > 0 else 0
    return chosen[::-1]


def _errors(per_layer, sens):
    return [[s * c.error**2 for c in opts] for opts, s in zip(per_layer, sens)]


def _knapsack_latency(per_layer, sens, target, cap, lat_cap, dense_lat):
    """The knapsack under ``cap`` on ``target`` *and* ``lat_cap`` on the summed predicted latency.

    Lagrangian relaxation: minimise ``sum_i s_i e_i^2 + lam * t_i / T`` (``T`` the dense latency)
    under the ``target`` cap alone; ``lam`` is bisected (log scale) to the smallest price whose
    choice meets the latency cap. ``None`` when even the fastest choice within ``cap`` is too slow.
    """
    errors = _errors(per_layer, sens)
    scale = max(sum(max(v) for v in errors), 1e-12)  # the objective's range: prices beyond it change nothing

    def solve(lam, units=DP_UNITS):
        values = [[v + lam * _cost(c, "latency") / dense_lat for c, v in zip(opts, vals)]
                  for opts, vals in zip(per_layer, errors)]
        return _knapsack(per_layer, values, target, cap, units)

    def latency(chosen):
        return sum(_cost(c, "latency") for c in chosen)

    plain = solve(0.0)
    if plain is not None and latency(plain) <= lat_cap:
        return plain
    # the fastest choice: latency first, the error only breaks ties
    fastest = _knapsack(per_layer, [[_cost(c, "latency") / dense_lat + 1e-9 * v / scale for c, v in zip(opts, vals)]
                                    for opts, vals in zip(per_layer, errors)], target, cap)
    if fastest is None or latency(fastest) > lat_cap:
        return None
    lo, hi, best = math.log(scale * 1e-6), math.log(scale * 1e6), fastest
    for _ in range(30):  # a coarse grid while searching the price, the full one for the answer
        mid = (lo + hi) / 2
        chosen = solve(math.exp(mid), DP_UNITS // 5)
        if chosen is not None and latency(chosen) <= lat_cap:
            hi, best = mid, chosen
        else:
            lo = mid
    chosen = solve(math.exp(hi))
    if chosen is not None and latency(chosen) <= lat_cap:
        best = chosen
    return best


def _knapsack_tiebreak(per_layer, sens, target, cap, tolerance, dense_lat):
    """The knapsack's choice, or a faster one whose objective is at most ``(1 + tolerance)`` times its.

    Among options of about the same predicted error, the error alone picks by noise; a low-rank pair
    and a smaller dense matrix of equal error differ in speed (two MatMuls against one). The objective
    ``sum_i s_i e_i^2 + lam * t_i / T`` is minimised with the largest price ``lam`` (log bisection)
    whose choice stays within the tolerance.
    """
    errors = _errors(per_layer, sens)
    scale = max(sum(max(v) for v in errors), 1e-12)

    def solve(lam, units=DP_UNITS):
        values = [[v + lam * _cost(c, "latency") / dense_lat for c, v in zip(opts, vals)]
                  for opts, vals in zip(per_layer, errors)]
        return _knapsack(per_layer, values, target, cap, units)

    def value(chosen):
        return sum(v[opts.index(c)] for opts, v, c in zip(per_layer, errors, chosen))

    plain = solve(0.0)
    if plain is None or tolerance <= 0:
        return plain
    limit = value(plain) * (1 + tolerance) + 1e-15
    lo, hi, best = math.log(scale * 1e-6), math.log(scale * 10), plain
    for _ in range(24):
        mid = (lo + hi) / 2
        chosen = solve(math.exp(mid))
        if chosen is not None and value(chosen) <= limit:
            lo, best = mid, chosen
        else:
            hi = mid
    return _spend_tolerance(per_layer, errors, best, target, cap, limit)


def _spend_tolerance(per_layer, errors, chosen, target, cap, limit):
    """Greedy: while the objective stays under ``limit`` and the cost under ``cap``, switch the layer
    whose faster option saves the most latency per unit of objective (one price moves every layer of
    the same kind at once; what it leaves of the tolerance can still buy a few of them)."""
    idx = [opts.index(c) for opts, c in zip(per_layer, chosen)]
    total = sum(_cost(c, target) for c in chosen)
    val = sum(v[j] for v, j in zip(errors, idx))
    while True:
        best = None
        for i, (opts, vals) in enumerate(zip(per_layer, errors)):
            cur = opts[idx[i]]
            for j, c in enumerate(opts):
                saved = _cost(cur, "latency") - _cost(c, "latency")
                extra = vals[j] - vals[idx[i]]
                if (saved <= 0 or val + extra > limit
                        or total - _cost(cur, target) + _cost(c, target) > cap * (1 + 1e-12)):
                    continue
                rate = saved / max(extra, 1e-18)
                if best is None or rate > best[0]:
                    best = (rate, i, j, extra)
        if best is None:
            return [opts[j] for opts, j in zip(per_layer, idx)]
        _, i, j, extra = best
        total += _cost(per_layer[i][j], target) - _cost(per_layer[i][idx[i]], target)
        val += extra
        idx[i] = j


def fastest_latency(menus: Sequence[LayerMenu], budget: float, target: str = "params", *,
                    no_slower: bool = False) -> float:
    """The smallest summed predicted latency of the menus' choices within ``budget`` of ``target``, as a
    fraction of the dense latency (what ``latency_cap`` can ask for at most)."""
    per_layer = [usable_options(m, target, no_slower=no_slower) for m in menus]
    dense_lat = sum(_cost(m.dense, "latency") for m in menus)
    cap = budget * sum(_cost(m.dense, target) for m in menus)
    values = [[_cost(c, "latency") for c in opts] for opts in per_layer]
    chosen = _knapsack(per_layer, values, target, cap)
    return math.inf if chosen is None else sum(_cost(c, "latency") for c in chosen) / dense_lat


def allocate(
    menus: Sequence[LayerMenu],
    budget: float,
    *,
    target: str = "params",
    allocator: str = "auto",
    methods: Sequence[str] | None = None,
    no_slower: bool = False,
    latency_cap: float | None = None,
    speed_tolerance: float = 0.0,
) -> Allocation:
    """Choose one candidate per menu under ``budget`` (fraction of the menus' dense cost); with
    ``no_slower`` no factorisation predicted slower than its dense layer is chosen; with
    ``latency_cap`` (knapsack only) the summed predicted latency is also at most that fraction of
    the dense layers' (see :func:`fastest_latency` for the smallest reachable); with
    ``speed_tolerance`` (knapsack, no cap, every option's latency predicted) the predicted error
    objective may exceed the knapsack's optimum by that fraction to choose faster options.

    >>> from tensorfold.compression.candidates import Candidate, LayerMenu
    >>> opts = [Candidate("dense", None, 100, None, 1.0, 0.0), Candidate("svd", 20, 50, None, 0.9, 0.300),
    ...         Candidate("mlp-select", 50, 50, None, 0.5, 0.301)]   # equal error within 1%, one faster
    >>> [c.method for c in allocate([LayerMenu("a", None, "", None, opts)], 0.5).choices]
    ['svd']
    >>> [c.method for c in allocate([LayerMenu("a", None, "", None, opts)], 0.5, speed_tolerance=0.02).choices]
    ['mlp-select']

    ``budget``, ``target`` and ``allocator`` come from a validated
    :class:`~tensorfold.compression.config.CompressConfig` and are not checked again here.
    """
    if latency_cap is not None:
        if isinstance(latency_cap, bool) or not isinstance(latency_cap, (int, float)) or not latency_cap > 0:
            raise InvalidArgumentError(f"latency_cap must be a positive fraction, got {latency_cap!r}")
        if allocator not in ("knapsack", "auto"):
            raise InvalidArgumentError(f"latency_cap needs allocator='knapsack' (or 'auto'), got {allocator!r}")
    per_layer = [usable_options(m, target, no_slower=no_slower) for m in menus]
    dense_total = sum(_cost(m.dense, target) for m in menus)
    cap = budget * dense_total
    smallest = sum(min(_cost(c, target) for c in opts) for opts in per_layer)
    if smallest > cap * (1 + 1e-12):
        raise NotCompressibleError(
            f"budget {budget:g} of the {target} cannot be met: the smallest factorisations of the covered "
            f"layers still need {smallest / dense_total:.3f} of it (allow more methods, exclude fewer layers, "
            f"or raise the budget)"
        )
    sens = [max(float(m.sensitivity), 0.0) for m in menus]
    mean_s = sum(sens) / len(sens) if sens else 1.0
    root_w = [math.sqrt(s / mean_s) if mean_s > 0 else 1.0 for s in sens]
    if allocator in ("uniform", "energy"):
        primary = [_primary(m, o, methods) for m, o in zip(menus, per_layer)]
        ones = [1.0] * len(menus)
        chosen = _uniform(primary, target, cap) if allocator == "uniform" else _threshold(primary, ones, target, cap)
        # rank granularity leaves slack on small models: spend it where the error is largest
        chosen = _fill_slack(primary, ones, chosen, target, cap)
    elif allocator == "balanced":
        chosen = _threshold(per_layer, root_w, target, cap)
        chosen = _fill_slack(per_layer, root_w, chosen, target, cap)
    elif latency_cap is not None:
        dense_lat = sum(_cost(m.dense, "latency") for m in menus)
        chosen = _knapsack_latency(per_layer, sens, target, cap, latency_cap * dense_lat, dense_lat)
        if chosen is None:
            best = fastest_latency(menus, budget, target, no_slower=no_slower)
            raise NotCompressibleError(
                f"a predicted latency of {latency_cap:.3f} of the dense layers cannot be met within budget {budget:g} "
                f"of the {target}: the fastest choice is predicted at {best:.3f} (lower the budget, allow more "
                f"methods, or ask for less speed)"
            )
        chosen = _fill_slack(per_layer, root_w, chosen, target, cap, latency_cap * dense_lat)
    else:
        priced = speed_tolerance > 0 and all(c.latency is not None for opts in per_layer for c in opts)
        if priced:
            dense_lat = max(sum(_cost(m.dense, "latency") for m in menus), 1e-12)
            chosen = _knapsack_tiebreak(per_layer, sens, target, cap, speed_tolerance, dense_lat)
        else:
            chosen = _knapsack(per_layer, _errors(per_layer, sens), target, cap)
        if chosen is None:  # rounding made the smallest choice infeasible: fall back to the balanced search
            chosen = _threshold(per_layer, root_w, target, cap)
        # costs were rounded up on the grid: spend what that left over (each step lowers the objective;
        # with latency priced, never at the cost of predicted speed)
        lat_cap = sum(_cost(c, "latency") for c in chosen) if priced else None
        chosen = _fill_slack(per_layer, root_w, chosen, target, cap, lat_cap)
    total = sum(_cost(c, target) for c in chosen)
    if total > cap * (1 + 1e-9):
        raise NotCompressibleError(
            f"the {allocator} allocator cannot meet budget {budget:g} with its method ({total / dense_total:.3f} "
            f"at best); use allocator='knapsack' or 'balanced', which mix methods"
        )
    return Allocation(list(chosen), total, dense_total, objective(menus, chosen))

