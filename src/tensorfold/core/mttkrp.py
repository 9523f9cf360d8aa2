"""Matricized-tensor times Khatri-Rao product (MTTKRP) without forming the Khatri-Rao product.

``mttkrp(X, factors, n) == unfold(X, n) @ khatri_rao(factors, skip=n)``, computed by contracting
X with one factor at a time. The first contraction is a single GEMM over the whole tensor (one pass
over X); every later one works on a tensor already smaller by a factor ``I_m / R``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tensorfold.core.tenalg import _normalize_mode
from tensorfold.errors import ShapeError


def mttkrp(X: torch.Tensor, factors: Sequence[torch.Tensor], mode: int) -> torch.Tensor:
    """MTTKRP of ``X`` with ``factors`` (one ``(X.shape[m], R)`` matrix per mode) for ``mode``.

    Returns a ``(X.shape[mode], R)`` matrix. ``factors[mode]`` is ignored (it may be None).
    """
    mode = _normalize_mode(mode, X.ndim)
    d = X.ndim
    if len(factors) != d:
        raise ShapeError(f"mttkrp needs {d} factors for a tensor with {d} modes, got {len(factors)}")
    others = [m for m in range(d) if m != mode]
    rank = factors[others[0]].shape[1]
    for m in others:
        if factors[m].shape != (X.shape[m], rank):
            raise ShapeError(
                f"factor {m} has shape {tuple(factors[m].shape)}, expected ({X.shape[m]}, {rank})"
            )
    if d == 1:
        raise ShapeError("mttkrp needs a tensor with at least 2 modes")
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
