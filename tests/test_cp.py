"""CP-ALS: exact recovery, monotone fit, determinism, peers as oracles, bad input, callback, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.decomp.cp import cp
from tensorfold.decomp.results import CPTensor, load
from tensorfold.errors import ConvergenceWarning, InvalidArgumentError, InvalidTensorError, RankError, ShapeError
from tensorfold.testing import add_noise, random_cp

pytestmark = pytest.mark.usefixtures("one_thread")


def _svd_init(X: torch.Tensor, rank: int) -> CPTensor:
    """Leading left singular vectors of every unfolding: the init every library gets in the peer tests."""
    factors = [torch.linalg.svd(tf.unfold(X, n), full_matrices=False)[0][:, :rank] for n in range(X.ndim)]
    return CPTensor(torch.ones(rank, dtype=X.dtype), factors)


def _fit(X: torch.Tensor, Y: torch.Tensor) -> float:
    return 1.0 - float(torch.linalg.vector_norm(X - Y) / torch.linalg.vector_norm(X))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("line_search", [False, True])
@pytest.mark.parametrize(("shape", "rank"), [((12, 13, 14), 3), ((11, 10, 12, 9), 2)])
def test_exact_recovery_float64(shape, rank, compress, line_search):
    X = random_cp(shape, rank, seed=3).to_tensor()
    result = cp(X, rank, tol=1e-14, n_iter_max=500, compress=compress, line_search=line_search)
    assert result.info.details["compressed"] is compress
    assert result.info.converged
    assert tf.relative_error(X, result) < 1e-8
    # the reported fit is the fit to X
    assert abs(result.info.fit_history[-1] - (1 - tf.relative_error(X, result))) < 1e-10


@pytest.mark.parametrize("init", ["svd", "random"])
def test_exact_recovery_float32(init):
    X = random_cp((10, 11, 12), 3, seed=4, dtype=torch.float32).to_tensor()
    result = cp(X, 3, init=init, n_iter_max=300)
    assert result.dtype == torch.float32
    assert result.info.details["dtype"] == "float32"
    assert tf.relative_error(X, result) < 1e-4
    assert abs(result.info.details["final_fit"] - (1 - tf.relative_error(X.double(), result.to(torch.float64)))) < 1e-6


def test_matrix_and_rank_one():
    M = random_cp((9, 7), 2, seed=5).to_tensor()
    assert tf.relative_error(M, cp(M, 2, tol=1e-14, n_iter_max=300)) < 1e-8
    X = random_cp((5, 6, 7), 1, seed=6).to_tensor()
    assert tf.relative_error(X, cp(X, 1, tol=1e-14)) < 1e-10


@pytest.mark.parametrize("compress", [False, True])
def test_fit_history_monotone_without_line_search(compress):
    X = add_noise(random_cp((20, 21, 22), 4, seed=7).to_tensor(), 0.1, seed=8)
    result = cp(X, 4, init="random", n_iter_max=15, tol=0, line_search=False, compress=compress, seed=1)
    assert result.info.details["compressed"] is compress
    fits = np.array(result.info.fit_history)
    assert len(fits) == result.info.n_iter >= 2
    assert np.all(np.diff(fits) >= -1e-12)
    assert 0.85 < fits[-1] < 0.95  # 10% noise: the fit sits just under 0.9 + what rank 4 can absorb


def test_compression_keeps_the_fit_of_plain_als():
    X = add_noise(random_cp((40, 42, 44), 5, seed=9).to_tensor(), 0.05, seed=10)
    plain = cp(X, 5, compress=False, n_iter_max=200, tol=1e-10)
    compressed = cp(X, 5, compress=True, n_iter_max=200, tol=1e-10)
    assert compressed.info.details["compressed"] and not plain.info.details["compressed"]
    assert compressed.info.details["core_shape"] == [10, 10, 10]
    assert abs(tf.relative_error(X, compressed) - tf.relative_error(X, plain)) < 1e-7
    # 5% noise and a full-rank fit: the error is the noise level, measured on X itself
    assert abs(tf.relative_error(X, compressed) - 0.05) < 0.005


@pytest.mark.filterwarnings("ignore::tensorfold.errors.ConvergenceWarning")
def test_same_seed_same_factors():
    X = add_noise(random_cp((9, 10, 11), 3, seed=11).to_tensor(), 0.05)
    a = cp(X, 3, init="random", seed=5, n_iter_max=20, tol=0)
    b = cp(X, 3, init="random", seed=5, n_iter_max=20, tol=0)
    c = cp(X, 3, init="random", seed=6, n_iter_max=1, tol=0)
    assert torch.equal(a.weights, b.weights)
    assert all(torch.equal(f, g) for f, g in zip(a.factors, b.factors))
    assert not torch.equal(a.factors[0], c.factors[0])
    state = torch.random.get_rng_state()  # tensorfold never draws from torch's global RNG
    cp(X, 3, init="random", seed=5, n_iter_max=2, tol=0)
    assert torch.equal(state, torch.random.get_rng_state())


def test_input_not_modified_and_numpy_input():
    X = add_noise(random_cp((8, 9, 10), 2, seed=12).to_tensor(), 0.01)
    before = X.clone()
    result = cp(X.numpy(), 2)
    assert torch.equal(X, before)
    assert isinstance(result.factors[0], torch.Tensor)


@pytest.mark.parametrize("line_search", [False, True])
def test_fit_matches_tensorly_and_pyttb(line_search):
    tl = pytest.importorskip("tensorly")
    ttb = pytest.importorskip("pyttb")
    from tensorly.decomposition import parafac

    X = add_noise(random_cp((15, 16, 17), 4, seed=13).to_tensor(), 0.05, seed=14)
    init = _svd_init(X, 4)
    n_iter = 25
    ours = cp(X, 4, init=init, n_iter_max=n_iter, tol=0, line_search=line_search, compress=False)
    ours_fit = 1 - tf.relative_error(X, ours)

    tl.set_backend("numpy")
    Xn = X.numpy()
    tl_init = tl.cp_tensor.CPTensor((np.ones(4), [f.numpy().copy() for f in init.factors]))
    tl_cp = parafac(Xn, 4, n_iter_max=n_iter, init=tl_init, tol=0)
    tl_fit = _fit(X, torch.from_numpy(tl.cp_to_tensor(tl_cp)))

    kt = ttb.ktensor([f.numpy().copy() for f in init.factors], np.ones(4))
    py_cp, _, _ = ttb.cp_als(ttb.tensor(np.asfortranarray(Xn)), 4, stoptol=0, maxiters=n_iter, init=kt, printitn=0)
    py_fit = _fit(X, torch.from_numpy(np.ascontiguousarray(py_cp.full().data)))

    assert ours_fit >= tl_fit - 1e-3
    assert ours_fit >= py_fit - 1e-3
    assert 0.9 < ours_fit < 0.96  # the 5% noise sets the attainable fit
    if not line_search:
        # Same init, same update rule: plain ALS reproduces TensorLy's iterates
        assert abs(ours_fit - tl_fit) < 1e-8


def test_callback_and_verbose(capsys):
    X = add_noise(random_cp((8, 9, 10), 2, seed=15).to_tensor(), 0.02)
    seen = []
    result = cp(X, 2, callback=lambda it, fit: seen.append((it, fit)), verbose=True, n_iter_max=30)
    assert [it for it, _ in seen] == list(range(1, result.info.n_iter + 1))
    assert tuple(fit for _, fit in seen) == result.info.fit_history
    assert "fit" in capsys.readouterr().err


def test_info_fields():
    X = add_noise(random_cp((8, 9, 10), 2, seed=16).to_tensor(), 0.02)
    info = cp(X, 2).info
    assert info.method == "cp-als"
    assert info.n_iter == len(info.fit_history) > 0
    assert info.seconds > 0
    for key in ("dtype", "device", "compressed", "full_iterations", "final_fit"):
        assert key in info.details


def test_convergence_warning():
    X = add_noise(random_cp((8, 9, 10), 3, seed=17).to_tensor(), 0.05)
    with pytest.warns(ConvergenceWarning):
        result = cp(X, 3, init="random", n_iter_max=2, tol=1e-12)
    assert not result.info.converged


def test_save_load_round_trip(tmp_path):
    X = add_noise(random_cp((8, 9, 10), 2, seed=18).to_tensor(), 0.02)
    result = cp(X, 2)
    path = result.save(tmp_path / "cp.safetensors")
    back = load(path)
    assert isinstance(back, CPTensor)
    assert torch.equal(back.weights, result.weights)
    assert all(torch.equal(a, b) for a, b in zip(back.factors, result.factors))
    assert back.info.fit_history == result.info.fit_history
    assert back.info.details["compressed"] == result.info.details["compressed"]


def test_given_init_is_used():
    X = random_cp((8, 9, 10), 2, seed=19).to_tensor()
    truth = random_cp((8, 9, 10), 2, seed=19)
    result = cp(X, 2, init=truth, n_iter_max=3, tol=0)
    assert result.info.fit_history[0] > 1 - 1e-10


def test_bad_input():
    good = random_cp((4, 5, 6), 2, seed=20).to_tensor()
    bad = good.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InvalidTensorError, match="NaN"):
        cp(bad, 2)
    with pytest.raises(InvalidTensorError, match="empty"):
        cp(torch.zeros(0, 3, 4, dtype=torch.float64), 2)
    with pytest.raises(InvalidTensorError, match="dtype"):
        cp(torch.ones(3, 4, 5, dtype=torch.int64), 2)
    with pytest.raises(InvalidTensorError, match="modes"):
        cp(torch.ones(5, dtype=torch.float64), 1)
    with pytest.raises(RankError):
        cp(good, 0)
    with pytest.raises(RankError):
        cp(good, 1000)
    with pytest.raises(RankError):
        cp(good, 2.5)
    with pytest.raises(InvalidArgumentError):
        cp(good, 2, init="magic")
    with pytest.raises(InvalidArgumentError):
        cp(good, 2, n_iter_max=0)
    with pytest.raises(InvalidArgumentError):
        cp(good, 2, tol=-1)
    with pytest.raises(InvalidArgumentError):
        cp(good, 2, compress="yes")
    with pytest.raises(InvalidArgumentError):
        cp(torch.zeros(3, 4, 5, dtype=torch.float64), 2)
    with pytest.raises(ShapeError):
        cp(good, 2, init=random_cp((4, 5, 7), 2))
    with pytest.raises(ShapeError):
        cp(good, 2, init=random_cp((4, 5, 6), 3))


def test_public_name():
    X = random_cp((6, 7, 8), 2, seed=21).to_tensor()
    assert tf.cp is cp
    assert tf.relative_error(X, tf.cp(X, rank=2, seed=0)) < 1e-8


def test_lossy_compression_is_repaired_on_the_full_tensor():
    # 30% noise and no margin: the leading rank-5 mode subspaces miss part of the CP components, so the
    # core phase alone falls short; the ALS sweeps on the full tensor must recover the plain-ALS fit.
    X = add_noise(random_cp((40, 42, 44), 5, seed=9).to_tensor(), 0.3, seed=10)
    plain = cp(X, 5, compress=False, n_iter_max=300, tol=1e-10)
    lossy = cp(X, 5, compress=True, core_margin=0, n_iter_max=300, tol=1e-10)
    details = lossy.info.details
    assert details["core_shape"] == [5, 5, 5]
    assert details["refinement_gain"] > 1e-3
    assert details["full_iterations"] > 1
    assert abs(tf.relative_error(X, lossy) - tf.relative_error(X, plain)) < 1e-7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    X = add_noise(random_cp((30, 31, 32), 3, seed=22, dtype=dtype).to_tensor(), 0.01)
    cpu = cp(X, 3, seed=0, compress=True)
    gpu = cp(X.cuda(), 3, seed=0, compress=True)
    assert gpu.device.type == "cuda" and gpu.info.details["device"].startswith("cuda")
    bound = 1e-5 if dtype == torch.float32 else 1e-9
    assert abs(tf.relative_error(X, gpu.to("cpu")) - tf.relative_error(X, cpu)) < bound
