"""Tensor-ring decomposition: TR-SVD initialisation, then alternating least squares sweeps.

TR-SVD (Zhao et al., 2016, "Tensor Ring Decomposition") splits the first bond: the leading
``r_0 r_1`` left singular vectors of ``X_(1)`` become the first core, and the remainder is treated
like a tensor train whose last core closes the ring. Its truncations are orthogonal projections, so

    ||X - TR_svd||^2 = sum of the discarded tails          (``info.details["svd_error_bound"]``).

Each ALS step then replaces one core by the exact least-squares solution against the contraction
of all the others (through the small ``r_{k-1} r_k`` normal equations), so the error never increases:
the final relative error is at most the TR-SVD bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from tensorfold.core.norms import tr_norm
from tensorfold.core.svd import truncated_svd
from tensorfold.core.validate import (
    check_callback,
    check_choice,
    check_count,
    check_positive,
    check_rank,
    check_tensor,
    make_generator,
    randn,
)
from tensorfold.decomp.error import relative_error
from tensorfold.decomp.iteration import FitTracker
from tensorfold.decomp.results import FitInfo, TRTensor
from tensorfold.decomp.svd import check_eps
from tensorfold.errors import InvalidArgumentError, RankError


def tensor_ring(
    X,
    ranks: int | Sequence[int] | None = None,
    *,
    eps: float | None = None,
    n_iter_max: int = 20,
    tol: float = 1e-8,
    init: str = "svd",
    seed: int | torch.Generator | None = 0,
    callback: Callable[[int, float], bool | None] | None = None,
) -> TRTensor:
    """Tensor ring ``X[i_1, ..., i_d] ~ trace(G_1[:, i_1, :] @ ... @ G_d[:, i_d, :])``.

    Parameters
    ----------
    X : tensor of order >= 2 (float32 or float64).
    ranks : bond ranks ``(r_0, ..., r_{d-1})`` (core ``k`` has shape ``(r_k, I_k, r_{k+1})`` with
        ``r_d = r_0``); an int applies to every bond. TR-SVD needs ``r_0 r_1 <= min(I_1, I_2 ... I_d)``;
        later bonds larger than the data allows are reduced (see ``result.rank``).
    eps : relative error target in (0, 1) instead of ``ranks``: TR-SVD with Zhao's delta-truncation
        (``sqrt(2) eps ||X|| / sqrt(d)`` for the first split, ``eps ||X|| / sqrt(d)`` for the others)
        chooses the ranks, so ``||X - TR|| <= eps ||X||`` is guaranteed (the ALS sweeps keep it).
    n_iter_max, tol : ALS sweeps at most (0 gives plain TR-SVD), stopping once the relative error
        changes by less than ``tol``.
    init : ``"svd"`` (TR-SVD) or ``"random"`` (Gaussian cores from ``seed``, scaled to ``||X||``).
    callback : called as ``callback(sweep, fit)`` (``fit = 1 - relative error``); returning True stops.

    Returns a :class:`TRTensor`; ``info.fit_history`` holds ``1 - relative error`` after the
    initialisation and after every sweep (non-decreasing up to rounding).

    >>> import tensorfold as tf
    >>> X = tf.testing.random_tr((6, 7, 8), (2, 2, 2), seed=0).to_tensor()
    >>> tf.relative_error(X, tf.tensor_ring(X, eps=1e-10)) < 1e-10
    True
    >>> tr = tf.tensor_ring(X, (2, 2, 2), n_iter_max=10)
    >>> tr.rank, tr.info.fit_history[-1] >= tr.info.fit_history[0]
    ((2, 2, 2, 2), True)
    """
    start = time.perf_counter()
    X = check_tensor(X, "X", min_order=2)
    d = X.ndim
    check_choice(init, "init", ("svd", "random"))
    if (ranks is None) == (eps is None):
        raise InvalidArgumentError("give either ranks or eps (a relative error target), not both")
    if eps is not None:
        eps = check_eps(eps)
        if init != "svd":
            raise InvalidArgumentError("eps chooses the ranks by TR-SVD, so it needs init='svd'")
    else:
        ranks = _check_tr_ranks(ranks, d)
    n_iter_max = check_count(n_iter_max, "n_iter_max")
    tol = check_positive(tol, "tol", allow_zero=True)
    check_callback(callback, "callback(sweep, fit)")

    norm_sq = float(torch.linalg.vector_norm(X).double() ** 2)
    details: dict = {"init": init, "eps": eps}
    if init == "svd":
        cores, tails = _tr_svd(X, ranks, eps=eps, norm_sq=norm_sq)
        details["tails_sq"] = tails
        details["svd_error_bound"] = math.sqrt(sum(tails) / norm_sq) if norm_sq > 0 else 0.0
    else:
        cores = _random_cores(X, ranks, seed, norm_sq)

    start_error = relative_error(X, TRTensor(tuple(cores)))
    tracker = FitTracker("tensor_ring (ALS)", n_iter_max=n_iter_max, tol=tol, callback=callback,
                         initial_error=start_error)
    for _ in range(n_iter_max):
        for k in range(d):
            res_sq = _als_update(X, cores, k, norm_sq)
        if tracker.update(math.sqrt(max(res_sq, 0.0) / norm_sq) if norm_sq > 0 else 0.0):
            break
    tracker.finish(stacklevel=2, hint="raise n_iter_max or tol")
    n_iter = tracker.n_iter

    info = FitInfo(
        method=f"tr-{init}" + ("-als" if n_iter else ""),
        n_iter=n_iter,
        converged=tracker.converged or n_iter_max == 0,
        fit_history=(1.0 - start_error, *tracker.history),
        seconds=time.perf_counter() - start,
        details=details,
    )
    return TRTensor(tuple(cores), info)


def _check_tr_ranks(ranks, d: int) -> list[int]:
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        return [check_rank(ranks, "ranks")] * d
    try:
        ranks = list(ranks)
    except TypeError:
        raise RankError(f"ranks must be an int or a sequence of {d} ints, got {ranks!r}") from None
    if len(ranks) != d:
        raise RankError(f"ranks has {len(ranks)} entries; a {d}-way tensor ring needs {d} (r_0, ..., r_{d - 1})")
    return [check_rank(r, f"ranks[{k}]") for k, r in enumerate(ranks)]


def _tr_svd(X: torch.Tensor, ranks: list[int] | None, *, eps: float | None, norm_sq: float):
    """TR-SVD at the given ranks, or with ranks chosen by delta-truncation for a relative error ``eps``."""
    shape, d = X.shape, X.ndim
    rest = X.numel() // shape[0]
    if eps is None:
        r0, r1 = ranks[0], ranks[1 % d]
        if r0 * r1 > min(shape[0], rest):
            raise RankError(
                f"TR-SVD needs ranks[0] * ranks[1] = {r0 * r1} <= min({shape[0]}, {rest}) "
                f"(the sizes of the first unfolding); lower the first two ranks"
            )
        trunc = truncated_svd(X.reshape(shape[0], rest), r0 * r1)
        delta = None
    else:
        delta = eps * math.sqrt(norm_sq / d)
        trunc = truncated_svd(X.reshape(shape[0], rest), abs_error=math.sqrt(2) * delta)
        r0, r1 = _balanced_split(trunc.S.shape[0])
    # The sign of each singular pair is arbitrary, and here it matters: the pair index (a, b) is split
    # over two bonds, so a sign flip of one pair is not a gauge change and alters the later truncations.
    # Fix it as TensorLy's svd_flip does (largest |U| entry of each column positive): reproducible
    # across LAPACK builds and devices, and equal to TensorLy's TR-SVD.
    U, SV = _flip_signs(trunc.U, trunc.S[:, None] * trunc.V.T)
    # Left singular vectors, index (a, b) over (r_0, r_1), become G_1 of shape (r_0, I_1, r_1).
    cores = [U.reshape(shape[0], r0, r1).permute(1, 0, 2).contiguous()]
    tails = [trunc.tail_sq]
    # Remainder as (b, I_2, ..., I_d, a): a tensor train whose last bond closes the ring.
    C = SV.reshape(r0, r1, rest).permute(1, 2, 0)
    r_prev = r1
    for k in range(1, d - 1):
        trunc = truncated_svd(C.reshape(r_prev * shape[k], -1), None if ranks is None else ranks[k + 1],
                              abs_error=delta)
        r = trunc.S.shape[0]
        cores.append(trunc.U.reshape(r_prev, shape[k], r))
        tails.append(trunc.tail_sq)
        C = trunc.S[:, None] * trunc.V.T
        r_prev = r
    if d > 1:
        cores.append(C.reshape(r_prev, shape[-1], r0))
    return cores, tails


def _flip_signs(U: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip column ``j`` of ``U`` and row ``j`` of ``W`` so that ``U``'s largest-magnitude entry is positive."""
    rows = U.abs().argmax(dim=0)
    signs = torch.sign(U[rows, torch.arange(U.shape[1], device=U.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, W * signs[:, None]


def _balanced_split(rank: int) -> tuple[int, int]:
    """``(r_0, r_1)`` with ``r_0 r_1 = rank`` and ``r_0 <= r_1`` as close as possible (Zhao et al.)."""
    r0 = max(k for k in range(1, math.isqrt(rank) + 1) if rank % k == 0)
    return r0, rank // r0


def _random_cores(X, ranks, seed, norm_sq) -> list[torch.Tensor]:
    gen = make_generator(seed)
    full = [*ranks, ranks[0]]
    cores = [
        randn(full[k], n, full[k + 1], generator=gen, dtype=X.dtype, device=X.device) for k, n in enumerate(X.shape)
    ]
    # Scale so the ring has the data's norm (a badly scaled start slows the first sweep).
    scale = (math.sqrt(norm_sq) / max(float(tr_norm(cores)), 1e-300)) ** (1.0 / len(cores))
    return [c * scale for c in cores]


def _subchain(cores: list[torch.Tensor], k: int) -> torch.Tensor:
    """Contraction of every core but ``k``, as a ``(r_k r_{k+1}, I_1 ... I_{k-1} I_{k+1} ... I_d)`` matrix.

    Rows are ordered ``(a, b)`` with ``a`` the left bond of core ``k`` and ``b`` its right bond, so
    that ``unfold(X, k) = G_(k) @ Q`` with ``G_(k) = core_k.permute(1, 0, 2).reshape(I_k, -1)``.
    """
    d = len(cores)
    order = [(k + j) % d for j in range(1, d)]  # the cores after k, cyclically
    first = cores[order[0]]
    b = first.shape[0]
    out = first.reshape(-1, first.shape[2])  # rows (b, i_{k+1})
    for j in order[1:]:
        G = cores[j]
        out = (out @ G.reshape(G.shape[0], -1)).reshape(-1, G.shape[2])
    a = out.shape[1]
    sizes = [cores[j].shape[1] for j in order]
    Q = out.reshape(b, *sizes, a)  # (b, i_{k+1}, ..., i_d, i_1, ..., i_{k-1}, a)
    n_after = d - 1 - k  # modes k+1..d-1 come first in `order`
    perm = [d, 0, *range(n_after + 1, d), *range(1, n_after + 1)]
    return Q.permute(perm).reshape(a * b, -1)


def _als_update(X: torch.Tensor, cores: list[torch.Tensor], k: int, norm_sq: float) -> float:
    """Replace core ``k`` by its least-squares optimum; return the new squared residual."""
    Q = _subchain(cores, k)  # (R, rest)
    a_sz, n, b_sz = math.prod(X.shape[:k]), X.shape[k], math.prod(X.shape[k + 1 :])
    R = Q.shape[0]
    Q3 = Q.reshape(R, a_sz, b_sz)
    # P = unfold(X, k) @ Q^T, from views of X (no unfolding copy).
    if a_sz == 1:
        P = X.reshape(n, b_sz) @ Q.T
    elif b_sz == 1:
        P = X.reshape(a_sz, n).T @ Q.T
    else:
        P = torch.bmm(X.reshape(a_sz, n, b_sz), Q3.permute(1, 2, 0)).sum(0)
    gram = Q @ Q.T
    # Minimum-norm solution of the normal equations: exact least squares even if gram is singular.
    G = P @ torch.linalg.pinv(gram, hermitian=True)
    r_left, r_right = cores[k].shape[0], cores[k].shape[2]
    cores[k] = G.reshape(n, r_left, r_right).permute(1, 0, 2).contiguous()
    cross = float((G * P).sum())
    approx_sq = float(((G @ gram) * G).sum())
    return norm_sq - 2 * cross + approx_sq

