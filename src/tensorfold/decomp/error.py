"""Relative error of an approximation, without forming it where the format allows."""

from __future__ import annotations

import torch

from tensorfold.core.norms import cp_inner, tr_inner, tt_inner
from tensorfold.core.tenalg import multi_mode_dot
from tensorfold.core.validate import check_tensor
from tensorfold.decomp.results import (
    CPTensor,
    Decomposition,
    LowRankMatrix,
    TRTensor,
    TTTensor,
    TuckerTensor,
)
from tensorfold.errors import ShapeError

# Below this relative error the expansion ||X||^2 - 2<X,Y> + ||Y||^2 loses most of its digits to
# cancellation, so the residual is formed directly instead.
_CANCELLATION_GUARD = {torch.float32: 3e-3, torch.float64: 1e-6}


def inner(X: torch.Tensor, approx: Decomposition) -> torch.Tensor:
    """``<X, approx>`` for a dense X, contracting X with the factors directly."""
    if isinstance(approx, CPTensor):
        return cp_inner(X, approx.weights, approx.factors)
    if isinstance(approx, TuckerTensor):
        return (multi_mode_dot(X, approx.factors, transpose=True) * approx.core).sum()
    if isinstance(approx, TTTensor):
        return tt_inner(X, approx.cores)
    if isinstance(approx, TRTensor):
        return tr_inner(X, approx.cores)
    if isinstance(approx, LowRankMatrix):
        return ((approx.U.T @ X @ approx.V).diagonal() * approx.S).sum()
    return (X * approx.to_tensor()).sum()


def relative_error(X, approx) -> float:
    """``||X - approx|| / ||X||`` for any result type (or a dense tensor), in float64 arithmetic.

    ``X`` may also be a tensor read block by block (a ``.npy`` memmap, a dask array, a Zarr array or an HDF5
    dataset): the error is then formed in one streaming pass (:func:`tensorfold.relative_error_chunked`)."""
    from tensorfold.decomp.blocks import is_blocked_input

    if isinstance(approx, Decomposition) and is_blocked_input(X):
        from tensorfold.decomp.chunked import relative_error_chunked

        return relative_error_chunked(X, approx)
    X = check_tensor(X, "X", check_finite=False)
    if isinstance(approx, Decomposition):
        if tuple(approx.shape) != tuple(X.shape):
            raise ShapeError(f"approximation has shape {approx.shape}, data has {tuple(X.shape)}")
        approx_c = approx.to(dtype=X.dtype, device=X.device)
        x_sq = float(torch.linalg.vector_norm(X).double() ** 2)
        if x_sq == 0:
            return float(approx_c.norm())
        a_sq = float(approx_c.norm().double() ** 2)
        cross = float(inner(X, approx_c).double())
        res_sq = max(x_sq - 2 * cross + a_sq, 0.0)
        rel = (res_sq / x_sq) ** 0.5
        if rel >= _CANCELLATION_GUARD.get(X.dtype, 1e-6):
            return rel
        approx = approx_c.to_tensor()
    approx = torch.as_tensor(approx).to(dtype=X.dtype, device=X.device)
    if approx.shape != X.shape:
        raise ShapeError(f"approximation has shape {tuple(approx.shape)}, data has {tuple(X.shape)}")
    x_norm = float(torch.linalg.vector_norm(X.double()))
    diff = float(torch.linalg.vector_norm((X - approx).double()))
    return diff / x_norm if x_norm > 0 else diff
