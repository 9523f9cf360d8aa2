"""Trust in the command line: one output per path, outputs checked before any work, stale temporaries of
killed runs cleaned (and nothing else), --overwrite never deleting a user's files, one-line errors for
usage mistakes, user strings printed as they are, user modules found in the working directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tensorfold.cli.main import app
from tensorfold.testing import random_tucker

runner = CliRunner()
NO_DEBUG = {"TENSORFOLD_DEBUG": None}

MODELS = '''
import torch
from torch import nn


def factory():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 4))


def calibration(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 12, generator=g)]
'''


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env=NO_DEBUG)


def one_error_line(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    # progress lines may come first; the error is one line, the last
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert "Traceback" not in res.output and "please report" not in res.output
    return errors[0]


@pytest.fixture()
def cube(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, random_tucker((6, 7, 8), (2, 2, 2), seed=0).to_tensor().numpy())
    return path


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- one output per path ------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--out", "rr.json"], "the .json summary is written beside it"),
    (["--out", "rr.png", "--plot", "rr.png"], "both write rr.png"),
    (["--out", "rr.safetensors", "--plot", "rr.json"], "give a .png, .svg, .pdf file name"),
])
def test_rank_never_writes_two_outputs_to_one_path(tmp_path, cube, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = invoke("rank", cube.name, "--method", "tucker", "--eps", "0.1", *args)
    assert message in one_error_line(res)
    assert listing(tmp_path) == ["x.npy"]


def test_decompose_summary_cannot_be_the_plot_of_rank(tmp_path, cube, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("rank", cube.name, "--method", "tucker", "--eps", "0.1", "--out", "rr.safetensors")
    assert res.exit_code == 0, res.output
    assert listing(tmp_path) == ["rr.json", "rr.safetensors", "x.npy"]
    assert json.loads((tmp_path / "rr.json").read_text())["output"] == "rr.safetensors"


# --- output location checked before any work ----------------------------------------------------
@pytest.mark.parametrize("command", ["decompose", "rank", "compress", "sweep"])
@pytest.mark.parametrize("where", ["file-in-the-way", "working-directory", "existing-file"])
def test_unwritable_output_is_refused_before_work(tmp_path, cube, monkeypatch, command, where):
    if where == "existing-file" and command in ("decompose", "rank"):
        pytest.skip("--overwrite may replace an existing file result")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    out = {"file-in-the-way": "afile/sub/out", "working-directory": ".", "existing-file": "afile"}[where]
    if command == "decompose":
        args = ["decompose", cube.name, "-m", "cp", "-r", "2", "--out", out + ("" if where != "file-in-the-way"
                                                                                 else ".safetensors")]
    elif command == "rank":
        args = ["rank", cube.name, "--method", "tucker", "--eps", "0.1", "--out", out]
    elif command == "compress":
        args = ["compress", "--model", "digits-cnn", "--budget", "0.5", "--out", out]
    else:
        args = ["sweep", "--model", "digits-cnn", "--out", out]
    started = time.perf_counter()
    res = invoke(*args, "--overwrite")
    line = one_error_line(res)
    assert time.perf_counter() - started < 20  # refused up front, not after the computation
    assert any(m in line for m in ("not a directory", "working directory", "is a file", "already exists",
                                   "give a directory path", "the .json summary")), line
    assert listing(tmp_path) == ["afile", "x.npy"] and (tmp_path / "afile").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused_before_work(tmp_path, cube):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_error_line(invoke("decompose", cube, "-m", "cp", "-r", "2", "--out", ro / "o.safetensors"))
        assert "cannot write" in line
    finally:
        ro.chmod(0o755)


# --- --overwrite and temporaries ----------------------------------------------------------------
def compress_args(out, *extra):
    return ["compress", "--model", "tf_trust_models:factory", "--budget", "0.5", "--calib", "32", "--methods", "svd",
            "--no-speed", "--out", str(out), *extra]


@pytest.fixture()
def user_models(tmp_path, monkeypatch):
    (tmp_path / "tf_trust_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tf_trust_models", None)


def test_overwrite_refuses_a_directory_tensorfold_did_not_write(tmp_path, user_models):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    line = one_error_line(invoke(*compress_args(out, "--overwrite")))
    assert "did not write" in line and "thesis.tex" in line
    assert listing(out) == ["thesis.tex"]
    (out / "thesis.tex").unlink()
    assert invoke(*compress_args(out, "--overwrite")).exit_code == 0  # empty: fine
    res = invoke(*compress_args(out, "--overwrite"))  # an earlier result: replaced
    assert res.exit_code == 0, res.output
    assert listing(out) == ["metrics.json", "plan.json", "report.html", "weights.safetensors"]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_stale_temporaries_are_cleaned_and_nothing_else(tmp_path, user_models):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    stale_dir = tmp_path / f".run.tmp.{dead.pid}.abcd1234"
    stale_dir.mkdir()
    (stale_dir / "plan.json").write_text("{")
    stale_old = tmp_path / f".run.old.{dead.pid}.zz_9yy8x"
    stale_old.mkdir()
    alive = tmp_path / f".run.tmp.{os.getpid()}.abcd1234"  # a run in progress (this process)
    alive.mkdir()
    others = [tmp_path / ".run.tmp.notes", tmp_path / f".other.tmp.{dead.pid}.abcd1234", tmp_path / "run.tmp"]
    for p in others:
        p.write_text("not ours")
    res = invoke(*compress_args(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert not stale_dir.exists() and not stale_old.exists()
    assert alive.exists() and all(p.read_text() == "not ours" for p in others)


KILLED_WRITER = '''
import inspect, os, sys, time
import torch
from torch import nn
import tensorfold as tf

class Slow(nn.Sequential):
    def state_dict(self, *args, **kwargs):
        if any(f.function == "write_compressed" for f in inspect.stack()):
            open(sys.argv[2], "w").close()   # tell the test we are half-way through writing
            time.sleep(120)
        return super().state_dict(*args, **kwargs)

torch.manual_seed(0)
model = Slow(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
small, plan = tf.compress(model, 0.5, methods=("svd",))
tf.save_compressed(small, plan, sys.argv[1], overwrite=True)
'''


def test_kill_9_mid_write_leaves_no_partial_output_and_the_next_run_cleans_up(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    out, flag = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(flag)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()  # no partial result under the real name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.tmp.")]
    assert len(leftovers) == 1 and f".{proc.pid}." in leftovers[0]
    import tensorfold as tf

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    small, plan = tf.compress(model, 0.5, methods=("svd",))
    tf.save_compressed(small, plan, out)
    assert listing(tmp_path) == ["run", "writer.py", "writing"]


# --- one-line errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["compress", "--budget", "abc", "--out", "o"], "'--budget'"),
    (["compress", "--model", "digits-cnn"], "Missing option '--out'"),
    (["bogus"], "No such command 'bogus'"),
    (["decompose", "x.npy", "--method", "cp", "--rank", "2", "--out", "o.safetensors", "--max-iter", "many"],
     "'--max-iter'"),
])
def test_usage_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke(*args))
    assert message in line and "--help" in line
    assert listing(tmp_path) == []


def test_weights_that_do_not_fit_are_one_full_line(tmp_path, user_models):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(24, 13), "0.bias": torch.zeros(24), "extra": torch.zeros(1)},
              str(tmp_path / "w.safetensors"))
    line = one_error_line(invoke(*compress_args(tmp_path / "run", "--weights", tmp_path / "w.safetensors")))
    assert "2 missing (2.bias, 2.weight)" in line and "1 unexpected (extra)" in line
    assert "0.weight (24, 13) vs (24, 12) expected" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body, message", [
    ("def factory(width):\n    pass\n", "needs arguments (width)"),
    ("def factory():\n    raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU here"),
    ("raise ImportError('broken module')\n", "broken module"),
])
def test_user_factory_failures_are_one_line(tmp_path, monkeypatch, body, message):
    (tmp_path / "tf_trust_bad.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tf_trust_bad", None)
    try:
        line = one_error_line(invoke("compress", "--model", "tf_trust_bad:factory", "--out", tmp_path / "run"))
    finally:
        sys.modules.pop("tf_trust_bad", None)
    assert message in line


def test_nan_calibration_is_refused():
    import tensorfold as tf
    from tensorfold.errors import InvalidArgumentError

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    bad = torch.randn(16, 8)
    bad[3, 2] = float("nan")
    with pytest.raises(InvalidArgumentError, match="calib batch 1 holds NaN or Inf"):
        tf.plan(model, 0.5, calib=[torch.randn(16, 8), bad])
    bad[3, 2] = float("inf")
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        tf.plan(model, 0.5, calib=[{"x": bad}])


# --- the real entry point: modules from the working directory, text printed as given -----------
def run_entry(tmp_path, *args):
    """The console script as a user runs it: sys.path[0] is the script's folder, not the working directory."""
    entry = tmp_path / "bin" / "tensorfold_entry.py"
    entry.parent.mkdir(exist_ok=True)
    entry.write_text("import sys\nfrom tensorfold.cli.main import app\nsys.argv[0] = 'tensorfold'\napp()\n")
    env = {k: v for k, v in os.environ.items() if k != "TENSORFOLD_DEBUG"}
    return subprocess.run([sys.executable, str(entry), *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)


def compress_beside(tmp_path, module: str, text: str):
    """``tensorfold compress --model MODULE:factory --out run`` in tmp_path/project beside MODULE.py."""
    work = tmp_path / "project"
    work.mkdir()
    (work / f"{module}.py").write_text(text)
    res = run_entry(work, "compress", "--model", f"{module}:factory", "--budget", "0.5", "--calib", "32",
                    "--methods", "svd", "--no-speed", "--out", "run")
    assert res.returncode == 0, res.stderr
    return work, res


def test_factory_beside_the_user_and_its_name_printed_as_typed(tmp_path):
    work, res = compress_beside(tmp_path, "mymodels", MODELS)
    assert "mymodels:factory:" in res.stderr and "\N{FACTORY}" not in res.stdout + res.stderr
    assert "mymodels:factory" in res.stdout  # the plan's title names the model as typed
    assert listing(work / "run") == ["metrics.json", "plan.json", "report.html", "weights.safetensors"]


def test_info_describes_a_compress_directory_and_its_weights(tmp_path, user_models):
    out = tmp_path / "run"
    assert invoke(*compress_args(out)).exit_code == 0
    for target in (out, out / "weights.safetensors"):
        res = invoke("info", target, "--json")
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout)
        assert info["plan"]["model"] == "tf_trust_models:factory" and info["plan"]["budget"] == 0.5
        assert info["weights"]["tensors"] == 6 and info["weights"]["dtypes"] == ["F32"]
        assert "rel_error" in info["quality"]
        assert invoke("info", target).exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a tensorfold compress result" in one_error_line(invoke("info", empty))


# --- a directory names a factory: it runs only with --trust-factory ------------------------------
MARKED_MODELS = MODELS + """

import pathlib
pathlib.Path(__file__).with_name("imported").write_text("yes")
"""


@pytest.mark.parametrize("source", ["user", "os:abort"])
def test_info_check_runs_a_named_factory_only_with_trust_factory(tmp_path, source):
    work, _ = compress_beside(tmp_path, "tf_marked_models", MARKED_MODELS)
    (work / "imported").unlink()  # compress imported the module the user named on the command line
    name = "tf_marked_models:factory"
    if source == "os:abort":  # a directory from elsewhere whose plan names a function that kills the process
        plan = json.loads((work / "run" / "plan.json").read_text())
        plan["model_name"] = name = "os:abort"
        (work / "run" / "plan.json").write_text(json.dumps(plan))
    res = run_entry(work, "info", "run", "--check")
    assert res.returncode == 2, (res.returncode, res.stderr)  # not -6 (SIGABRT): nothing was called
    assert res.stderr.strip() == (f"error: run/plan.json names the model factory {name!r}; rebuilding the model "
                                  "would import and run that code. Add --trust-factory (tensorfold info run --check "
                                  "--trust-factory) only if you trust this directory")
    assert not (work / "imported").exists()
    res = run_entry(work, "info", "run", "--trust-factory")  # without --check nothing would use it
    assert res.returncode == 2 and "only matters with --check" in res.stderr
    if source == "user":
        res = run_entry(work, "info", "run", "--check", "--trust-factory", "--json")
        assert res.returncode == 0, res.stderr
        assert (work / "imported").read_text() == "yes"
        check = json.loads(res.stdout)["check"]
        assert check == {"rebuilt": "Sequential", "parameters": check["plan_parameters"], "matches_plan": True,
                         "plan_parameters": check["plan_parameters"], "factory_run": name}
        assert check["parameters"] == 192  # of 412: the saved plan's count (its rel_error is checked elsewhere)
        res = run_entry(work, "info", "run", "--check", "--trust-factory")
        text = " ".join(res.stdout.replace("\N{BOX DRAWINGS LIGHT VERTICAL}", " ").split())  # table cells wrap
        assert res.returncode == 0
        assert "rebuilt a Sequential and loaded its weights: 192 parameters (as planned)" in text


def test_info_check_rebuilds_a_builtin_model_without_trust(tmp_path):
    out = tmp_path / "d"
    res = invoke("compress", "--model", "digits-cnn", "--budget", "0.5", "--calib", "16", "--methods", "svd",
                 "--no-speed", "--out", out)
    assert res.exit_code == 0, res.output
    res = invoke("info", out, "--check", "--json")
    assert res.exit_code == 0, res.output
    check = json.loads(res.stdout)["check"]
    assert check["matches_plan"] and check["factory_run"] is None
    assert check["parameters"] == json.loads(res.stdout)["plan"]["model_params_after"]
    res = invoke("info", out / "weights.safetensors", "--check", "--json")  # its directory is rebuilt
    assert res.exit_code == 0 and json.loads(res.stdout)["check"] == check


def test_info_check_of_a_decomposition_is_refused(tmp_path, cube):
    out = tmp_path / "c.safetensors"
    assert invoke("decompose", cube, "-m", "cp", "-r", "2", "--out", out).exit_code == 0
    assert "is a decomposition" in one_error_line(invoke("info", out, "--check"))


def test_tt_rank_clipping_is_a_warning_in_the_summary(tmp_path, cube):
    res = invoke("decompose", cube, "--method", "tt", "--rank", "1000", "--out", tmp_path / "t.safetensors")
    assert res.exit_code == 0, res.output
    assert "warning" in res.stdout and "clipped" in res.stdout
    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["warnings"] == ["--rank 1000 exceeds what a 6x7x8 tensor allows; clipped to bond ranks "
                                   "(1, 6, 8, 1) (at most (6, 8))"]
    res = invoke("decompose", cube, "--method", "tt", "--rank", "2,2", "--out", tmp_path / "u.safetensors")
    assert "warnings" not in json.loads((tmp_path / "u.json").read_text())


# --- fine-tuning is reported, and never makes the result worse ----------------------------------
FINETUNE_DATA = '''
import torch

def good():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(32, 12, generator=g) for _ in range(4)], [torch.randn(32, 12, generator=g)]

def only_train():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(32, 12, generator=g) * 50 for _ in range(4)]

def needs_args(n):
    return []
'''


def test_finetune_reports_epochs_and_quality_before_and_after(tmp_path, user_models):
    (tmp_path / "tf_trust_data.py").write_text(FINETUNE_DATA)
    out = tmp_path / "run"
    res = invoke(*compress_args(out, "--finetune-epochs", "2", "--data", "tf_trust_data:good"))
    assert res.exit_code == 0, res.output
    assert "fine-tune epoch 1: training loss" in res.stderr and "fine-tune epoch 2" in res.stderr
    ft = json.loads((out / "metrics.json").read_text())["finetune"]
    assert [e["epoch"] for e in ft["epochs"]] == [1, 2] and all("val_loss" in e for e in ft["epochs"])
    assert ft["metric"] == "mean_cos" and "fine-tuning: mean_cos" in res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    better = ft["quality_after"]["mean_cos"] >= ft["quality_before"]["mean_cos"]
    assert ft["kept"] == ("fine-tuned" if better else "before fine-tuning")
    assert metrics["quality"] == ft["quality_after" if better else "quality_before"]
    # (the README's own example, run by tests/test_readme.py, is a case where fine-tuning helps)
    page = (out / "report.html").read_text()
    assert "<h2>Fine-tuning</h2>" in page and "before fine-tuning" in page
    sys.modules.pop("tf_trust_data", None)


def test_finetune_that_hurts_is_undone_with_a_warning(tmp_path, user_models):
    from tensorfold.compression.config import CompressConfig, FinetuneConfig
    from tensorfold.compression.job import JobOptions, run_job

    (tmp_path / "tf_trust_data.py").write_text(FINETUNE_DATA)
    logged = []
    result = run_job("tf_trust_models:factory", CompressConfig(budget=0.5, methods=("svd",), calib_samples=32),
                     JobOptions(data="tf_trust_data:only_train", speed=False),
                     finetune=FinetuneConfig(epochs=2, lr=1.0, progress=False), log=logged.append)
    ft = result.metrics["finetune"]
    assert ft["kept"] == "before fine-tuning" and "worse" in ft["warning"]
    assert any(m.startswith("warning: fine-tuning made mean_cos worse") for m in logged)
    assert result.metrics["quality"] == ft["quality_before"]
    assert ft["quality_after"]["mean_cos"] < ft["quality_before"]["mean_cos"]
    line = one_error_line(invoke(*compress_args(tmp_path / "r2", "--finetune-epochs", "1", "--data",
                                                "tf_trust_data:needs_args")))
    assert "--data tf_trust_data:needs_args" in line
    sys.modules.pop("tf_trust_data", None)


def test_saving_an_adapter_twice_replaces_the_earlier_one(tmp_path):
    """save_adapter overwrites its own directory: adapter files count as a tensorfold result."""
    from tensorfold.io import is_tensorfold_result

    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter.safetensors").write_bytes(b"x")
    (d / "adapter_config.json").write_text("{}")
    assert is_tensorfold_result(d)
    (d / "notes.txt").write_text("mine")
    assert not is_tensorfold_result(d)


def test_out_of_core_decompose_follows_the_output_rule(tmp_path, cube, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("decompose", cube.name, "--method", "cp", "--rank", "2", "--chunks", "3", "--out", "o.json")
    assert "the .json summary is written beside it" in one_error_line(res)
