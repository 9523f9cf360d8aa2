"""Symmetric CP by the subspace power method: exact recovery of components, rank found, bad input."""

import pytest
import torch

import tensorfold as tf
from tensorfold.errors import InvalidTensorError, RankError


def _symmetric(n, rank, order, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank, generator=gen, dtype=dtype)
    A = A / torch.linalg.vector_norm(A, dim=0)
    weights = torch.randn(rank, generator=gen, dtype=dtype)
    return tf.CPTensor(weights, [A] * order).to_tensor(), A, weights


def _component_error(A_true, A_found):
    """Largest ``min_s ||a_i - s b_match(i)||`` (s = +-1) over the true unit components: sign/permutation free."""
    cos = A_true.T @ A_found
    match = cos.abs().argmax(1)
    signs = torch.sign(cos[torch.arange(A_true.shape[1]), match])
    assert match.unique().numel() == A_true.shape[1]  # a permutation, not several matches to one component
    return float(torch.linalg.vector_norm(A_true - A_found[:, match] * signs, dim=0).max())


@pytest.mark.parametrize("order", [3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_rank5_components(order, seed):
    X, A, weights = _symmetric(20, 5, order, seed)
    result = tf.symmetric_cp(X, seed=seed)
    assert result.rank == 5
    assert _component_error(A, result.factors[0]) < 1e-6
    # weights match those of the matched components (sign folded into odd-order vectors)
    match = (A.T @ result.factors[0]).abs().argmax(1)
    signs = torch.sign((A * result.factors[0][:, match]).sum(0)) ** order
    assert torch.allclose(result.weights[match] * signs, weights, atol=1e-6)
    assert all(torch.equal(f, result.factors[0]) for f in result.factors)
    assert tf.relative_error(X, result) < 1e-8


def test_overcomplete_order4_and_given_rank():
    X, A, _ = _symmetric(8, 12, 4, seed=3)  # rank above n: beyond any matrix method
    result = tf.symmetric_cp(X, seed=0)
    assert result.rank == 12 and _component_error(A, result.factors[0]) < 1e-6
    assert tf.symmetric_cp(X, rank=12, seed=0).rank == 12


def test_float32_and_save_round_trip(tmp_path):
    X, A, _ = _symmetric(10, 3, 3, seed=4, dtype=torch.float32)
    result = tf.symmetric_cp(X, seed=0)
    assert result.rank == 3 and result.dtype == torch.float32
    assert _component_error(A, result.factors[0]) < 1e-4
    loaded = tf.load(result.save(tmp_path / "sym.safetensors"))
    assert torch.equal(loaded.factors[2], result.factors[2])


def test_noisy_tensor_rank_from_tolerance():
    X, A, _ = _symmetric(15, 4, 3, seed=5)
    noise = torch.randn(15, 15, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = sum(noise.permute(p) for p in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    X = X + 1e-6 * noise / noise.norm() * X.norm()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tf.symmetric_cp(X, tol=1e-4, seed=0)
    assert result.rank == 4 and _component_error(A, result.factors[0]) < 1e-4


def test_bad_inputs():
    X, _, _ = _symmetric(6, 2, 3, seed=0)
    nonsym = X.clone()
    nonsym[0, 1, 2] += 1.0
    with pytest.raises(InvalidTensorError, match="not symmetric"):
        tf.symmetric_cp(nonsym)
    with pytest.raises(InvalidTensorError, match="equal mode sizes"):
        tf.symmetric_cp(torch.randn(4, 4, 5, dtype=torch.float64))
    with pytest.raises(InvalidTensorError, match="modes"):
        tf.symmetric_cp(torch.eye(4, dtype=torch.float64))
    with pytest.raises(InvalidTensorError, match="modes"):
        tf.symmetric_cp(torch.zeros((2,) * 5, dtype=torch.float64))
    with pytest.raises(InvalidTensorError, match="zero"):
        tf.symmetric_cp(torch.zeros(3, 3, 3, dtype=torch.float64))
    with pytest.raises(RankError):
        tf.symmetric_cp(X, rank=7)
    with pytest.raises(InvalidTensorError):
        tf.symmetric_cp(X.to(torch.int64))
