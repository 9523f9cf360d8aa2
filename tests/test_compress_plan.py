"""Planning and applying compressions on small models: budgets, allocators, plans, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.allocators import allocate
from tensorfold.compression.api import Planner
from tensorfold.errors import InvalidArgumentError, NotCompressibleError, ShapeError
from tensorfold.nn import FactorizedLayer


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 10))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def batches(shape, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("allocator", ["uniform", "energy", "balanced", "knapsack"])
def test_budget_met_on_mlp(budget, allocator):
    model = mlp()
    p = tf.plan(model, budget, methods=("svd",), allocator=allocator, curve=False)
    assert p.fraction <= budget + 1e-12
    assert p.fraction >= 0.98 * budget, (allocator, p.fraction)
    assert p.model_fraction < 1.0
    small = tf.apply(model, p)
    assert sum(q.numel() for q in small.parameters()) == p.model_params_after


@pytest.mark.parametrize("target", ["params", "flops"])
def test_budget_met_on_cnn_with_calibration(target):
    model = cnn()
    calib = batches((8, 3, 16, 16))
    methods = ("svd", "tucker") if target == "params" else ("svd", "spatial")
    p = tf.plan(model, 0.5, target=target, methods=methods, calib=calib, curve=False)
    assert 0.98 * 0.5 <= p.fraction <= 0.5
    small = tf.apply(model, p, calib)
    x = calib[0]
    assert small(x).shape == (8, 10)
    methods = {lp.method for lp in p.layers}
    assert methods - {"dense"}, "something must be factored"
    for lp in p.layers:
        layer = small.get_submodule(lp.name)
        assert isinstance(layer, FactorizedLayer) == lp.factored


def test_budget_one_gives_the_original_model():
    model, x = mlp(), batches((16, 48))[0]
    for allocator in ("uniform", "energy", "balanced", "knapsack"):
        p = tf.plan(model, 1.0, methods=("svd",), allocator=allocator, curve=False)
        assert all(not lp.factored for lp in p.layers)
        small = tf.apply(model, p)
        torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)
    conv = cnn()
    xc = batches((2, 3, 16, 16))[0]
    small, p = tf.compress(conv, 1.0, methods=("svd", "tucker"), calib=[xc])
    torch.testing.assert_close(small(xc), conv(xc), rtol=1e-6, atol=1e-6)


def test_input_model_is_never_modified():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    small, _ = tf.compress(model, 0.4, methods=("svd",), calib=batches((16, 48)))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, FactorizedLayer) for m in model.modules())
    assert any(isinstance(m, FactorizedLayer) for m in small.modules())


def test_allocator_objectives_are_ordered():
    model = mlp(3)
    calib = batches((32, 48), seed=5)
    planner = Planner(model, tf.CompressConfig(0.4, methods=("svd",)), calib=calib)
    objective = {a: planner.plan(0.4, a, curve=False).objective for a in ("uniform", "energy", "balanced", "knapsack")}
    # the knapsack minimises exactly this objective (up to its cost grid): it cannot be beaten
    assert objective["knapsack"] <= objective["uniform"] + 1e-12
    assert objective["knapsack"] <= objective["energy"] + 1e-12
    assert objective["knapsack"] <= objective["balanced"] + 1e-12
    # and it is strictly better than a uniform rank fraction on this model
    assert objective["knapsack"] < objective["uniform"]


def test_balanced_minimises_the_worst_weighted_error():
    model = mlp(4)
    planner = Planner(model, tf.CompressConfig(0.4, methods=("svd",)))
    worst = {}
    for a in ("uniform", "balanced"):
        p = planner.plan(0.4, a, curve=False)
        worst[a] = max(lp.error for lp in p.layers)
    assert worst["balanced"] <= worst["uniform"] + 1e-12


def test_knapsack_matches_brute_force_on_a_tiny_menu():
    from itertools import product

    from tensorfold.compression.candidates import Candidate, LayerMenu

    g = torch.Generator().manual_seed(0)
    menus = []
    for i in range(4):
        opts = [Candidate("dense", None, 100, None, None, 0.0)]
        for r in range(1, 5):
            opts.append(Candidate("svd", r, 20 * r, None, None, float(torch.rand(1, generator=g)) / r))
        menus.append(LayerMenu(f"l{i}", None, "", None, opts, sensitivity=1.0 + i))
    got = allocate(menus, 0.45, allocator="knapsack")
    best = min(
        (sum(m.sensitivity * c.error**2 for m, c in zip(menus, combo)), combo)
        for combo in product(*(m.options for m in menus))
        if sum(c.params for c in combo) <= 0.45 * 400
    )
    assert got.objective == pytest.approx(best[0], rel=1e-9)


def test_plan_json_roundtrip_and_table(tmp_path):
    model = cnn()
    p = tf.plan(model, 0.5, methods=("svd", "tucker"), calib=batches((4, 3, 16, 16)), curve=True)
    again = tf.Plan.from_json(p.to_json())
    assert again == p
    path = tmp_path / "plan.json"
    p.save(path)
    assert tf.Plan.load(path) == p
    record = json.loads(path.read_text())
    assert record["totals"]["params_fraction"] == pytest.approx(p.params / p.dense_params)
    assert record["totals"]["model_fraction"] == pytest.approx(p.model_fraction)
    text = str(p)
    assert all(lp.name in text for lp in p.layers)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(p.table())
    assert "total" in console.export_text()
    assert [b for b, _ in p.curve] == sorted(b for b, _ in p.curve)
    objectives = [o for _, o in p.curve]
    assert objectives[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b - 1e-12 for a, b in zip(objectives, objectives[1:]))


def test_skipped_layers_have_reasons():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1), nn.Linear(1, 4))
    p = tf.plan(model, 0.5, methods=("svd",), curve=False)
    reasons = dict(p.skipped)
    assert "saves nothing" in reasons["2"] and "saves nothing" in reasons["3"]
    assert [lp.name for lp in p.layers] == ["0"]
    p2 = tf.plan(cnn(), 0.5, methods=("svd",), exclude=["8"], curve=False)
    assert dict(p2.skipped)["8"] == "excluded by pattern"


def test_cp_candidates_on_a_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    with torch.no_grad():  # kernels of CP rank 3: a CP layer can hold them almost exactly
        for conv in (model[0], model[2]):
            o, i, kh, kw = conv.weight.shape
            factors = [torch.randn(n, 3) for n in (o, i, kh, kw)]
            conv.weight.copy_(torch.einsum("ar,br,cr,dr->abcd", *factors))
    p = tf.plan(model, 0.3, methods=("cp",), input_shape=(1, 4, 8, 8), curve=False)
    assert p.fraction <= 0.3
    assert all(lp.method == "cp" for lp in p.layers)
    small = tf.apply(model, p)
    for lp in p.layers:  # the predicted (measured) error is what the applied layer has, give or take ALS runs
        layer, dense = small.get_submodule(lp.name), model.get_submodule(lp.name)
        with torch.no_grad():
            actual = float((layer.dense_weight() - dense.weight).norm() / dense.weight.norm())
        assert actual <= lp.error + 0.05
        assert lp.error < 0.1
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        rel = float((small(x) - model(x)).norm() / model(x).norm())
    assert rel < 0.2


def test_latency_target_never_picks_a_slower_layer():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    p = tf.plan(model, 0.7, target="latency", methods=("svd",), input_shape=(32, 256), curve=False)
    for lp in p.layers:
        assert lp.latency is not None and lp.dense_latency is not None
        if lp.factored:
            assert lp.latency < lp.dense_latency
    assert p.latency <= 0.7 * p.dense_latency + 1e-12


def test_calib_batch_kinds_tuple_and_dict():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 32)
            self.b = nn.Linear(32, 8)

        def forward(self, x, scale=1.0):
            return self.b(torch.relu(self.a(x))) * scale

    model = KW()
    x = batches((8, 16))[0]
    for calib in ([(x, torch.zeros(8))], [{"x": x, "scale": 2.0}]):
        small, p = tf.compress(model, 0.5, methods=("svd",), calib=calib)
        assert p.calibrated and small(x).shape == (8, 8)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_budget(budget):
    with pytest.raises(InvalidArgumentError, match="budget"):
        tf.plan(mlp(), budget)


def test_bad_methods_allocator_target():
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        tf.plan(mlp(), 0.5, methods=("svd", "magic"))
    with pytest.raises(InvalidArgumentError, match="allocator"):
        tf.plan(mlp(), 0.5, allocator="greedy")
    with pytest.raises(InvalidArgumentError, match="target"):
        tf.plan(mlp(), 0.5, target="energy")
    with pytest.raises(InvalidArgumentError, match="input shape"):
        tf.plan(mlp(), 0.5, target="flops")


def test_no_compressible_layer_and_unmatched_include():
    with pytest.raises(NotCompressibleError):
        tf.plan(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5)
    with pytest.raises(NotCompressibleError):
        tf.plan(nn.Sequential(nn.Linear(4, 1)), 0.5)
    with pytest.raises(InvalidArgumentError, match="match no"):
        tf.plan(mlp(), 0.5, include=["encoder.*"])
    with pytest.raises(InvalidArgumentError):
        tf.plan(torch.zeros(3), 0.5)


def test_wrong_calibration_batches():
    with pytest.raises(ShapeError, match="calib batch 0"):
        tf.plan(mlp(), 0.5, calib=[torch.randn(4, 47)])
    with pytest.raises(InvalidArgumentError):
        tf.plan(mlp(), 0.5, calib=[])
    with pytest.raises(InvalidArgumentError):
        tf.plan(mlp(), 0.5, calib=["text"])
    p = tf.plan(mlp(), 0.5, methods=("svd",), curve=False)
    with pytest.raises(ShapeError):
        tf.apply(mlp(), p, calib=[torch.randn(4, 3)])
    with pytest.raises(ShapeError, match="plan's layer"):
        tf.apply(nn.Sequential(nn.Linear(48, 96)), p)


def test_unreachable_budget_is_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(NotCompressibleError, match="cannot be met"):
        tf.plan(model, 0.05, methods=("svd",))


def test_no_slower_guard_with_a_flops_target():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    p = tf.plan(model, 0.6, target="flops", methods=("svd",), input_shape=(32, 256), curve=False, no_slower=True)
    assert p.fraction <= 0.6
    for lp in p.layers:
        assert lp.latency is not None and lp.dense_latency is not None
        if lp.factored:
            assert lp.latency < lp.dense_latency
    with pytest.raises(tf.InvalidArgumentError, match="input shapes"):
        tf.plan(model, 0.6, methods=("svd",), curve=False, no_slower=True)
