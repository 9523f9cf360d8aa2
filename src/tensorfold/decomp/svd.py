"""Low-rank approximation of a matrix by truncated SVD (exact or randomized).

A thin, validated front end to :func:`tensorfold.core.svd.truncated_svd` that returns a
:class:`~tensorfold.decomp.results.LowRankMatrix` with its truncation error recorded.
"""

from __future__ import annotations

import math
import time

import torch

from tensorfold.core.svd import truncated_svd
from tensorfold.core.validate import check_choice, check_count, check_positive, check_rank, check_tensor
from tensorfold.decomp.results import FitInfo, LowRankMatrix
from tensorfold.errors import InvalidArgumentError


def check_eps(eps, name: str = "eps") -> float:
    """A relative error target must lie strictly between 0 and 1 (1 would allow the zero matrix)."""
    value = check_positive(eps, name)
    if value >= 1:
        raise InvalidArgumentError(f"{name} is a relative error target and must be < 1, got {eps!r}")
    return value


def svd_lowrank(
    M,
    rank: int | None = None,
    *,
    eps: float | None = None,
    method: str = "exact",
    oversample: int = 10,
    n_iter: int = 2,
    seed: int | torch.Generator | None = 0,
) -> LowRankMatrix:
    """Best rank-``rank`` approximation ``M ~ U diag(S) V^T`` (Eckart-Young for ``method="exact"``).

    Parameters
    ----------
    M : (m, n) float32/float64 tensor or array.
    rank : kept rank, at most ``min(m, n)``. Optional when ``eps`` is given.
    eps : relative error target in (0, 1): the smallest rank with ``||M - U S V^T|| <= eps ||M||``
        is kept (capped by ``rank`` when both are given). Needs ``method="exact"``.
    method : ``"exact"`` (full SVD) or ``"randomized"`` (range finder with ``oversample`` extra columns
        and ``n_iter`` power iterations; much cheaper when ``rank << min(m, n)``).
    seed : seed or generator for the randomized method.

    Returns a :class:`LowRankMatrix`; ``info.details`` holds ``tail_sq`` (squared Frobenius norm of the
    discarded part) and ``relative_error`` (``sqrt(tail_sq) / ||M||``).

    >>> import torch, tensorfold as tf
    >>> M = torch.randn(50, 8, dtype=torch.float64) @ torch.randn(8, 40, dtype=torch.float64)
    >>> approx = tf.svd_lowrank(M, 8)
    >>> approx.rank, approx.info.details["relative_error"] < 1e-12
    (8, True)
    """
    start = time.perf_counter()
    M = check_tensor(M, "M", min_order=2, max_order=2)
    check_choice(method, "method", ("exact", "randomized"))
    if rank is None and eps is None:
        raise InvalidArgumentError("svd_lowrank needs a rank, an eps (relative error target) or both")
    if rank is not None:
        rank = check_rank(rank, "rank", max_rank=min(M.shape), what=f"a {M.shape[0]}x{M.shape[1]} matrix")
    if eps is not None:
        eps = check_eps(eps)
        if method == "randomized":
            raise InvalidArgumentError("eps needs method='exact' (the randomized method works at a given rank)")
    oversample = check_count(oversample, "oversample")
    n_iter = check_count(n_iter, "n_iter")

    trunc = truncated_svd(
        M, rank, rel_error=eps, method=method, oversample=oversample, n_iter=n_iter, seed=seed
    )
    norm_sq = float(torch.linalg.vector_norm(M).double() ** 2)
    rel = math.sqrt(trunc.tail_sq / norm_sq) if norm_sq > 0 else 0.0
    info = FitInfo(
        method=f"svd-{method}",
        n_iter=n_iter if method == "randomized" else 0,
        converged=True,
        fit_history=(1.0 - rel,),
        seconds=time.perf_counter() - start,
        details={"tail_sq": trunc.tail_sq, "relative_error": rel, "rank": int(trunc.S.shape[0])},
    )
    return LowRankMatrix(trunc.U, trunc.S, trunc.V, info)
