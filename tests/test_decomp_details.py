"""Details of core/ and decomp/ that the sampled mutation run (docs/testing.md) found unguarded: recorded
diagnostics, helper results worked out by hand, error messages. Known answers only."""

from __future__ import annotations

import math

import pytest
import torch

import tensorfold as tf
from tensorfold.core.norms import tr_norm
from tensorfold.decomp.tr import _balanced_split, _random_cores
from tensorfold.errors import InvalidArgumentError


def _details_matrix(m=30, n=20, rank=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                               dtype=torch.float64)


# --- decomp/svd.py ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_iter", [0, 3])
def test_svd_lowrank_records_its_power_iterations(n_iter):
    r = tf.svd_lowrank(_details_matrix(), 3, method="randomized", n_iter=n_iter)
    assert (r.info.method, r.info.n_iter, r.info.converged) == ("svd-randomized", n_iter, True)
    exact = tf.svd_lowrank(_details_matrix(), 3)
    assert (exact.info.method, exact.info.n_iter) == ("svd-exact", 0)
    assert exact.info.fit_history[0] == pytest.approx(1.0, abs=1e-12)  # rank 3 of a rank-3 matrix


def test_svd_lowrank_eps_with_randomized_names_the_fix():
    with pytest.raises(InvalidArgumentError, match=r"^eps needs method='exact' \(the randomized method works at a "
                                                   r"given rank\)$"):
        tf.svd_lowrank(_details_matrix(), eps=0.1, method="randomized")


# --- decomp/tr.py -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, split", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (6, (2, 3)),
                                         (7, (1, 7)), (12, (3, 4)), (16, (4, 4)), (18, (3, 6))])
def test_balanced_split_is_the_most_square_factor_pair(rank, split):
    assert _balanced_split(rank) == split


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_tr_cores_have_the_data_norm_and_dtype(dtype):
    X = torch.ones(4, 5, 6, dtype=dtype)
    norm_sq = float(torch.sum(X * X))  # 120
    cores = _random_cores(X, (2, 3, 2), seed=0, norm_sq=norm_sq)
    assert [c.shape for c in cores] == [(2, 4, 3), (3, 5, 2), (2, 6, 2)]
    assert all(c.dtype == dtype for c in cores)
    assert float(tr_norm(cores)) == pytest.approx(math.sqrt(120), rel=1e-5)


# --- decomp/tt.py -----------------------------------------------------------------------------------
def test_tt_results_name_their_method():
    X = tf.testing.random_tt((6, 7, 8), (2, 3), seed=0).to_tensor()
    tt = tf.tensor_train(X, eps=0.1)
    assert tt.info.method == "tt-svd" and tt.rank == (1, 2, 3, 1)
    assert tf.tt_round(tt, eps=1e-3).info.method == "tt-round"


# --- decomp/cp.py -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, mode", [((2, 5, 3), 1), ((3, 4, 5, 2), 1), ((3, 4, 5, 2), 2), ((1, 4, 5), 1),
                                         ((3, 4, 1), 1)])
def test_mode_times_unfolding_is_the_product_of_unfoldings(shape, mode):
    from tensorfold.decomp.cp import _mode_times_unfolding

    g = torch.Generator().manual_seed(0)
    T = torch.randn(*shape, generator=g, dtype=torch.float64)
    zshape = list(shape)
    zshape[mode] = 3
    Z = torch.randn(*zshape, generator=g, dtype=torch.float64)
    expected = tf.unfold(T, mode) @ tf.unfold(Z, mode).T
    torch.testing.assert_close(_mode_times_unfolding(T, Z, mode), expected, rtol=1e-12, atol=1e-12)


# --- decomp/nonnegative.py --------------------------------------------------------------------------
def test_balance_equalises_column_norms_and_leaves_zero_columns_alone():
    from tensorfold.decomp.nonnegative import _balance

    A = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # column norms sqrt(2), 0
    B = torch.tensor([[2.0, 3.0], [2.0, 3.0]], dtype=torch.float64)  # 2 sqrt(2), 3 sqrt(2)
    a, b = _balance([A, B])
    # column 0: the geometric mean of sqrt(2) and 2 sqrt(2) is 2 in both modes; column 1 has a zero: unchanged
    torch.testing.assert_close(a, torch.tensor([[2 ** 0.5, 0.0], [2 ** 0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([[2 ** 0.5, 3.0], [2 ** 0.5, 3.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_nonnegative_init_has_the_data_dtype(dtype):
    from tensorfold.decomp.nonnegative import _initial_cp

    X = torch.ones(3, 4, 5, dtype=dtype)
    factors = _initial_cp(X, 2, "random", 0)
    assert [tuple(f.shape) for f in factors] == [(3, 2), (4, 2), (5, 2)]
    assert all(f.dtype == dtype and bool((f >= 0).all()) for f in factors)


# --- decomp/symmetric.py ----------------------------------------------------------------------------
def test_symmetric_cp_names_its_method_and_checks_n_starts():
    v = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    X = torch.einsum("i,j,k->ijk", v, v, v) * 2.0
    result = tf.symmetric_cp(X, 1)
    assert result.info.method == "symmetric-cp-spm"
    assert float(result.weights[0]) == pytest.approx(2.0, rel=1e-8)
    with pytest.raises(tf.TensorfoldError, match="n_starts"):
        tf.symmetric_cp(X, 1, n_starts=0)


# --- decomp/tucker.py -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["hosvd", "sthosvd"])
def test_one_pass_tucker_is_converged_after_zero_iterations(method):
    X = tf.testing.random_tucker((6, 7, 8), (2, 2, 2), seed=0).to_tensor()
    info = tf.tucker(X, (2, 2, 2), method=method).info
    assert (info.method, info.n_iter, info.converged) == (f"tucker-{method}", 0, True)


def test_tucker_tol_error_names_tol():
    X = tf.testing.random_tucker((6, 7, 8), (2, 2, 2), seed=0).to_tensor()
    with pytest.raises(InvalidArgumentError, match=r"^tol "):
        tf.tucker(X, (2, 2, 2), tol=-1.0)


# --- core/settings.py -------------------------------------------------------------------------------
def test_settings_to_json_honours_indent():
    config = tf.CompressConfig(budget=0.5)
    assert "\n" in config.to_json() and "\n" not in config.to_json(indent=None)
    assert config.to_json(indent=None) == json_dumps(config.to_dict())


def json_dumps(d):
    import json

    return json.dumps(d)


# --- decomp/completion.py ---------------------------------------------------------------------------
def test_tucker_completion_is_the_same_in_many_chunks(monkeypatch):
    from tensorfold.decomp import completion

    X = tf.testing.random_tucker((8, 9, 10), (2, 2, 2), seed=0).to_tensor()
    mask = torch.rand(X.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    whole = tf.complete(X, mask=mask, rank=(2, 2, 2), model="tucker", n_iter_max=5, tol=0.0)
    monkeypatch.setattr(completion, "_CHUNK_SCALARS", 8 * 37)  # 37 observed cells per chunk (rank product 8)
    chunked = tf.complete(X, mask=mask, rank=(2, 2, 2), model="tucker", n_iter_max=5, tol=0.0)
    torch.testing.assert_close(chunked.to_tensor(), whole.to_tensor(), rtol=1e-9, atol=1e-9)
    # the observed error of every sweep (computed in chunks too) is the same
    assert chunked.info.fit_history == pytest.approx(whole.info.fit_history, rel=1e-9, abs=1e-12)
    assert len(whole.info.fit_history) >= 5


# --- decomp/rank_selection.py -----------------------------------------------------------------------
@pytest.mark.parametrize("budget, ranks", [(1000, (1, 3, 3)), (17, (1, 2, 2)), (11, (1, 1, 1))])
def test_greedy_core_shape_skips_a_full_mode(budget, ranks):
    """Mode 0 has size 1 (always full). Worked by hand: from (1,1,1) (size 8) mode 1 gains 0.3 for 4 more
    parameters, mode 2 0.25 for 4: (1,2,1) size 12; then mode 1 gains 0.1/4, mode 2 0.25/5: (1,2,2) size 17."""
    import numpy as np

    from tensorfold.decomp.rank_selection import _greedy

    cumulative = [np.array([0.0, 1.0]), np.array([0.0, 0.6, 0.9, 1.0]), np.array([0.0, 0.7, 0.95, 1.0])]
    assert _greedy(cumulative, (1, 3, 3), budget) == ranks


def test_select_rank_tucker_reports_the_hosvd_error_bound():
    g = torch.Generator().manual_seed(0)
    X = tf.testing.random_tucker((8, 9, 10), (2, 3, 3), seed=0).to_tensor()
    X = X + 0.05 * torch.linalg.vector_norm(X) / 27 * torch.randn(X.shape, generator=g, dtype=X.dtype)
    result = tf.select_rank(X, "tucker", eps=0.2)
    sel = result.info.details["selection"]
    ranks = sel["ranks"]
    tail = sum(float((torch.linalg.svdvals(tf.unfold(X, n)) ** 2)[r:].sum()) for n, r in enumerate(ranks))
    assert sel["error_bound"] == pytest.approx(math.sqrt(tail) / float(torch.linalg.vector_norm(X)), rel=1e-9)
    assert tf.relative_error(X, result) <= sel["error_bound"] + 1e-12 and sel["error_bound"] <= 0.2
    assert sel["budget"] == sel["size"] == math.prod(ranks) + sum(n * r for n, r in zip(X.shape, ranks))


def test_select_rank_tt_names_its_arguments():
    X = tf.testing.random_tt((4, 5, 6), (2, 2), seed=0).to_tensor()
    with pytest.raises(InvalidArgumentError, match=r"^select_rank\(method='tt'\) needs exactly one of eps or "
                                                   r"budget$"):
        tf.select_rank(X, "tt")


# --- decomp/results.py ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, cores, message", [
    (tf.TTTensor, [torch.ones(1, 3, 2, 1), torch.ones(2, 3, 1)], "^TT cores must be 3-way"),
    (tf.TRTensor, [torch.ones(2, 3, 2, 1), torch.ones(2, 3, 2)], "^TR cores must be 3-way"),
])
def test_core_chain_errors_name_the_format(kind, cores, message):
    with pytest.raises(tf.TensorfoldError, match=message):
        kind(cores)


def test_load_names_an_unknown_result_type(tmp_path):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"tensorfold": json.dumps({"type": "hypercube"})})
    with pytest.raises(tf.FileFormatError, match=r"odd\.safetensors: unknown result type 'hypercube'$"):
        tf.load(path)


def test_cp_input_errors_name_the_argument():
    X = tf.testing.random_cp((5, 6, 7), 2, seed=0).to_tensor()
    with pytest.raises(InvalidArgumentError, match=r"^callback must be None or callable as callback\(iteration, "
                                                   r"fit\), got int$"):
        tf.cp(X, 2, callback=5)
    with pytest.raises(tf.TensorfoldError, match=r"^X has 1 modes \(shape \(3,\)\); at least 2 needed$"):
        tf.cp(torch.ones(3), 2)
