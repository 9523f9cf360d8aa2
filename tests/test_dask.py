"""Out-of-core inputs: Dask arrays, Zarr and HDF5 stores, .npy memmaps, and a dask.distributed cluster."""

import os

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.testing import add_noise

da = pytest.importorskip("dask.array")


@pytest.fixture(scope="module")
def X():
    return add_noise(tf.testing.random_cp((24, 20, 18), 3, seed=0).to_tensor(), 0.02)


def _close(a, b, tol=1e-10):
    A, B = a.to_tensor(), b.to_tensor()
    return float((A - B).norm() / B.norm()) < tol


def test_dask_and_in_memory_agree_for_every_method(X):
    D = da.from_array(X.numpy(), chunks=(10, 7, 18))
    for passes in (1, 2):
        assert _close(tf.tucker_sketch(D, 3, passes=passes, seed=2), tf.tucker_sketch(X, 3, passes=passes, seed=2))
    cp_mem, cp_dask = tf.cp_chunked(X, 3, n_iter_max=3, tol=0), tf.cp_chunked(D, 3, n_iter_max=3, tol=0)
    assert _close(cp_dask, cp_mem, 1e-8)
    assert abs(tf.relative_error(X, cp_mem) - tf.relative_error(X, tf.cp(X, 3))) < 1e-4
    assert abs(tf.relative_error_chunked(D, cp_dask) - tf.relative_error(X, cp_dask)) < 1e-12
    assert tf.relative_error(D, cp_dask) == tf.relative_error_chunked(D, cp_dask)  # the same entry point
    # synchronous scheduler, same answer
    assert _close(tf.tucker_sketch(D, 3, seed=2, scheduler="synchronous"), tf.tucker_sketch(X, 3, seed=2))


def test_stores_and_memmap_agree_with_memory(X, tmp_path):
    zarr = pytest.importorskip("zarr")
    h5py = pytest.importorskip("h5py")
    ref = tf.tucker_sketch(X, 3, passes=2, seed=1)
    z = zarr.open(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, chunks=(8, 8, 8), dtype="float64")
    z[:] = X.numpy()
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("data", data=X.numpy(), chunks=(12, 10, 9))
    np.save(tmp_path / "x.npy", X.numpy())
    for source in (tmp_path / "x.zarr", str(tmp_path / "x.h5"), tmp_path / "x.npy"):
        got = tf.tucker_sketch(source, 3, passes=2, seed=1)
        assert _close(got, ref), source
    mm = tf.open_tensor(tmp_path / "x.npy")
    assert isinstance(mm, np.memmap)
    assert _close(tf.tucker_sketch(mm, 3, passes=2, seed=1, chunks=5), ref)
    before = X.clone()
    tf.cp_chunked(tmp_path / "x.zarr", 3, n_iter_max=1)
    assert torch.equal(X, before) and np.array_equal(zarr.open(str(tmp_path / "x.zarr"), mode="r")[:], X.numpy())


def test_nan_chunk_and_wrong_dtype_store_are_clear_errors(X, tmp_path):
    zarr = pytest.importorskip("zarr")
    bad = X.numpy().copy()
    bad[15, 3, 2] = np.nan
    with pytest.raises(tf.InvalidTensorError, match=r"block \[10:20, 0:7, 0:18\] contains 1 NaN"):
        tf.tucker_sketch(da.from_array(bad, chunks=(10, 7, 18)), 3)
    z = zarr.open(str(tmp_path / "int.zarr"), mode="w", shape=(4, 5, 6), chunks=(2, 5, 6), dtype="int32")
    z[:] = 1
    with pytest.raises(tf.InvalidTensorError, match="int32.*float32 or float64"):
        tf.cp_chunked(tmp_path / "int.zarr", 2)
    with pytest.raises(tf.FileFormatError, match="no such file"):
        tf.tucker_sketch(tmp_path / "missing.zarr", 2)


def _kill_once(block, marker):
    # The first task to get here takes its worker process down (a crash mid-run); Dask reschedules it.
    if block.size and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return block


def test_local_cluster_survives_a_killed_worker(X, tmp_path):
    distributed = pytest.importorskip("distributed")
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests package
    marker = str(tmp_path / "killed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="400MB",
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        D = da.from_array(X.numpy(), chunks=(12, 10, 9)).map_blocks(
            _kill_once, marker, meta=np.empty((0, 0, 0)))
        got = tf.tucker_sketch(D, 3, passes=2, seed=3, scheduler=client)
    assert os.path.exists(marker)  # a worker really died
    assert _close(got, tf.tucker_sketch(X, 3, passes=2, seed=3))


def test_tt_sketch_on_dask_matches_memory():
    Y = tf.testing.random_tt((8, 9, 10, 6), (2, 3, 2), seed=1).to_tensor()
    D = da.from_array(Y.numpy(), chunks=(3, 4, 5, 6))
    a, b = tf.tt_sketch(D, (2, 3, 2), seed=2), tf.tt_sketch(Y, (2, 3, 2), seed=2)
    assert torch.allclose(a.to_tensor(), b.to_tensor(), atol=1e-9)


def test_gcp_over_dask_blocks_matches_memory():
    Y, _ = tf.testing.poisson_cp_problem((12, 13, 14), 2, seed=4)
    start = tf.gcp(Y, 2, loss="poisson", n_iter_max=3)
    D = da.from_array(Y.numpy(), chunks=(5, 13, 7))
    mem = tf.gcp(Y, 2, loss="poisson", init=start, n_iter_max=40)
    blk = tf.gcp(D, 2, loss="poisson", init=start, n_iter_max=40)
    assert blk.info.details["input"] == "dask"
    assert _close(blk, mem, 1e-6)
    bad = Y.numpy().copy()
    bad[0, 0, 0] = 0.5
    with pytest.raises(tf.InvalidTensorError, match="counts"):
        tf.gcp(da.from_array(bad, chunks=5), 2, loss="poisson", init=start)


def test_in_memory_functions_read_small_lazy_arrays_and_refuse_big_ones(X, monkeypatch):
    D = da.from_array(X.numpy(), chunks=(10, 7, 18))
    assert _close(tf.cp(D, 3), tf.cp(X, 3), 1e-12)
    assert _close(tf.tucker(D, 3), tf.tucker(X, 3), 1e-12)
    from tensorfold.core import validate

    monkeypatch.setattr(validate, "_available_memory", lambda: 4 * X.numel() * 8 - 4)
    with pytest.raises(tf.InvalidTensorError, match="block by block with tf.tucker_sketch"):
        tf.cp(D, 3)
