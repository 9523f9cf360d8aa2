"""Nonnegative CP and Tucker decompositions by hierarchical ALS (HALS).

HALS (Cichocki & Phan 2009; accelerated form of Gillis & Glineur 2012) updates one factor column at a
time in closed form, ``a_j <- max(0, a_j + (M[:, j] - A V[:, j]) / V[j, j])``, where ``M`` is the
MTTKRP and ``V`` the Hadamard product of the other factors' Gram matrices. The expensive part (the
MTTKRP, one pass over the tensor) is done once per factor update and then reused by several cheap
inner sweeps (``O(I R^2)`` each), stopping early when a sweep moves the factor much less than the first.

Nonnegative Tucker uses the same column update for the factors (with ``M`` and ``V`` built from the
core) and an accelerated projected gradient (FISTA) on the small core.

>>> import torch, tensorfold as tf
>>> cp = tf.testing.random_cp((10, 11, 12), rank=2, seed=0)
>>> X = tf.CPTensor(cp.weights, [f.abs() for f in cp.factors]).to_tensor()
>>> result = tf.nonnegative_cp(X, rank=2, n_iter_max=300, seed=0)
>>> bool(min(float(f.min()) for f in result.factors) >= 0) and tf.relative_error(X, result) < 1e-3
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from tensorfold.core.mttkrp import mttkrp
from tensorfold.core.norms import cp_gram
from tensorfold.core.svd import truncated_svd
from tensorfold.core.tenalg import multi_mode_dot, unfold
from tensorfold.core.validate import (
    check_choice,
    check_count,
    check_positive,
    check_rank,
    check_ranks,
    check_tensor,
    make_generator,
)
from tensorfold.decomp.iteration import FitTracker
from tensorfold.decomp.results import CPTensor, FitInfo, TuckerTensor
from tensorfold.errors import InvalidArgumentError, InvalidTensorError, ShapeError

Callback = Callable[[int, float], object]


def nonnegative_cp(
    X,
    rank: int,
    *,
    method: str = "hals",
    init: str | CPTensor = "svd",
    n_iter_max: int = 100,
    n_inner: int = 5,
    tol: float = 1e-8,
    seed: int | torch.Generator | None = 0,
    callback: Callback | None = None,
) -> CPTensor:
    """Nonnegative CP decomposition ``X ~ [[w; A_1, ..., A_d]]`` with every ``A_n >= 0`` (HALS).

    Parameters
    ----------
    X:
        Nonnegative dense tensor (order >= 2). Negative entries are refused: shift or clip the data
        first if a nonnegative model of it is really wanted.
    rank:
        Number of components.
    init:
        ``"svd"`` (absolute values of the leading singular vectors of each unfolding), ``"random"``
        (uniform in [0, 1), scaled to the data), or a CPTensor to start from (its absolute values).
    n_iter_max, tol:
        Outer iterations (one update of every factor each), and stop when the relative error changes
        by less than ``tol``.
    n_inner:
        At most this many HALS sweeps per factor update (each reuses the same MTTKRP); a sweep that
        changes the factor by less than 1% of the first sweep's change ends them early.
    callback:
        ``callback(iteration, fit)`` after each outer iteration (counted from 1, ``fit`` = 1 - relative
        error); returning True stops.

    Returns
    -------
    CPTensor with nonnegative factors (unit-norm columns) and nonnegative weights; ``info.fit_history``
    holds ``1 - relative error`` per iteration.
    """
    check_choice(method, "method", ("hals",))
    X = _check_nonnegative(X)
    rank = check_rank(rank)
    n_iter_max = check_count(n_iter_max, "n_iter_max", minimum=1)
    n_inner = check_rank(n_inner, "n_inner")
    tol = check_positive(tol, "tol", allow_zero=True)
    start = time.perf_counter()
    factors = _initial_cp(X, rank, init, seed)
    x_norm_sq = float(torch.linalg.vector_norm(X).double() ** 2)
    tracker = FitTracker("nonnegative_cp", n_iter_max=n_iter_max, tol=tol, callback=callback)
    last = X.ndim - 1
    for _ in range(n_iter_max):
        # One pass over X serves every mode but the last: T = X x_last A_last, (I_0, ..., I_{d-2}, R); the
        # MTTKRPs of modes 0..d-2 are then small contractions of T (the last factor has not changed).
        T = (X.reshape(-1, X.shape[-1]) @ factors[last]).reshape(*X.shape[:-1], rank)
        for mode in range(X.ndim):
            V = cp_gram(factors, skip=mode)
            M = _partial_mttkrp(T, factors, mode) if mode < last else mttkrp(X, factors, mode)
            factors[mode] = hals_columns(M, V, factors[mode], n_inner)
        # <X, model> = <M, A_last> from the last MTTKRP (computed with the other factors as they are now,
        # so before the rebalancing below).
        model_sq = float(cp_gram(factors).sum())
        cross = float((M * factors[-1]).sum())
        factors = _balance(factors)
        if tracker.update(_relative_error(x_norm_sq, cross, model_sq)):
            break
    tracker.finish()
    info = FitInfo("nonnegative-cp-hals", len(tracker.history), tracker.converged, tuple(tracker.history),
                   time.perf_counter() - start, {"n_inner": n_inner})
    weights = torch.ones(rank, dtype=X.dtype, device=X.device)
    return CPTensor(weights, tuple(factors), info).normalize()


def _partial_mttkrp(T: torch.Tensor, factors: Sequence[torch.Tensor], mode: int) -> torch.Tensor:
    """MTTKRP of mode ``mode`` from ``T = X x_last A_last`` (modes 0..d-2 plus a rank axis)."""
    for m in range(T.ndim - 2, -1, -1):  # contract from the back so earlier mode indices stay valid
        if m != mode:
            T = torch.einsum("...jr,jr->...r", T.movedim(m, -2), factors[m])
    return T


def hals_columns(M: torch.Tensor, V: torch.Tensor, A: torch.Tensor, n_sweeps: int) -> torch.Tensor:
    """Nonnegative least squares ``min_{A >= 0} ||Y - A B^T||`` by column-wise HALS sweeps.

    Only ``M = Y B`` (I, R) and ``V = B^T B`` (R, R) are needed. Returns a new matrix (``A`` is not
    modified). Sweeps stop after ``n_sweeps`` or once one changes A by less than 1% of the first.
    """
    A = A.clone()
    R = A.shape[1]
    diag = V.diagonal().tolist()  # one transfer, not one per column
    first_change = None
    for _ in range(n_sweeps):
        before = A.clone()
        for j in range(R):
            if diag[j] <= 0:
                continue  # the other factors' column j is zero: column j is undetermined, keep it
            # a_j <- max(0, a_j + (m_j - A v_j) / v_jj), in place on the column view
            col = A[:, j]
            col.add_(M[:, j] - A @ V[:, j], alpha=1.0 / diag[j]).clamp_min_(0)
        dead = ~A.any(0)
        if bool(dead.any()):
            # A zero column would stay zero for ever (and zero the others' Gram); keep it alive.
            A[:, dead] = torch.finfo(A.dtype).eps * float(A.abs().max().clamp_min(1e-300))
        change = float(torch.linalg.vector_norm(A - before))
        if first_change is None:
            first_change = change
        elif change <= 1e-2 * first_change:
            break
    return A


def _relative_error(x_norm_sq: float, cross: float, model_sq: float) -> float:
    """``||X - M|| / ||X||`` from ``||X||^2``, ``<X, M>`` and ``||M||^2``."""
    return math.sqrt(max(x_norm_sq - 2 * cross + model_sq, 0.0) / x_norm_sq) if x_norm_sq else 0.0


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale columns so every mode has the same column norms (the model is unchanged).

    HALS column updates are invariant to this diagonal rescaling, but without it the norms drift apart
    over many iterations and the smallest ones underflow.
    """
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors])
    positive = (norms > 0).all(0)
    target = norms.clamp_min(1e-300).log().mean(0).exp()
    scale = torch.where(positive, target / norms.clamp_min(1e-300), torch.ones_like(norms))
    return [f * s for f, s in zip(factors, scale)]


def _check_nonnegative(X) -> torch.Tensor:
    X = check_tensor(X, "X", min_order=2)
    if bool((X < 0).any()):
        raise InvalidTensorError(
            f"X has {int((X < 0).sum())} negative entries (min {float(X.min()):.3g}); a nonnegative "
            f"decomposition needs X >= 0 (shift or clip the data first)"
        )
    return X


def _nonnegative_svd_factor(X: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """``|U|`` of the leading singular vectors of the mode unfolding, padded when rank > mode size."""
    n = X.shape[mode]
    k = min(rank, n)
    U = truncated_svd(unfold(X, mode), k).U.abs()
    if U.shape[1] < rank:
        U = torch.cat([U, U.mean(1, keepdim=True).expand(n, rank - U.shape[1])], 1)
    return U


def _initial_cp(X: torch.Tensor, rank: int, init, seed) -> list[torch.Tensor]:
    if isinstance(init, CPTensor):
        if tuple(init.shape) != tuple(X.shape) or init.rank != rank:
            raise ShapeError(f"init has shape {init.shape} and rank {init.rank}; expected {tuple(X.shape)}, {rank}")
        factors = [f.to(dtype=X.dtype, device=X.device).abs() for f in init.factors]
        factors[0] = factors[0] * init.weights.to(dtype=X.dtype, device=X.device).abs()
        return factors
    if not isinstance(init, str):
        raise InvalidArgumentError(f"init must be 'svd', 'random' or a CPTensor, got {type(init).__name__}")
    check_choice(init, "init", ("svd", "random"))
    if init == "svd":
        factors = [_nonnegative_svd_factor(X, m, rank) for m in range(X.ndim)]
    else:
        gen = make_generator(seed)
        factors = [torch.rand(n, rank, generator=gen, dtype=X.dtype).to(X.device) for n in X.shape]
    return _fit_scale_cp(X, factors)


def _fit_scale_cp(X: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Scale the start so its norm matches the best scalar multiple of it (``<X, M> / ||M||^2``)."""
    model_sq = float(cp_gram(factors).sum())
    cross = float((mttkrp(X, factors, X.ndim - 1) * factors[-1]).sum())
    scale = cross / model_sq if model_sq > 0 and cross > 0 else 1.0
    return [f * scale ** (1.0 / len(factors)) for f in factors]


# --- nonnegative Tucker -----------------------------------------------------------------------------

def nonnegative_tucker(
    X,
    ranks: int | Sequence[int],
    *,
    init: str = "svd",
    n_iter_max: int = 100,
    n_inner: int = 5,
    tol: float = 1e-8,
    seed: int | torch.Generator | None = 0,
    callback: Callback | None = None,
) -> TuckerTensor:
    """Nonnegative Tucker decomposition ``X ~ G x_1 U_1 ... x_d U_d`` with ``G >= 0`` and ``U_n >= 0``.

    Factors are updated by HALS (as in :func:`nonnegative_cp`, with the core folded into the
    normal equations), the core by accelerated projected gradient steps. ``init="svd"`` starts from
    the absolute values of each unfolding's leading singular vectors, ``"random"`` from uniform
    factors. ``info.fit_history`` holds ``1 - relative error`` per iteration.

    >>> import torch, tensorfold as tf
    >>> X = torch.rand(8, 9, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> T = tf.nonnegative_tucker(X, (3, 3, 3), n_iter_max=20)
    >>> bool(T.core.min() >= 0 and min(float(U.min()) for U in T.factors) >= 0)
    True
    """
    X = _check_nonnegative(X)
    ranks = check_ranks(ranks, X.shape)
    n_iter_max = check_count(n_iter_max, "n_iter_max", minimum=1)
    n_inner = check_rank(n_inner, "n_inner")
    tol = check_positive(tol, "tol", allow_zero=True)
    check_choice(init, "init", ("svd", "random"))
    start = time.perf_counter()
    if init == "svd":
        factors = [_nonnegative_svd_factor(X, m, r) for m, r in enumerate(ranks)]
    else:
        gen = make_generator(seed)
        factors = [torch.rand(n, r, generator=gen, dtype=X.dtype).to(X.device) for n, r in zip(X.shape, ranks)]
    core_steps = 10 * n_inner
    projected = multi_mode_dot(X, factors, transpose=True)
    core = _nonnegative_core(projected, [U.T @ U for U in factors], projected.clamp_min(0), n_steps=core_steps)
    x_norm_sq = float(torch.linalg.vector_norm(X).double() ** 2)
    tracker = FitTracker("nonnegative_tucker", n_iter_max=n_iter_max, tol=tol, callback=callback)
    for _ in range(n_iter_max):
        for mode in range(X.ndim):
            grams = [U.T @ U for U in factors]
            # X_(n) ~ U_n B^T with B = (kron of the other U) G_(n)^T, never formed:
            core_n = unfold(core, mode)
            M = unfold(multi_mode_dot(X, factors, skip=mode, transpose=True), mode) @ core_n.T
            V = unfold(multi_mode_dot(core, grams, skip=mode), mode) @ core_n.T
            U = hals_columns(M, V, factors[mode], n_inner)
            # Unit columns, scale moved into the core: the model is unchanged and the core problem's
            # step size (1 / prod of the Gram norms) stays well scaled.
            norms = torch.linalg.vector_norm(U, dim=0).clamp_min(torch.finfo(U.dtype).tiny)
            factors[mode] = U / norms
            shape = [1] * core.ndim
            shape[mode] = -1
            core = core * norms.reshape(shape)
        projected = multi_mode_dot(X, factors, transpose=True)
        grams = [U.T @ U for U in factors]
        core = _nonnegative_core(projected, grams, core, n_steps=core_steps)
        model_sq = float((core * multi_mode_dot(core, grams)).sum())
        cross = float((core * projected).sum())
        if tracker.update(_relative_error(x_norm_sq, cross, model_sq)):
            break
    tracker.finish()
    info = FitInfo("nonnegative-tucker-hals", len(tracker.history), tracker.converged, tuple(tracker.history),
                   time.perf_counter() - start, {"n_inner": n_inner})
    return TuckerTensor(core, tuple(factors), info)


def _nonnegative_core(target, grams, core, n_steps: int) -> torch.Tensor:
    """FISTA on ``min_{G >= 0} ||X - G x U||^2`` for fixed factors (small problem: core-sized).

    Needs only ``target = X x_n U_n^T`` (all modes) and the Gram matrices ``U_n^T U_n``.
    """
    lipschitz = math.prod(float(torch.linalg.eigvalsh(g).max()) for g in grams)
    if lipschitz <= 0:
        return core
    step = 1.0 / lipschitz
    G, Y, t = core, core, 1.0
    for k in range(n_steps):
        grad = multi_mode_dot(Y, grams) - target
        G_next = (Y - step * grad).clamp_min(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        Y = G_next + ((t - 1) / t_next) * (G_next - G)
        # Convergence check every 5 steps only: each check is a device synchronisation.
        settled = k % 5 == 4 and float(torch.linalg.vector_norm(G_next - G)) <= 1e-8 * float(
            torch.linalg.vector_norm(G_next))
        G, t = G_next, t_next
        if settled:
            break
    return G
