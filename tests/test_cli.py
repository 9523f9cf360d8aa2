"""The command line: round trips of every input format, `info`, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import tensorfold
from tensorfold.cli import decompose as decompose_cli
from tensorfold.cli.common import parse_rank
from tensorfold.cli.main import app
from tensorfold.errors import RankError
from tensorfold.testing import random_cp, random_tr, random_tt, random_tucker

runner = CliRunner()
NO_DEBUG = {"TENSORFOLD_DEBUG": None}


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env or NO_DEBUG)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_input(path: Path, X: torch.Tensor, key: str | None) -> Path:
    """Store ``X`` in the format given by the suffix (under ``key`` where the format has names)."""
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, X.numpy())
    elif suffix == ".npz":
        np.savez(path, **{key: X.numpy(), "other": np.zeros(3)})
    elif suffix == ".pt":
        torch.save(X if key is None else {key: X, "other": torch.zeros(3)}, path)
    elif suffix == ".safetensors":
        save_file({key: X.contiguous(), "other": torch.zeros(3)}, str(path))
    return path


# (file name, key, method, rank, tensor with an exact decomposition of that rank)
ROUND_TRIPS = [
    ("x.npy", None, "cp", "2", lambda: random_cp((6, 7, 8), 2, seed=1).to_tensor()),
    ("x.npz", "data", "tucker", "2,3,2", lambda: random_tucker((6, 7, 8), (2, 3, 2), seed=2).to_tensor()),
    ("x.pt", None, "tt", "2,3", lambda: random_tt((5, 6, 7), (2, 3), seed=3).to_tensor()),
    ("x.safetensors", "layer.weight", "svd", "3", lambda: random_cp((20, 12), 3, seed=4).to_tensor()),
    ("y.pt", "w", "tr", "2,2,2", lambda: random_tr((5, 6, 7), (2, 2, 2), seed=5).to_tensor()),
]


@pytest.mark.parametrize("name,key,method,rank,make", ROUND_TRIPS, ids=[r[2] + "-" + r[0] for r in ROUND_TRIPS])
def test_round_trip(tmp_path, name, key, method, rank, make):
    X = make()
    source = write_input(tmp_path / name, X, key)
    before = digest(source)
    out = tmp_path / "result.safetensors"
    args = [source, "--method", method, "--rank", rank, "--out", out, "--json"]
    if key is not None:
        args += ["--key", key]
    if method in ("cp", "tr"):
        args += ["--max-iter", "300", "--tol", "1e-14"]
    res = invoke("decompose", *args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert json.loads(out.with_suffix(".json").read_text()) == summary

    loaded = tensorfold.load(out)
    recomputed = tensorfold.relative_error(X, loaded)
    assert summary["relative_error"] == pytest.approx(recomputed, rel=1e-6, abs=1e-12)
    # TR-ALS can stall in a local optimum on some inputs (not on this fixed one, which reaches ~1e-8).
    assert recomputed < 1e-6
    assert summary["method"] == method
    assert summary["n_params"] == loaded.n_params
    assert summary["compression_ratio"] == pytest.approx(X.numel() / loaded.n_params)
    rank_field = loaded.rank if isinstance(loaded.rank, int) else list(loaded.rank)
    assert summary["rank"] == rank_field
    assert summary["input"] == {"path": str(source), "key": key, "shape": list(X.shape), "dtype": "float64"}
    assert summary["dtype"] == "float64" and summary["device"] == "cpu"
    assert summary["seconds"] >= 0
    assert tuple(loaded.shape) == tuple(X.shape)
    assert digest(source) == before  # the input is only read


def test_table_output_and_info(tmp_path):
    X = random_cp((6, 7, 8), 2, seed=1).to_tensor()
    source = write_input(tmp_path / "x.npy", X, None)
    out = tmp_path / "cp.safetensors"
    res = invoke("decompose", source, "-m", "cp", "-r", "2", "-o", out)
    assert res.exit_code == 0, res.output
    for label in ("relative error", "parameters", "compression", "iterations", "seconds", "float64 / cpu"):
        assert label in res.stdout
    n_params = tensorfold.load(out).n_params
    assert n_params == 2 * (6 + 7 + 8) + 2

    info = invoke("info", out)
    assert info.exit_code == 0, info.output
    assert "cp" in info.stdout and "(6, 7, 8)" in info.stdout and str(n_params) in info.stdout
    header = json.loads(invoke("info", out, "--json").stdout)
    assert header["type"] == "cp" and header["shape"] == [6, 7, 8] and header["rank"] == 2
    assert header["n_params"] == n_params
    assert header["info"]["n_iter"] == json.loads(out.with_suffix(".json").read_text())["iterations"]


def test_dtype_option_casts(tmp_path):
    X = random_tucker((6, 7, 8), (2, 2, 2), seed=0).to_tensor()
    source = write_input(tmp_path / "x.npy", X, None)
    out = tmp_path / "t.safetensors"
    res = invoke("decompose", source, "-m", "tucker", "-r", "2", "-o", out, "--dtype", "float32", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["dtype"] == "float32" and summary["input"]["dtype"] == "float64"
    assert tensorfold.load(out).dtype == torch.float32
    assert summary["relative_error"] < 1e-5


def test_integer_input_needs_dtype(tmp_path):
    source = tmp_path / "counts.npy"
    np.save(source, np.arange(60).reshape(3, 4, 5))
    out = tmp_path / "o.safetensors"
    res = invoke("decompose", source, "-m", "tucker", "-r", "2", "-o", out)
    assert_clean_error(res, "has dtype int64; pass --dtype float32 or --dtype float64")
    res = invoke("decompose", source, "-m", "tucker", "-r", "2", "-o", out, "--dtype", "float64")
    assert res.exit_code == 0, res.output


def test_same_seed_same_result(tmp_path):
    X = random_cp((6, 7, 8), 3, seed=6).to_tensor()
    source = write_input(tmp_path / "x.npy", X, None)
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.safetensors"
        res = invoke("decompose", source, "-m", "cp", "-r", "2", "-o", out, "--seed", "7", "--max-iter", "20")
        assert res.exit_code == 0, res.output
        outs.append(tensorfold.load(out))
    assert torch.equal(outs[0].to_tensor(), outs[1].to_tensor())


# --- errors ---------------------------------------------------------------------------------------
def assert_clean_error(res, message: str, code: int = 2):
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert res.stdout == ""


@pytest.fixture
def cube(tmp_path):
    return write_input(tmp_path / "cube.npy", random_cp((4, 5, 6), 2, seed=0).to_tensor(), None)


def bad_input_file(tmp_path: Path, case: str) -> Path:
    """An input file that is wrong in the way ``case`` names."""
    if case == "missing file":
        return tmp_path / "absent.npy"
    if case == "corrupt file":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        return bad
    if case == "unknown key":
        np.savez(tmp_path / "arrays.npz", a=np.ones((3, 3)), b=np.ones((3, 3)))
        return tmp_path / "arrays.npz"
    if case == "NaN input":
        X = torch.ones(4, 5, 6, dtype=torch.float64)
        X[1, 2, 3] = float("nan")
        return write_input(tmp_path / "nan.npy", X, None)
    if case == "matrix":
        return write_input(tmp_path / "m.npy", torch.ones(4, 5, dtype=torch.float64), None)
    raise AssertionError(case)


# case -> (input: "cube" (a 4x5x6 tensor) or a bad_input_file case, options, expected message)
ERROR_CASES = {
    "missing file": ("missing file", ["-m", "cp", "-r", "2"], "absent.npy: no such file"),
    "corrupt file": ("corrupt file", ["-m", "cp", "-r", "2"], "cannot read as .safetensors"),
    "unknown key": ("unknown key", ["-k", "c", "-m", "svd", "-r", "1"], "no array named 'c'; available: a, b"),
    "NaN input": ("NaN input", ["-m", "cp", "-r", "2"], "contains 1 NaN or Inf entries"),
    "rank 0": ("cube", ["-m", "cp", "-r", "0"], "--rank must be positive"),
    "rank not a number": ("cube", ["-m", "cp", "-r", "two"], "--rank must be an integer or a comma-separated list"),
    "rank too large": ("cube", ["-m", "tucker", "-r", "3,9,3"], "larger than the data allows"),
    "svd rank too large": ("matrix", ["-m", "svd", "-r", "9"], "larger than the data allows"),
    "missing rank": ("cube", ["-m", "cp"], "method 'cp' needs --rank"),
    "per-mode rank for cp": ("cube", ["-m", "cp", "-r", "2,2,2"], "takes a single --rank"),
    "wrong rank count": ("cube", ["-m", "tucker", "-r", "2,2"], "2 entries but the tensor has 3 modes"),
    "wrong method": (
        "cube", ["-m", "pca", "-r", "2"],
        "--method must be one of cp, tucker, tt, tr, svd, ncp, ntucker, symcp; got 'pca'",
    ),
    "eps for cp": ("cube", ["-m", "cp", "-r", "2", "--eps", "0.1"], "--eps applies to tt, tr, svd, not to 'cp'"),
    "eps out of range": ("cube", ["-m", "tt", "--eps", "1.5"], "--eps must be a relative error in (0, 1)"),
    "max-iter for tt": ("cube", ["-m", "tt", "-r", "2", "--max-iter", "5"], "apply to iterative methods"),
    "svd on 3-way": ("cube", ["-m", "svd", "-r", "2"], "needs a 2-way tensor (a matrix); "),
    "bad dtype": ("cube", ["-m", "cp", "-r", "2", "--dtype", "float16"], "--dtype must be one of float32, float64"),
    "bad device": ("cube", ["-m", "cp", "-r", "2", "--device", "tpu"], "--device must be one of cpu, cuda"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cube, case):
    source, options, message = ERROR_CASES[case]
    path = cube if source == "cube" else bad_input_file(tmp_path, source)
    before = digest(cube)
    res = invoke("decompose", path, "--out", tmp_path / "out.safetensors", *options)
    assert_clean_error(res, message)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out.json").exists()
    assert digest(cube) == before


@pytest.mark.parametrize("out,overwrite,message", [
    ("o.json", False, "the .json summary is written beside it"),
    ("cube.npy", True, "is the input file; choose another output path"),
    (".", True, "is the working directory"),
    ("..", True, "is the working directory"),
])
def test_bad_output_paths(tmp_path, cube, monkeypatch, out, overwrite, message):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = invoke("decompose", cube, "-m", "cp", "-r", "2", "-o", out, *(["--overwrite"] if overwrite else []))
    assert_clean_error(res, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert tensorfold.io.load_array(cube).shape == (4, 5, 6)


def test_existing_out_needs_overwrite(tmp_path, cube):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    res = invoke("decompose", cube, "-m", "cp", "-r", "2", "-o", out)
    assert_clean_error(res, "already exists; pass --overwrite")
    assert out.read_bytes() == b"keep me"
    assert not out.with_suffix(".json").exists()

    res = invoke("decompose", cube, "-m", "cp", "-r", "2", "-o", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert tensorfold.load(out).rank == 2


def test_existing_summary_needs_overwrite(tmp_path, cube):
    out = tmp_path / "out.safetensors"
    out.with_suffix(".json").write_text("{}")
    res = invoke("decompose", cube, "-m", "cp", "-r", "2", "-o", out)
    assert_clean_error(res, "out.json already exists")
    assert not out.exists() and out.with_suffix(".json").read_text() == "{}"


def test_info_errors(tmp_path):
    assert_clean_error(invoke("info", tmp_path / "absent.safetensors"), "no such file")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(64))
    assert_clean_error(invoke("info", corrupt), "not a readable safetensors file")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert_clean_error(invoke("info", foreign), "not one written by tensorfold")


# --- the registry and the top-level error handler ---------------------------------------------------
def _svd_by_hand(X, options):
    from tensorfold.core.svd import truncated_svd
    from tensorfold.decomp.results import FitInfo, LowRankMatrix

    if options.callback is not None:
        options.callback(1, 0.5)
    t = truncated_svd(X, rank=options.rank)
    return LowRankMatrix(t.U, t.S, t.V, FitInfo("by-hand", n_iter=1, seconds=0.01))


def test_registering_a_method_adds_it_to_the_cli(tmp_path, monkeypatch):
    method = decompose_cli.Method("by-hand", "plain truncated SVD", _svd_by_hand, iterative=True, max_order=2)
    monkeypatch.setitem(decompose_cli.METHODS, method.name, method)
    X = random_cp((9, 7), 2, seed=3).to_tensor()
    source = write_input(tmp_path / "m.npy", X, None)
    out = tmp_path / "m.safetensors"
    res = invoke("decompose", source, "-m", "by-hand", "-r", "2", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["iterations"] == 1 and summary["seconds"] == 0.01
    assert summary["relative_error"] < 1e-12
    assert summary["n_params"] == 2 * (9 + 7 + 1)
    assert tensorfold.load(out).info.method == "by-hand"


@pytest.mark.parametrize("raised,code,message", [
    (RuntimeError("disk on fire"), 1, "unexpected RuntimeError: disk on fire (rerun with --debug"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_unexpected_errors_are_one_line(tmp_path, monkeypatch, cube, raised, code, message):
    def explode(X, options):
        raise raised

    monkeypatch.setitem(decompose_cli.METHODS, "cp", decompose_cli.Method("cp", "boom", explode, iterative=True))
    out = tmp_path / "out.safetensors"
    assert_clean_error(invoke("decompose", cube, "-m", "cp", "-r", "2", "-o", out), message, code=code)
    assert not out.exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_exception(tmp_path, monkeypatch, cube, how):
    def explode(X, options):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(decompose_cli.METHODS, "cp", decompose_cli.Method("cp", "boom", explode))
    args = ["decompose", cube, "-m", "cp", "-r", "2", "-o", tmp_path / "o.safetensors"]
    if how == "flag":
        res = invoke("--debug", *args)
    else:
        res = invoke(*args, env={"TENSORFOLD_DEBUG": "1"})
    assert isinstance(res.exception, RuntimeError) and "disk on fire" in str(res.exception)
    assert res.exit_code != 0


def test_help_texts_have_examples():
    top = invoke("--help")
    assert top.exit_code == 0 and "decompose" in top.stdout and "info" in top.stdout
    for command in ("decompose", "info"):
        res = invoke(command, "--help")
        assert res.exit_code == 0 and "Examples" in res.stdout and f"tensorfold {command} " in res.stdout
    assert "--method" in invoke("decompose", "--help").stdout
    assert invoke("--version").stdout.strip() == f"tensorfold {tensorfold.__version__}"


def test_parse_rank():
    assert parse_rank("5") == 5 and parse_rank(" 8, 4,4 ") == (8, 4, 4) and parse_rank(None) is None
    for bad in ("0", "-1", "2,0", "x", "2,,3", "1.5"):
        with pytest.raises(RankError):
            parse_rank(bad)


def test_console_script_in_a_fresh_process(tmp_path):
    """The real entry point (not CliRunner): exit code, one stderr line, and a CLI import without torch."""
    res = subprocess.run(
        [sys.executable, "-m", "tensorfold", "decompose", str(tmp_path / "absent.npy"), "-m", "cp", "-r", "2",
         "-o", str(tmp_path / "o.safetensors")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TENSORFOLD_DEBUG": ""},
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent.npy'}: no such file"]
    probe = "import sys, tensorfold.cli.main; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stderr


def test_demo_quick_rows_match_direct_computations():
    from tensorfold.demo import load_digits_tensor, run_demo

    rows = run_demo(quick=True)
    assert [r["method"] for r in rows] == ["cp", "tucker", "tt", "svd*"]
    X = load_digits_tensor()
    assert tuple(X.shape) == (1797, 8, 8) and X.dtype == torch.float64
    # Eckart-Young: the rank-5 SVD error of the unfolding is the tail of its singular values.
    s = torch.linalg.svdvals(X.reshape(1797, 64))
    expected = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
    svd_row = rows[-1]
    assert float(svd_row["rel. error"]) == pytest.approx(expected, abs=1e-4)
    assert svd_row["params"] == 5 * (1797 + 64 + 1)
    for row in rows:
        assert 0 < float(row["rel. error"]) < 1 and row["dtype"] == "float64"
