"""Property tests of the core tensor operations (hypothesis, tiny shapes, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorfold.core.mttkrp import mttkrp, mttkrp_from_partial, partial_mttkrp
from tensorfold.core.norms import cp_inner, cp_norm, tr_inner, tr_norm, tt_inner, tt_norm, tucker_norm
from tensorfold.core.svd import truncated_svd
from tensorfold.core.tenalg import fold, khatri_rao, kronecker, mode_dot, unfold
from tensorfold.decomp.error import relative_error
from tensorfold.decomp.results import LowRankMatrix
from tensorfold.testing import random_cp, random_tr, random_tt, random_tucker

FAST = settings(max_examples=25, deadline=None)
shapes = st.lists(st.integers(1, 4), min_size=2, max_size=5).map(tuple)
seeds = st.integers(0, 2**31 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b, tol=1e-10):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()) if b.numel() else 1.0)))


@FAST
@given(shapes, seeds, st.data())
def test_fold_inverts_unfold(shape, seed, data):
    X = _randn(*shape, seed=seed)
    n = data.draw(st.integers(0, len(shape) - 1))
    M = unfold(X, n)
    assert M.shape == (shape[n], math.prod(shape) // shape[n])
    assert torch.equal(fold(M, n, shape), X)
    # the unfolding puts mode n first and keeps the other modes in order (row-major)
    assert torch.equal(M, X.movedim(n, 0).reshape(shape[n], -1))


@FAST
@given(shapes, seeds, st.data())
def test_mode_products_commute_and_compose(shape, seed, data):
    d = len(shape)
    X = _randn(*shape, seed=seed)
    m = data.draw(st.integers(0, d - 1))
    n = data.draw(st.integers(0, d - 1).filter(lambda k: k != m))
    A = _randn(3, shape[m], seed=seed + 1)
    B = _randn(2, shape[n], seed=seed + 2)
    assert _close(mode_dot(mode_dot(X, A, m), B, n), mode_dot(mode_dot(X, B, n), A, m))
    C = _randn(4, 3, seed=seed + 3)
    # X x_m A x_m C == X x_m (C A)
    assert _close(mode_dot(mode_dot(X, A, m), C, m), mode_dot(X, C @ A, m))
    # the definition: unfold(X x_m A, m) == A unfold(X, m)
    assert _close(unfold(mode_dot(X, A, m), m), A @ unfold(X, m))
    assert _close(mode_dot(X, A.T, m, transpose=True), mode_dot(X, A, m))


@FAST
@given(shapes, seeds, st.integers(1, 3))
def test_mttkrp_equals_unfold_times_khatri_rao(shape, seed, rank):
    d = len(shape)
    X = _randn(*shape, seed=seed)
    factors = [_randn(s, rank, seed=seed + 1 + k) for k, s in enumerate(shape)]
    for n in range(d):
        naive = unfold(X, n) @ khatri_rao(factors, skip=n)
        assert _close(mttkrp(X, factors, n), naive)
    # the dimension-tree pieces give the same MTTKRPs for both blocks of every split
    for h in range(1, d):
        for keep in (list(range(h)), list(range(h, d))):
            P = partial_mttkrp(X, factors, keep)
            for n in keep:
                naive = unfold(X, n) @ khatri_rao(factors, skip=n)
                assert _close(mttkrp_from_partial(P, factors, keep, n), naive)


@FAST
@given(st.lists(st.integers(1, 4), min_size=2, max_size=3), seeds, st.integers(1, 3))
def test_khatri_rao_and_kronecker_identities(rows, seed, rank):
    mats = [_randn(r, rank, seed=seed + k) for k, r in enumerate(rows)]
    kr = khatri_rao(mats)
    assert kr.shape == (math.prod(rows), rank)
    for r in range(rank):
        col = mats[0][:, r]
        for M in mats[1:]:
            col = torch.kron(col, M[:, r])
        assert _close(kr[:, r], col)
    # (A (.) B)^T (A (.) B) == (A^T A) * (B^T B)
    gram = torch.ones(rank, rank, dtype=torch.float64)
    for M in mats:
        gram = gram * (M.T @ M)
    assert _close(kr.T @ kr, gram)
    # mixed product: (A (x) B)(C (x) D) == AC (x) BD
    A, B = _randn(2, 3, seed=seed), _randn(3, 2, seed=seed + 7)
    C, D = _randn(3, 2, seed=seed + 8), _randn(2, 4, seed=seed + 9)
    assert _close(kronecker([A, B]) @ kronecker([C, D]), kronecker([A @ C, B @ D]))
    # the Khatri-Rao product is a column subset of the Kronecker product
    full = kronecker(mats)
    idx = [sum(r * rank ** (len(mats) - 1 - k) for k in range(len(mats))) for r in range(rank)]
    assert _close(full[:, idx], kr)


small_shapes = st.lists(st.integers(2, 4), min_size=2, max_size=4).map(tuple)


@FAST
@given(small_shapes, seeds, st.integers(1, 3))
def test_norms_of_decompositions_equal_norms_of_reconstructions(shape, seed, rank):
    d = len(shape)
    cp_t = random_cp(shape, rank, seed=seed % 10_000, normalize=False)
    cp_t = type(cp_t)(_randn(rank, seed=seed), cp_t.factors)
    assert _close(cp_norm(cp_t.weights, cp_t.factors), torch.linalg.vector_norm(cp_t.to_tensor()))
    ranks = [min(rank, s) for s in shape]
    tk = random_tucker(shape, ranks, seed=seed % 10_000, orthogonal=False)
    assert _close(tucker_norm(tk.core, tk.factors), torch.linalg.vector_norm(tk.to_tensor()))
    tt = random_tt(shape, [rank] * (d - 1), seed=seed % 10_000)
    assert _close(tt_norm(tt.cores), torch.linalg.vector_norm(tt.to_tensor()))
    tr = random_tr(shape, [rank] * d, seed=seed % 10_000)
    assert _close(tr_norm(tr.cores), torch.linalg.vector_norm(tr.to_tensor()))


@FAST
@given(small_shapes, seeds, st.integers(1, 3))
def test_inner_products_equal_dense_inner_products(shape, seed, rank):
    d = len(shape)
    X = _randn(*shape, seed=seed)
    cp_t = random_cp(shape, rank, seed=seed % 10_000)
    assert _close(cp_inner(X, cp_t.weights, cp_t.factors), (X * cp_t.to_tensor()).sum())
    tt = random_tt(shape, [rank] * (d - 1), seed=seed % 10_000)
    assert _close(tt_inner(X, tt.cores), (X * tt.to_tensor()).sum())
    tr = random_tr(shape, [rank] * d, seed=seed % 10_000)
    assert _close(tr_inner(X, tr.cores), (X * tr.to_tensor()).sum())


@FAST
@given(small_shapes, seeds, st.integers(1, 3), st.sampled_from(["cp", "tucker", "tt", "tr"]))
def test_relative_error_equals_dense_formula(shape, seed, rank, kind):
    d = len(shape)
    if kind == "cp":
        approx = random_cp(shape, rank, seed=seed % 10_000)
    elif kind == "tucker":
        approx = random_tucker(shape, [min(rank, s) for s in shape], seed=seed % 10_000)
    elif kind == "tt":
        approx = random_tt(shape, [rank] * (d - 1), seed=seed % 10_000)
    else:
        approx = random_tr(shape, [rank] * d, seed=seed % 10_000)
    Y = approx.to_tensor()
    # data near the approximation (small errors: the cancellation-prone case) and far from it
    for scale in (1e-9, 1e-3, 1.0):
        X = Y + scale * float(torch.linalg.vector_norm(Y)) * _randn(*shape, seed=seed + 1) / math.sqrt(Y.numel())
        dense = float(torch.linalg.vector_norm(X - Y) / torch.linalg.vector_norm(X))
        assert relative_error(X, approx) == pytest.approx(dense, rel=1e-6, abs=1e-12)


@FAST
@given(st.integers(2, 7), st.integers(2, 7), seeds)
def test_relative_error_of_low_rank_matrix(m, n, seed):
    M = _randn(m, n, seed=seed)
    t = truncated_svd(M, rank=1)
    approx = LowRankMatrix(t.U, t.S, t.V)
    dense = float(torch.linalg.vector_norm(M - approx.to_tensor()) / torch.linalg.vector_norm(M))
    assert relative_error(M, approx) == pytest.approx(dense, rel=1e-6, abs=1e-12)


@FAST
@given(st.integers(2, 8), st.integers(2, 8), seeds, st.data())
def test_truncated_svd_rank_and_error_rules(m, n, seed, data):
    M = _randn(m, n, seed=seed)
    S_all = torch.linalg.svdvals(M)
    k = data.draw(st.integers(1, min(m, n)))
    t = truncated_svd(M, rank=k)
    assert t.U.shape == (m, k) and t.S.shape == (k,) and t.V.shape == (n, k)
    residual_sq = float(torch.linalg.vector_norm(M - (t.U * t.S) @ t.V.T) ** 2)
    # Eckart-Young: the best rank-k error is the tail of the spectrum, and tail_sq reports it
    assert t.tail_sq == pytest.approx(float((S_all[k:] ** 2).sum()), rel=1e-9, abs=1e-12)
    assert residual_sq == pytest.approx(t.tail_sq, rel=1e-9, abs=1e-12)
    # a relative-error target: met, and by the smallest rank that meets it
    eps = data.draw(st.floats(0.01, 0.99))
    te = truncated_svd(M, rel_error=eps)
    norm_sq = float(torch.linalg.vector_norm(M) ** 2)
    r = te.S.shape[0]
    assert math.sqrt(te.tail_sq / norm_sq) <= eps + 1e-12
    if r > 1:
        assert math.sqrt(float((S_all[r - 1 :] ** 2).sum()) / norm_sq) > eps
    # rank caps the error-chosen rank
    both = truncated_svd(M, rank=1, rel_error=eps)
    assert both.S.shape[0] == 1
