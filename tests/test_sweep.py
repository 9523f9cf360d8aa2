"""Sweep curves and report files, the sweep CLI, iterative compression, grouped/depthwise convs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tensorfold as tf
from tensorfold.compression.api import compress
from tensorfold.compression.iterative import budget_schedule, densify, iterative_compress
from tensorfold.compression.sweep import FILES, sweep, write_sweep
from tensorfold.errors import InvalidArgumentError
from tensorfold.nn import FactorizedLayer
from tensorfold.zoo.vision import VisionTask, accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_sweep():
    return sweep("digits-cnn", budgets=(0.3, 0.7), allocators=("uniform", "knapsack"), methods=("svd",),
                 calib_samples=128, latency=False, progress=False)


def test_sweep_points_and_monotone_budgets(digits_sweep):
    result = digits_sweep
    assert result.budgets == (0.7, 0.3)
    assert result.dense_metrics["accuracy"] >= 0.95
    for allocator in ("uniform", "knapsack"):
        curve = result.curve(allocator)
        assert [p.budget for p in curve] == [0.7, 0.3]
        assert all(p.fraction <= p.budget + 1e-9 and p.fraction >= p.budget - 0.02 for p in curve)
        assert curve[0].params > curve[1].params  # smaller budget, smaller model
        for p in curve:
            assert p.metrics["accuracy_drop"] == pytest.approx(result.dense_metrics["accuracy"] - p.metrics["accuracy"])
    # the knapsack allocator keeps accuracy where a uniform rank cut collapses at 30%
    knap, uni = result.curve("knapsack")[1], result.curve("uniform")[1]
    assert knap.metrics["accuracy"] >= uni.metrics["accuracy"] + 0.2


def test_write_sweep_files_atomically(digits_sweep, tmp_path):
    out = write_sweep(digits_sweep, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["points"]) == 4 and data["metric"] == "accuracy"
    for name in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "knapsack" in page
    with pytest.raises(InvalidArgumentError):
        write_sweep(digits_sweep, out)  # exists
    write_sweep(digits_sweep, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary leftovers


def test_sweep_points_are_the_plans_of_plan_and_apply(digits_sweep):
    """The sweep plans each budget once for all its allocators: every point is still exactly what
    plan() + apply() give for that budget and allocator on the same calibration batches."""
    from tensorfold import zoo

    entry = zoo.get("digits-cnn")
    original, calib = entry.load(), entry.calibration(128, 0)
    for point in digits_sweep.points:
        config = tf.CompressConfig(budget=point.budget, allocator=point.allocator, methods=("svd",), curve=False,
                                   calib_samples=128)
        small, p = compress(original, config, calib=calib, example_inputs=entry.example_inputs(32))
        assert (point.params, point.fraction) == (p.model_params_after, p.fraction)
        assert point.metrics == entry.evaluate(original, small)
    assert [(p.allocator, p.budget) for p in digits_sweep.points] == [
        ("uniform", 0.7), ("uniform", 0.3), ("knapsack", 0.7), ("knapsack", 0.3)]


def test_sweep_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        sweep("digits-cnn", budgets=(1.5,), progress=False)
    with pytest.raises(InvalidArgumentError):
        sweep("digits-cnn", budgets=(0.5,), allocators=("greedy",), progress=False)
    with pytest.raises(InvalidArgumentError):
        sweep("no-such-model", budgets=(0.5,), progress=False)


def test_sweep_cli_with_finetuning(tmp_path):
    from tensorfold.cli.main import app

    out = tmp_path / "cli"
    args = ["sweep", "--model", "digits-cnn", "--budgets", "0.3", "--allocators", "uniform", "--methods", "svd",
            "--finetune-epochs", "2", "--calib", "128", "--no-latency", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    (point,) = data["points"]
    # uniform rank at 30% collapses; two short epochs of distillation win a good part of it back
    assert point["metrics_finetuned"]["accuracy"] >= point["metrics"]["accuracy"] + 0.1
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output


def test_iterative_compression_meets_the_budget():
    task = VisionTask("digits-cnn")
    model = task.load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = task.finetune_data(64, 0)
    result = iterative_compress(model, 0.25, data=train, val_data=val, steps=2, methods=("svd",),
                                allocator="knapsack", calib=task.calibration(128, 0), lr=3e-3, progress=False,
                                evaluate=lambda m: {"accuracy": accuracy(m, task.splits.test)})
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert result.rounds[0]["budget"] == pytest.approx(0.5)
    assert result.plan.fraction <= 0.25 + 1e-9
    params = sum(p.numel() for p in result.model.parameters())
    assert params == result.plan.model_params_after
    assert result.rounds[-1]["accuracy"] >= 0.9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_densify_is_exact_and_budget_schedule():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6))
    small, _ = compress(model, 0.5, methods=("svd",))
    dense = densify(small)
    assert not any(isinstance(m, FactorizedLayer) for m in dense.modules())
    x = torch.randn(8, 12, generator=g)
    torch.testing.assert_close(dense(x), small(x), rtol=1e-5, atol=1e-5)
    assert budget_schedule(0.2, 1) == [0.2]
    with pytest.raises(InvalidArgumentError):
        budget_schedule(0.2, 0)


def depthwise_model() -> nn.Module:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          nn.ReLU(), nn.Conv2d(32, 32, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_depthwise_conv_is_skipped_with_a_reason_when_nothing_can_be_saved():
    model = depthwise_model()
    p = tf.plan(model, 0.3, methods=("svd",), input_shape=(2, 3, 8, 8), curve=False)
    reasons = dict(p.skipped)
    assert "2" in reasons and "saves nothing" in reasons["2"]
    small = tf.apply(model, p)
    assert isinstance(small[2], nn.Conv2d) and small[2].groups == 32


def test_depthwise_conv_is_factored_per_group_by_the_spatial_scheme():
    model = depthwise_model()
    p = tf.plan(model, 0.7, methods=("spatial",), include=["2"], input_shape=(2, 3, 8, 8), curve=False)
    chosen = {lp.name: lp for lp in p.layers}
    assert chosen["2"].method == "spatial"
    small = tf.apply(model, p)
    layer = small[2]
    assert isinstance(layer, FactorizedLayer) and layer.to_dense().groups == 32
    # weight-only fitting = per-channel Eckart-Young truncation of each 3x3 kernel
    rank = chosen["2"].rank
    kernels = model[2].weight.detach().double().reshape(32, 3, 3)
    u, s, vh = torch.linalg.svd(kernels)
    best = (u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank]
    got = layer.to_dense().weight.detach().double().reshape(32, 3, 3)
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert small(x).shape == model(x).shape
