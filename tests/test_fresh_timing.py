"""One fresh timing process for everything the ``tensorfold`` command times (compression/fresh_speed.py
FreshTimer): the sweep's speedups and a speed budget's planning (layer probes, whole-plan checks), not only
the compress speed line. No timing is asserted: a fake child with a fake clock shows the fresh path is taken
and its figures are the ones reported; a real child shows the plumbing (same models, same layers); a child
that fails hands over to this process and the records and output say so."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tensorfold as tf
import tensorfold.nn
from tensorfold.compression import fresh_speed, speed
from tensorfold.compression.fresh_speed import FreshProcessError, FreshTimer, _rebuild_layer, _recipe
from tensorfold.compression.job import JobOptions, ModelSource, run_job
from tensorfold.compression.speed import Timer, describe_timing
from tensorfold.errors import FileFormatError
from tensorfold.nn import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 8))


def calibration(n, seed):
    return [torch.randn(n, 48, generator=torch.Generator().manual_seed(seed))]
'''
LAYERS = ["0", "2", "4"]


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    (tmp_path / "tf_fresh_timing_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return "tf_fresh_timing_models:build", importlib.import_module("tf_fresh_timing_models").build


# ---- a fake clock: a layer call costs 2 us plus 1 ns per weight; the rest of the model 10 us ------------------


def seconds_of(module: nn.Module) -> float:
    return 2e-6 + 1e-9 * sum(p.numel() for p in module.parameters())


REST = 1e-5


class FakeChild:
    """Answers FreshTimer's requests as the child would, from the fake clock (no process, no timing)."""

    def __init__(self, pair_answer: dict | None = None):
        self.ops: list[str] = []
        self.pair_answer = pair_answer or {}

    def __call__(self, timer: FreshTimer, op: str, **kw) -> dict:
        self.ops.append(op)
        if op == "check":  # the child's output norm: this model's, as a child that rebuilt it right
            return {"norm": fresh_speed._output_norm(timer.original, fresh_speed._load_input(timer._dir / kw["input"]))}
        if op == "latency":
            return {"seconds": seconds_of(_rebuild_layer(kw["layer"]))}
        if op == "layer_times":
            model = timer.original
            if kw["plan"] is not None:
                model = speed.skeleton_model(model, tf.Plan.load(timer._dir / kw["plan"]))
            per = {name: seconds_of(model.get_submodule(name)) for name in kw["names"]}
            total = REST + sum(seconds_of(model.get_submodule(n)) for n in LAYERS)
            return {"total": total, "per": per}
        if op == "pair":
            return {**self.pair_answer, "check_rel_error": 0.0, "threads": kw["threads"], "repeats": kw["repeats"]}
        raise AssertionError(op)


def no_timing_here(monkeypatch):
    """Any timing in this process fails the test: the fresh path must answer everything."""
    def boom(*a, **k):
        raise AssertionError("timed in this process")

    monkeypatch.setattr(speed, "layer_times", boom)
    monkeypatch.setattr(tensorfold.nn, "measure_latency", boom, raising=False)
    monkeypatch.setattr(speed.Timer, "pair", boom)
    # and no shipped latency table: every layer probe is a request
    monkeypatch.setattr(tensorfold.nn.LatencyTable, "load", classmethod(lambda cls, path=None: (_ for _ in ()).throw(
        FileFormatError("no table in this test"))))


def predicted_model_seconds(model: nn.Module) -> float:
    return REST + sum(seconds_of(model.get_submodule(n)) for n in LAYERS)


def test_a_speed_budget_is_planned_with_the_fresh_processs_timings(factory, monkeypatch):
    spec, build = factory
    original = build()
    child = FakeChild()
    monkeypatch.setattr(FreshTimer, "_ask", lambda timer, op, **kw: child(timer, op, **kw))
    no_timing_here(monkeypatch)
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    with FreshTimer(spec, original) as timer:
        plan = tf.plan(original, 0.9, calib=[x], methods="svd", speedup=1.2, curve=False)
    assert timer.record() == {"process": "fresh", "omp_wait_policy": "default"}
    assert {"check", "latency", "layer_times"} <= set(child.ops) and child.ops[0] == "latency"
    # the plan's measured speedup is the fake clock's, for exactly the plan chosen
    skeleton = speed.skeleton_model(original, plan)
    assert any(lp.factored for lp in plan.layers) and plan.measured_speedup == pytest.approx(
        predicted_model_seconds(original) / predicted_model_seconds(skeleton), rel=1e-9)
    assert plan.measured_speedup >= 1.2
    assert plan.model_latency == pytest.approx(predicted_model_seconds(original), rel=1e-9)


def test_the_job_records_where_its_speed_budget_and_speed_line_were_timed(factory, monkeypatch):
    spec, build = factory
    answer = {"seconds_original": 0.010, "seconds_compressed": 0.004, "speedup": 2.5, "speedup_q1": 2.4,
              "speedup_q3": 2.6, "noisy": False, "process": "fresh", "omp_wait_policy": "default"}
    child = FakeChild(answer)
    monkeypatch.setattr(FreshTimer, "_ask", lambda timer, op, **kw: child(timer, op, **kw))
    monkeypatch.setattr(fresh_speed, "output_fidelity", lambda a, b, batches: {"rel_error": 0.0})
    no_timing_here(monkeypatch)
    source = ModelSource(spec, build(), None, lambda n, seed: [torch.randn(n, 48, generator=torch.Generator()
                                                                           .manual_seed(seed))])
    result = run_job(source, tf.CompressConfig(0.9, methods="svd", calib_samples=32, speedup=1.2),
                     JobOptions(speed_in="fresh", threads=1))
    assert result.metrics["plan_timing"] == {"process": "fresh", "omp_wait_policy": "default"}
    speed_record = result.metrics["speed"]
    assert (speed_record["speedup"], speed_record["seconds_compressed"], speed_record["process"]) == (2.5, 0.004,
                                                                                                     "fresh")
    assert child.ops.count("pair") == 1 and "layer_times" in child.ops


def test_the_sweep_reports_the_fresh_processs_figures(monkeypatch, tmp_path):
    from tensorfold.compression.sweep import sweep, write_sweep

    pairs = iter([  # the dense reference (the model against itself), then the one point
        {"seconds_original": 0.020, "seconds_compressed": 0.020, "speedup": 1.0, "speedup_q1": 0.99,
         "speedup_q3": 1.01, "noisy": False, "process": "fresh"},
        {"seconds_original": 0.021, "seconds_compressed": 0.007, "speedup": 3.0, "speedup_q1": 2.9,
         "speedup_q3": 3.1, "noisy": False, "process": "fresh"},
    ])

    def ask(timer, op, **kw):
        if op == "check":
            return {"norm": fresh_speed._output_norm(timer.original, fresh_speed._load_input(timer._dir / kw["input"]))}
        assert op == "pair"
        return {**next(pairs), "check_rel_error": 0.0}

    monkeypatch.setattr(FreshTimer, "_ask", ask)
    monkeypatch.setattr(fresh_speed, "output_fidelity", lambda a, b, batches: {"rel_error": 0.0})
    no_timing_here(monkeypatch)
    result = sweep("digits-cnn", budgets=(0.5,), allocators=("uniform",), methods=("svd",), calib_samples=64,
                   progress=False, speed_in="fresh", speed_wait_policy="active")
    (point,) = result.points
    assert result.timing == {"process": "fresh", "omp_wait_policy": "ACTIVE"}
    assert result.dense_latency == 0.020 and result.dense_latency_spread == pytest.approx((0.0198, 0.0202))
    assert (point.speedup, point.latency, point.dense_latency, point.ratio_spread, point.timed_in) == (
        3.0, 0.007, 0.021, (2.9, 3.1), "fresh")
    assert not point.noisy  # 0.021 is within 25% of the reference
    out = write_sweep(result, tmp_path / "sweep")
    data = json.loads((out / "sweep.json").read_text())
    assert data["timing"]["process"] == "fresh" and data["points"][0]["timed_in"] == "fresh"
    assert "fresh process with the ACTIVE OpenMP wait policy" in (out / "index.html").read_text()


def test_a_failing_fresh_process_hands_over_to_this_one_and_says_why(monkeypatch):
    from tensorfold.compression.sweep import sweep

    def ask(timer, op, **kw):
        raise FreshProcessError("the speed process failed (exit 1): no such model")

    monkeypatch.setattr(FreshTimer, "_ask", ask)
    said = []
    result = sweep("digits-cnn", budgets=(0.5,), allocators=("uniform",), methods=("svd",), calib_samples=64,
                   progress=said.append, speed_in="fresh")
    (point,) = result.points
    assert result.timing["process"] == "this" and "no such model" in result.timing["fresh_error"]
    assert point.timed_in == "this" and point.speedup > 0
    assert any("timed in this process instead" in m for m in said)
    line = describe_timing(result.timing)
    assert line.startswith("timed in this process") and "the fresh process failed" in line


def test_without_fallback_the_failure_is_an_error(factory):
    spec, build = factory
    with FreshTimer(spec, build(), fallback=False) as timer, pytest.raises(FreshProcessError, match="did not rebuild"):
        timer.layer_times(build(), None, [], torch.zeros(2, 48))  # another instance than the one given


def test_a_real_child_times_the_same_layers_and_plans(factory, monkeypatch):
    spec, build = factory
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the command's own setting
    original = build()
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    plan = tf.plan(original, 0.5, calib=[x], methods="svd", curve=False)
    layer = LowRankLinear.empty(tensorfold.nn.base.DenseSpec(96, 96, True), 7)
    with FreshTimer(spec, original, fallback=False) as timer:
        total, per = timer.layer_times(original, plan, LAYERS, x, threads=1, repeats=2, warmup=1)
        dense_total, _ = timer.layer_times(original, None, [], x, threads=1, repeats=2, warmup=1)
        alone = timer.latency(layer, (16, 96), threads=1, repeats=2, warmup=1)
        assert timer.requests == 4  # one check of the input, three timings: one process for all
        assert timer.record() == {"process": "fresh", "omp_wait_policy": "default"}
    assert sorted(per) == LAYERS and all(t > 0 for t in per.values()) and total > 0 and dense_total > 0
    assert alone > 0
    assert timer._proc is None and timer._tmp is None  # ended and cleaned up


def test_layer_recipes_rebuild_the_same_structure():
    dense = nn.Linear(24, 40, bias=False, dtype=torch.float64)
    back = _rebuild_layer(json.loads(json.dumps(_recipe(dense))))
    assert type(back) is nn.Linear and back.weight.shape == (40, 24) and back.bias is None
    assert back.weight.dtype == torch.float64
    conv = tf.nn.layer_kind("TuckerConv").empty(tensorfold.nn.base.DenseSpec.of(nn.Conv2d(8, 16, 3, padding=1)),
                                                (4, 6))
    again = _rebuild_layer(json.loads(json.dumps(_recipe(conv))))
    assert type(again) is type(conv) and again.rank == conv.rank
    assert [p.shape for p in again.parameters()] == [p.shape for p in conv.parameters()]
    with pytest.raises(FreshProcessError, match="cannot be described"):
        _recipe(nn.LSTM(4, 4))


def test_the_active_timer_is_the_innermost_with_block():
    outer, inner = Timer(), Timer()
    assert type(Timer.active()) is Timer and Timer.active() is not outer
    with outer:
        assert Timer.active() is outer
        with inner:
            assert Timer.active() is inner
        assert Timer.active() is outer
    assert Timer.active() is not outer


def test_the_sweep_command_says_where_it_timed(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tensorfold.cli
    from tensorfold.cli.main import app

    monkeypatch.setattr(tensorfold.cli, "USER_OMP_WAIT_POLICY", None)
    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["sweep", "--model", "digits-cnn", "--budgets", "0.5", "--allocators", "uniform",
                                 "--methods", "svd", "--calib", "64", "--threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "latencies timed in a fresh process with the default OpenMP wait policy" in " ".join(r.output.split())
    data = json.loads((out / "sweep.json").read_text())
    assert data["timing"] == {"process": "fresh", "omp_wait_policy": "default"}
    assert data["points"][0]["timed_in"] == "fresh"


def test_the_snapshot_keeps_the_state_from_before_planning(factory):
    """Planning measures on the user's model and puts each change back; the child must rebuild the state
    from before, whenever its first request comes."""
    from safetensors.torch import load_file

    spec, build = factory
    original = build()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    with FreshTimer(spec, original).snapshot() as timer:
        with torch.no_grad():
            original[0].weight.add_(1.0)  # a change in progress when the first request comes
        timer.snapshot()  # later calls keep the first state
        saved = load_file(str(timer._dir / fresh_speed.ORIGINAL_FILE))
    assert sorted(saved) == sorted(before) and all(torch.equal(saved[k], before[k]) for k in before)
