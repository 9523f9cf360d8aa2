"""Tensor-train decomposition (TT-SVD) and rounding of an existing tensor train.

Both use Oseledets' delta-truncation: with ``delta = eps / sqrt(d - 1) * ||X||`` for each of the
``d - 1`` truncated SVDs, the discarded parts are mutually orthogonal, so

    ||X - TT||^2 = sum of the discarded tails <= (d - 1) delta^2 = eps^2 ||X||^2,

i.e. the relative error is guaranteed to be at most ``eps`` (``info.details["error_bound"]`` holds
the exact value ``sqrt(sum tails) / ||X||``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from tensorfold.core.svd import truncated_svd
from tensorfold.core.validate import check_rank, check_tensor
from tensorfold.decomp.results import FitInfo, TTTensor
from tensorfold.decomp.svd import check_eps
from tensorfold.errors import InvalidArgumentError, RankError


def tensor_train(X, max_rank: int | Sequence[int] | None = None, eps: float | None = None) -> TTTensor:
    """TT-SVD: ``X[i_1, ..., i_d] ~ G_1[:, i_1, :] @ G_2[:, i_2, :] @ ... @ G_d[:, i_d, :]``.

    Parameters
    ----------
    X : tensor of order >= 2 (float32 or float64).
    max_rank : cap on the bond ranks: an int for every bond, or ``d - 1`` ints ``(r_1, ..., r_{d-1})``
        (each at most ``min(I_1 ... I_k, I_{k+1} ... I_d)``).
    eps : relative error target in (0, 1). Without ``max_rank`` the result is guaranteed to satisfy
        ``||X - TT|| <= eps ||X||`` with the smallest ranks the delta-truncation finds; with both,
        ranks are capped and ``info.details["error_bound"]`` reports the error actually reached.

    Returns a :class:`TTTensor` with cores ``(r_{k-1}, I_k, r_k)``, ``r_0 = r_d = 1``.

    >>> import tensorfold as tf
    >>> X = tf.testing.random_tt((4, 5, 6, 7), (2, 3, 2), seed=0).to_tensor()
    >>> tt = tf.tensor_train(X, eps=1e-10)
    >>> tt.rank, tf.relative_error(X, tt) < 1e-10
    ((1, 2, 3, 2, 1), True)
    """
    start = time.perf_counter()
    X = check_tensor(X, "X", min_order=2)
    caps = _bond_caps(X.shape, max_rank, eps)
    norm = float(torch.linalg.vector_norm(X).double())
    delta = None if eps is None else check_eps(eps) / math.sqrt(X.ndim - 1) * norm

    cores, tails = [], []
    C, r_prev = X, 1
    for k, n in enumerate(X.shape[:-1]):
        trunc = truncated_svd(C.reshape(r_prev * n, -1), caps[k], abs_error=delta)
        r = trunc.S.shape[0]
        cores.append(trunc.U.reshape(r_prev, n, r))
        tails.append(trunc.tail_sq)
        C = trunc.S[:, None] * trunc.V.T  # the remainder, (r, I_{k+2} ... I_d)
        r_prev = r
    cores.append(C.reshape(r_prev, X.shape[-1], 1))
    return TTTensor(tuple(cores), _info("tt-svd", tails, norm, eps, start))


def tt_round(tt: TTTensor, max_rank: int | Sequence[int] | None = None, eps: float | None = None) -> TTTensor:
    """Recompress a tensor train: right-to-left QR orthogonalisation, then truncated SVDs left to right.

    With ``eps`` the result satisfies ``||tt - rounded|| <= eps ||tt||`` (same delta-truncation as
    :func:`tensor_train`); ``max_rank`` caps the bonds as there. The input is not modified.

    >>> import tensorfold as tf
    >>> a = tf.testing.random_tt((4, 5, 6), (2, 2), seed=0)
    >>> doubled = tf.TTTensor([a.cores[0], a.cores[1], 2 * a.cores[2]])
    >>> tf.tt_round(doubled, eps=1e-12).rank
    (1, 2, 2, 1)
    """
    start = time.perf_counter()
    if not isinstance(tt, TTTensor):
        raise InvalidArgumentError(f"tt_round needs a TTTensor, got {type(tt).__name__}")
    for i, c in enumerate(tt.cores):
        check_tensor(c, f"core {i}", min_order=3, max_order=3)
    caps = _bond_caps(tt.shape, max_rank, eps)
    cores = list(tt.cores)
    d = len(cores)
    # Right-to-left: make cores 2..d right-orthonormal, pushing the R factors into the left neighbour.
    for k in range(d - 1, 0, -1):
        r0, n, r1 = cores[k].shape
        Q, R = torch.linalg.qr(cores[k].reshape(r0, n * r1).T)
        cores[k] = Q.T.reshape(-1, n, r1)
        left = cores[k - 1]
        cores[k - 1] = (left.reshape(-1, r0) @ R.T).reshape(left.shape[0], left.shape[1], -1)
    # Now ||tt|| = ||cores[0]|| and each truncation error is orthogonal to the others.
    norm = float(torch.linalg.vector_norm(cores[0]).double())
    delta = None if eps is None else check_eps(eps) / math.sqrt(max(d - 1, 1)) * norm
    tails = []
    for k in range(d - 1):
        r0, n, r1 = cores[k].shape
        trunc = truncated_svd(cores[k].reshape(r0 * n, r1), caps[k], abs_error=delta)
        r = trunc.S.shape[0]
        cores[k] = trunc.U.reshape(r0, n, r)
        nxt = cores[k + 1]
        cores[k + 1] = ((trunc.S[:, None] * trunc.V.T) @ nxt.reshape(r1, -1)).reshape(r, nxt.shape[1], nxt.shape[2])
        tails.append(trunc.tail_sq)
    return TTTensor(tuple(cores), _info("tt-round", tails, norm, eps, start))


def _bond_caps(shape: Sequence[int], max_rank, eps) -> list[int | None]:
    """Per-bond rank caps from ``max_rank`` (an int caps every bond; a sequence is checked bond by bond)."""
    d = len(shape)
    if max_rank is None and eps is None:
        raise InvalidArgumentError("give max_rank, eps (a relative error target) or both")
    if max_rank is None:
        return [None] * (d - 1)
    limits = [min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(d - 1)]
    if isinstance(max_rank, int) and not isinstance(max_rank, bool):
        r = check_rank(max_rank, "max_rank")
        return [min(r, lim) for lim in limits]
    try:
        ranks = list(max_rank)
    except TypeError:
        raise RankError(f"max_rank must be an int or a sequence of {d - 1} ints, got {max_rank!r}") from None
    if len(ranks) != d - 1:
        raise RankError(f"max_rank has {len(ranks)} entries; a {d}-way tensor train has {d - 1} bonds")
    return [
        check_rank(r, f"max_rank[{k}]", max_rank=lim, what=f"bond {k + 1} of a TT of shape {tuple(shape)}")
        for k, (r, lim) in enumerate(zip(ranks, limits))
    ]


def _info(method: str, tails: list[float], norm: float, eps: float | None, start: float) -> FitInfo:
    bound = math.sqrt(sum(tails)) / norm if norm > 0 else 0.0
    return FitInfo(
        method=method,
        fit_history=(1.0 - bound,),
        seconds=time.perf_counter() - start,
        details={"tails_sq": tails, "error_bound": bound, "eps": eps},
    )
