"""Allocators' exact choices on small menus (each test kills mutants that mutmut found surviving in
compression/allocators.py; docs/testing.md lists the ones that cannot change a result).

A menu row is ``(method, rank, params, flops, latency, error)``; the first row is the dense layer."""

from __future__ import annotations

import itertools
import math

import pytest

from tensorfold.compression.allocators import _fill_slack, allocate, fastest_latency
from tensorfold.compression.candidates import Candidate, LayerMenu
from tensorfold.errors import InvalidArgumentError, NotCompressibleError


def menu(name: str, rows, sensitivity: float = 1.0) -> LayerMenu:
    return LayerMenu(name, None, "", None, [Candidate(*r) for r in rows], sensitivity=sensitivity)


def picks(allocation) -> list[tuple]:
    return [(c.method, c.rank) for c in allocation.choices]


# --- hand-worked cases -----------------------------------------------------------------------------
@pytest.mark.parametrize("allocator", ["uniform", "energy", "balanced", "knapsack"])
def test_no_menus_gives_an_empty_allocation(allocator):
    got = allocate([], 0.5, allocator=allocator)
    assert got.choices == [] and got.total == 0 and got.dense_total == 0 and got.objective == 0
    assert got.fraction == 1.0


def two_method_menu():
    """tucker listed before svd: rank-1 Tucker 30 params (error .5), SVD ranks 1-2 cost 20/40 (.6/.2)."""
    return menu("a", [("dense", None, 100, None, None, 0.0), ("tucker", 1, 30, None, None, 0.5),
                      ("svd", 1, 20, None, None, 0.6), ("svd", 2, 40, None, None, 0.2)])


@pytest.mark.parametrize("allocator", ["uniform", "energy"])
@pytest.mark.parametrize("methods, expected", [
    (None, ("tucker", 1)),      # no methods given: the first method the menu lists, whatever it costs
    (("svd",), ("svd", 1)),      # the listed method; rank 2 (40) does not fit in 30
    (("cp", "svd"), ("svd", 1)),  # the first listed method that the layer has
])
def test_single_method_allocators_use_the_first_method(allocator, methods, expected):
    got = allocate([two_method_menu()], 0.3, allocator=allocator, methods=methods)
    assert picks(got) == [expected]


@pytest.mark.parametrize("allocator", ["uniform", "energy"])
def test_a_layer_without_the_listed_method_stays_dense(allocator):
    # a has no cp: it stays dense (100); b's only cp option (10) is taken: 110 of the cap 120
    b = menu("b", [("dense", None, 100, None, None, 0.0), ("cp", 1, 10, None, None, 0.5)])
    got = allocate([two_method_menu(), b], 0.6, allocator=allocator, methods=("cp",))
    assert picks(got) == [("dense", None), ("cp", 1)] and got.total == 110


def slack_menus():
    """Ranks 1 and 2 cost 20 and 40 in both layers; errors a .5/.1, b .9/.3."""
    return [menu("a", [("dense", None, 100, None, None, 0.0), ("svd", 1, 20, None, None, 0.5),
                       ("svd", 2, 40, None, None, 0.1)]),
            menu("b", [("dense", None, 100, None, None, 0.0), ("svd", 1, 20, None, None, 0.9),
                       ("svd", 2, 40, None, None, 0.3)])]


def test_uniform_spends_its_slack_on_the_worst_layer():
    # cap 60: the common fraction gives (1, 1) = 40; 20 left buys one upgrade, for b (error .9 > .5)
    got = allocate(slack_menus(), 0.3, allocator="uniform")
    assert [c.rank for c in got.choices] == [1, 2] and got.total == 60
    assert got.objective == pytest.approx(0.5**2 + 0.3**2)


def test_fill_slack_upgrades_the_worst_layer_first_by_the_cheapest_step():
    a, b = slack_menus()
    per_layer = [a.options, b.options]
    start = [a.options[1], b.options[1]]  # (1, 1) = 40
    # cap 80: b (.9) gets rank 2 (not dense), then a (.5) rank 2: (2, 2) = 80
    assert [c.rank for c in _fill_slack(per_layer, [1.0, 1.0], start, "params", 80)] == [2, 2]
    # weights turn the order round: a weighs 3 x .5 = 1.5 > .9, and takes the only upgrade within 60
    assert [c.rank for c in _fill_slack(per_layer, [3.0, 1.0], start, "params", 60)] == [2, 1]
    # with a latency cap: latencies 10 (rank 1), 12 (rank 2) per layer; 23 allows one upgrade, 24 two
    lat = [[Candidate(c.method, c.rank, c.params, None, {None: 20.0, 1: 10.0, 2: 12.0}[c.rank], c.error)
            for c in opts] for opts in per_layer]
    one = _fill_slack(lat, [1.0, 1.0], [lat[0][1], lat[1][1]], "params", 200, lat_cap=23.0)
    two = _fill_slack(lat, [1.0, 1.0], [lat[0][1], lat[1][1]], "params", 200, lat_cap=24.0)
    assert [c.rank for c in one] == [1, 2] and [c.rank for c in two] == [2, 2]


def test_knapsack_breaks_ties_for_the_first_listed_option():
    # svd and tucker rank 1 have the same error: the cheaper, first listed, svd is kept
    m = menu("a", [("dense", None, 100, None, None, 0.0), ("svd", 1, 20, None, None, 0.3),
                   ("tucker", 1, 40, None, None, 0.3)])
    got = allocate([m], 0.5, allocator="knapsack")
    assert picks(got) == [("svd", 1)] and got.total == 20


def test_knapsack_with_a_free_option_and_one_that_fills_the_cap():
    # "drop" costs nothing; a's rank 2 alone costs the whole cap 80:
    # (rank 2, drop) = 80 with 1 * .1^2 + 1 * .2^2 = .05 beats (rank 1, rank 1) = 80 with .26
    a = menu("a", [("dense", None, 100, None, None, 0.0), ("svd", 1, 50, None, None, 0.5),
                   ("svd", 2, 80, None, None, 0.1)])
    b = menu("b", [("dense", None, 100, None, None, 0.0), ("drop", None, 0, None, None, 0.2),
                   ("svd", 1, 30, None, None, 0.1)])
    got = allocate([a, b], 0.4, allocator="knapsack")
    assert picks(got) == [("svd", 2), ("drop", None)] and got.total == 80
    assert got.objective == pytest.approx(0.05)


def test_uniform_fraction_above_one_half():
    # cap 100 of 200. a: rank 1 10 params (error .9), rank 2 90 (.85); b: rank 1 10 (.3), rank 2 60 (.1).
    # The largest common fraction below .9 takes b's rank 2 (from .6 on): (1, 2) = 70; the 30 left buys
    # neither a's rank 2 (+80) nor b's dense layer (+40). A fraction stuck at or below .5 would give
    # (1, 1) = 20, from which the slack step upgrades a instead: (2, 1) = 100.
    a = menu("a", [("dense", None, 100, None, None, 0.0), ("svd", 1, 10, None, None, 0.9),
                   ("svd", 2, 90, None, None, 0.85)])
    b = menu("b", [("dense", None, 100, None, None, 0.0), ("svd", 1, 10, None, None, 0.3),
                   ("svd", 2, 60, None, None, 0.1)])
    got = allocate([a, b], 0.5, allocator="uniform")
    assert [c.rank for c in got.choices] == [1, 2] and got.total == 70


def test_uniform_accepts_a_fraction_whose_total_is_exactly_the_cap():
    # cap 75 of 250. a (dense 50): rank 1 5 params (error .9), rank 2 20 (.85); b (dense 200): rank 1 10
    # (.3), rank 2 70 (.1). Fractions in [.35, .4) give (1, 2) = 75, exactly the cap: kept, and nothing
    # else fits. Refusing the exact fit would leave (1, 1) = 15, which the slack step spends on a: (dense, 1).
    a = menu("a", [("dense", None, 50, None, None, 0.0), ("svd", 1, 5, None, None, 0.9),
                   ("svd", 2, 20, None, None, 0.85)])
    b = menu("b", [("dense", None, 200, None, None, 0.0), ("svd", 1, 10, None, None, 0.3),
                   ("svd", 2, 70, None, None, 0.1)])
    got = allocate([a, b], 0.3, allocator="uniform")
    assert [c.rank for c in got.choices] == [1, 2] and got.total == 75


def test_knapsack_optimum_that_fills_the_cap_exactly():
    # costs are whole multiples of the grid unit (cap 5000 / 20000 units = 0.25), so rounding must not
    # push an exact fit over the cap. (3, 2) = 5000 with .1^2 + .5^2 = .26 is the optimum; (2, 2) = 4000
    # (.34) would be upgraded by the slack step to b's rank 3 instead: (2, 3) = 5000 (.2925).
    a = menu("a", [("dense", None, 5000, None, None, 0.0), ("svd", 1, 1000, None, None, 0.9),
                   ("svd", 2, 1500, None, None, 0.3), ("svd", 3, 2500, None, None, 0.1)])
    b = menu("b", [("dense", None, 5000, None, None, 0.0), ("svd", 1, 1000, None, None, 0.6),
                   ("svd", 2, 2500, None, None, 0.5), ("svd", 3, 3500, None, None, 0.45)])
    got = allocate([a, b], 0.5, allocator="knapsack")
    assert [c.rank for c in got.choices] == [3, 2] and got.total == 5000
    assert got.objective == pytest.approx(0.26)


def latency_menus():
    """a: rank 1 (20 params, 4 ms, error .5) and rank 2 (40 params, 3 ms, .1); b's only factorisation
    (30 params, 11 ms) is slower than its dense layer (10 ms). Dense: 100 params, 10 ms each."""
    return [menu("a", [("dense", None, 100, None, 10.0, 0.0), ("svd", 1, 20, None, 4.0, 0.5),
                       ("svd", 2, 40, None, 3.0, 0.1)]),
            menu("b", [("dense", None, 100, None, 10.0, 0.0), ("svd", 1, 30, None, 11.0, 0.2)])]


def test_fastest_latency_worked_out_by_hand():
    menus = latency_menus()
    # 150 params: a rank 2 + b dense = 140 -> 3 + 10 = 13 ms of 20
    assert fastest_latency(menus, 0.75) == pytest.approx(0.65)
    # 100 params: b must take its slower factorisation: 3 + 11 = 14 ms
    assert fastest_latency(menus, 0.5) == pytest.approx(0.7)
    # ... unless slower factorisations are dropped: then nothing fits
    assert fastest_latency(menus, 0.5, no_slower=True) == math.inf
    # a latency budget of 14 ms: b's factorisation is dropped, a rank 2 + b dense = 13 ms
    assert fastest_latency(menus, 0.7, "latency") == pytest.approx(0.65)
    with pytest.raises(InvalidArgumentError, match="needs the input shape"):
        fastest_latency(menus, 0.5, "flops")


def test_latency_target_drops_factorisations_not_faster_than_dense():
    a, b = latency_menus()
    b.options.append(Candidate("tucker", 1, 20, None, 10.0, 0.05))  # exactly as slow as dense: dropped
    got = allocate([a, b], 0.9, target="latency", allocator="knapsack")
    assert picks(got) == [("svd", 2), ("dense", None)]


@pytest.mark.parametrize("cap", [True, -0.5, 0.0, "0.5"])
def test_latency_cap_must_be_a_positive_number(cap):
    with pytest.raises(InvalidArgumentError, match="latency_cap must be a positive fraction"):
        allocate(latency_menus(), 0.7, latency_cap=cap)


def test_latency_cap_with_the_default_allocator():
    # 150 params and 65% of the 20 ms: a rank 2 (3 ms) + b dense (10 ms) = 13 ms, the only choice
    got = allocate(latency_menus(), 0.75, latency_cap=0.65)
    assert picks(got) == [("svd", 2), ("dense", None)]
    with pytest.raises(InvalidArgumentError, match="needs allocator='knapsack'"):
        allocate(latency_menus(), 0.7, allocator="balanced", latency_cap=0.65)


def one_layer_for_latency():
    """Dense 100 params, 10 ms; svd rank 1 20 params, 8 ms (error .3); tucker rank 1 20 params, 4 ms (.3);
    svd rank 2 40 params, 9 ms (.1)."""
    return [menu("a", [("dense", None, 100, None, 10.0, 0.0), ("svd", 1, 20, None, 8.0, 0.3),
                       ("tucker", 1, 20, None, 4.0, 0.3), ("svd", 2, 40, None, 9.0, 0.1)])]


def test_latency_cap_met_by_the_plain_knapsack_keeps_its_choice():
    # 20 params: svd 1 and tucker 1 tie on the error (.3); the plain knapsack keeps the first listed, svd
    # at 8 ms, which meets a cap of exactly 8 ms: no price on latency is needed, so none is applied
    got = allocate(one_layer_for_latency(), 0.2, latency_cap=0.8)
    assert picks(got) == [("svd", 1)]


def test_latency_cap_reached_exactly_by_the_fastest_choice():
    # 40 params: the plain optimum svd 2 (9 ms) misses a 4 ms cap; the fastest, tucker 1, is exactly 4 ms
    got = allocate(one_layer_for_latency(), 0.4, latency_cap=0.4)
    assert picks(got) == [("tucker", 1)]
    with pytest.raises(NotCompressibleError, match="fastest choice is predicted at 0.400"):
        allocate(one_layer_for_latency(), 0.4, latency_cap=0.39)


def test_budget_below_the_smallest_factorisations_is_refused_up_front():
    # the smallest choices, a rank 1 (20) + b rank 1 (30) = 50 params, are a quarter of the dense 200
    with pytest.raises(NotCompressibleError, match="smallest factorisations of the covered layers still need 0.250"):
        allocate(latency_menus(), 0.2)


def test_single_method_allocator_that_cannot_meet_the_budget_says_so():
    # svd rank 1 (20) would fit in 25 params, but uniform keeps to tucker, whose smallest is 30
    message = r"uniform allocator cannot meet budget 0.25 with its method \(0.300 at best\)"
    with pytest.raises(NotCompressibleError, match=message):
        allocate([two_method_menu()], 0.25, allocator="uniform", methods=("tucker",))


def test_no_slower_drops_a_factorisation_as_slow_as_dense():
    a, b = latency_menus()
    b.options.append(Candidate("tucker", 1, 20, None, 10.0, 0.05))  # 10 ms, as slow as b's dense layer
    # 120 params without b's tucker: a rank 1 (20) + b dense (100); with it a rank 2 + tucker would fit
    got = allocate([a, b], 0.6, no_slower=True)
    assert picks(got) == [("svd", 1), ("dense", None)]


@pytest.mark.parametrize("allocator", ["balanced", "knapsack"])
def test_all_sensitivities_zero(allocator):
    # every choice has objective 0; the weights fall back to 1, so balanced and the slack step still work
    menus = slack_menus()
    for m in menus:
        m.sensitivity = 0.0
    got = allocate(menus, 0.3, allocator=allocator)
    assert got.total <= 60 and got.objective == 0


# --- menus drawn at random (fixed) that told surviving mutants apart -------------------------------
# Expected choices are those of this implementation, checked here against what must hold: the cap,
# the latency cap, and for the plain knapsack the brute-force optimum of sum_i s_i e_i^2.
SCENARIOS = [
    # (layers [(sensitivity, rows)], budget, allocate() keywords, expected (method, rank) per layer, total)
    ([
        (0.5, [('dense', None, 200, 400, 10.0, 0.0), ('svd', 1, 125, 260, 10.9, 0.8),
                ('svd', 2, 145, 290, 6.9, 0.35), ('svd', 3, 155, 320, 10.4, 0.2), ('svd', 4, 210, 420, 13.4, 0.05)]),
        (1.0, [('dense', None, 100, 200, 10.0, 0.0), ('svd', 1, 65, 130, 12.0, 0.35)]),
     ], 0.8, {'allocator': 'knapsack', 'target': 'params'},
     [('svd', 3), ('svd', 1)], 220.0),
    ([
        (0.5, [('dense', None, 60, 120, 20.0, 0.0), ('tucker', 1, 15, 40, 3.7, 0.5),
                ('svd', 1, 20, 40, 10.7, 0.95), ('svd', 2, 45, 100, 15.3, 0.8), ('svd', 3, 55, 110, 16.0, 0.65),
                ('svd', 4, 70, 150, 17.7, 0.5)]),
        (4.0, [('dense', None, 120, 240, 10.0, 0.0), ('tucker', 1, 5, 10, 3.1, 0.8),
                ('tucker', 2, 60, 120, 6.0, 0.65), ('tucker', 3, 80, 160, 10.1, 0.5),
                ('tucker', 4, 120, 250, 8.4, 0.1), ('svd', 1, 45, 90, 7.2, 0.9), ('svd', 2, 75, 150, 7.1, 0.65),
                ('svd', 3, 110, 220, 8.1, 0.05)]),
     ], 0.6, {'allocator': 'energy', 'target': 'latency'},
     [('tucker', 1), ('dense', None)], 13.7),
    ([
        (2.0, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 25, 60, 14.6, 0.5)]),
        (1.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 95, 200, 18.7, 0.35)]),
     ], 1.0, {'allocator': 'uniform', 'target': 'latency', 'methods': ['tucker', 'svd']},
     [('dense', None), ('dense', None)], 30.0),
    ([
        (2.0, [('dense', None, 120, 240, 10.0, 0.0), ('tucker', 1, 5, 20, 1.3, 0.65),
                ('tucker', 2, 50, 100, 7.8, 0.55), ('tucker', 3, 80, 160, 5.5, 0.5),
                ('tucker', 4, 85, 170, 5.0, 0.05), ('svd', 1, 60, 120, 8.0, 0.9), ('svd', 2, 90, 180, 3.6, 0.8),
                ('svd', 3, 110, 220, 14.6, 0.4), ('svd', 4, 135, 280, 7.1, 0.15)]),
        (0.5, [('dense', None, 100, 200, 20.0, 0.0), ('svd', 1, 40, 90, 7.7, 0.8), ('svd', 2, 100, 200, 7.3, 0.25),
                ('svd', 3, 115, 240, 32.2, 0.2)]),
     ], 1.0, {'allocator': 'knapsack', 'target': 'params', 'latency_cap': 0.7},
     [('dense', None), ('svd', 2)], 220.0),
    ([
        (4.0, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 25, 60, 6.0, 0.85)]),
        (4.0, [('dense', None, 100, 200, 10.0, 0.0), ('svd', 1, 60, 130, 7.5, 0.65),
                ('svd', 2, 85, 170, 6.6, 0.05)]),
        (0.5, [('dense', None, 80, 160, 20.0, 0.0), ('svd', 1, 25, 60, 13.2, 0.6), ('svd', 2, 30, 70, 15.7, 0.45),
                ('svd', 3, 45, 100, 6.3, 0.15), ('svd', 4, 65, 140, 16.3, 0.05)]),
     ], 0.5, {'allocator': 'uniform', 'target': 'latency', 'no_slower': True, 'methods': ['tucker', 'svd']},
     [('svd', 1), ('dense', None), ('svd', 3)], 22.3),
    ([
        (1.0, [('dense', None, 80, 160, 20.0, 0.0), ('svd', 1, 75, 160, 6.5, 0.9), ('svd', 2, 95, 190, 23.2, 0.25)]),
        (0.5, [('dense', None, 100, 200, 20.0, 0.0), ('svd', 1, 25, 50, 10.7, 0.25)]),
        (4.0, [('dense', None, 200, 400, 10.0, 0.0), ('svd', 1, 75, 160, 2.8, 0.95)]),
     ], 0.6, {'allocator': 'uniform', 'target': 'params'},
     [('dense', None), ('svd', 1), ('svd', 1)], 180.0),
    ([
        (0.5, [('dense', None, 120, 240, 10.0, 0.0), ('svd', 1, 120, 250, 3.6, 0.6)]),
        (2.0, [('dense', None, 200, 400, 20.0, 0.0), ('svd', 1, 25, 50, 8.0, 0.95), ('svd', 2, 50, 110, 8.1, 0.25)]),
     ], 0.5, {'allocator': 'energy', 'target': 'params'},
     [('dense', None), ('svd', 1)], 145.0),
    ([
        (4.0, [('dense', None, 200, 400, 20.0, 0.0), ('tucker', 1, 120, 250, 22.0, 0.55),
                ('svd', 1, 85, 170, 5.3, 0.75), ('svd', 2, 115, 230, 22.0, 0.45), ('svd', 3, 125, 250, 7.7, 0.05)]),
        (1.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 15, 30, 3.2, 0.85), ('svd', 2, 25, 50, 5.2, 0.65),
                ('svd', 3, 35, 70, 6.9, 0.1), ('svd', 4, 90, 190, 17.4, 0.05)]),
     ], 0.5, {'allocator': 'energy', 'target': 'latency'},
     [('svd', 3), ('svd', 3)], 14.6),
    ([
        (2.0, [('dense', None, 200, 400, 10.0, 0.0), ('svd', 1, 160, 330, 12.5, 0.15)]),
        (4.0, [('dense', None, 200, 400, 10.0, 0.0), ('tucker', 1, 50, 110, 3.5, 0.95),
                ('tucker', 2, 70, 150, 7.2, 0.25), ('tucker', 3, 120, 250, 10.2, 0.2),
                ('svd', 1, 25, 60, 4.7, 0.4)]),
     ], 0.9, {'allocator': 'balanced', 'target': 'params', 'no_slower': True, 'methods': ['cp']},
     [('dense', None), ('tucker', 2)], 270.0),
    ([
        (1.0, [('dense', None, 200, 400, 20.0, 0.0), ('svd', 1, 25, 50, 8.8, 0.45), ('svd', 2, 65, 130, 13.1, 0.4),
                ('svd', 3, 140, 290, 7.6, 0.35)]),
        (0.5, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 55, 110, 16.7, 0.35),
                ('svd', 2, 60, 120, 22.4, 0.15)]),
        (4.0, [('dense', None, 80, 160, 20.0, 0.0), ('tucker', 1, 10, 30, 6.4, 0.6), ('svd', 1, 15, 40, 9.1, 0.85),
                ('svd', 2, 80, 160, 22.5, 0.55)]),
     ], 0.6, {'allocator': 'knapsack', 'target': 'params'},
     [('svd', 1), ('dense', None), ('dense', None)], 165.0),
    ([
        (4.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 15, 40, 4.8, 0.65), ('svd', 2, 40, 80, 2.4, 0.55),
                ('svd', 3, 95, 190, 16.2, 0.35)]),
        (1.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 25, 60, 3.4, 0.7), ('svd', 2, 55, 110, 12.2, 0.65)]),
        (0.5, [('dense', None, 80, 160, 10.0, 0.0), ('tucker', 1, 20, 40, 1.9, 0.85),
                ('tucker', 2, 25, 60, 6.9, 0.75), ('svd', 1, 5, 20, 1.7, 0.4), ('svd', 2, 60, 120, 8.9, 0.3)]),
     ], 0.4, {'allocator': 'knapsack', 'target': 'params', 'latency_cap': 0.7},
     [('svd', 2), ('svd', 1), ('svd', 1)], 70.0),
    ([
        (0.5, [('dense', None, 120, 240, 20.0, 0.0), ('svd', 1, 35, 70, 13.0, 0.5), ('svd', 2, 40, 80, 3.5, 0.45),
                ('svd', 3, 115, 230, 27.6, 0.1), ('svd', 4, 120, 250, 30.0, 0.05)]),
     ], 0.8, {'allocator': 'knapsack', 'target': 'flops', 'no_slower': True, 'latency_cap': 0.8},
     [('svd', 2)], 80.0),
    ([
        (4.0, [('dense', None, 200, 400, 10.0, 0.0), ('svd', 1, 75, 150, 4.0, 0.8)]),
        (4.0, [('dense', None, 100, 200, 20.0, 0.0), ('tucker', 1, 10, 20, 10.2, 0.85),
                ('tucker', 2, 20, 40, 11.2, 0.55), ('tucker', 3, 45, 100, 9.2, 0.5),
                ('tucker', 4, 85, 180, 26.6, 0.35), ('svd', 1, 70, 150, 21.6, 0.85),
                ('svd', 2, 80, 160, 6.8, 0.15)]),
     ], 0.7, {'allocator': 'energy', 'target': 'params'},
     [('svd', 1), ('dense', None)], 175.0),
    ([
        (4.0, [('dense', None, 80, 160, 20.0, 0.0), ('tucker', 1, 5, 20, 7.6, 0.4),
                ('tucker', 2, 20, 50, 12.5, 0.3), ('tucker', 3, 85, 170, 17.4, 0.1),
                ('svd', 1, 65, 130, 22.3, 0.25)]),
        (1.0, [('dense', None, 120, 240, 20.0, 0.0), ('svd', 1, 110, 220, 22.4, 0.8),
                ('svd', 2, 115, 240, 28.9, 0.35)]),
        (4.0, [('dense', None, 100, 200, 20.0, 0.0), ('svd', 1, 35, 80, 9.7, 0.9), ('svd', 2, 45, 100, 5.6, 0.85),
                ('svd', 3, 55, 120, 18.3, 0.5), ('svd', 4, 85, 180, 29.2, 0.1)]),
     ], 0.8, {'allocator': 'knapsack', 'target': 'params', 'latency_cap': 0.6},
     [('tucker', 1), ('dense', None), ('svd', 2)], 170.0),
    ([
        (0.5, [('dense', None, 80, 160, 20.0, 0.0), ('tucker', 1, 5, 20, 2.9, 0.5),
                ('tucker', 2, 35, 80, 15.2, 0.45), ('tucker', 3, 45, 100, 9.2, 0.15),
                ('tucker', 4, 65, 140, 23.8, 0.1), ('svd', 1, 45, 100, 4.2, 0.35), ('svd', 2, 90, 190, 23.0, 0.25)]),
        (1.0, [('dense', None, 120, 240, 20.0, 0.0), ('svd', 1, 100, 210, 8.9, 0.35),
                ('svd', 2, 115, 230, 19.7, 0.15)]),
     ], 0.7, {'allocator': 'uniform', 'target': 'params'},
     [('tucker', 2), ('svd', 1)], 135.0),
    ([
        (1.0, [('dense', None, 60, 120, 10.0, 0.0), ('tucker', 1, 25, 60, 9.2, 0.75),
                ('tucker', 2, 40, 90, 6.6, 0.7), ('tucker', 3, 55, 120, 13.9, 0.25),
                ('tucker', 4, 70, 150, 6.2, 0.05), ('svd', 1, 25, 60, 2.0, 0.75), ('svd', 2, 50, 110, 7.8, 0.7),
                ('svd', 3, 55, 110, 9.4, 0.5), ('svd', 4, 70, 150, 11.1, 0.45)]),
        (4.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 5, 10, 1.6, 0.7), ('svd', 2, 70, 150, 3.4, 0.65)]),
     ], 0.45, {'allocator': 'balanced', 'target': 'latency'},
     [('svd', 1), ('svd', 2)], 5.4),
    ([
        (1.0, [('dense', None, 60, 120, 10.0, 0.0), ('svd', 1, 25, 50, 5.4, 0.95), ('svd', 2, 65, 130, 4.8, 0.8)]),
        (2.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 5, 20, 1.9, 0.45), ('svd', 2, 20, 50, 6.1, 0.3),
                ('svd', 3, 35, 80, 5.9, 0.2), ('svd', 4, 60, 120, 3.7, 0.15)]),
     ], 0.9, {'allocator': 'uniform', 'target': 'params'},
     [('dense', None), ('svd', 4)], 120.0),
    ([
        (1.0, [('dense', None, 60, 120, 10.0, 0.0), ('tucker', 1, 70, 140, 6.6, 0.25),
                ('svd', 1, 50, 110, 8.3, 0.7), ('svd', 2, 60, 120, 4.9, 0.2)]),
        (4.0, [('dense', None, 60, 120, 10.0, 0.0), ('svd', 1, 10, 30, 3.2, 0.35), ('svd', 2, 60, 120, 16.4, 0.25),
                ('svd', 3, 75, 150, 5.5, 0.15)]),
        (4.0, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 5, 10, 3.9, 0.9), ('svd', 2, 65, 140, 22.5, 0.1)]),
     ], 0.45, {'allocator': 'uniform', 'target': 'flops'},
     [('dense', None), ('svd', 1), ('svd', 1)], 160.0),
    ([
        (0.5, [('dense', None, 200, 400, 10.0, 0.0), ('tucker', 1, 70, 140, 2.5, 0.55),
                ('tucker', 2, 125, 260, 5.1, 0.2), ('svd', 1, 70, 150, 3.6, 0.3)]),
        (4.0, [('dense', None, 60, 120, 10.0, 0.0), ('tucker', 1, 15, 40, 3.4, 0.35),
                ('tucker', 2, 20, 40, 3.4, 0.3), ('tucker', 3, 25, 60, 3.7, 0.2), ('svd', 1, 20, 40, 5.3, 0.65),
                ('svd', 2, 50, 110, 13.8, 0.55), ('svd', 3, 60, 130, 14.7, 0.45), ('svd', 4, 70, 140, 10.2, 0.1)]),
     ], 0.4, {'allocator': 'energy', 'target': 'params', 'methods': ['svd']},
     [('svd', 1), ('svd', 1)], 90.0),
    ([
        (1.0, [('dense', None, 200, 400, 20.0, 0.0), ('svd', 1, 75, 160, 5.9, 0.7),
                ('svd', 2, 105, 220, 13.2, 0.35), ('svd', 3, 140, 280, 12.4, 0.2)]),
     ], 0.7, {'allocator': 'knapsack', 'target': 'latency', 'latency_cap': 0.6},
     [('svd', 1)], 5.9),
    ([
        (0.5, [('dense', None, 100, 200, 10.0, 0.0), ('svd', 1, 5, 10, 3.1, 0.8), ('svd', 2, 10, 20, 5.2, 0.35),
                ('svd', 3, 15, 40, 4.1, 0.2), ('svd', 4, 85, 170, 3.7, 0.15)]),
        (4.0, [('dense', None, 200, 400, 20.0, 0.0), ('tucker', 1, 55, 120, 6.6, 0.55),
                ('tucker', 2, 100, 210, 4.8, 0.2), ('tucker', 3, 120, 240, 14.2, 0.1),
                ('svd', 1, 20, 40, 7.6, 0.7), ('svd', 2, 25, 50, 4.4, 0.35), ('svd', 3, 35, 80, 7.4, 0.25),
                ('svd', 4, 40, 90, 7.6, 0.1)]),
     ], 1.0, {'allocator': 'balanced', 'target': 'latency'},
     [('dense', None), ('dense', None)], 30.0),
    ([
        (2.0, [('dense', None, 100, 200, 20.0, 0.0), ('tucker', 1, 20, 50, 2.7, 0.4),
                ('tucker', 2, 60, 120, 7.2, 0.3), ('svd', 1, 5, 10, 8.7, 0.95), ('svd', 2, 90, 190, 24.2, 0.85)]),
        (0.5, [('dense', None, 80, 160, 20.0, 0.0), ('svd', 1, 10, 30, 1.9, 0.85), ('svd', 2, 35, 70, 12.2, 0.6),
                ('svd', 3, 70, 150, 6.1, 0.45), ('svd', 4, 85, 180, 25.8, 0.4)]),
     ], 0.8, {'allocator': 'knapsack', 'target': 'latency'},
     [('dense', None), ('svd', 3)], 26.1),
    ([
        (4.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 20, 50, 4.8, 0.95), ('svd', 2, 80, 170, 16.3, 0.15)]),
        (4.0, [('dense', None, 120, 240, 20.0, 0.0), ('svd', 1, 15, 30, 8.1, 0.9), ('svd', 2, 80, 170, 18.9, 0.8),
                ('svd', 3, 90, 180, 20.2, 0.55), ('svd', 4, 135, 270, 14.4, 0.05)]),
        (0.5, [('dense', None, 80, 160, 20.0, 0.0), ('svd', 1, 15, 40, 12.0, 0.6), ('svd', 2, 95, 190, 29.6, 0.35)]),
     ], 1.0, {'allocator': 'uniform', 'target': 'latency', 'no_slower': True},
     [('dense', None), ('dense', None), ('dense', None)], 50.0),
    ([
        (0.5, [('dense', None, 100, 200, 10.0, 0.0), ('svd', 1, 5, 20, 1.7, 0.85), ('svd', 2, 20, 40, 2.1, 0.4)]),
        (0.5, [('dense', None, 120, 240, 10.0, 0.0), ('tucker', 1, 75, 150, 5.0, 0.25),
                ('svd', 1, 30, 60, 5.0, 0.85), ('svd', 2, 120, 240, 12.6, 0.15)]),
        (2.0, [('dense', None, 120, 240, 10.0, 0.0), ('tucker', 1, 25, 50, 2.9, 0.95),
                ('tucker', 2, 100, 210, 9.8, 0.85), ('tucker', 3, 110, 220, 11.3, 0.05),
                ('svd', 1, 30, 70, 1.7, 0.85), ('svd', 2, 55, 120, 2.9, 0.6), ('svd', 3, 125, 250, 16.0, 0.4)]),
     ], 0.6, {'allocator': 'balanced', 'target': 'flops'},
     [('svd', 2), ('svd', 1), ('dense', None)], 340.0),
    ([
        (2.0, [('dense', None, 120, 240, 10.0, 0.0), ('svd', 1, 5, 20, 3.6, 0.85), ('svd', 2, 75, 150, 10.3, 0.7),
                ('svd', 3, 80, 160, 2.3, 0.55), ('svd', 4, 100, 200, 4.3, 0.3)]),
        (2.0, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 5, 10, 3.3, 0.85), ('svd', 2, 30, 60, 10.1, 0.75),
                ('svd', 3, 45, 100, 21.0, 0.7), ('svd', 4, 55, 120, 21.9, 0.55)]),
     ], 0.7, {'allocator': 'knapsack', 'target': 'params', 'no_slower': True, 'latency_cap': 0.7},
     [('dense', None), ('svd', 1)], 125.0),
    ([
        (0.5, [('dense', None, 100, 200, 20.0, 0.0), ('svd', 1, 15, 40, 8.6, 0.9), ('svd', 2, 30, 60, 13.1, 0.6),
                ('svd', 3, 105, 220, 20.6, 0.1), ('svd', 4, 110, 220, 28.9, 0.05)]),
        (2.0, [('dense', None, 80, 160, 20.0, 0.0), ('svd', 1, 20, 50, 5.6, 0.85), ('svd', 2, 55, 110, 13.1, 0.8),
                ('svd', 3, 60, 130, 23.3, 0.35)]),
        (4.0, [('dense', None, 120, 240, 20.0, 0.0), ('svd', 1, 35, 80, 4.9, 0.8), ('svd', 2, 60, 120, 5.4, 0.55),
                ('svd', 3, 85, 170, 21.4, 0.2)]),
     ], 0.9, {'allocator': 'knapsack', 'target': 'params', 'methods': ['svd'], 'latency_cap': 0.8},
     [('dense', None), ('dense', None), ('svd', 2)], 240.0),
    ([
        (0.5, [('dense', None, 120, 240, 10.0, 0.0), ('svd', 1, 45, 90, 4.0, 0.65), ('svd', 2, 95, 200, 5.5, 0.6),
                ('svd', 3, 100, 210, 5.9, 0.15), ('svd', 4, 130, 270, 5.2, 0.05)]),
        (1.0, [('dense', None, 60, 120, 10.0, 0.0), ('svd', 1, 15, 40, 1.4, 0.95), ('svd', 2, 25, 50, 2.4, 0.4)]),
     ], 0.9, {'allocator': 'uniform', 'target': 'params', 'methods': ['tucker', 'svd']},
     [('svd', 3), ('dense', None)], 160.0),
    ([
        (1.0, [('dense', None, 60, 120, 20.0, 0.0), ('tucker', 1, 5, 20, 9.4, 0.75),
                ('tucker', 2, 10, 30, 11.6, 0.55), ('tucker', 3, 15, 30, 5.1, 0.3),
                ('tucker', 4, 20, 40, 14.4, 0.25), ('svd', 1, 5, 20, 9.6, 0.95), ('svd', 2, 15, 30, 9.9, 0.3),
                ('svd', 3, 40, 90, 10.1, 0.2)]),
        (0.5, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 5, 20, 9.6, 0.65), ('svd', 2, 20, 40, 12.9, 0.2),
                ('svd', 3, 30, 70, 4.2, 0.15)]),
        (0.5, [('dense', None, 100, 200, 20.0, 0.0), ('tucker', 1, 115, 240, 7.5, 0.05),
                ('svd', 1, 10, 30, 4.5, 0.7), ('svd', 2, 95, 190, 24.2, 0.05)]),
     ], 0.2, {'allocator': 'knapsack', 'target': 'flops', 'latency_cap': 0.5},
     [('tucker', 3), ('svd', 1), ('svd', 1)], 80.0),
    ([
        (2.0, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 10, 20, 3.0, 0.85), ('svd', 2, 45, 100, 15.2, 0.8),
                ('svd', 3, 50, 100, 19.6, 0.65), ('svd', 4, 60, 120, 8.2, 0.45)]),
        (2.0, [('dense', None, 80, 160, 10.0, 0.0), ('svd', 1, 15, 40, 1.2, 0.55), ('svd', 2, 70, 140, 9.9, 0.4),
                ('svd', 3, 75, 150, 4.1, 0.35), ('svd', 4, 95, 200, 14.5, 0.05)]),
        (2.0, [('dense', None, 60, 120, 20.0, 0.0), ('svd', 1, 10, 30, 3.5, 0.95), ('svd', 2, 30, 60, 15.0, 0.9),
                ('svd', 3, 60, 120, 25.1, 0.8), ('svd', 4, 70, 140, 37.1, 0.25)]),
     ], 0.7, {'allocator': 'knapsack', 'target': 'latency', 'latency_cap': 0.5},
     [('svd', 4), ('dense', None), ('svd', 1)], 21.7),
]


def brute_force_objective(menus, cap, target):
    feasible = [combo for combo in itertools.product(*(m.options for m in menus))
                if sum(c.cost(target) for c in combo) <= cap]
    return min(sum(m.sensitivity * c.error**2 for m, c in zip(menus, combo)) for combo in feasible)


@pytest.mark.parametrize("layers, budget, kwargs, expected, total", SCENARIOS)
def test_random_menus_keep_their_choice(layers, budget, kwargs, expected, total):
    menus = [menu(f"l{i}", rows, s) for i, (s, rows) in enumerate(layers)]
    got = allocate(menus, budget, **kwargs)
    assert picks(got) == expected
    assert got.total == pytest.approx(total)
    target = kwargs.get("target", "params")
    assert got.total <= budget * got.dense_total + 1e-9
    if kwargs.get("latency_cap"):
        dense_lat = sum(m.dense.latency for m in menus)
        assert sum(c.latency for c in got.choices) <= kwargs["latency_cap"] * dense_lat + 1e-9
    elif kwargs["allocator"] == "knapsack" and not kwargs.get("no_slower") and target != "latency":
        assert got.objective == pytest.approx(brute_force_objective(menus, budget * got.dense_total, target))
