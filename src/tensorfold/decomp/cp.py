"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares.

The solver has three parts, each kept small:

* **ALS sweeps with a dimension tree** (:class:`ALSSweeps`): the modes are split into a leading and a trailing
  block; one GEMM contracts X with the Khatri-Rao product of the trailing factors and gives the MTTKRP of
  every leading mode, a second GEMM does the same for the trailing modes. A sweep reads X twice,
  whatever its order, and never copies it. The fit comes from ``||X||``, the last MTTKRP and the factor
  Gram matrices (no reconstruction), except near fit 1 where that formula cancels: there the residual
  is formed directly, in chunks.
* **Line search** (Bro's extrapolation): after a sweep the factors are pushed further along the step
  they just took, and the jump is kept only if it lowers the error. The GEMM that scores the jump is
  the first GEMM of the next sweep, so an accepted jump costs nothing extra.
* **Compression first** (CANDELINC): a rank-R CP tensor lives in an R-dimensional subspace of every
  mode, so X is projected onto orthonormal bases of its leading mode subspaces (a randomized range
  finder, one power iteration, ``R + margin`` columns), ALS runs on the small core, the factors are
  expanded, and ALS continues on the full tensor until the fit on the full tensor stops changing. If
  the compression lost fit, this continuation is plain uncompressed ALS from a good start, so the
  answer never rests on the compressed problem alone. Every reported fit is the fit to the original X
  (during the core phase by Pythagoras: ``||X - Y||^2 = ||X - PX||^2 + ||PX - Y||^2`` for Y in the
  subspace).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tensorfold.core.mttkrp import mttkrp, mttkrp_from_partial, partial_mttkrp
from tensorfold.core.svd import truncated_svd
from tensorfold.core.tenalg import khatri_rao, mode_dot
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
from tensorfold.decomp.iteration import FitTracker
from tensorfold.decomp.results import CPTensor, FitInfo
from tensorfold.errors import InvalidArgumentError, InvalidTensorError, ShapeError

# Below this relative error ||X||^2 - 2<X,Y> + ||Y||^2 has lost most of its digits to cancellation, so
# the residual is formed directly instead (same thresholds as tensorfold.decomp.error).
_GUARD = {torch.float32: 3e-3, torch.float64: 1e-6}
# Compression is worth it ("auto") when the core is this much smaller than X and X is not tiny.
_AUTO_MIN_NUMEL = 50_000
_AUTO_MAX_CORE_FRACTION = 0.25
# Row blocks of this many entries bound the temporaries of direct norms and residuals (2 MB in float64).
_BLOCK_ELEMENTS = 1 << 18
# Line search: jump = iteration ** (1 / power); the power grows after this many rejected jumps.
LS_MAX_FAIL = 4


def cp(
    X,
    rank: int,
    *,
    init: str | CPTensor = "svd",
    n_iter_max: int = 100,
    tol: float = 1e-8,
    seed: int | torch.Generator | None = 0,
    line_search: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
    compress: bool | str = "auto",
    core_margin: int | None = None,
    verbose: bool = False,
) -> CPTensor:
    """CP decomposition ``X ~ sum_r w_r a_r^(1) o ... o a_r^(d)`` by ALS with line search.

    Parameters
    ----------
    X : tensor of order >= 2 (torch or numpy, float32 or float64; CPU or CUDA). Never modified.
    rank : number of components R (``1 <= R <= prod(X.shape)``).
    init : ``"svd"`` (leading singular vectors of each unfolding, found with a randomized range finder;
        random columns where a mode has fewer than R), ``"random"`` (Gaussian), or a :class:`CPTensor`.
    n_iter_max : most ALS sweeps per phase (the core phase and the full-tensor phase each get this
        many when the tensor is compressed first).
    tol : stop when the relative change of the fit between two sweeps is below ``tol`` (never below
        ten machine epsilons of X's dtype, which is all the fit can resolve); ``tol=0`` runs exactly
        ``n_iter_max`` sweeps per phase (and does not warn).
    seed : seed or ``torch.Generator`` for the random init and the range finder.
    line_search : Bro-style extrapolation, kept only when it lowers the error.
    callback : ``callback(iteration, fit)`` after every sweep (iteration counts from 1 across phases);
        returning True stops.
    compress : ``True``, ``False`` or ``"auto"`` (compress when the core is at most a quarter of X).
    core_margin : extra columns per mode beyond R when compressing (default ``max(5, R // 2)``).
    verbose : print the fit of every sweep to stderr.

    Returns
    -------
    CPTensor with unit-norm factor columns and the norms in ``weights``. ``info.fit_history`` has one
    fit ``1 - ||X - Y|| / ||X||`` (to the original X) per sweep; ``info.details`` holds the dtype,
    device, whether the tensor was compressed, the core shape, sweeps per phase, accepted jumps and
    ``final_fit`` (for float32 data formed directly from the residual, which the cheap per-sweep
    formula can only resolve to about 1e-5).

    Example
    -------
    >>> import tensorfold as tf
    >>> X = tf.testing.random_cp((8, 9, 10), rank=3, seed=1).to_tensor()
    >>> result = tf.cp(X, rank=3, tol=1e-12)
    >>> bool(tf.relative_error(X, result) < 1e-8)
    True
    """
    start = time.perf_counter()
    # NaN/Inf are caught by the norm below (one pass over X serves both).
    X = check_tensor(X, "X", min_order=2, check_finite=False)
    rank = check_rank(rank, "rank", max_rank=math.prod(X.shape), what=f"a tensor of shape {tuple(X.shape)}")
    n_iter_max = check_count(n_iter_max, "n_iter_max", minimum=1)
    tol = check_positive(tol, "tol", allow_zero=True)
    if compress not in (True, False, "auto"):
        raise InvalidArgumentError(f"compress must be True, False or 'auto', got {compress!r}")
    if core_margin is None:
        core_margin = max(5, rank // 2)
    else:
        core_margin = check_count(core_margin, "core_margin")
    if isinstance(init, CPTensor):
        if tuple(init.shape) != tuple(X.shape) or init.rank != rank:
            raise ShapeError(f"init has shape {init.shape} and rank {init.rank}; X needs {tuple(X.shape)}, {rank}")
    else:
        check_choice(init, "init", ("svd", "random"))
    X = X.contiguous()  # a no-op for ordinary tensors; ALS relies on row-major views of X
    gen = make_generator(seed)
    total_sq = _norm_sq(X)
    if not math.isfinite(total_sq):
        check_tensor(X, "X", check_finite=True)  # raises, naming the NaN/Inf entries
        raise InvalidTensorError("||X||^2 overflows float64; rescale X")
    if total_sq == 0:
        raise InvalidArgumentError("X is all zeros; it has no CP decomposition to fit")
    if tol > 0:  # tol=0 asks for exactly n_iter_max sweeps per phase
        tol = max(tol, 10 * torch.finfo(X.dtype).eps)

    core_ranks = [min(n, rank + core_margin) for n in X.shape]
    core_numel = math.prod(core_ranks)
    use_core = core_numel < X.numel() and (
        compress is True
        or (compress == "auto" and X.numel() >= _AUTO_MIN_NUMEL and core_numel <= _AUTO_MAX_CORE_FRACTION * X.numel())
    )
    tracker = FitTracker("cp", n_iter_max=n_iter_max, tol=tol, callback=check_callback(
        callback, "callback(iteration, fit)"))
    report = _Reporter(tracker, verbose)
    details = {
        "dtype": str(X.dtype).replace("torch.", ""),
        "device": str(X.device),
        "compressed": bool(use_core),
        "line_search": bool(line_search),
    }

    if use_core:
        weights, factors, core_run = _core_phase(
            X, rank, init, gen, core_ranks, total_sq, (n_iter_max, tol, line_search, report), details
        )
    else:
        weights, factors = _initial(X, rank, init, gen)
        core_run = None

    full = ALSSweeps(X, total_sq, total_sq, 0.0, "full")
    # The core phase's last fit is already the fit of the expanded model to X, so one full sweep that
    # does not change it shows convergence on the full tensor.
    previous = core_run.history[-1] if core_run else None
    if tracker.stopped:  # the callback ended the run in the core phase
        run = _Run(core_run.history[-1:], 0, False, 0)
    else:
        weights, factors, run = full.run(weights, factors, n_iter_max, tol, line_search, report, previous)
    history = list(tracker.history)
    accepted = run.accepted + (core_run.accepted if core_run else 0)
    final_fit = run.history[-1]
    if X.dtype == torch.float32:
        # The Gram/MTTKRP fit carries float32 rounding of order 1e-6; check the answer directly, once.
        final_fit = 1.0 - math.sqrt(_residual_sq_direct(X, weights, factors) / total_sq)
    details.update(full_iterations=run.n_iter, accepted_jumps=accepted, final_fit=final_fit)
    if core_run is not None:
        details["refinement_gain"] = run.history[-1] - core_run.history[-1]
    tracker.converged = run.converged  # CP's own resolution-aware rule decided it (see ALSSweeps.run)
    tracker.finish(stacklevel=2, hint="the fit was still changing on the full tensor; raise n_iter_max or tol")
    info = FitInfo(
        method="cp-als",
        n_iter=len(history),
        converged=run.converged,
        fit_history=tuple(history),
        seconds=time.perf_counter() - start,
        details=details,
    )
    return CPTensor(weights, tuple(factors), info)


def _core_phase(X, rank, init, gen, core_ranks, total_sq, als_options, details):
    """Compress X, run ALS on the core, return the expanded (weights, factors) and the core run."""
    core, bases = _compress(X, core_ranks, gen)
    core_sq = _norm_sq(core)
    outside_sq = max(total_sq - core_sq, 0.0)
    weights, factors = _initial(core, rank, init, gen, bases=bases)
    weights, factors, run = ALSSweeps(core, core_sq, total_sq, outside_sq, "core").run(weights, factors, *als_options)
    factors = [Q @ A if Q is not None else A for Q, A in zip(bases, factors)]
    weights, factors = normalize_factors(weights, factors)
    details.update(
        core_shape=list(core.shape),
        core_iterations=run.n_iter,
        compression_residual=math.sqrt(outside_sq / total_sq),
        fit_after_core=run.history[-1],
    )
    return weights, factors, run


# --------------------------------------------------------------------------------------------------
# ALS on one tensor
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    history: list[float]
    n_iter: int
    converged: bool
    accepted: int


class _Reporter:
    """Records every sweep's fit in the run's FitTracker (numbered across phases, callback) and on stderr."""

    def __init__(self, tracker: FitTracker, verbose: bool):
        self.tracker = tracker
        self.verbose = verbose

    def __call__(self, fit: float, phase: str) -> bool:
        """Record the sweep; True when the callback asks to stop."""
        if self.verbose:
            print(f"cp-als sweep {self.tracker.n_iter + 1} ({phase}): fit {fit:.10f}", file=sys.stderr)
        return self.tracker.record_fit(fit)


class ALSSweeps:
    """ALS sweeps on ``T`` (the data, or its compressed core), reporting fits to the original data.

    Public, with ``normalize_factors``, ``absorbed_factors``, ``leading_vectors``, ``hadamard_grams``,
    ``solve_normal`` and ``LS_MAX_FAIL``: the CP-ALS engine that completion (EM) and chunked CP reuse.

    ``T_sq = ||T||^2``; ``total_sq = ||X||^2``; ``outside_sq = ||X - PX||^2`` is the part of X the
    compression discarded (0 for the full tensor).
    """

    def __init__(self, T: torch.Tensor, T_sq: float, total_sq: float, outside_sq: float, phase: str):
        self.T = T
        self.T_sq = T_sq
        self.total_sq = total_sq
        self.outside_sq = outside_sq
        self.phase = phase
        d = T.ndim
        # Split the modes where the two partial results (prod(block) x R) are smallest together.
        sizes = [math.prod(T.shape[:h]) + math.prod(T.shape[h:]) for h in range(1, d)]
        h = 1 + sizes.index(min(sizes))
        self.left = list(range(h))
        self.right = list(range(h, d))
        self.guard = _GUARD[T.dtype]
        self.eps = torch.finfo(T.dtype).eps

    # -- one sweep ------------------------------------------------------------------------------
    def sweep(self, weights, factors, grams, P_left=None):
        """Update every factor once (in place in the lists); returns the weights and the last MTTKRP."""
        if P_left is None:
            P_left = partial_mttkrp(self.T, factors, self.left)
        for n in self.left:
            weights = self._update(n, mttkrp_from_partial(P_left, factors, self.left, n), factors, grams)
        P_right = partial_mttkrp(self.T, factors, self.right)
        for n in self.right:
            M = mttkrp_from_partial(P_right, factors, self.right, n)
            weights = self._update(n, M, factors, grams)
        return weights, M

    @staticmethod
    def _update(n, M, factors, grams):
        V = hadamard_grams(grams, skip=n)
        A = solve_normal(M, V)
        norms = torch.linalg.vector_norm(A, dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        A = A / norms
        factors[n] = A
        grams[n] = A.T @ A
        return norms

    # -- fit ------------------------------------------------------------------------------------
    def fit_from_last(self, weights, factors, grams, M) -> tuple[float, float]:
        """Fit after a sweep from the last mode's MTTKRP ``M`` (X against all other current factors)."""
        last = self.T.ndim - 1
        inner = float(((M * factors[last]).sum(0).double() * weights.double()).sum())
        return self._fit(inner, weights, factors, grams)

    def fit_from_left_partial(self, weights, factors, grams, P_left) -> tuple[float, float]:
        n = self.left[0]
        M = mttkrp_from_partial(P_left, factors, self.left, n)
        inner = float(((M * factors[n]).sum(0).double() * weights.double()).sum())
        return self._fit(inner, weights, factors, grams)

    def resolution(self, rel: float) -> float:
        """Smallest relative change of the fit the fit computation can resolve at relative error ``rel``.

        Rounding of order ``eps * ||X||^2`` in ``||X||^2 - 2<X,Y> + ||Y||^2`` moves ``rel`` by about
        ``eps / (2 rel)``; below the guard the residual is formed directly and only ``eps`` remains.
        """
        return 10 * self.eps if rel < self.guard else max(10 * self.eps, 5 * self.eps / max(rel, 1e-300))

    def _fit(self, inner, weights, factors, grams) -> tuple[float, float]:
        w = weights.double()
        model_sq = float(w @ hadamard_grams(grams).double() @ w)
        res_sq = max(self.T_sq - 2 * inner + model_sq, 0.0)
        rel = math.sqrt((self.outside_sq + res_sq) / self.total_sq)
        if rel < self.guard:
            res_sq = _residual_sq_direct(self.T, weights, factors)
            rel = math.sqrt((self.outside_sq + res_sq) / self.total_sq)
        return 1.0 - rel, rel

    # -- the loop -------------------------------------------------------------------------------
    def run(self, weights, factors, n_iter_max, tol, line_search, report, previous_fit=None) -> tuple:
        """Up to ``n_iter_max`` sweeps; ``previous_fit`` is the fit of the starting point, if known."""
        factors = list(factors)
        grams = [A.T @ A for A in factors]
        history: list[float] = []
        converged = False
        accepted = 0
        P_next = None
        power, fails = 2.0, 0
        for it in range(1, n_iter_max + 1):
            start = absorbed_factors(weights, factors) if line_search else None
            weights, M = self.sweep(weights, factors, grams, P_next)
            P_next = None
            fit, rel = self.fit_from_last(weights, factors, grams, M)
            if line_search and it > 1 and rel >= self.guard:
                jump = it ** (1.0 / power)
                end = absorbed_factors(weights, factors)
                w_c, f_c = normalize_factors(None, [s + jump * (e - s) for s, e in zip(start, end)])
                g_c = [A.T @ A for A in f_c]
                P_c = partial_mttkrp(self.T, f_c, self.left)
                fit_c, rel_c = self.fit_from_left_partial(w_c, f_c, g_c, P_c)
                if fit_c > fit:
                    weights, factors, grams, fit, rel, P_next = w_c, f_c, g_c, fit_c, rel_c, P_c
                    accepted += 1
                    fails = 0
                else:
                    fails += 1
                    if fails >= LS_MAX_FAIL:
                        power, fails = power + 1.0, 0
            history.append(fit)
            if report(fit, self.phase):
                break
            threshold = max(tol, self.resolution(rel)) * max(abs(history[-1]), 1e-30)
            last = history[-2] if len(history) > 1 else previous_fit
            if tol > 0 and last is not None and abs(history[-1] - last) <= threshold:
                converged = True
                break
        return weights, factors, _Run(history, len(history), converged, accepted)


def hadamard_grams(grams: Sequence[torch.Tensor], skip: int | None = None) -> torch.Tensor:
    out = None
    for n, G in enumerate(grams):
        if n != skip:
            out = G.clone() if out is None else out * G
    return out


def solve_normal(M: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``M @ inv(V)`` for the symmetric PSD ``V``; pseudo-inverse when V is singular."""
    L, info = torch.linalg.cholesky_ex(V)
    if int(info) == 0:
        return torch.cholesky_solve(M.T, L).T
    return M @ torch.linalg.pinv(V, hermitian=True)


def absorbed_factors(weights, factors) -> list[torch.Tensor]:
    """Factors with the weights folded into the last one (the model, independent of scaling)."""
    return [*factors[:-1], factors[-1] * weights]


def normalize_factors(weights, factors) -> tuple[torch.Tensor, list[torch.Tensor]]:
    rank = factors[0].shape[1]
    w = torch.ones(rank, dtype=factors[0].dtype, device=factors[0].device) if weights is None else weights
    out = []
    for A in factors:
        norms = torch.linalg.vector_norm(A, dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        out.append(A / norms)
        w = w * norms
    return w, out


def _norm_sq(T: torch.Tensor) -> float:
    """``||T||^2`` accumulated in float64 (in row blocks, so float32 data is never copied whole)."""
    if T.dtype == torch.float64:
        return float(torch.linalg.vector_norm(T) ** 2)
    T2 = T.reshape(T.shape[0], -1)
    block = max(1, _BLOCK_ELEMENTS // max(T2.shape[1], 1))
    return sum(float((T2[i : i + block].double() ** 2).sum()) for i in range(0, T2.shape[0], block))


def _residual_sq_direct(T: torch.Tensor, weights, factors) -> float:
    """``||T - [[w; factors]]||^2`` formed in row blocks of mode 0 (bounded extra memory)."""
    rest = khatri_rao(factors[1:]) if T.ndim > 1 else None  # (prod(other dims), R)
    T2 = T.reshape(T.shape[0], -1)
    block = max(1, min(T.shape[0], _BLOCK_ELEMENTS // max(T2.shape[1], 1)))
    total = 0.0
    for i in range(0, T.shape[0], block):
        approx = (factors[0][i : i + block] * weights) @ rest.T
        total += float(((T2[i : i + block] - approx).double() ** 2).sum())
    return total


# --------------------------------------------------------------------------------------------------
# Initialization and compression
# --------------------------------------------------------------------------------------------------


def _initial(T, rank, init, gen, bases=None):
    """Initial (weights, normalized factors) for ALS on ``T`` (the core when ``bases`` is given)."""
    d = T.ndim
    if isinstance(init, CPTensor):  # shape and rank checked by cp()
        factors = [f.to(dtype=T.dtype, device=T.device) for f in init.factors]
        factors[-1] = factors[-1] * init.weights.to(dtype=T.dtype, device=T.device)
        if bases is not None:
            factors = [Q.T @ A if Q is not None else A for Q, A in zip(bases, factors)]
        return normalize_factors(None, factors)
    if init == "random":
        if bases is not None:
            full = [randn(Q.shape[0] if Q is not None else n, rank, generator=gen, dtype=T.dtype, device=T.device)
                    for Q, n in zip(bases, T.shape)]
            factors = [Q.T @ A if Q is not None else A for Q, A in zip(bases, full)]
        else:
            factors = [randn(n, rank, generator=gen, dtype=T.dtype, device=T.device) for n in T.shape]
        return normalize_factors(None, factors)
    factors = [leading_vectors(T, n, rank, gen) for n in range(d)]
    return normalize_factors(None, factors)


def leading_vectors(T, mode, rank, gen, n_power: int = 1) -> torch.Tensor:
    """Approximate leading ``rank`` left singular vectors of ``unfold(T, mode)`` (random columns beyond
    the mode size), from a randomized range finder: never a full SVD of a big unfolding."""
    n = T.shape[mode]
    k = min(n, rank + 10)
    if n <= 3 * k:
        S = _mode_times_unfolding(T, T, mode)  # the n x n Gram matrix: cheap when n is small
    else:
        S = _sketch(T, mode, k, gen, n_power)
    U = truncated_svd(S, rank=min(rank, k)).U
    if U.shape[1] < rank:
        U = torch.cat([U, randn(n, rank - U.shape[1], generator=gen, dtype=T.dtype, device=T.device)], dim=1)
    return U


def _sketch(T, mode, k, gen, n_power) -> torch.Tensor:
    """``(unfold(T) unfold(T)^T)^q unfold(T) Omega`` with a Khatri-Rao-structured Gaussian Omega."""
    omegas = [None if m == mode else randn(s, k, generator=gen, dtype=T.dtype, device=T.device)
              for m, s in enumerate(T.shape)]
    if mode in (0, T.ndim - 1):
        S = partial_mttkrp(T, omegas, [mode])  # one GEMM with the Khatri-Rao product, on T as stored
    else:
        S = mttkrp(T, omegas, mode)
    for _ in range(n_power):
        Q, _ = torch.linalg.qr(S)
        S = _mode_times_unfolding(T, mode_dot(T, Q, mode, transpose=True), mode)
    return S


def _compress(X, core_ranks, gen, n_power: int = 1):
    """Project X onto orthonormal bases of its leading mode subspaces (sequentially, like ST-HOSVD):
    mode 0 first, where the projection is one GEMM on X as stored, then the others on the smaller core."""
    T = X
    bases: list[torch.Tensor | None] = [None] * X.ndim
    for mode in range(X.ndim):
        k = core_ranks[mode]
        if k >= T.shape[mode]:
            continue
        Q, _ = torch.linalg.qr(_sketch(T, mode, k, gen, n_power))
        T = mode_dot(T, Q, mode, transpose=True)
        bases[mode] = Q
    return T, bases


def _split(T, mode):
    a = math.prod(T.shape[:mode])
    b = math.prod(T.shape[mode + 1 :])
    return a, T.shape[mode], b


def _mode_times_unfolding(T, Z, mode) -> torch.Tensor:
    """``unfold(T, mode) @ unfold(Z, mode).T`` for Z shaped like T except in ``mode``; no copy of T."""
    a, n, b = _split(T, mode)
    k = Z.shape[mode]
    if a == 1:
        return T.reshape(n, b) @ Z.reshape(k, b).T
    if b == 1:
        return T.reshape(a, n).T @ Z.reshape(a, k)
    # Batched GEMMs over blocks of the leading index bound the (block, n, k) temporaries.
    T3, Z3 = T.reshape(a, n, b), Z.reshape(a, k, b)
    step = max(1, _BLOCK_ELEMENTS // (n * k))
    out = torch.zeros(n, k, dtype=T.dtype, device=T.device)
    for i in range(0, a, step):
        out += torch.matmul(T3[i : i + step], Z3[i : i + step].mT).sum(0)
    return out
