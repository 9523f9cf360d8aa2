"""Faster plans at the same quality: the ``structured`` method preset (dense options only) and the
knapsack's latency tie-break (``speed_tolerance``), on hand-made menus and on a tiny BERT with a fake clock."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.allocators import allocate
from tensorfold.compression.api import Planner
from tensorfold.compression.candidates import Candidate, LayerMenu
from tensorfold.compression.config import check_methods
from tensorfold.errors import InvalidArgumentError, NotCompressibleError

hf_tiny = pytest.importorskip("hf_tiny")
pytest.importorskip("transformers")

STRUCTURED = {"mlp-select", "qk-select", "vo-svd", "drop"}


def menu(name: str, rows, sensitivity: float = 1.0) -> LayerMenu:
    return LayerMenu(name, None, "", None, [Candidate(*r) for r in rows], sensitivity=sensitivity)


# ---- the allocator: a fake latency table -----------------------------------------------------------------


def ffn_menu(name: str) -> LayerMenu:
    """A pair at half its 100 params: a low-rank factor pair (error .30, 0.9 s) or a smaller dense
    matrix (error .305, 0.5 s); 60 params: the pair at error .2 (1.0 s)."""
    return menu(name, [("dense", None, 100, None, 1.0, 0.0), ("svd", 20, 50, None, 0.9, 0.30),
                       ("mlp-select", 50, 50, None, 0.5, 0.305), ("svd", 24, 60, None, 1.0, 0.20)])


def test_tiebreak_picks_the_faster_of_two_near_equal_errors():
    menus = [ffn_menu("a"), ffn_menu("b")]
    plain = allocate(menus, 0.5)
    assert [(c.method, c.rank) for c in plain.choices] == [("svd", 20), ("svd", 20)]
    assert plain.objective == pytest.approx(2 * 0.30**2)
    fast = allocate(menus, 0.5, speed_tolerance=0.05)  # .305^2 / .30^2 = 1.034: within 5%
    assert [(c.method, c.rank) for c in fast.choices] == [("mlp-select", 50), ("mlp-select", 50)]
    assert fast.objective == pytest.approx(2 * 0.305**2)
    # 2%: only one of the two may switch (objective 1.017 x), the other stays the more accurate pair
    one = allocate(menus, 0.5, speed_tolerance=0.02)
    assert sorted(c.method for c in one.choices) == ["mlp-select", "svd"]
    assert one.objective == pytest.approx(0.30**2 + 0.305**2)


def test_tiebreak_never_trades_more_error_than_the_tolerance():
    # the fast option is 2x the error: no tolerance below (0.6/0.3)^2 - 1 = 3 may take it
    rows = [("dense", None, 100, None, 1.0, 0.0), ("svd", 20, 50, None, 0.9, 0.30),
            ("mlp-select", 50, 50, None, 0.1, 0.6)]
    for tol in (0.0, 0.5, 2.9):
        assert allocate([menu("a", rows)], 0.5, speed_tolerance=tol).choices[0].method == "svd"
    assert allocate([menu("a", rows)], 0.5, speed_tolerance=3.1).choices[0].method == "mlp-select"


def test_tiebreak_needs_every_latency_and_leaves_the_budget_alone():
    rows = [("dense", None, 100, None, None, 0.0), ("svd", 20, 50, None, None, 0.30),
            ("mlp-select", 50, 50, None, None, 0.305)]
    assert allocate([menu("a", rows)], 0.5, speed_tolerance=0.5).choices[0].method == "svd"  # nothing to price
    menus = [ffn_menu("a"), ffn_menu("b")]
    got = allocate(menus, 0.6, speed_tolerance=0.05)
    assert got.total <= 0.6 * 200
    # the slack after the tie-break is spent only where it costs no predicted speed
    assert sum(c.latency for c in got.choices) <= sum(c.latency for c in allocate(menus, 0.6).choices)


def test_speed_tolerance_is_validated():
    assert tf.CompressConfig(speed_tolerance=0).speed_tolerance == 0.0
    # off by default: on MiniLM 5% cost held-out quality (0.8165 -> 0.8103 at 50%) for no measurable speed
    assert tf.CompressConfig().speed_tolerance == 0.0
    with pytest.raises(InvalidArgumentError, match="speed_tolerance"):
        tf.CompressConfig(speed_tolerance=-0.1)


# ---- the structured preset --------------------------------------------------------------------------------


def test_structured_preset_names_the_block_methods():
    assert set(check_methods("structured")) == STRUCTURED
    assert check_methods("svd,structured") == ("svd", "mlp-select", "qk-select", "vo-svd", "drop")
    with pytest.raises(InvalidArgumentError, match="preset: structured"):
        check_methods("structurd")


def test_structured_plan_keeps_only_dense_options():
    model = hf_tiny.bert_encoder(layers=2, hidden=32, inter=64)
    calib = hf_tiny.token_batches(4)
    for budget in (0.3, 0.6):
        p = tf.plan(model, budget, methods="structured", calib=calib, curve=False)
        assert {lp.method for lp in p.layers} <= STRUCTURED | {"dense"}
        assert {lp.method for lp in p.layers} & STRUCTURED
        assert p.fraction <= budget + 1e-9
    small = tf.apply(model, p, calib)
    # every compressed layer is still one smaller nn.Linear: no factor pairs
    from tensorfold.nn import LowRankLayer

    assert not any(isinstance(m, LowRankLayer) for m in small.modules())
    assert sum(m.weight.numel() for m in small.modules() if isinstance(m, nn.Linear)) < sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_structured_without_transformer_blocks_is_not_compressible():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    calib = [torch.randn(64, 16, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(NotCompressibleError):
        tf.plan(model, 0.5, methods="structured", calib=calib)


# ---- the planner: a fake clock where a factor pair pays one more MatMul call ------------------------------

SEC_PER_WEIGHT, PER_CALL = 1e-9, 4e-6


def _fake_time(module) -> float:
    mats = [p for p in module.parameters() if p.ndim >= 2]
    return SEC_PER_WEIGHT * sum(p.numel() for p in mats) + PER_CALL * len(mats)


def test_planner_prices_latency_within_the_tolerance(monkeypatch):

    hf_tiny.use_fake_latency(monkeypatch, _fake_time)
    model = hf_tiny.bert_encoder(layers=2, hidden=32, inter=128)
    calib = hf_tiny.token_batches(4)
    methods = ("svd", "mlp-select", "qk-select", "vo-svd")
    assert not Planner(model, tf.CompressConfig(methods=methods, speed_tolerance=0.0), calib=calib).speed_priced
    default = Planner(model, tf.CompressConfig(budget=0.5, methods=methods), calib=calib)
    assert not default.speed_priced
    assert default.plan(curve=False).objective == pytest.approx(allocate(default.menus, 0.5).objective, rel=1e-12)
    planner = Planner(model, tf.CompressConfig(budget=0.5, methods=methods, speed_tolerance=0.3), calib=calib)
    assert planner.speed_priced  # blocks recognised, calibrated: every option has a predicted latency
    fast = planner.plan(curve=False)
    plain = allocate(planner.menus, 0.5)  # the same menus, the error alone

    def svd_parts(choices):
        return sum(p.method == "svd" for c in choices for p in getattr(c, "parts", (c,)))

    assert fast.fraction <= 0.5 + 1e-9
    assert fast.objective <= 1.3 * plain.objective + 1e-12
    assert sum(lp.latency for lp in fast.layers) < sum(c.latency for c in plain.choices)
    assert svd_parts(plain.choices) > 0 and sum(lp.method == "svd" for lp in fast.layers) < svd_parts(plain.choices)


def test_scaled_latency_model_times_each_layer_once(monkeypatch):
    from tensorfold.compression.candidates import LatencyModel

    calls = []
    monkeypatch.setattr(LatencyModel, "_measure", lambda self, module, shape: calls.append(module) or 8e-3)
    lat = LatencyModel(scaled=True)
    lat.table = None
    assert lat.dense("fc", nn.Linear(64, 32), (4, 64)) == 8e-3
    assert lat.dense("fc", nn.Linear(64, 8), (4, 64)) == pytest.approx(2e-3)  # a quarter of the FLOPs
    assert lat.dense("fc", nn.Linear(16, 32), (4, 16)) == pytest.approx(2e-3)
    assert len(calls) == 1
    assert LatencyModel().dense("fc", nn.Linear(64, 8), (4, 64)) == 8e-3 and len(calls) == 2  # unscaled: measured


def test_speed_records_the_openmp_wait_policy(monkeypatch):
    from tensorfold.compression.evaluate import describe_speed, measure_speedup

    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    speed = measure_speedup(model, model, x, repeats=2, warmup=0)
    assert speed["omp_wait_policy"] == "PASSIVE" and "OMP_WAIT_POLICY=PASSIVE" in describe_speed(speed)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    speed = measure_speedup(model, model, x, repeats=2, warmup=0)
    assert speed["omp_wait_policy"] == "default" and "OMP_WAIT_POLICY" not in describe_speed(speed)
