"""Basic multilinear algebra: unfolding, folding, mode products, Khatri-Rao and Kronecker products.

Conventions (the same as TensorLy's, so results compare entry by entry): ``unfold(X, n)`` moves mode
``n`` to the front and reshapes in C (row-major) order, and ``khatri_rao([A, B])[i * J + j] =
A[i] * B[j]``, so that ``unfold(X, n) == A_n @ khatri_rao(others).T`` for a CP tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tensorfold.errors import ShapeError


def unfold(X: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` matricization: shape ``(X.shape[mode], prod(other dims))``."""
    mode = _normalize_mode(mode, X.ndim)
    return X.movedim(mode, 0).reshape(X.shape[mode], -1)


def fold(M: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold`: ``fold(unfold(X, n), n, X.shape) == X``."""
    shape = tuple(int(s) for s in shape)
    mode = _normalize_mode(mode, len(shape))
    moved = (shape[mode],) + shape[:mode] + shape[mode + 1 :]
    if M.numel() != _prod(shape) or M.shape[0] != shape[mode]:
        raise ShapeError(f"cannot fold a matrix of shape {tuple(M.shape)} into {shape} along mode {mode}")
    return M.reshape(moved).movedim(0, mode)


def mode_dot(X: torch.Tensor, M: torch.Tensor, mode: int, *, transpose: bool = False) -> torch.Tensor:
    """Mode-n product ``X x_n M``: contracts mode ``mode`` of X with the columns of M.

    ``M`` has shape ``(J, X.shape[mode])`` (or ``(X.shape[mode], J)`` with ``transpose=True``); the
    result has ``J`` in place of ``X.shape[mode]``. A vector ``M`` removes the mode.
    """
    mode = _normalize_mode(mode, X.ndim)
    if M.ndim == 1:
        if M.shape[0] != X.shape[mode]:
            raise ShapeError(f"vector of length {M.shape[0]} cannot contract mode {mode} of size {X.shape[mode]}")
        return torch.tensordot(X, M, dims=([mode], [0]))
    inner = 0 if transpose else 1
    if M.shape[inner] != X.shape[mode]:
        raise ShapeError(
            f"matrix of shape {tuple(M.shape)} cannot multiply mode {mode} of size {X.shape[mode]}"
            + (" (transposed)" if transpose else "")
        )
    # GEMMs on row-major views of X, seen as (before, I_mode, after): no copy of X for any mode
    # (tensordot would permute X for a middle mode), and a contiguous result.
    A = M.T if transpose else M  # (J, I_mode)
    before, n, after = _prod(X.shape[:mode]), X.shape[mode], _prod(X.shape[mode + 1 :])
    if after == 1:
        out = X.reshape(before, n) @ A.T
    elif before == 1:
        out = A @ X.reshape(n, after)
    else:
        out = torch.matmul(A, X.reshape(before, n, after))
    return out.reshape(*X.shape[:mode], A.shape[0], *X.shape[mode + 1 :])


def multi_mode_dot(
    X: torch.Tensor,
    matrices: Sequence[torch.Tensor],
    modes: Sequence[int] | None = None,
    *,
    skip: int | None = None,
    transpose: bool = False,
) -> torch.Tensor:
    """Apply :func:`mode_dot` for several modes (all modes by default, except ``skip``).

    Modes are processed in the order that shrinks the tensor fastest, which gives the same result
    (mode products on distinct modes commute) at lower cost.
    """
    if modes is None:
        modes = range(len(matrices))
    pairs = [(_normalize_mode(m, X.ndim), M) for m, M in zip(modes, matrices) if m != skip]
    def shrink(pair):
        mode, M = pair
        new = M.shape[0] if (M.ndim == 2 and not transpose) else (M.shape[1] if M.ndim == 2 else 0)
        return new / max(X.shape[mode], 1)
    # Vectors remove a mode, which changes later mode indices: do matrices first, vectors last
    # from the highest mode down.
    mats = sorted((p for p in pairs if p[1].ndim == 2), key=shrink)
    vecs = sorted((p for p in pairs if p[1].ndim == 1), key=lambda p: -p[0])
    for mode, M in mats:
        X = mode_dot(X, M, mode, transpose=transpose)
    for mode, v in vecs:
        X = mode_dot(X, v, mode)
    return X


def khatri_rao(
    matrices: Sequence[torch.Tensor],
    *,
    skip: int | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Column-wise Kronecker product of matrices with a common number of columns.

    Only for small problems and tests: algorithms in tensorfold never form it for a full tensor
    (see :mod:`tensorfold.core.mttkrp`).
    """
    mats = [M for i, M in enumerate(matrices) if i != skip]
    if not mats:
        raise ShapeError("khatri_rao needs at least one matrix")
    rank = mats[0].shape[1]
    if any(M.ndim != 2 or M.shape[1] != rank for M in mats):
        raise ShapeError(f"khatri_rao needs matrices with {rank} columns, got {[tuple(M.shape) for M in mats]}")
    out = mats[0]
    for M in mats[1:]:
        out = (out[:, None, :] * M[None, :, :]).reshape(-1, rank)
    if weights is not None:
        out = out * weights
    return out


def kronecker(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Kronecker product ``A_0 (x) A_1 (x) ...`` (row-major, like numpy.kron)."""
    if not matrices:
        raise ShapeError("kronecker needs at least one matrix")
    out = matrices[0]
    for M in matrices[1:]:
        out = torch.kron(out, M)
    return out


def _normalize_mode(mode: int, ndim: int) -> int:
    if not -ndim <= mode < ndim:
        raise ShapeError(f"mode {mode} is out of range for a tensor with {ndim} modes")
    return mode % ndim


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
