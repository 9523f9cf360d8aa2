"""Speed-aware planning: the knapsack under a FLOP budget *and* a latency cap, the latency model's
measurements, and plan(..., speedup=) checked against a deterministic fake clock (no timing here)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression import api as api_module
from tensorfold.compression import speed as speed_module
from tensorfold.compression.allocators import allocate, fastest_latency
from tensorfold.compression.candidates import Candidate, LatencyModel, LayerMenu, layer_menu
from tensorfold.compression.speed import skeleton_model
from tensorfold.errors import InvalidArgumentError, NotCompressibleError
from tensorfold.nn import FactorizedLayer, dense_flops


def c(method, rank, flops, latency, error):
    return Candidate(method, rank, flops, flops, latency, error)


def toy_menus():
    """Two layers of 100 FLOPs and 10 ms. 'cp' is cheap in FLOPs and accurate but slow; 'svd' fast."""
    opts = [c("dense", None, 100, 10.0, 0.0), c("cp", 1, 40, 12.0, 0.05), c("svd", 1, 40, 6.0, 0.20),
            c("svd", 2, 60, 8.0, 0.10)]
    return [LayerMenu("a", None, "", None, list(opts)), LayerMenu("b", None, "", None, list(opts))]


def brute_force(menus, flops_cap, lat_cap):
    best = None
    for combo in itertools.product(*[m.options for m in menus]):
        if sum(x.flops for x in combo) <= flops_cap and sum(x.latency for x in combo) <= lat_cap:
            obj = sum(m.sensitivity * x.error**2 for m, x in zip(menus, combo))
            if best is None or obj < best[0]:
                best = (obj, combo)
    return best


def test_latency_cap_changes_the_choice_and_both_caps_hold():
    menus = toy_menus()
    plain = allocate(menus, 0.5, target="flops", allocator="knapsack")
    assert [x.method for x in plain.choices] == ["cp", "cp"]  # accurate, but 24 ms against 20 dense
    assert sum(x.latency for x in plain.choices) == pytest.approx(24.0)
    for cap in (1.0, 0.8, 0.6):
        fast = allocate(menus, 0.5, target="flops", allocator="knapsack", latency_cap=cap)
        assert fast.total <= 0.5 * 200
        assert sum(x.latency for x in fast.choices) <= cap * 20 + 1e-9
        obj, combo = brute_force(menus, 100, cap * 20)
        assert fast.objective == pytest.approx(obj), cap
    # cap 1.0 (20 ms): one layer keeps CP (12 ms), the other takes SVD rank 2 (8 ms)
    one = allocate(menus, 0.5, target="flops", allocator="knapsack", latency_cap=1.0)
    assert sorted((x.method, x.rank) for x in one.choices) == [("cp", 1), ("svd", 2)]
    assert one.objective == pytest.approx(0.05**2 + 0.10**2)
    # cap 0.6 (12 ms): SVD rank 1 in both layers, the only choice that fits
    assert [x.rank for x in allocate(menus, 0.5, target="flops", latency_cap=0.6).choices] == [1, 1]


def test_latency_cap_with_a_looser_flop_budget_upgrades_ranks():
    menus = toy_menus()
    fast = allocate(menus, 0.7, target="flops", allocator="knapsack", latency_cap=0.8)  # 140 FLOPs, 16 ms
    assert [(x.method, x.rank) for x in fast.choices] == [("svd", 2), ("svd", 2)]
    assert fast.objective == pytest.approx(brute_force(menus, 140, 16.0)[0])


def test_unreachable_latency_cap_names_the_fastest():
    menus = toy_menus()
    assert fastest_latency(menus, 0.5, "flops") == pytest.approx(12.0 / 20.0)
    with pytest.raises(NotCompressibleError, match="fastest choice is predicted at 0.600"):
        allocate(menus, 0.5, target="flops", latency_cap=0.5)
    with pytest.raises(InvalidArgumentError, match="knapsack"):
        allocate(menus, 0.5, target="flops", allocator="uniform", latency_cap=0.8)
    with pytest.raises(InvalidArgumentError, match="positive"):
        allocate(menus, 0.5, target="flops", latency_cap=0.0)


def test_latency_model_measures_each_shape_once_and_every_rank(monkeypatch):
    calls = []

    def fake_measure(self, module, input_shape):
        calls.append(type(module).__name__)
        if isinstance(module, FactorizedLayer):  # not linear in FLOPs: odd ranks are slow
            return 1e-3 * (1 + module.rank % 2)
        return 1e-3

    monkeypatch.setattr(LatencyModel, "_measure", fake_measure)
    lm = LatencyModel(probe_seconds=1.0)
    lm.table = None
    convs = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)]
    menus = [layer_menu(f"c{i}", conv, ("svd",), input_shape=(4, 8, 6, 6), latency=lm) for i, conv in enumerate(convs)]
    svd = [o for o in menus[0].options if o.method == "svd"]
    assert len(svd) > 6
    for o in svd:  # measured, not interpolated between six probes
        assert o.latency == pytest.approx(1e-3 * (1 + o.rank % 2))
    assert calls.count("Conv2d") == 2  # once, and its second sample after the factored probes; not per layer
    assert calls.count("SVDConv") == len(svd)  # the second layer of the same shape reuses them
    assert [o.latency for o in menus[1].options] == [o.latency for o in menus[0].options]


def test_skeleton_model_has_the_plans_structure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.randn(2, 3, 8, 8)
    p = tf.plan(model, 0.4, methods=("svd", "tucker", "cp"), example_inputs=x, curve=False)
    fitted = tf.apply(model, p)
    skeleton = skeleton_model(model, p)
    assert [type(m).__name__ for m in skeleton.modules()] == [type(m).__name__ for m in fitted.modules()]
    assert sum(q.numel() for q in skeleton.parameters()) == p.model_params_after
    assert skeleton(x).shape == (2, 10)
    assert all(torch.isfinite(q).all() for q in skeleton.parameters())


# ---- plan(..., speedup=) against a fake clock ---------------------------------------------------------

SECONDS_PER_FLOP = 1e-9
IN_MODEL_SLOWDOWN = 1.5  # factored layers run this much slower inside the model than alone
REST = 2e-4  # the model's time outside its convs


def _flops(module, shape):
    if isinstance(module, FactorizedLayer):
        return module.flops(shape)
    return dense_flops(module, shape)


def fake_layer_times(model, names, sample, *, threads=2, repeats=20, warmup=3):
    shapes = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, i[0].shape))
             for n in names]
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, FactorizedLayer)) and "." not in n]
    seen = {}
    hooks += [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].shape)) for n, m in convs]
    with torch.no_grad():
        model(sample)
    for h in hooks:
        h.remove()

    def t(m, shape):
        base = _flops(m, shape) * SECONDS_PER_FLOP
        return base * (IN_MODEL_SLOWDOWN if isinstance(m, FactorizedLayer) else 1.0)

    per = {n: t(model.get_submodule(n), shapes[n]) for n in names}
    total = REST + sum(t(m, seen[n]) for n, m in convs)
    return total, per


def fake_measure(self, module, input_shape):
    return _flops(module, input_shape) * SECONDS_PER_FLOP  # isolated: no slowdown


def speed_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_speedup_plan_is_checked_and_corrected_inside_the_model(monkeypatch):
    monkeypatch.setattr(speed_module, "layer_times", fake_layer_times)
    monkeypatch.setattr(LatencyModel, "_measure", fake_measure)
    checks = []
    check = speed_module.SpeedCheck.check
    monkeypatch.setattr(speed_module.SpeedCheck, "check", lambda self, *a, **k: checks.append(check(self, *a, **k))
                        or checks[-1])
    model, x = speed_model(), torch.randn(4, 16, 8, 8)
    planner = api_module.Planner(model, tf.CompressConfig(0.6, "flops", ("svd",), speedup=1.5), example_inputs=x)
    total_dense = planner.speed.dense_total
    dense_flops_total = sum(m.dense.flops for m in planner.menus)
    assert total_dense == pytest.approx(REST + dense_flops_total * SECONDS_PER_FLOP)
    assert planner.speed.rest == pytest.approx(REST)
    p = planner.plan(curve=False)
    assert p.fraction <= 0.6
    # measured with the fake clock: dense / compressed, factored layers 1.5x slower than alone
    compressed = REST + sum(lp.flops * SECONDS_PER_FLOP * (IN_MODEL_SLOWDOWN if lp.factored else 1.0)
                            for lp in p.layers)
    assert p.measured_speedup == pytest.approx(total_dense / compressed)
    assert p.measured_speedup >= 1.5
    assert len(checks) >= 2 and checks[0] < 1.5  # the first plan, on isolated timings, fell short
    # the menus now carry the in-model latency of the chosen kind: the prediction matches the clock
    assert p.predicted_speedup == pytest.approx(p.measured_speedup, rel=1e-6)
    assert p.latency_cap == pytest.approx((total_dense / 1.5 - REST) / (dense_flops_total * SECONDS_PER_FLOP))
    assert tf.Plan.from_json(p.to_json()) == p
    # isolated predictions alone would have been optimistic: without the correction the plan misses
    plain = tf.plan(model, 0.6, target="flops", methods=("svd",), example_inputs=x, curve=False)
    slow = REST + sum(lp.flops * SECONDS_PER_FLOP * (IN_MODEL_SLOWDOWN if lp.factored else 1.0) for lp in plain.layers)
    assert total_dense / slow < 1.5


def test_speedup_out_of_reach_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(speed_module, "layer_times", fake_layer_times)
    monkeypatch.setattr(LatencyModel, "_measure", fake_measure)
    model, x = speed_model(), torch.randn(4, 16, 8, 8)
    with pytest.raises(NotCompressibleError):
        tf.plan(model, 0.6, target="flops", methods=("svd",), example_inputs=x, curve=False, speedup=20.0)
    with pytest.raises(InvalidArgumentError, match="speedup"):
        tf.plan(model, 0.6, target="flops", methods=("svd",), example_inputs=x, curve=False, speedup=-1.0)
    with pytest.raises(InvalidArgumentError, match="input shapes"):
        tf.plan(model, 0.6, methods=("svd",), curve=False, speedup=1.3)


def test_svd_input_errors_are_those_of_the_built_layer():
    from tensorfold.nn import SVDConv

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    menu = layer_menu("c", conv, ("svd-input",), input_shape=(2, 16, 8, 8))
    W = conv.weight.detach()
    for o in menu.options[1:]:
        built = SVDConv.from_dense(conv, o.rank, scheme="input")
        assert o.error == pytest.approx(float((built.dense_weight().detach() - W).norm() / W.norm()), rel=1e-4)


def test_cli_speedup_option(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from tensorfold.cli.main import app
    from tensorfold.compression import job

    monkeypatch.setattr(speed_module, "layer_times", fake_layer_times)
    monkeypatch.setattr(LatencyModel, "_measure", fake_measure)
    # the CLI times a speed goal in a fresh process, which the fakes above cannot reach: this test is about
    # the option's plumbing, so the job times in this process, on the fake clock (no real timing in pytest)
    monkeypatch.setattr(job, "job_timer", lambda *args, **kwargs: speed_module.Timer())
    (tmp_path / "tf_speed_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))\n\n"
        "def calibration(n, seed):\n    return [torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["compress", "--model", "tf_speed_models:build", "--budget", "0.6", "--target",
                                 "flops", "--calib", "32", "--methods", "svd", "--speedup", "1.4", "--no-speed",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    totals = json.loads((out / "plan.json").read_text())["totals"]
    assert totals["speedup"] == 1.4 and totals["measured_speedup"] >= 1.4 and totals["flops_fraction"] <= 0.6
    assert "speedup asked 1.4x" in r.output and "fresh process" not in r.output
    r = CliRunner().invoke(app, ["compress", "--model", "tf_speed_models:build", "--calib", "32", "--methods", "svd",
                                 "--speedup", "-2", "--no-speed", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "speedup" in r.output and not (tmp_path / "bad").exists()
