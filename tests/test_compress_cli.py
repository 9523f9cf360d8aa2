"""``tensorfold compress`` end to end on a user model factory, and its bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tensorfold.cli.main import app

FACTORY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 6))


def calibration(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 24, generator=g)]


def finetune_data():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(32, 24, generator=g) for _ in range(4)], [torch.randn(32, 24, generator=g)]
'''


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    (tmp_path / "tf_cli_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tf_cli_models:build"


def run(*args):
    return CliRunner().invoke(app, list(args))


def test_compress_writes_everything(tmp_path, factory):
    out = tmp_path / "run"
    weights = tmp_path / "w.pt"
    import importlib

    model = importlib.import_module("tf_cli_models").build()
    torch.save(model.state_dict(), weights)
    r = run("compress", "--model", factory, "--weights", str(weights), "--budget", "0.4", "--calib", "64",
            "--methods", "svd", "--out", str(out), "--curve", "0.7", "--no-speed")
    assert r.exit_code == 0, r.output
    assert sorted(f.name for f in out.iterdir()) == ["metrics.json", "plan.json", "report.html",
                                                     "weights.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plan_totals"]["params_fraction"] <= 0.4
    assert [c["budget"] for c in metrics["quality_curve"]] == [0.4, 0.7]
    assert metrics["quality_curve"][0]["rel_error"] >= metrics["quality_curve"][1]["rel_error"]
    assert "total" in r.output and "quality" in r.output
    import tensorfold as tf

    again = tf.load_compressed(out, trust_factory=True)  # rebuilt from the factory named in the plan
    x = torch.randn(5, 24)
    assert again(x).shape == (5, 6)
    # existing directory: refused without --overwrite, left as it was
    before = (out / "plan.json").read_text()
    r = run("compress", "--model", factory, "--budget", "0.3", "--calib", "0", "--methods", "svd", "--out", str(out))
    assert r.exit_code == 2 and "exists" in r.output
    assert (out / "plan.json").read_text() == before
    r = run("compress", "--model", factory, "--budget", "0.3", "--calib", "0", "--methods", "svd", "--out", str(out),
            "--overwrite", "--no-speed")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "plan.json").read_text())["budget"] == 0.3


def test_finetune_option_runs_distillation(tmp_path, factory):
    out = tmp_path / "run"
    r = run("compress", "--model", factory, "--budget", "0.3", "--calib", "64", "--methods", "svd", "--out", str(out),
            "--finetune-epochs", "2", "--data", "tf_cli_models:finetune_data", "--no-speed")
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quality"]["rel_error"] < 1.0


def test_finetune_minutes_bound_the_epochs(tmp_path, factory):
    out = tmp_path / "run"
    # 3 epochs of 4 batches end long before 10 minutes (early stopping after 2 epochs without improvement aside)
    r = run("compress", "--model", factory, "--budget", "0.3", "--calib", "64", "--methods", "svd", "--out", str(out),
            "--finetune-epochs", "3", "--finetune-minutes", "10", "--data", "tf_cli_models:finetune_data",
            "--no-speed")
    assert r.exit_code == 0, r.output
    tuning = json.loads((out / "metrics.json").read_text())["finetune"]
    assert tuning["out_of_time"] is False and tuning["steps"] == 4 * len(tuning["epochs"])
    assert 0 < tuning["seconds"] < 600
    # the quality evaluations before and after fine-tuning count as evaluation, not as fine-tuning
    stages = json.loads((out / "metrics.json").read_text())["seconds"]["stages"]
    assert tuning["seconds_evaluating"] > 0 and stages["evaluation"] >= tuning["seconds_evaluating"]
    assert stages["fine-tuning"] >= tuning["seconds"] * 0.99


def test_finetune_precision_reaches_the_fine_tune_and_metrics(tmp_path, factory):
    runs = {}
    for precision in (None, "bfloat16"):
        out = tmp_path / f"run-{precision}"
        extra = [] if precision is None else ["--finetune-precision", precision]
        r = run("compress", "--model", factory, "--budget", "0.3", "--calib", "64", "--methods", "svd", "--out",
                str(out), "--finetune-epochs", "2", "--data", "tf_cli_models:finetune_data", "--no-speed", *extra)
        assert r.exit_code == 0, r.output
        runs[precision] = json.loads((out / "metrics.json").read_text())["finetune"]
    assert runs[None]["precision"] == "float32" and runs["bfloat16"]["precision"] == "bfloat16"
    assert runs[None]["notes"] == [] and runs["bfloat16"]["notes"] == []
    assert runs[None]["steps"] == runs["bfloat16"]["steps"] == 8  # 2 epochs of 4 batches
    # the same seeded steps in another arithmetic: near, not equal, training losses
    losses = [[e["train_loss"] for e in runs[k]["epochs"]] for k in (None, "bfloat16")]
    assert losses[0] != losses[1] and losses[1] == pytest.approx(losses[0], rel=0.05)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "budget"),
        (["--budget", "1.5"], "budget"),
        (["--methods", "svd,magic"], "unknown method"),
        (["--include", "encoder.*"], "match no"),
        (["--allocator", "greedy"], "allocator"),
        (["--target", "speed"], "target"),
        (["--model", "nosuchmodel"], "neither a built-in"),
        (["--model", "tf_cli_models:missing"], "no attribute"),
        (["--weights", "nofile.pt"], "no such weights file"),
        (["--data", "builtin"], "--finetune-epochs"),
        (["--finetune-epochs", "1"], "data"),
        (["--finetune-minutes", "-1"], "--finetune-minutes must be >= 0"),
        (["--finetune-minutes", "2"], "data"),
        (["--finetune-epochs", "1", "--finetune-precision", "bf16"], "--finetune-precision must be one of"),
        (["--finetune-precision", "bfloat16"], "--finetune-precision is only used with"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, factory, args, message):
    out = tmp_path / "run"
    base = ["compress", "--model", factory, "--calib", "32", "--methods", "svd", "--out", str(out), "--no-speed"]
    r = run(*base, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tf_cli_models.py"]
