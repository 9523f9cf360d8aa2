"""Streaming Tucker sketch (Sun-Guo-Luo-Tropp-Udell): exact on low rank, its error bound, any block order."""

import numpy as np
import pytest
import torch

import tensorfold as tf
from tensorfold.decomp.blocks import as_blocked, map_reduce
from tensorfold.testing import add_noise


@pytest.mark.parametrize("passes", [1, 2])
def test_exact_multilinear_rank_is_recovered(passes):
    X = tf.testing.random_tucker((20, 18, 16, 6), (3, 2, 4, 2), seed=0).to_tensor()
    approx = tf.tucker_sketch(X, (3, 2, 4, 2), passes=passes, seed=4, chunks=(7, 5, 16, 4))
    assert approx.rank == (3, 2, 4, 2)
    assert tf.relative_error(X, approx) < 1e-9
    assert torch.allclose(approx.factors[0].T @ approx.factors[0], torch.eye(3, dtype=X.dtype), atol=1e-10)


def test_error_bound_in_expectation_on_low_rank_plus_noise():
    # Theorem (one-pass sketch, before truncation): E||X - Xhat||^2 <= (1 + D) sum_n (1 + r/(k-r-1)) tau_r^2(X_(n))
    # with D = k / (s - k - 1) and tau_r^2 the tail energy of unfolding n beyond rank r.
    r = (4, 3, 3)
    X = add_noise(tf.testing.random_tucker((40, 35, 30), r, seed=0).to_tensor(), 0.1)
    norm_sq = float((X**2).sum())
    taus = [float((torch.linalg.svdvals(tf.unfold(X, n))[r[n]:] ** 2).sum()) for n in range(3)]
    ks = [2 * x + 1 for x in r]
    ss = [2 * k + 1 for k in ks]
    delta = max(k / (s - k - 1) for k, s in zip(ks, ss))
    bound = (1 + delta) * sum((1 + rr / (k - rr - 1)) * t for rr, k, t in zip(r, ks, taus))
    errs = [tf.relative_error(X, tf.tucker_sketch(X, r, truncate=False, seed=s)) ** 2 * norm_sq for s in range(20)]
    assert np.mean(errs) <= bound
    assert np.mean(errs) >= min(taus)  # not trivially exact: the sketch pays for its single pass


def test_two_pass_fit_is_exact_and_beats_one_pass_on_average():
    X = add_noise(tf.testing.random_tucker((30, 25, 20), (3, 3, 2), seed=1).to_tensor(), 0.1)
    one = [tf.relative_error(X, tf.tucker_sketch(X, (3, 3, 2), seed=s)) for s in range(5)]
    two = [tf.tucker_sketch(X, (3, 3, 2), passes=2, seed=s) for s in range(5)]
    for t in two:
        assert abs(t.info.fit_history[0] - (1 - tf.relative_error(X, t))) < 1e-10
    assert np.mean([tf.relative_error(X, t) for t in two]) < np.mean(one)
    best = tf.relative_error(X, tf.tucker(X, (3, 3, 2)))
    assert min(tf.relative_error(X, t) for t in two) < 1.5 * best


def test_a_refinement_pass_reaches_hooi_on_low_rank_plus_noise():
    # Strong signal, noise 10%: the sketch finds the signal subspaces tilted by noise; one HOOI pass fixes that.
    X = add_noise(tf.testing.random_cp((60, 50, 40), 6, seed=5).to_tensor(), 0.1)
    hooi = tf.relative_error(X, tf.tucker(X, 8))
    two = tf.tucker_sketch(X, 8, passes=2, seed=0)
    three = tf.tucker_sketch(X, 8, passes=3, seed=0, chunks=(20, 25, 40))
    assert tf.relative_error(X, two) > 1.05 * hooi
    assert tf.relative_error(X, three) < 1.01 * hooi
    assert abs(three.info.fit_history[0] - (1 - tf.relative_error(X, three))) < 1e-10


def test_block_order_and_chunking_do_not_change_the_sketch():
    X = add_noise(tf.testing.random_tucker((17, 13, 11), (3, 2, 2), seed=2).to_tensor(), 0.05)
    whole = tf.tucker_sketch(X, (3, 2, 2), seed=7)
    blocked = tf.tucker_sketch(X, (3, 2, 2), seed=7, chunks=(5, 4, 3))
    assert torch.allclose(whole.to_tensor(), blocked.to_tensor(), atol=1e-12)
    # Contributions are linear: summing blocks in reverse order gives the same sketch.
    from tensorfold.decomp.sketch import _SketchBlock

    B = as_blocked(X, chunks=(5, 4, 3))
    fn = _SketchBlock(B.shape, [torch.randn(n, 4, dtype=torch.float64) for n in X.shape],
                      [torch.randn(3, n, dtype=torch.float64) for n in X.shape])
    forward = map_reduce(B, fn)
    from tensorfold.decomp.blocks import _block_grid

    backward = None
    for sl in reversed(list(_block_grid(B.shape, B.chunks))):
        part = fn(sl, X[sl].contiguous())
        backward = part if backward is None else [a + b for a, b in zip(backward, part)]
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(forward, backward))


def test_float32_input_keeps_its_dtype():
    X = tf.testing.random_tucker((15, 14, 13), (2, 2, 2), seed=0, dtype=torch.float32).to_tensor()
    approx = tf.tucker_sketch(X, 2, passes=2)
    assert approx.dtype == torch.float32
    assert tf.relative_error(X, approx) < 1e-4


def test_bad_arguments_are_clear_errors():
    X = torch.randn(5, 6, 7, dtype=torch.float64)
    with pytest.raises(tf.InvalidArgumentError, match="passes"):
        tf.tucker_sketch(X, 2, passes=0)
    with pytest.raises(tf.InvalidArgumentError, match="truncate"):
        tf.tucker_sketch(X, 2, passes=3, truncate=False)
    with pytest.raises(tf.InvalidArgumentError, match="k\\[0\\]"):
        tf.tucker_sketch(X, 3, k=2)
    with pytest.raises(tf.RankError):
        tf.tucker_sketch(X, 9)
    with pytest.raises(tf.InvalidArgumentError, match="chunks"):
        tf.tucker_sketch(X, 2, chunks=(2, 0, 2))
    bad = X.clone()
    bad[4, 5, 6] = float("nan")
    with pytest.raises(tf.InvalidTensorError, match=r"block \[4:5, 0:6, 0:7\] contains 1 NaN"):
        tf.tucker_sketch(bad, 2, chunks=(2, 6, 7))
    with pytest.raises(tf.InvalidTensorError, match="int64"):
        tf.tucker_sketch(torch.ones(4, 4, 4, dtype=torch.int64), 2)


def test_tt_sketch_exact_on_low_tt_rank_any_chunking():
    X = tf.testing.random_tt((6, 7, 8, 9), (2, 3, 2), seed=0).to_tensor()
    whole = tf.tt_sketch(X, (2, 3, 2), seed=1)
    blocked = tf.tt_sketch(X, (2, 3, 2), seed=1, chunks=(4, 5, 3, 9))
    assert whole.rank == (1, 2, 3, 2, 1)
    assert tf.relative_error(X, whole) < 1e-9
    assert torch.allclose(whole.to_tensor(), blocked.to_tensor(), atol=1e-9)


def test_tt_sketch_on_noise_is_within_a_small_factor_of_tt_svd():
    Y = add_noise(tf.testing.random_tt((10, 11, 12, 13), (3, 4, 3), seed=2).to_tensor(), 0.05)
    best = tf.relative_error(Y, tf.tensor_train(Y, max_rank=[3, 4, 3]))
    errs = [tf.relative_error(Y, tf.tt_sketch(Y, (3, 4, 3), seed=s)) for s in range(5)]
    assert best <= min(errs) and np.mean(errs) < 3.5 * best  # measured 1.3-3.1x; 10x without oversampling
    with pytest.raises(tf.InvalidArgumentError, match="ranks"):
        tf.tt_sketch(Y, (3, 4))


def test_cp_chunked_tries_several_starts_on_the_core():
    # Equal weights, near-orthogonal factors seen through a rotated 15-dim basis: CP-ALS from the SVD start
    # stalls near fit 0.68 on such cores; the best of several starts reaches the noise floor here.
    gen = torch.Generator().manual_seed(0)
    planted = [torch.randn(1260, 10, generator=gen, dtype=torch.float64) for _ in range(3)]
    g = torch.Generator().manual_seed(100)
    bases = [torch.linalg.qr(torch.cat([a, torch.randn(1260, 5, generator=g, dtype=torch.float64)], 1))[0]
             for a in planted]
    bases = [Q @ torch.linalg.qr(torch.randn(15, 15, generator=g, dtype=torch.float64))[0] for Q in bases]
    X = tf.CPTensor(torch.ones(10, dtype=torch.float64), [Q.T @ a for Q, a in zip(bases, planted)]).to_tensor()
    X = add_noise(X, 0.01, seed=3)
    one = tf.cp_chunked(X, 10, n_starts=1, n_iter_max=1)
    best = tf.cp_chunked(X, 10, n_iter_max=1)
    assert one.info.fit_history[-1] < 0.7
    assert best.info.fit_history[-1] > 0.98
