"""CLI for completion (--mask/--coo), nonnegative and symmetric methods, and `tensorfold rank`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tensorfold as tf
from tensorfold.cli.main import app

runner = CliRunner()
NO_DEBUG = {"TENSORFOLD_DEBUG": None}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env=NO_DEBUG)


@pytest.fixture()
def masked(tmp_path):
    X = tf.testing.random_cp((12, 13, 14), rank=2, seed=0).to_tensor()
    mask = tf.testing.random_mask(X.shape, 0.4, seed=1)
    np.save(tmp_path / "x.npy", torch.where(mask, X, torch.zeros_like(X)).numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    return X, mask


def test_decompose_with_mask_completes(tmp_path, masked):
    X, mask = masked
    out = tmp_path / "cp.safetensors"
    res = invoke("decompose", tmp_path / "x.npy", "--mask", tmp_path / "mask.npy", "--method", "cp", "--rank", 2,
                 "--out", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["observed"] == int(mask.sum()) and summary["observed_relative_error"] < 1e-8
    assert tf.relative_error(X, tf.load(out)) < 1e-6  # the unobserved cells are recovered too
    assert json.loads(out.with_suffix(".json").read_text())["rank"] == 2


@pytest.mark.parametrize("method,algorithm", [("cp", "complete-cp-em"), ("cp-als", "complete-cp-als"),
                                              ("cp-em", "complete-cp-em")])
def test_decompose_with_mask_uses_imputation_when_dense_enough(tmp_path, method, algorithm):
    X = tf.testing.random_cp((30, 30, 30), rank=3, seed=2).to_tensor()  # 27000 cells, 40% observed: EM
    mask = tf.testing.random_mask(X.shape, 0.4, seed=3)
    np.save(tmp_path / "x.npy", torch.where(mask, X, torch.full_like(X, float("nan"))).numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    out = tmp_path / "cp.safetensors"
    res = invoke("decompose", tmp_path / "x.npy", "--mask", tmp_path / "mask.npy", "--method", method, "--rank", 3,
                 "--out", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["algorithm"] == algorithm
    assert tf.relative_error(X, tf.load(out)) < 1e-5


def test_decompose_coo_input(tmp_path, masked):
    X, mask = masked
    idx = mask.nonzero()
    np.savez(tmp_path / "obs.npz", indices=idx.numpy(), values=X[mask].numpy(), shape=np.array(X.shape))
    out = tmp_path / "tk.safetensors"
    res = invoke("decompose", tmp_path / "obs.npz", "--coo", "--method", "tucker", "--rank", "2,2,2",
                 "--out", out)
    assert res.exit_code == 0, res.output
    assert isinstance(tf.load(out), tf.TuckerTensor)


def test_completion_cli_errors(tmp_path, masked):
    np.save(tmp_path / "bad_mask.npy", np.ones((3, 3), dtype=bool))
    res = invoke("decompose", tmp_path / "x.npy", "--mask", tmp_path / "bad_mask.npy", "--method", "cp",
                 "--rank", 2, "--out", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "mask has shape" in res.output
    res = invoke("decompose", tmp_path / "x.npy", "--mask", tmp_path / "mask.npy", "--method", "tt",
                 "--rank", 2, "--out", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "--method" in res.output
    res = invoke("decompose", tmp_path / "x.npy", "--coo", "--method", "cp", "--rank", 2,
                 "--out", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "indices" in res.output
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("method", ["ncp", "ntucker"])
def test_nonnegative_methods(tmp_path, method):
    X = torch.rand(8, 9, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.save(tmp_path / "x.npy", X.numpy())
    out = tmp_path / "nn.safetensors"
    res = invoke("decompose", tmp_path / "x.npy", "--method", method, "--rank", 3, "--max-iter", 20, "--out", out)
    assert res.exit_code == 0, res.output
    result = tf.load(out)
    assert all(float(f.min()) >= 0 for f in result.factors)
    np.save(tmp_path / "neg.npy", (X - 0.5).numpy())
    res = invoke("decompose", tmp_path / "neg.npy", "--method", method, "--rank", 3, "--out", tmp_path / "n2.st")
    assert res.exit_code == 2 and "negative" in res.output


def test_symmetric_method(tmp_path):
    A = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    X = torch.einsum("ir,jr,kr->ijk", A, A, A)
    np.save(tmp_path / "sym.npy", X.numpy())
    out = tmp_path / "sym.safetensors"
    res = invoke("decompose", tmp_path / "sym.npy", "--method", "symcp", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["rank"] == 3 and summary["relative_error"] < 1e-10
    np.save(tmp_path / "nonsym.npy", torch.rand(4, 4, 4, dtype=torch.float64).numpy())
    res = invoke("decompose", tmp_path / "nonsym.npy", "--method", "symcp", "--out", tmp_path / "s2.safetensors")
    assert res.exit_code == 2 and "not symmetric" in res.output


def test_rank_command_tucker_budget_and_plot(tmp_path):
    X = tf.testing.add_noise(tf.testing.random_tucker((12, 13, 14), (3, 4, 5), seed=0).to_tensor(), 0.01)
    np.save(tmp_path / "x.npy", X.numpy())
    res = invoke("rank", tmp_path / "x.npy", "--method", "tucker", "--budget", 300, "--plot", tmp_path / "s.png",
                 "--out", tmp_path / "t.safetensors", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["size"] <= 300 and summary["energy"] >= summary["greedy"]["energy"] - 1e-9
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert tuple(tf.load(tmp_path / "t.safetensors").rank) == tuple(summary["chosen_rank"])


def test_rank_command_tt_cp_and_errors(tmp_path):
    X = tf.testing.add_noise(tf.testing.random_cp((10, 11, 12), rank=2, seed=0).to_tensor(), 0.01)
    np.save(tmp_path / "x.npy", X.numpy())
    res = invoke("rank", tmp_path / "x.npy", "--method", "tt", "--eps", 0.05, "--json")
    assert res.exit_code == 0 and json.loads(res.output)["relative_error"] <= 0.05
    res = invoke("rank", tmp_path / "x.npy", "--method", "cp", "--max-rank", 3, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["suggested_rank"] == 2
    res = invoke("rank", tmp_path / "x.npy", "--method", "tucker")
    assert res.exit_code == 2 and "exactly one of --eps or --budget" in res.output
    res = invoke("rank", tmp_path / "x.npy", "--method", "tucker", "--budget", 10)
    assert res.exit_code == 2 and "too small" in res.output
