"""compression.fresh_speed: the speed of a compressed model timed in a fresh process (the ``tensorfold``
command's speed line). Plumbing only, no timing assertions: the child rebuilds the same two models (its
output error between them equals ours), runs with the wait policy asked for (not the parent's), and a
child that cannot rebuild the models is a clear FreshProcessError that run_job turns into an in-process
measurement saying why."""

from __future__ import annotations

import os

import pytest
import torch

import tensorfold as tf
from tensorfold.compression.fresh_speed import FreshProcessError, measure_in_fresh_process
from tensorfold.compression.job import JobOptions, ModelSource, run_job
from tensorfold.errors import InvalidArgumentError

FACTORY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(3)
    hidden = nn.Sequential(nn.Linear(48, 48), nn.GELU())
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), hidden, nn.Linear(48, 5))


def calibration(n, seed):
    return [torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))]
'''


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    (tmp_path / "tf_fresh_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))  # not in PYTHONPATH: the child must still import it
    import importlib

    return "tf_fresh_models:build", importlib.import_module("tf_fresh_models").build


def compressed_pair(build):
    original = build()
    with torch.no_grad():  # weights the factory does not make: the child must take ours, not rebuild them
        for p in original.parameters():
            p.mul_(1.5)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    plan = tf.plan(original, 0.5, calib=[x], methods="svd")
    return original, tf.apply(original, plan, [x]), plan, x


def test_child_rebuilds_both_models_and_uses_the_asked_wait_policy(factory, monkeypatch):
    spec, build = factory
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the parent's setting, as in the tensorfold command
    original, compressed, plan, x = compressed_pair(build)
    record = measure_in_fresh_process(spec, original, compressed, plan, x, threads=1, repeats=2)
    assert record["process"] == "fresh" and record["omp_wait_policy"] == "default"
    mine = tf.compression.evaluate.output_fidelity(original, compressed, [x])["rel_error"]
    assert mine > 0.01 and record["check_rel_error"] == pytest.approx(mine, rel=1e-5)
    assert record["repeats"] == 2 and record["threads"] == 1 and record["speedup"] > 0
    again = measure_in_fresh_process(spec, original, compressed, plan, x, threads=1, repeats=2, wait_policy="active")
    assert again["omp_wait_policy"] == "ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # ours untouched


def test_a_child_that_rebuilds_other_models_is_refused(factory, tmp_path):
    spec, build = factory
    original, compressed, plan, x = compressed_pair(build)
    # the factory's code changes after this process built the model: same layers and weights in the
    # child, another forward (a Tanh for the ReLU), so its output error differs from ours
    (tmp_path / "tf_fresh_models.py").write_text(FACTORY.replace("nn.ReLU(), hidden",
                                                                 "nn.Tanh(), hidden"))
    with pytest.raises(FreshProcessError, match="rebuilt different models"):
        measure_in_fresh_process(spec, original, compressed, plan, x, threads=1, repeats=1)


def test_run_job_falls_back_to_this_process_and_says_why(factory):
    spec, build = factory
    original = build()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    # a model source whose name the child cannot rebuild (no such module)
    source = ModelSource("tf_no_such_module:build", original, None, lambda n, seed: [x[:n]])
    logged = []
    result = run_job(source, tf.CompressConfig(0.5, methods="svd", calib_samples=16),
                     JobOptions(speed_in="fresh", threads=1), log=logged.append)
    speed = result.metrics["speed"]
    assert speed["process"] == "this" and "speed process failed" in speed["fresh_error"]
    assert any("timed in this process instead" in m for m in logged)


def test_speed_in_is_checked():
    with pytest.raises(InvalidArgumentError, match="speed_in"):
        JobOptions(speed_in="elsewhere")


def test_the_command_times_in_a_fresh_process_with_the_users_wait_policy(factory, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import tensorfold.cli
    from tensorfold.cli.main import app

    spec, _ = factory
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what cli/__init__ set for this command
    monkeypatch.setattr(tensorfold.cli, "USER_OMP_WAIT_POLICY", None)  # the user had set nothing
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["compress", "--model", spec, "--budget", "0.5", "--calib", "16", "--methods", "svd",
                                 "--speed-threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    speed = json.loads((out / "metrics.json").read_text())["speed"]
    assert speed["process"] == "fresh" and speed["omp_wait_policy"] == "default"
    assert "timed in a fresh process with the default OpenMP wait policy" in " ".join(r.output.split())
    assert "OMP_WAIT_POLICY=PASSIVE" not in r.output


def test_a_dict_batch_with_other_values_goes_to_the_child_whole(tmp_path):
    from tensorfold.compression.fresh_speed import _load_input, _save_input

    ids = torch.arange(12).reshape(2, 6)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long), "modality": "text"}
    _save_input((batch, torch.zeros(2)), tmp_path / "x.safetensors")  # an (inputs, targets) pair: inputs only
    back = _load_input(tmp_path / "x.safetensors")
    assert sorted(back) == ["attention_mask", "input_ids", "modality"] and back["modality"] == "text"
    assert torch.equal(back["input_ids"], ids) and back["attention_mask"].dtype == torch.long
    _save_input(ids.float(), tmp_path / "t.safetensors")
    assert torch.equal(_load_input(tmp_path / "t.safetensors"), ids.float())
    with pytest.raises(FreshProcessError, match="neither tensors nor JSON"):
        _save_input({"input_ids": ids, "hook": object()}, tmp_path / "y.safetensors")
