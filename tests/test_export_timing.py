"""The export comparison's timing schedule (compression.export.timed_rounds / speed_summary) on a fake clock:
the pass after a switch between variants is not timed, each round gives one figure per variant, and the
speedup is the median of per-round ratios. No real timing here (speed figures live in bench/)."""

import pytest

from tensorfold.compression.export import describe_variant, speed_summary, timed_rounds


class FakeMachine:
    """A clock that advances only when a fake variant runs: ``cost`` seconds, ``switch`` more for the first
    pass after another variant ran, everything ``slow[round]`` times slower in the given rounds."""

    def __init__(self, cost: dict[str, float], switch: float, slow: dict[int, float], n_variants: int):
        self.now, self.last, self.calls = 0.0, None, 0
        self.cost, self.switch, self.slow, self.n = cost, switch, slow, n_variants

    def clock(self) -> float:
        return self.now

    def runner(self, name: str):
        def run():
            per_round = 3 * self.n  # timed_rounds' default: one untimed and two timed passes per variant
            factor = self.slow.get(self.calls // per_round, 1.0)
            self.now += self.cost[name] * factor + (self.switch if self.last not in (None, name) else 0.0)
            self.last = name
            self.calls += 1
        return run


def test_the_pass_after_a_switch_is_not_timed():
    m = FakeMachine({"dense fp32": 0.3, "dense int8": 0.12}, switch=0.05, slow={}, n_variants=2)
    times = timed_rounds({k: m.runner(k) for k in m.cost}, 4, clock=m.clock)
    assert times["dense fp32"] == pytest.approx([0.3] * 4) and times["dense int8"] == pytest.approx([0.12] * 4)
    assert m.calls == 4 * 2 * 3


def test_speedup_is_the_median_of_per_round_ratios_with_their_quartiles():
    # round 1 runs everything twice as slow (load): the ratios stay 2.5, the seconds' quartiles show it
    m = FakeMachine({"dense fp32": 0.3, "dense int8": 0.12}, switch=0.05, slow={1: 2.0}, n_variants=2)
    times = timed_rounds({k: m.runner(k) for k in m.cost}, 5, clock=m.clock)
    assert times["dense int8"] == pytest.approx([0.12, 0.24, 0.12, 0.12, 0.12])
    row = speed_summary(times["dense fp32"], times["dense int8"])
    assert row["speedup"] == pytest.approx(2.5) and row["speedup_q1"] == pytest.approx(2.5)
    assert row["seconds"] == pytest.approx(0.12) and row["seconds_best"] == pytest.approx(0.12)
    assert row["rounds"] == 5


def test_spread_of_uneven_rounds():
    row = speed_summary([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.4, 0.5, 0.25, 0.5])
    assert row["speedup"] == pytest.approx(2.0)
    assert (row["speedup_q1"], row["speedup_q3"]) == pytest.approx((2.0, 2.5))
    assert row["seconds"] == pytest.approx(0.5) and row["seconds_best"] == pytest.approx(0.25)
    line = describe_variant({"variant": "dense int8", "runtime": "onnxruntime", **row, "mean_cos": 0.96,
                             "quality_keys": ["mean_cos"]})
    assert "500.0 ms" in line and "2.00x (2.00-2.50x)" in line and "mean_cos 0.9600" in line
