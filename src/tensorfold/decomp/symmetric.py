"""Symmetric CP decomposition by the subspace power method (SPM).

For a symmetric tensor ``T = sum_i lambda_i a_i^{(x)m}`` of order ``m`` (3 or 4) with unit ``a_i``,
Kileel and Pereira ("Subspace power method for symmetric tensor decomposition", 2019/2021):

1. flatten ``T`` to an ``n^d x n^(m-d)`` matrix with ``d = ceil(m/2)``; its column space is
   ``A = span{vec(a_i^{(x)d})}``, and its numerical rank is the CP rank (found here from the singular
   values with a relative tolerance, or given);
2. find one ``a_i`` by a shifted power iteration that maximises ``F(x) = ||P_A vec(x^{(x)d})||^2`` over
   the unit sphere (the maxima with ``F = 1`` are exactly the components);
3. get its weight from the rank-one reduction formula ``lambda = 1 / (b^T S^{-1} c)`` with ``c``, ``b``
   the coordinates of ``vec(a^{(x)d})`` and ``vec(a^{(x)(m-d)})`` in the singular bases, and deflate the
   subspace by an SVD of the small ``r x r`` matrix ``S - lambda c b^T``;
4. repeat until the subspace is empty, then polish each component by power iterations on the full
   subspace (removing deflation error) and refit the weights by least squares.

No peer library has this method; it needs no rank guess and no ALS.

>>> import torch, tensorfold as tf
>>> A = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
>>> X = torch.einsum("ir,jr,kr->ijk", A, A, A)
>>> result = tf.symmetric_cp(X)
>>> result.rank, tf.relative_error(X, result) < 1e-10
(3, True)
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from tensorfold.core.mttkrp import mttkrp
from tensorfold.core.svd import truncated_svd
from tensorfold.core.validate import check_count, check_positive, check_rank, check_tensor, make_generator, randn
from tensorfold.decomp.results import CPTensor, FitInfo
from tensorfold.errors import ConvergenceWarning, InvalidTensorError, RankError


def symmetric_cp(
    X,
    rank: int | None = None,
    *,
    tol: float | None = None,
    power_tol: float | None = None,
    n_iter_max: int = 2000,
    n_starts: int = 3,
    shift: float = 1.0,
    symmetry_tol: float | None = None,
    seed: int | torch.Generator | None = 0,
) -> CPTensor:
    """Symmetric CP decomposition ``X ~ sum_r weights[r] a_r (x) ... (x) a_r`` of an order-3 or order-4 tensor.

    Parameters
    ----------
    X:
        A symmetric tensor of shape ``(n,) * m`` with ``m`` in {3, 4}.
    rank:
        Number of components; by default found from the flattening's singular values as the count of
        those above ``tol`` times the largest.
    tol:
        Relative singular-value threshold for the rank (default ``1e-7`` in float64, ``3e-3`` in
        float32). With noisy data, raise it above the noise level.
    power_tol:
        Stop a power iteration when the step changes the unit vector by less than this (default
        ``1e-13`` in float64, ``1e-6`` in float32).
    n_iter_max, n_starts:
        Power iterations per start, and random starts tried per component (the best is kept).
    shift:
        Shift ``gamma`` of the power iteration ``x <- (grad F(x) / 2d + gamma x)/||.||``; a positive
        shift makes the iteration monotone.
    symmetry_tol:
        ``X`` must equal its index permutations to this relative Frobenius tolerance (default
        ``1e-7`` in float64, ``1e-4`` in float32).
    seed:
        Seed or generator for the random starts.

    Returns
    -------
    CPTensor with identical (cloned) factors in every mode, unit columns and ``rank`` the one found.
    ``info.details`` holds the flattening spectrum and each component's final ``F`` value.
    """
    start = time.perf_counter()
    X = check_tensor(X, "X", min_order=3, max_order=4)
    m, n = X.ndim, X.shape[0]
    eps = torch.finfo(X.dtype).eps
    tol = check_positive(tol if tol is not None else (1e-7 if X.dtype == torch.float64 else 3e-3), "tol")
    power_tol = check_positive(power_tol if power_tol is not None else (1e-13 if X.dtype == torch.float64 else 1e-6),
                               "power_tol")
    symmetry_tol = check_positive(
        symmetry_tol if symmetry_tol is not None else (1e-7 if X.dtype == torch.float64 else 1e-4), "symmetry_tol"
    )
    n_iter_max = check_count(n_iter_max, "n_iter_max", minimum=1)
    n_starts = check_rank(n_starts, "n_starts")
    shift = check_positive(shift, "shift", allow_zero=True)
    check_symmetric(X, symmetry_tol)
    gen = make_generator(seed)

    d = (m + 1) // 2
    flat = X.reshape(n**d, n ** (m - d))
    full = truncated_svd(flat, min(flat.shape))
    spectrum = full.S
    if rank is None:
        if float(spectrum[0]) == 0:
            raise InvalidTensorError("X is zero; it has no components")
        rank = max(int((spectrum > tol * spectrum[0]).sum()), 1)
    else:
        rank = check_rank(rank, max_rank=min(flat.shape), what=f"an order-{m} symmetric tensor of size {n} (SPM)")
    U, S, V = full.U[:, :rank], full.S[:rank], full.V[:, :rank]
    U0 = U.clone()

    components, values, n_power = [], [], 0
    for _ in range(rank):
        best_x, best_f = None, -1.0
        for _ in range(n_starts):
            x0 = randn(n, generator=gen, dtype=X.dtype, device=X.device)
            x, f, its = _power_iteration(U, x0 / torch.linalg.vector_norm(x0), d, shift, n_iter_max, power_tol)
            n_power += its
            if f > best_f:
                best_x, best_f = x, f
            if 1.0 - f < 1e-3:  # converged to a component; more starts will not help
                break
        x = best_x
        alpha = U.T @ _power_vec(x, d)
        beta = V.T @ _power_vec(x, m - d)
        denom = float(beta @ (alpha / S))
        if abs(denom) <= eps:
            raise RankError(
                f"SPM could not isolate component {len(components) + 1} of {rank}; the rank is probably "
                f"too high for this tensor (try a larger tol or a smaller rank)"
            )
        lam = 1.0 / denom
        components.append(x)
        values.append(best_f)
        if len(components) == rank:
            break
        # Deflate: remove lam * vec(x^d) vec(x^(m-d))^T from the flattening inside the current bases.
        P, Sig, Q = torch.linalg.svd(torch.diag(S) - lam * torch.outer(alpha, beta))
        U, S, V = U @ P[:, :-1], Sig[:-1], V @ Q.T[:, :-1]

    # Polish on the undeflated subspace: the true components are exact fixed points there.
    polished = []
    for x in components:
        x, f, its = _power_iteration(U0, x, d, shift, n_iter_max, power_tol)
        polished.append(x)
        n_power += its
    A = torch.stack(polished, 1)
    weights = _least_squares_weights(X, A)
    if m % 2 == 1:  # odd order: the sign lives in the vector; keep weights positive
        signs = torch.where(weights < 0, -torch.ones_like(weights), torch.ones_like(weights))
        A, weights = A * signs, weights * signs
    else:  # even order: the vector's sign is free; make each column's largest entry positive
        idx = A.abs().argmax(0)
        signs = torch.sign(A[idx, torch.arange(A.shape[1], device=A.device)])
        A = A * torch.where(signs == 0, torch.ones_like(signs), signs)
    final_f = [float(_objective(U0, a, d)) for a in A.T]
    converged = all(1.0 - f < math.sqrt(power_tol) + 1e3 * eps for f in final_f)
    if not converged:
        warnings.warn(
            "symmetric_cp: some components are not exact maxima of the SPM objective (F < 1); the tensor may "
            "be noisy or its rank beyond SPM's range", ConvergenceWarning, stacklevel=2,
        )
    info = FitInfo(
        "symmetric-cp-spm", n_power, converged, (), time.perf_counter() - start,
        {"spectrum": spectrum.double().cpu().tolist(), "objective": final_f, "rank_tol": tol},
    )
    return CPTensor(weights, tuple(A.clone() for _ in range(m)), info)


def check_symmetric(X: torch.Tensor, tol: float) -> None:
    """Raise :class:`InvalidTensorError` unless X is cubical and invariant under index permutations.

    A transposition and a cyclic shift generate every permutation, so two comparisons suffice.
    """
    if len(set(X.shape)) != 1:
        raise InvalidTensorError(f"a symmetric tensor needs equal mode sizes, got shape {tuple(X.shape)}")
    norm = float(torch.linalg.vector_norm(X))
    m = X.ndim
    for perm in ((1, 0, *range(2, m)), (*range(1, m), 0)):
        gap = float(torch.linalg.vector_norm(X - X.permute(perm)))
        if gap > tol * max(norm, torch.finfo(X.dtype).tiny):
            raise InvalidTensorError(
                f"X is not symmetric: permuting its indices by {perm} changes it by {gap / max(norm, 1e-300):.2e} "
                f"relative to its norm (allowed {tol:.1e}); symmetrize it first or raise symmetry_tol"
            )


def _power_vec(x: torch.Tensor, k: int) -> torch.Tensor:
    """``vec(x (x) ... (x) x)`` with ``k`` factors (row-major, matching ``reshape`` of the tensor)."""
    out = x
    for _ in range(k - 1):
        out = torch.outer(out, x).reshape(-1)
    return out


def _objective(U: torch.Tensor, x: torch.Tensor, d: int) -> torch.Tensor:
    c = U.T @ _power_vec(x, d)
    return c @ c


def _power_iteration(U, x, d, shift, n_iter_max, tol):
    """Shifted power iteration for ``max ||U^T vec(x^d)||^2`` on the unit sphere; returns (x, F, iterations)."""
    n = x.shape[0]
    its = 0
    for its in range(1, n_iter_max + 1):  # noqa: B007 (the count is returned)
        proj = U @ (U.T @ _power_vec(x, d))  # P_A vec(x^d)
        grad = proj.reshape(n, -1) @ _power_vec(x, d - 1)  # contraction with x^(d-1): grad F / 2d
        y = grad + shift * x
        y = y / torch.linalg.vector_norm(y)
        step = float(torch.linalg.vector_norm(y - x))
        x = y
        if step < tol:
            break
    return x, float(_objective(U, x, d)), its


def _least_squares_weights(X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Weights minimising ``||X - sum_r w_r a_r^m||``: Gram ``(A^T A)^m`` and right side ``<X, a_r^m>``."""
    m = X.ndim
    gram = (A.T @ A) ** m
    rhs = (mttkrp(X, [A] * m, 0) * A).sum(0)
    return torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]
