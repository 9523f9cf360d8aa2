"""`tensorfold decompose` on Zarr/HDF5/memmapped inputs: results, summaries and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import tensorfold as tf
from tensorfold.cli.main import app
from tensorfold.testing import add_noise

zarr = pytest.importorskip("zarr")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"TENSORFOLD_DEBUG": None})


@pytest.fixture
def store(tmp_path):
    X = add_noise(tf.testing.random_cp((20, 18, 16), 3, seed=0).to_tensor(), 0.01).float()
    z = zarr.open(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, chunks=(8, 9, 16), dtype="float32")
    z[:] = X.numpy()
    np.save(tmp_path / "x.npy", X.numpy())
    return X, tmp_path


def test_zarr_cp_and_tucker_match_in_memory(store):
    X, tmp = store
    res = invoke("decompose", tmp / "x.zarr", "--method", "cp", "--rank", 3, "--out", tmp / "cp.safetensors", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp / "cp.json").read_text())
    approx = tf.load(tmp / "cp.safetensors")
    assert abs(summary["relative_error"] - tf.relative_error(X.double(), approx.to(dtype=X.double().dtype))) < 1e-4
    assert summary["relative_error"] < 0.012
    res = invoke("decompose", tmp / "x.npy", "--method", "tucker", "--rank", "3,3,3", "--chunks", "5",
                 "--out", tmp / "tk.safetensors")
    assert res.exit_code == 0, res.output
    tk = tf.load(tmp / "tk.safetensors")
    assert tk.rank == (3, 3, 3) and tf.relative_error(X, tk) < 0.012  # sketch + HOOI pass, noise 0.01


def test_out_of_core_errors_are_one_line(store):
    X, tmp = store
    res = invoke("decompose", tmp / "x.zarr", "--method", "tt", "--rank", 3, "--out", tmp / "o.safetensors")
    assert res.exit_code != 0 and "does not run out of core" in res.output
    res = invoke("decompose", tmp / "x.npy", "--method", "cp", "--rank", 3, "--memory-limit", "1GB",
                 "--out", tmp / "o.safetensors")
    assert res.exit_code != 0 and "--memory-limit applies to --scheduler local" in res.output
    res = invoke("decompose", tmp / "x.npy", "--method", "cp", "--rank", 3, "--chunks", "4,x",
                 "--out", tmp / "o.safetensors")
    assert res.exit_code != 0 and "--chunks" in res.output
    assert not (tmp / "o.safetensors").exists()
