"""Tensor completion: CP or Tucker models fitted to the observed entries only.

Inputs are a dense tensor with a boolean ``mask`` or a sparse coordinate list (``coo``); both become
a :class:`~tensorfold.decomp.sparse.COOTensor` of the observed cells, and every step below works on
those cells alone (gathers of factor rows and ``index_add``), so memory is ``O(nnz R^2 + sum I_n R^2)``
and a tensor with 10^11 cells but 10^5 observations is never densified.

Methods
-------
``method="auto"`` (the default) picks ``"em"`` for a CP model of a dense input (``X`` with ``mask``)
observed at ``_EM_MIN_DENSITY`` (15%) of its cells or more with at least ``_EM_MIN_NNZ`` (10,000)
observations, and ``"als"`` otherwise (COO input, Tucker, sparse or small problems): see :func:`complete`.

``method="als"`` (CP or Tucker): exact alternating least squares on the observed entries. For CP, each
row ``a_i`` of factor ``n`` solves its own small ridge problem ``(sum_k k_k k_k^T + lam I) a_i =
sum_k y_k k_k`` over the observations ``k`` in that row (``k_k`` the Hadamard product of the other
factors' rows); the per-row Gram matrices come from one ``index_add`` and are solved in one batched
call. Unlike imputation (EM) schemes, which refit the full tensor with the missing cells filled in, this
never touches unobserved cells and converges in far fewer sweeps at low observation ratios.

``method="em"`` (CP, dense input): expectation-maximisation by imputation. The unobserved cells are
filled with the current model and one dense ALS sweep of the engine (:class:`tensorfold.decomp.cp.ALSSweeps`,
two GEMMs over the tensor through the dimension tree) refits all factors; each fill-and-sweep lowers
the error on the observed cells (the filled objective majorises it). Bro-style extrapolation of the
factors, scored by the observed error, cuts the number of sweeps 2-4x. A sweep costs a few
full-tensor passes (``O(prod(shape) R)``), independent of the observation count, so it wins when many
cells are observed; with few observations imputation converges slowly and per-row ALS wins.

``method="wopt"`` (CP): CP-WOPT (Acar, Dunlavy, Kolda, Morup 2011): L-BFGS on the weighted least
squares objective ``0.5 ||W * (X - [[A_1..A_d]])||^2`` with the gradient from sparse MTTKRPs.

Both start by default from a spectral initialisation: the leading left singular vectors of each
zero-filled sparse unfolding, found by a randomized range finder that only multiplies with the observed
entries (``init="random"`` is cheaper but more often ends in a poor local minimum).

>>> import tensorfold as tf
>>> X = tf.testing.random_cp((20, 20, 20), rank=2, seed=0).to_tensor()
>>> mask = tf.testing.random_mask(X.shape, 0.3, seed=1)
>>> result = tf.complete(X, mask=mask, rank=2, seed=0)
>>> tf.relative_error(X, result) < 1e-6
True
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from tensorfold.core.mttkrp import mttkrp
from tensorfold.core.svd import truncated_svd
from tensorfold.core.tenalg import khatri_rao
from tensorfold.core.validate import (
    as_tensor,
    check_choice,
    check_count,
    check_positive,
    check_rank,
    check_tensor,
    make_generator,
    randn,
)
from tensorfold.decomp.cp import LS_MAX_FAIL, ALSSweeps, absorbed_factors, leading_vectors, normalize_factors
from tensorfold.decomp.iteration import FitTracker
from tensorfold.decomp.results import CPTensor, FitInfo, TuckerTensor
from tensorfold.decomp.sparse import (
    _CHUNK_SCALARS,
    COOTensor,
    RowBlocks,
    as_coo,
    observed,
    row_products,
)
from tensorfold.errors import InvalidArgumentError

Callback = Callable[[int, float], object]

# From this observed fraction (and this many observations) on, CP-WOPT on a dense input evaluates the
# model densely (one GEMM and d MTTKRPs over the full tensor) instead of gathering factor rows per
# observed cell; on small problems the gathers are cheaper.
_DENSE_WOPT_DENSITY = 0.1
_DENSE_WOPT_MIN_NNZ = 50_000
# method="auto" takes the imputation (EM) path for a dense input from this observed fraction and this
# many observations on. Measured (2 threads, float64, 1% noise; seconds ALS / EM): 100^3 rank 5 at 10%
# 0.15 / 0.19, 15% 4.1 (446 slow sweeps; 0.21 without noise) / 0.15, 20% 0.29 / 0.11, 50% 0.66 / 0.08; rank 10 at
# 10% 0.20 / 0.22, 15% 0.29 / 0.15; 60^3 rank 5 at 10% 0.050 / 0.074, 20% 0.064 / 0.037; 40^3 rank 3 at
# 30% 0.027 / 0.011. EM needs more sweeps as the observed fraction falls (~45 at 10%, ~15 at 50%) while
# each costs prod(shape) R, against nnz R^2 for a per-row ALS sweep: the crossover sits near 10-13%.
_EM_MIN_DENSITY = 0.15
_EM_MIN_NNZ = 10_000


def complete(
    X=None,
    *,
    mask=None,
    coo=None,
    rank,
    method: str = "auto",
    model: str = "cp",
    init: str = "svd",
    n_iter_max: int = 500,
    tol: float = 1e-10,
    reg: float | None = None,
    seed: int | torch.Generator | None = 0,
    callback: Callback | None = None,
    n_starts: int = 1,
) -> CPTensor | TuckerTensor:
    """Fit a low-rank CP (or Tucker) model to the observed entries of a tensor.

    Parameters
    ----------
    X, mask:
        A dense tensor and a boolean (or 0/1) mask of the same shape; True marks observed cells.
        Values of ``X`` under False are ignored (they may be NaN).
    coo:
        Instead of ``X``/``mask``: the observed cells as ``(indices (nnz, d), values (nnz,), shape)``,
        a :class:`~tensorfold.decomp.sparse.COOTensor` or a torch sparse COO tensor. Never densified.
    rank:
        CP rank (int), or Tucker ranks (int or one per mode) with ``model="tucker"``.
    method:
        ``"auto"`` (default), ``"als"`` (CP or Tucker: per-row least squares on the observed cells),
        ``"em"`` (CP, dense ``X`` with ``mask`` only: impute the missing cells with the model, one dense
        ALS sweep, repeat) or ``"wopt"`` (CP only, L-BFGS on the masked objective). ``"auto"`` chooses
        ``"em"`` for CP on a dense input with at least 15% of the cells and 10,000 cells observed, and
        ``"als"`` otherwise; ``info.method`` says which ran.
    init:
        ``"svd"`` (spectral: the leading singular vectors of the zero-filled sparse unfoldings; costs a
        few sparse products, and avoids most bad local minima) or ``"random"`` (orthonormalised
        Gaussian columns, scaled to the data).
    n_iter_max, tol:
        Sweep limit, and stop when the relative error on the observed entries changes by less than
        ``tol`` between sweeps (or falls below ``tol``).
    reg:
        Ridge weight, relative to the mean diagonal of the per-row Gram matrices; keeps rows with few
        observations well posed. Default ``1e-12`` (float64) or ``1e-6`` (float32). Not used by
        ``"em"``, whose least-squares problems are over the full (filled) tensor.
    seed:
        Seed or generator for the initialisation.
    callback:
        ``callback(iteration, fit)`` after each sweep (iterations counted from 1, ``fit`` = 1 - relative
        error on the observed entries); returning True stops (with ``n_starts > 1``: stops that start).
    n_starts:
        Fit from ``init`` and from ``n_starts - 1`` further random starts (drawn from ``seed``) and return
        the fit with the lowest error on the observed entries (``info.details["start_errors"]`` lists
        them). Sparse completion of order 4 and more often stalls in a local minimum from a single
        start: on 24 exact order-4 problems (10^4-12^4 cells, rank 3-4, 1,000-2,200 observations) one
        start recovered the tensor in 10 cases and 5 starts in 18 (at about 5x the time).

    Returns
    -------
    CPTensor (or TuckerTensor); ``info.fit_history`` holds ``1 - relative error on observed entries``
    per sweep and ``info.details`` the observation count and the final observed error.

    >>> import torch, tensorfold as tf
    >>> idx = torch.tensor([[0, 0, 0], [1, 2, 3], [4, 1, 2]])
    >>> tf.complete(coo=(idx, torch.tensor([1.0, 2.0, 3.0]), (5, 5, 5)), rank=1).rank
    1
    """
    check_choice(method, "method", ("auto", "als", "em", "wopt"))
    check_choice(model, "model", ("cp", "tucker"))
    check_choice(init, "init", ("svd", "random"))
    n_iter_max = check_count(n_iter_max, "n_iter_max", minimum=1)
    n_starts = check_rank(n_starts, "n_starts")
    tol = check_positive(tol, "tol", allow_zero=True)
    data = _observations(X, mask, coo)
    if reg is None:
        reg = 1e-12 if data.dtype == torch.float64 else 1e-6
    reg = check_positive(reg, "reg", allow_zero=True)
    gen = make_generator(seed)
    start = time.perf_counter()
    if method == "em" and coo is not None:
        raise InvalidArgumentError("method='em' needs a dense X with a mask (COO input is never densified); "
                                   "use method='als' or 'wopt'")
    if method == "auto":
        dense_em = coo is None and model == "cp" and data.density >= _EM_MIN_DENSITY and data.nnz >= _EM_MIN_NNZ
        method = "em" if dense_em else "als"
    if model == "tucker":
        if method != "als":
            raise InvalidArgumentError("model='tucker' supports method='als' only")
        from tensorfold.core.validate import check_ranks

        ranks = check_ranks(rank, data.shape)

        def fit(init_k):
            return _tucker_als(data, ranks, init_k, n_iter_max, tol, reg, gen, callback, start)
    else:
        rank = check_rank(rank)
        if method == "als":
            def fit(init_k):
                return _cp_als(data, rank, init_k, n_iter_max, tol, reg, gen, callback, start)
        elif method == "em":
            imputation = _Imputation(X, mask, data)

            def fit(init_k):
                return _cp_em(imputation, rank, init_k, n_iter_max, tol, gen, callback, start)
        else:
            dense = None
            if coo is None and data.density >= _DENSE_WOPT_DENSITY and data.nnz >= _DENSE_WOPT_MIN_NNZ:
                weight = torch.zeros(data.shape, dtype=data.dtype, device=data.device)
                weight[tuple(data.indices.T)] = 1.0
                filled = torch.zeros_like(weight)
                filled[tuple(data.indices.T)] = data.values
                dense = (filled, weight)

            def fit(init_k):
                return _cp_wopt(data, rank, init_k, n_iter_max, tol, reg, gen, callback, start, dense)
    if n_starts == 1:
        return fit(init)
    return _best_of_starts(fit, init, n_starts, start)


def _best_of_starts(fit, init: str, n_starts: int, start: float):
    """Run ``fit`` from ``init`` and then from ``n_starts - 1`` random starts; keep the lowest observed error.

    Completion is non-convex, and on sparse problems of order 4 and more a start often ends in a local
    minimum with a "spike" component (one huge, concentrated term fitting a few cells); the observed
    error tells such runs apart (0.2-0.3 against 1e-10 on exact data), so the best run is chosen by it.
    Only the chosen run's warnings (e.g. ConvergenceWarning) are re-issued.
    """
    best, best_warnings, errors = None, [], []
    for k in range(n_starts):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit(init if k == 0 else "random")
        errors.append(result.info.details["observed_relative_error"])
        if best is None or errors[-1] < best.info.details["observed_relative_error"]:
            best, best_warnings, chosen = result, caught, k
    for w in best_warnings:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    details = {**best.info.details, "start_errors": errors, "chosen_start": chosen}
    info = replace(best.info, details=details, seconds=time.perf_counter() - start)
    return replace(best, info=info)

# --- input -----------------------------------------------------------------------------------------

def _observations(X, mask, coo) -> COOTensor:
    if coo is not None:
        if X is not None or mask is not None:
            raise InvalidArgumentError("give either X with mask, or coo, not both")
        return as_coo(coo)
    if X is None:
        raise InvalidArgumentError("give the data: X with a mask, or coo=(indices, values, shape)")
    if mask is None:
        raise InvalidArgumentError("complete needs a mask marking the observed entries of X (or use coo=)")
    return observed(X, mask)


# --- initialisation --------------------------------------------------------------------------------

def _leading_subspace(data: COOTensor, mode: int, k: int, gen: torch.Generator, n_power: int = 2) -> torch.Tensor:
    """Leading ``k`` left singular vectors of the mode-``mode`` unfolding of the zero-filled sparse tensor.

    The unfolding has one column per distinct combination of the other indices that is observed (all
    other columns are zero), so it is an ``(I_n, <= nnz)`` sparse matrix; a randomized range finder
    with ``n_power`` power iterations then needs only sparse products, and the final small SVD goes
    through :func:`tensorfold.core.svd.truncated_svd`.
    """
    others = [m for m in range(data.ndim) if m != mode]
    if math.prod(data.shape[m] for m in others) < 2**62:  # one int64 key per column: a fast 1-D unique
        strides = torch.tensor([math.prod(data.shape[m] for m in others[j + 1:]) for j in range(len(others))],
                               device=data.device)
        _, cols = torch.unique(data.indices[:, others] @ strides, return_inverse=True)
    else:
        _, cols = torch.unique(data.indices[:, others], dim=0, return_inverse=True)
    n_cols = int(cols.max()) + 1
    Y = torch.sparse_coo_tensor(
        torch.stack([data.indices[:, mode], cols]), data.values, (data.shape[mode], n_cols), check_invariants=False
    ).coalesce()
    Yt = Y.t().coalesce()
    width = min(k + 8, data.shape[mode], n_cols)
    Omega = randn(n_cols, width, generator=gen, dtype=data.dtype, device=data.device)
    Q, _ = torch.linalg.qr(torch.sparse.mm(Y, Omega))
    for _ in range(n_power):
        # Only the short side (I_n x width) is re-orthonormalised: a QR of the tall (<= nnz x width)
        # intermediate costs more than all the sparse products, and a start needs no more accuracy.
        Q, _ = torch.linalg.qr(torch.sparse.mm(Y, torch.sparse.mm(Yt, Q)))
    B = torch.sparse.mm(Yt, Q).T  # (width, n_cols) = Q^T Y
    trunc = truncated_svd(B, min(k, width))
    U = Q @ trunc.U
    if U.shape[1] < k:  # fewer observed directions than the rank: pad with random orthogonal columns
        pad = randn(U.shape[0], k - U.shape[1], generator=gen, dtype=U.dtype, device=U.device)
        U = torch.linalg.qr(torch.cat([U, pad], 1))[0]
    return U


def _initial_factors(data: COOTensor, ranks: Sequence[int], init: str, gen) -> list[torch.Tensor]:
    if init == "svd":
        factors = []
        for mode, r in enumerate(ranks):
            n = data.shape[mode]
            U = _leading_subspace(data, mode, min(r, n), gen)
            if r > n:  # a CP rank above the mode size: the extra columns start random
                U = torch.cat([U, randn(n, r - n, generator=gen, dtype=U.dtype, device=U.device) / math.sqrt(n)], 1)
            factors.append(U)
        return factors
    return [torch.linalg.qr(randn(n, r, generator=gen, dtype=data.dtype, device=data.device))[0]
            if r <= n else randn(n, r, generator=gen, dtype=data.dtype, device=data.device) / math.sqrt(n)
            for n, r in zip(data.shape, ranks)]


def _cp_scale(data: COOTensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Scale the factors equally so that the model's magnitude on the observed cells matches the data's.

    Balanced factors matter for the gradient method (an unbalanced start is badly conditioned).
    """
    model = row_products(factors, data.indices).sum(1)
    denom = float(model.norm())
    scale = data.norm() / denom if denom > 0 else 1.0
    return [f * scale ** (1.0 / len(factors)) for f in factors]


# --- CP by ALS on the observed entries ---------------------------------------------------------------

def _ridge_solve(G: torch.Tensor, rhs: torch.Tensor, reg: float) -> torch.Tensor:
    """Solve ``(G_i + lam I) a_i = rhs_i`` for every row i at once; lam relative to the mean diagonal."""
    R = G.shape[-1]
    diag = G.diagonal(dim1=-2, dim2=-1)
    mean_diag = float(diag.mean()) if diag.numel() else 1.0
    lam = reg * mean_diag + torch.finfo(G.dtype).tiny
    eye = torch.eye(R, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G + lam * eye)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
    # Rows whose Gram is numerically singular (very few observations): least squares per row.
    return torch.linalg.lstsq(G + lam * eye, rhs.unsqueeze(-1)).solution.squeeze(-1)


def _observed_error(data: COOTensor, model_values: torch.Tensor, data_norm: float) -> float:
    return float(torch.linalg.vector_norm((model_values - data.values).double())) / data_norm


def _cp_als(data, rank, init, n_iter_max, tol, reg, gen, callback, start) -> CPTensor:
    factors = _cp_scale(data, _initial_factors(data, [rank] * data.ndim, init, gen))
    data_norm = data.norm() or 1.0
    # Rows of each factor at the observed cells; after a factor update only its own rows change.
    gathered = [f[data.indices[:, m]] for m, f in enumerate(factors)]
    blocks = [RowBlocks(data.indices[:, m], n) for m, n in enumerate(data.shape)]
    tracker = FitTracker("complete (CP-ALS)", n_iter_max=n_iter_max, tol=tol, callback=callback, relative=True,
                         dtype=data.dtype)
    for _ in range(n_iter_max):
        for mode in range(data.ndim):
            buffer = blocks[mode].workspace(rank, data.values)
            _product(gathered, skip=mode, out=buffer[:-1, :rank])
            G, rhs = blocks[mode].gram_and_rhs_of(buffer)
            factors[mode] = _ridge_solve(G, rhs, reg)
            gathered[mode] = factors[mode][data.indices[:, mode]]
        if tracker.update(_observed_error(data, _product(gathered).sum(1), data_norm)):
            break
    tracker.finish()
    weights = torch.ones(rank, dtype=data.dtype, device=data.device)
    info = _info("complete-cp-als", tracker, start, data)
    return CPTensor(weights, tuple(factors), info).normalize()


def _product(gathered: list[torch.Tensor], skip: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise product of the gathered rows of every mode except ``skip`` (written into ``out`` if given)."""
    terms = [g for m, g in enumerate(gathered) if m != skip]
    if out is None:
        out = terms[0].clone() if len(terms) == 1 else terms[0] * terms[1]
    elif len(terms) == 1:
        out.copy_(terms[0])
    else:
        torch.mul(terms[0], terms[1], out=out)
    for g in terms[2:]:
        out.mul_(g)
    return out


def _info(method: str, tracker: FitTracker, start: float, data: COOTensor, **details) -> FitInfo:
    return FitInfo(
        method=method,
        n_iter=len(tracker.history),
        converged=tracker.converged,
        fit_history=tuple(tracker.history),
        seconds=time.perf_counter() - start,
        details={"nnz": data.nnz, "density": data.density, "observed_relative_error": tracker.error, **details},
    )


# --- CP by imputation (EM) with dense ALS sweeps ----------------------------------------------------

class _Imputation:
    """A dense input prepared for EM: the zero-filled data, the 0/1 weights, and two model/residual buffers.

    :meth:`evaluate` writes the model ``[[w; factors]]`` and the masked residual ``W * (X - model)`` into
    one of the two buffer pairs (the current iterate and a line-search candidate alternate between them,
    so a run allocates no full-size tensor per sweep) and returns the relative error on the observed cells.
    """

    def __init__(self, X, mask, data: COOTensor):
        X = check_tensor(X, "X", min_order=2, check_finite=False)  # already validated by observed()
        observed_cells = as_tensor(mask, "mask").to(X.device) != 0
        self.shape = tuple(X.shape)
        self.dtype, self.device = X.dtype, X.device
        self.weight = observed_cells.to(X.dtype)
        # where(), not X * weight: the unobserved cells may hold NaN.
        self.data = torch.where(observed_cells, X, torch.zeros((), dtype=X.dtype, device=X.device)).contiguous()
        self.norm = data.norm() or 1.0
        self.coo = data
        self.models = [torch.empty(self.shape, dtype=X.dtype, device=X.device) for _ in range(2)]
        self.residuals = [torch.empty_like(m) for m in self.models]

    def evaluate(self, weights, factors, slot: int) -> float:
        model, residual = self.models[slot], self.residuals[slot]
        # Row-major unfolding of mode 0 against the Khatri-Rao product of the rest: one GEMM.
        torch.matmul(factors[0] * weights, khatri_rao(factors[1:]).T, out=model.view(self.shape[0], -1))
        torch.sub(self.data, model, out=residual).mul_(self.weight)
        return float(torch.linalg.vector_norm(residual).double()) / self.norm

    def filled(self, slot: int) -> torch.Tensor:
        """The data with the unobserved cells imputed by the model of ``slot`` (overwrites that model)."""
        return self.models[slot].add_(self.residuals[slot])


def _cp_em(imp: _Imputation, rank, init, n_iter_max, tol, gen, callback, start) -> CPTensor:
    if init == "svd":
        # The leading subspaces of the zero-filled tensor (the spectral start of the sparse path), found
        # by the engine's dense range finder: a few GEMMs instead of sparse products over every cell.
        factors = [leading_vectors(imp.data, mode, rank, gen) for mode in range(len(imp.shape))]
    else:
        factors = _initial_factors(imp.coo, [rank] * len(imp.shape), init, gen)
    weights, factors = normalize_factors(None, factors)
    imp.evaluate(weights, factors, 0)
    # Least-squares scale of the start on the observed cells: sum(W X M) / sum(W M^2), from the buffers.
    model, residual = imp.models[0], imp.residuals[0]
    masked_model = imp.data - residual  # W * M
    denom = float(torch.linalg.vector_norm(masked_model).double() ** 2)
    if denom > 0:
        weights = weights * (float((masked_model * imp.data).sum()) / denom)
    del masked_model, model, residual
    slot = 0
    imp.evaluate(weights, factors, slot)
    grams = [A.T @ A for A in factors]
    tracker = FitTracker("complete (CP-EM)", n_iter_max=n_iter_max, tol=tol, callback=callback, relative=True,
                         dtype=imp.dtype)
    power, fails, accepted = 2.0, 0, 0
    for it in range(1, n_iter_max + 1):
        begin = absorbed_factors(weights, factors)
        # E-step and M-step: impute, then one dense ALS sweep (dimension tree, two GEMMs over the tensor).
        filled = imp.filled(slot)
        weights, _ = ALSSweeps(filled, 1.0, 1.0, 0.0, "em").sweep(weights, factors, grams)
        err = imp.evaluate(weights, factors, slot)
        if it > 1:
            # Extrapolate along the sweep's step (as cp's line search); the candidate's model and
            # residual land in the other buffers and become the next imputation if it is kept.
            jump = it ** (1.0 / power)
            ends = absorbed_factors(weights, factors)
            w_c, f_c = normalize_factors(None, [b + jump * (e - b) for b, e in zip(begin, ends)])
            err_c = imp.evaluate(w_c, f_c, 1 - slot)
            if err_c < err:
                weights, factors, err, slot = w_c, f_c, err_c, 1 - slot
                grams = [A.T @ A for A in factors]
                accepted, fails = accepted + 1, 0
            else:
                fails += 1
                if fails >= LS_MAX_FAIL:
                    power, fails = power + 1.0, 0
        if tracker.update(err):
            break
    tracker.finish()
    info = _info("complete-cp-em", tracker, start, imp.coo, accepted_jumps=accepted)
    return CPTensor(weights, tuple(factors), info).normalize()


# --- CP-WOPT: L-BFGS on the masked objective ----------------------------------------------------------

def _cp_wopt(data, rank, init, n_iter_max, tol, reg, gen, callback, start, dense=None) -> CPTensor:
    import numpy as np
    from scipy.optimize import minimize

    factors = _cp_scale(data, _initial_factors(data, [rank] * data.ndim, init, gen))
    data_norm = data.norm() or 1.0
    # Optimise a scaled copy (unit data norm) so the solver's tolerances mean the same for every input.
    factors = [f / data_norm ** (1.0 / data.ndim) for f in factors]
    y = data.values / data_norm
    if dense is not None:
        dense = (dense[0] / data_norm, dense[1])
    sizes = [f.numel() for f in factors]
    tracker = FitTracker("complete (CP-WOPT)", n_iter_max=n_iter_max, tol=tol, callback=callback)

    def unpack(x: np.ndarray) -> list[torch.Tensor]:
        flat = torch.from_numpy(x).to(dtype=data.dtype, device=data.device)
        return [p.reshape(n, rank) for p, n in zip(torch.split(flat, sizes), data.shape)]

    def residual_and_grads(F):
        """Residual on the observed cells (as a vector, or a masked dense tensor) and the data-term gradients."""
        if dense is not None:
            # Dense mask with many observations: GEMM-based reconstruction and MTTKRPs beat gathers.
            X_filled, weight = dense
            residual = (F[0] @ khatri_rao(F[1:]).T).reshape(data.shape) * weight - X_filled
            return residual, [mttkrp(residual, F, m) for m in range(data.ndim)]
        gathered = [f.index_select(0, data.indices[:, m]) for m, f in enumerate(F)]
        prefix = [torch.ones_like(gathered[0])]  # prefix[m] = prod of gathered[:m]
        for g in gathered[:-1]:
            prefix.append(prefix[-1] * g)
        residual = (prefix[-1] * gathered[-1]).sum(1) - y
        grads, suffix = [None] * data.ndim, torch.ones_like(gathered[0])
        for m in range(data.ndim - 1, -1, -1):
            K = prefix[m] * suffix
            grads[m] = torch.zeros_like(F[m]).index_add_(0, data.indices[:, m], K * residual[:, None])
            suffix = suffix * gathered[m]
        return residual, grads

    def loss_and_grad(x: np.ndarray):
        F = unpack(x)
        residual, grads = residual_and_grads(F)
        loss = 0.5 * float(torch.linalg.vector_norm(residual).double() ** 2)
        if reg:
            grads = [g + reg * f for g, f in zip(grads, F)]
            loss += 0.5 * reg * sum(float((f * f).sum()) for f in F)
        return loss, torch.cat([g.reshape(-1) for g in grads]).double().cpu().numpy()

    def progress(intermediate_result):  # scipy passes the iterate's objective: no extra evaluation
        # 0.5 * squared relative error on the observed cells (unit data norm), plus the tiny ridge term
        tracker.update(math.sqrt(max(2 * float(intermediate_result.fun), 0.0)))
        if tracker.stopped:
            raise StopIteration

    x0 = torch.cat([f.reshape(-1) for f in factors]).double().cpu().numpy()
    eps = float(torch.finfo(data.dtype).eps)
    options = {"maxiter": n_iter_max, "maxcor": 20, "ftol": max(tol, eps) ** 2, "gtol": max(tol, eps) * 1e-2}
    res = minimize(loss_and_grad, x0, jac=True, method="L-BFGS-B", options=options, callback=progress)
    factors = unpack(res.x)
    factors[0] = factors[0] * data_norm
    err = _observed_error(data, row_products(factors, data.indices).sum(1), data_norm)
    if tracker.history:
        tracker.history[-1] = 1.0 - err  # the exact value, without the ridge term
    else:
        tracker.history.append(1.0 - err)
    tracker.error = err
    # L-BFGS-B has its own stopping rules (on the objective and the projected gradient).
    tracker.converged = bool(res.success) or err < tol
    if res.nit < n_iter_max:
        tracker.stopped = tracker.stopped or not tracker.converged  # stopped by the callback or the line search
    tracker.finish()
    weights = torch.ones(rank, dtype=data.dtype, device=data.device)
    info = _info("complete-cp-wopt", tracker, start, data, function_evaluations=int(res.nfev),
                 solver_message=str(res.message))
    info = replace(info, n_iter=int(res.nit))
    return CPTensor(weights, tuple(factors), info).normalize()


# --- Tucker by ALS on the observed entries ------------------------------------------------------------

def _kron_rows(factors, indices, modes, sl) -> torch.Tensor:
    """Row-wise Kronecker product of the gathered rows of ``factors[m]`` for ``m in modes`` (row-major)."""
    out = None
    for m in modes:
        g = factors[m].index_select(0, indices[sl, m])
        out = g if out is None else (out[:, :, None] * g[:, None, :]).reshape(g.shape[0], -1)
    return out


def _tucker_features(core, factors, indices, mode, sl) -> torch.Tensor:
    """``k_o = unfold(core, mode) @ kron_{m != mode} U_m[i_m]``: the features of mode ``mode``'s rows."""
    others = [m for m in range(core.ndim) if m != mode]
    Z = _kron_rows(factors, indices, others, sl)
    core_n = core.movedim(mode, 0).reshape(core.shape[mode], -1)
    return Z @ core_n.T


def _tucker_core(data: COOTensor, factors, ranks, reg) -> torch.Tensor:
    """Least-squares core for fixed factors: normal equations over the observed cells, chunked."""
    P = math.prod(ranks)
    modes = list(range(data.ndim))
    A = torch.zeros(P, P, dtype=data.dtype, device=data.device)
    b = torch.zeros(P, dtype=data.dtype, device=data.device)
    step = max(1, _CHUNK_SCALARS // P)
    for s in range(0, data.nnz, step):
        sl = slice(s, min(s + step, data.nnz))
        Z = _kron_rows(factors, data.indices, modes, sl)
        A += Z.T @ Z
        b += Z.T @ data.values[sl]
    core = _ridge_solve(A[None], b[None], reg)[0]
    return core.reshape(ranks)


def _tucker_values(data: COOTensor, core, factors) -> torch.Tensor:
    out = torch.empty(data.nnz, dtype=data.dtype, device=data.device)
    P = core.numel()
    step = max(1, _CHUNK_SCALARS // P)
    for s in range(0, data.nnz, step):
        sl = slice(s, min(s + step, data.nnz))
        out[sl] = _kron_rows(factors, data.indices, range(data.ndim), sl) @ core.reshape(-1)
    return out


def _tucker_als(data, ranks, init, n_iter_max, tol, reg, gen, callback, start) -> TuckerTensor:
    factors = _initial_factors(data, ranks, init, gen)
    core = _tucker_core(data, factors, ranks, reg)
    blocks = [RowBlocks(data.indices[:, m], n) for m, n in enumerate(data.shape)]
    data_norm = data.norm() or 1.0
    tracker = FitTracker("complete (Tucker-ALS)", n_iter_max=n_iter_max, tol=tol, callback=callback,
                         relative=True, dtype=data.dtype)
    for _ in range(n_iter_max):
        for mode in range(data.ndim):
            K = _tucker_features(core, factors, data.indices, mode, slice(None))
            G, rhs = blocks[mode].gram_and_rhs(K, data.values)
            U = _ridge_solve(G, rhs, reg)
            # Keep factors orthonormal (the core absorbs the triangular part) so the problems stay
            # well conditioned.
            Q, Rt = torch.linalg.qr(U)
            factors[mode] = Q
            core = torch.tensordot(Rt, core, dims=([1], [mode])).movedim(0, mode)
        core = _tucker_core(data, factors, ranks, reg)
        if tracker.update(_observed_error(data, _tucker_values(data, core, factors), data_norm)):
            break
    tracker.finish()
    info = _info("complete-tucker-als", tracker, start, data)
    return TuckerTensor(core, tuple(factors), info)
