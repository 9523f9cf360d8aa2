"""cp_chunked: one pass over the data per sweep (block-Jacobi ALS with a monotone guard), nonnegative and
masked (EM) variants served by the same pass, on planted problems with known answers."""

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.testing import add_noise


def _collinear(shape, rank, seed, noise):
    # Factor columns sharing a common direction: ALS needs tens of sweeps here (the seed is not enough).
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(n, 1, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, rank, generator=g,
          dtype=torch.float64) for n in shape]
    return add_noise(tf.CPTensor(torch.ones(rank, dtype=torch.float64), fs).to_tensor(), noise, seed=seed)


def test_chunked_matches_in_memory_cp_on_a_memmap(tmp_path):
    X = add_noise(tf.testing.random_cp((20, 21, 22), rank=3, seed=1).to_tensor(), 0.05, seed=2).numpy()
    np.save(tmp_path / "x.npy", X)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ref = tf.cp(torch.from_numpy(X), 3, n_iter_max=500, tol=1e-12)
    for sweep in ("one-pass", "exact"):
        out = tf.cp_chunked(mm, 3, chunks=(7, 7, 7), sweep=sweep, tol=1e-10, n_iter_max=30)
        assert tf.relative_error(X, out) == pytest.approx(tf.relative_error(X, ref), rel=1e-5)
        assert out.info.details["sweep"] == sweep


def test_one_pass_sweeps_reach_the_exact_error_in_fewer_passes():
    X = _collinear((15, 16, 17), 4, seed=0, noise=0.1)
    runs = {s: tf.cp_chunked(X, 4, chunks=(8, 8, 8), sweep=s, core_margin=0, n_iter_max=60, tol=1e-9)
            for s in ("one-pass", "exact")}
    errs = {s: tf.relative_error(X, r) for s, r in runs.items()}
    assert errs["one-pass"] == pytest.approx(errs["exact"], rel=1e-3)
    assert runs["one-pass"].info.details["passes"] < runs["exact"].info.details["passes"]
    fits = runs["one-pass"].info.fit_history
    assert all(b >= a - 1e-12 for a, b in zip(fits[1:], fits[2:]))  # monotone after the measured seed
    assert fits[-1] == pytest.approx(1 - errs["one-pass"], abs=1e-9)  # the reported fit is the returned model's


@pytest.mark.parametrize("sweep", ["one-pass", "exact"])
def test_nonnegative_chunked_recovers_a_nonnegative_tensor(sweep):
    g = torch.Generator().manual_seed(0)
    X = tf.CPTensor(torch.ones(3), tuple(torch.rand(n, 3, generator=g) for n in (20, 21, 22))).to_tensor()
    out = tf.cp_chunked(X, 3, chunks=(7, 7, 7), nonnegative=True, sweep=sweep, n_iter_max=50, tol=1e-10)
    assert min(float(f.min()) for f in out.factors) >= 0 and float(out.weights.min()) >= 0
    assert 1 - tf.relative_error(X, out) > 0.999


def _planted_missing(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = tf.CPTensor(torch.ones(3), tuple(torch.randn(n, 3, generator=g) for n in (20, 21, 22))).to_tensor()
    return X, torch.rand(X.shape, generator=g) > 0.3  # 30% missing


def _errors(X, mask, out):
    Y = out.to_tensor()
    return float((Y - X)[mask].norm() / X[mask].norm()), float((Y - X)[~mask].norm() / X[~mask].norm())


def test_masked_chunked_recovers_held_out_cells_from_a_mask_or_nan():
    X, mask = _planted_missing()
    out = tf.cp_chunked(X, 3, chunks=(7, 7, 7), mask=mask, n_iter_max=100, tol=1e-10)
    obs, held = _errors(X, mask, out)
    assert obs < 1e-4 and held < 1e-4
    assert out.info.details["masked"] and out.info.fit_history[-1] > 0.9999
    Xn = X.numpy().copy()
    Xn[~mask.numpy()] = np.nan
    before = Xn.copy()
    out = tf.cp_chunked(Xn, 3, chunks=(7, 7, 7), mask="nan", n_iter_max=100, tol=1e-10)
    assert max(_errors(X, mask, out)) < 1e-4
    np.testing.assert_array_equal(Xn, before)  # input not modified


def test_masked_chunked_over_dask():
    da = pytest.importorskip("dask.array")
    X, mask = _planted_missing(seed=1)
    out = tf.cp_chunked(da.from_array(X.numpy(), chunks=7), 3, mask=da.from_array(mask.numpy(), chunks=7),
                        n_iter_max=100, tol=1e-10, scheduler="synchronous")
    assert max(_errors(X, mask, out)) < 1e-4


def test_bad_masks_and_options_are_refused_clearly():
    X, mask = _planted_missing()
    with pytest.raises(tf.ShapeError, match="mask has shape"):
        tf.cp_chunked(X, 3, mask=mask[:-1])
    with pytest.raises(tf.InvalidArgumentError, match="boolean"):
        tf.cp_chunked(X, 3, mask=mask.float())
    with pytest.raises(tf.InvalidArgumentError, match="'nan'"):
        tf.cp_chunked(X, 3, mask="missing")
    with pytest.raises(tf.InvalidArgumentError, match="sweep"):
        tf.cp_chunked(X, 3, sweep="jacobi")
    Xn = X.clone()
    Xn[0, 0, 0] = float("nan")
    with pytest.raises(tf.InvalidTensorError, match="NaN"):
        tf.cp_chunked(Xn, 3, chunks=(7, 7, 7))
