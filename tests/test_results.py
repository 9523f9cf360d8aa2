"""Result types: save/load round trips, to(dtype), parameter counts, summary, corrupt files, atomic saves."""

import json
import math

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.decomp.results import read_header
from tensorfold.errors import FileFormatError
from tensorfold.testing import add_noise, random_cp, random_tr, random_tt, random_tucker

DTYPES = [torch.float64, torch.float32]


def make_results(dtype):
    """One result of every type, each produced by its algorithm (so ``info`` is filled in)."""
    X = add_noise(random_tucker((6, 7, 8), (2, 3, 2), seed=0, dtype=dtype).to_tensor(), 0.05)
    M = add_noise(random_tt((12, 9), (3,), seed=1, dtype=dtype).to_tensor(), 0.05)
    cp = random_cp((6, 7, 8), 3, seed=2, dtype=dtype)
    cp = tf.CPTensor(cp.weights * torch.tensor([3.0, 2.0, 1.0], dtype=dtype), cp.factors,
                     tf.FitInfo("cp-test", 4, False, (0.5, 0.75), 0.25, {"note": "made by hand", "n": [1, 2]}))
    return {
        "cp": cp,
        "tucker": tf.tucker(X, (2, 3, 2), n_iter_max=3, tol=0),
        "tt": tf.tensor_train(X, eps=0.2),
        "tr": tf.tensor_ring(X, (1, 2, 2), n_iter_max=2, tol=0),
        "svd": tf.svd_lowrank(M, 3),
    }


def expected_n_params(result) -> int:
    if isinstance(result, tf.CPTensor):
        return result.rank * (1 + sum(result.shape))
    if isinstance(result, tf.TuckerTensor):
        return math.prod(result.rank) + sum(n * r for n, r in zip(result.shape, result.rank))
    if isinstance(result, (tf.TTTensor, tf.TRTensor)):
        ranks = result.rank
        return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(result.shape))
    if isinstance(result, tf.LowRankMatrix):
        m, n = result.shape
        return result.rank * (m + n + 1)
    raise TypeError(type(result))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["cp", "tucker", "tt", "tr", "svd"])
def test_save_load_round_trip(tmp_path, kind, dtype):
    result = make_results(dtype)[kind]
    path = result.save(tmp_path / f"{kind}.safetensors")
    loaded = tf.load(path)
    assert type(loaded) is type(result) and loaded.kind == kind
    assert loaded.dtype == dtype and loaded.shape == result.shape and loaded.rank == result.rank
    saved, back = result.tensors(), loaded.tensors()
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    assert torch.equal(loaded.to_tensor(), result.to_tensor())
    assert loaded.info == result.info  # method, iterations, convergence, fit history, seconds, details
    header = read_header(path)
    assert header["type"] == kind and header["n_params"] == result.n_params
    assert header["info"]["fit_history"] == list(result.info.fit_history)


@pytest.mark.parametrize("kind", ["cp", "tucker", "tt", "tr", "svd"])
def test_to_dtype_and_norm(kind):
    result = make_results(torch.float64)[kind]
    single = result.to(torch.float32)
    assert single.dtype == torch.float32 and single.info == result.info and type(single) is type(result)
    full = result.to_tensor()
    assert torch.allclose(single.to_tensor().double(), full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    back = single.to(dtype=torch.float64)
    assert back.dtype == torch.float64
    assert float(result.norm()) == pytest.approx(float(torch.linalg.vector_norm(full)), rel=1e-12)
    assert float(single.norm()) == pytest.approx(float(torch.linalg.vector_norm(full)), rel=1e-5)


@pytest.mark.parametrize("kind", ["cp", "tucker", "tt", "tr", "svd"])
def test_n_params_compression_ratio_and_summary(kind):
    result = make_results(torch.float64)[kind]
    assert result.n_params == expected_n_params(result)
    assert result.compression_ratio == pytest.approx(math.prod(result.shape) / expected_n_params(result))
    summary = result.summary()
    json.dumps(summary)  # JSON-friendly
    assert summary["type"] == kind and summary["shape"] == list(result.shape)
    assert summary["n_params"] == result.n_params and summary["dtype"] == "float64" and summary["device"] == "cpu"
    rank = result.rank
    assert summary["rank"] == (list(rank) if isinstance(rank, tuple) else rank)
    assert kind in repr(result).lower() or type(result).__name__ in repr(result)


def test_concrete_parameter_counts():
    assert random_cp((10, 20, 30), 4).n_params == 4 + 4 * 60
    assert random_tucker((10, 20, 30), (2, 3, 4)).n_params == 24 + 20 + 60 + 120
    assert random_tt((10, 20, 30), (2, 3)).n_params == 20 + 2 * 20 * 3 + 3 * 30
    assert random_tr((10, 20, 30), (2, 3, 4)).n_params == 2 * 10 * 3 + 3 * 20 * 4 + 4 * 30 * 2
    tt = random_tt((10, 20, 30), (2, 3))
    assert tt.compression_ratio == pytest.approx(6000 / 230)


def test_load_on_device_argument(tmp_path):
    result = make_results(torch.float64)["tt"]
    loaded = tf.load(result.save(tmp_path / "tt.safetensors"), device="cpu")
    assert loaded.device.type == "cpu"


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileFormatError, match="no such file"):
        tf.load(missing)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(FileFormatError):
        tf.load(garbage)

    npy = tmp_path / "array.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(FileFormatError):
        tf.load(npy)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, str(foreign))
    with pytest.raises(FileFormatError, match="not one written by tensorfold"):
        tf.load(foreign)

    unknown = tmp_path / "unknown.safetensors"
    save_file({"w": torch.ones(3)}, str(unknown), metadata={"tensorfold": json.dumps({"type": "hypercube"})})
    with pytest.raises(FileFormatError, match="unknown result type"):
        tf.load(unknown)

    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"w": torch.ones(3)}, str(bad_json), metadata={"tensorfold": "{not json"})
    with pytest.raises(FileFormatError, match="corrupt"):
        tf.load(bad_json)

    inconsistent = tmp_path / "inconsistent.safetensors"
    save_file({"core0": torch.ones(1, 3, 2), "core1": torch.ones(3, 4, 1)}, str(inconsistent),
              metadata={"tensorfold": json.dumps({"type": "tt"})})
    with pytest.raises(FileFormatError, match="inconsistent"):
        tf.load(inconsistent)

    missing_key = tmp_path / "missing_key.safetensors"
    save_file({"factor0": torch.ones(3, 2)}, str(missing_key), metadata={"tensorfold": json.dumps({"type": "cp"})})
    with pytest.raises(FileFormatError):
        tf.load(missing_key)


def test_load_rejects_truncated_file(tmp_path):
    path = make_results(torch.float64)["tucker"].save(tmp_path / "tucker.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError):
        tf.load(truncated)


def test_failed_save_leaves_original_untouched(tmp_path, monkeypatch):
    import safetensors.torch

    results = make_results(torch.float64)
    path = results["tt"].save(tmp_path / "result.safetensors")
    original = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        results["tucker"].save(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.safetensors"]  # no temporary left behind
    monkeypatch.undo()
    assert isinstance(tf.load(path), tf.TTTensor)


def test_save_creates_parent_directories_and_returns_path(tmp_path):
    result = make_results(torch.float32)["svd"]
    path = result.save(tmp_path / "a" / "b" / "m.safetensors")
    assert path.is_file() and isinstance(tf.load(path), tf.LowRankMatrix)
