"""Matricized-tensor times Khatri-Rao product (MTTKRP) without forming the Khatri-Rao product.

``mttkrp(X, factors, n) == unfold(X, n) @ khatri_rao(factors, skip=n)``, computed by contracting
X with one factor at a time. The first contraction is a single GEMM over the whole tensor (one pass
over X); every later one works on a tensor already smaller by a factor ``I_m / R``.

For an ALS sweep, which needs the MTTKRP of every mode, :func:`partial_mttkrp` and
:func:`mttkrp_from_partial` implement a two-level dimension tree: the modes are split into a leading
and a trailing block, X is contracted once with the Khatri-Rao product of one block's factors (one
GEMM, one pass over X, no copy of X), and the MTTKRPs of every mode of the other block come from
that small partial result. A sweep then reads X twice instead of ``d`` times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tensorfold.core.tenalg import _normalize_mode, khatri_rao
from tensorfold.errors import ShapeError

_LETTERS = "abcdefghijklmnopqstuvwxyz"  # 'r' is the rank index


def mttkrp(X: torch.Tensor, factors: Sequence[torch.Tensor], mode: int) -> torch.Tensor:
    """MTTKRP of ``X`` with ``factors`` (one ``(X.shape[m], R)`` matrix per mode) for ``mode``.

    Returns a ``(X.shape[mode], R)`` matrix. ``factors[mode]`` is ignored (it may be None).

    >>> import torch
    >>> X = torch.randn(3, 4, 5, dtype=torch.float64)
    >>> fs = [torch.randn(n, 2, dtype=torch.float64) for n in X.shape]
    >>> from tensorfold.core.tenalg import unfold, khatri_rao
    >>> torch.allclose(mttkrp(X, fs, 1), unfold(X, 1) @ khatri_rao(fs, skip=1))
    True
    """
    mode = _normalize_mode(mode, X.ndim)
    d = X.ndim
    if d == 1:
        raise ShapeError("mttkrp needs a tensor with at least 2 modes")
    if len(factors) != d:
        raise ShapeError(f"mttkrp needs {d} factors for a tensor with {d} modes, got {len(factors)}")
    others = [m for m in range(d) if m != mode]
    rank = _check_factors(X, factors, others)
    if mode != d - 1:
        # One GEMM over the whole tensor with the last factor, then shrink mode by mode.
        T = (X.reshape(-1, X.shape[-1]) @ factors[-1]).reshape(*X.shape[:-1], rank)
        for m in range(d - 2, mode, -1):
            T = torch.einsum("...jr,jr->...r", T, factors[m])
        for m in range(mode):
            T = torch.einsum("j...r,jr->...r", T, factors[m])
        return T
    T = (factors[0].T @ X.reshape(X.shape[0], -1)).reshape(rank, *X.shape[1:])
    for m in range(1, d - 1):
        T = torch.einsum("rj...,jr->r...", T, factors[m])
    return T.T


def partial_mttkrp(X: torch.Tensor, factors: Sequence[torch.Tensor], keep: Sequence[int]) -> torch.Tensor:
    """Contract ``X`` with the factors of every mode outside ``keep``, in one GEMM.

    ``keep`` must be a leading block ``0..h-1`` or a trailing block ``h..d-1`` of the modes, so that
    X's row-major layout gives the matricization as a view (X is never copied when contiguous).
    Returns a tensor of shape ``(*X.shape[keep], R)``; feed it to :func:`mttkrp_from_partial`.
    Only the factors of the contracted modes are read.
    """
    d = X.ndim
    keep = [_normalize_mode(m, d) for m in keep]
    h = len(keep)
    if h == 0 or h == d:
        raise ShapeError(f"keep must be a proper, non-empty block of the {d} modes, got {keep}")
    leading = keep == list(range(h))
    if not leading and keep != list(range(d - h, d)):
        raise ShapeError(f"keep must be a leading or trailing block of modes, got {keep}")
    contracted = [m for m in range(d) if m not in keep]
    rank = _check_factors(X, factors, contracted)
    kr = khatri_rao([factors[m] for m in contracted])
    if leading:
        rows = math.prod(X.shape[:h])
        P = X.reshape(rows, -1) @ kr  # (prod(keep dims), R)
        return P.reshape(*X.shape[:h], rank)
    cols = math.prod(X.shape[d - h :])
    P = kr.T @ X.reshape(-1, cols)  # (R, prod(keep dims)): GEMM reads X in place, transposed
    return P.reshape(rank, *X.shape[d - h :]).movedim(0, -1)


def mttkrp_from_partial(
    P: torch.Tensor, factors: Sequence[torch.Tensor], keep: Sequence[int], mode: int
) -> torch.Tensor:
    """MTTKRP for ``mode`` (one of ``keep``) from a :func:`partial_mttkrp` result ``P``.

    ``factors`` is indexed by the original mode numbers; the factors of ``keep`` other than ``mode``
    are contracted with ``P`` (a small tensor), so this costs no pass over X.
    """
    keep = list(keep)
    if mode not in keep:
        raise ShapeError(f"mode {mode} is not among the kept modes {keep}")
    if len(keep) == 1:
        return P
    pos = keep.index(mode)
    letters = _LETTERS[: len(keep)]
    operands = [P]
    terms = [letters + "r"]
    for i, m in enumerate(keep):
        if m != mode:
            operands.append(factors[m])
            terms.append(letters[i] + "r")
    return torch.einsum(",".join(terms) + "->" + letters[pos] + "r", *operands)


def _check_factors(X: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int]) -> int:
    rank = factors[modes[0]].shape[1]
    for m in modes:
        if factors[m].shape != (X.shape[m], rank):
            raise ShapeError(f"factor {m} has shape {tuple(factors[m].shape)}, expected ({X.shape[m]}, {rank})")
    return rank
