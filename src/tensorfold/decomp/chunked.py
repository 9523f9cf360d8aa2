"""CP-ALS and relative errors for tensors read block by block (in memory, memmap, Dask, Zarr, HDF5).

:func:`cp_chunked` follows the in-memory :func:`tensorfold.cp` (CANDELINC): X is compressed first, here
by the three-pass Tucker sketch (:func:`tensorfold.tucker_sketch` to ranks ``k = R + margin``: the sketches,
one HOOI pass, the exact core), CP-ALS runs on the small core in memory, and the expanded factors are
refined by ALS sweeps on the data, each MTTKRP a map-reduce over the blocks (per-block MTTKRPs of the
block against the factor rows it touches, summed). The default sweep (``sweep="one-pass"``) reads the
data once: every block gives the MTTKRPs of all modes at the sweep's start factors (block-Jacobi ALS) and,
from ``||X||^2 - 2<X, M> + ||M||^2``, the fit of those factors; a step that lowers the fit is undone and
followed by one exact Gauss-Seidel sweep (one pass per mode), so the fit never decreases. Nonnegative fits
use HALS updates from the same MTTKRPs and Grams; masked fits (EM) fill each block's missing cells with
the current model inside the same pass.

:func:`relative_error_chunked` forms ``||X - approx||`` block by block (the residual of each block against
the matching rows of the factors), in one pass.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from tensorfold.core.mttkrp import mttkrp
from tensorfold.core.validate import check_positive, check_rank, make_generator
from tensorfold.decomp.blocks import as_blocked, map_reduce
from tensorfold.decomp.results import CPTensor, Decomposition, FitInfo, TRTensor, TTTensor, TuckerTensor
from tensorfold.errors import ConvergenceWarning, InvalidArgumentError, ShapeError


def restrict(approx: Decomposition, slices: Sequence[slice]) -> Decomposition:
    """The sub-block ``approx[slices]`` as a decomposition of the same kind (factor rows sliced)."""
    if isinstance(approx, CPTensor):
        return CPTensor(approx.weights, tuple(f[s] for f, s in zip(approx.factors, slices)))
    if isinstance(approx, TuckerTensor):
        return TuckerTensor(approx.core, tuple(f[s] for f, s in zip(approx.factors, slices)))
    if isinstance(approx, (TTTensor, TRTensor)):
        return type(approx)(tuple(c[:, s, :] for c, s in zip(approx.cores, slices)))
    raise InvalidArgumentError(f"no block-wise form for {type(approx).__name__}")


class _ResidualBlock:
    def __init__(self, approx: Decomposition):
        self.approx = approx

    def __call__(self, slices, B):
        R = B - restrict(self.approx, slices).to(dtype=B.dtype).to_tensor()
        R *= R
        return [torch.sum(B * B, dtype=torch.float64), torch.sum(R, dtype=torch.float64)]


def relative_error_chunked(X, approx: Decomposition, *, chunks=None, scheduler=None) -> float:
    """``||X - approx|| / ||X||`` in one streaming pass over the blocks of ``X`` (any input that
    :func:`tensorfold.decomp.blocks.as_blocked` takes), in float64 and without cancellation."""
    B = as_blocked(X, chunks=chunks, scheduler=scheduler)
    if tuple(approx.shape) != B.shape:
        raise ShapeError(f"approximation has shape {approx.shape}, data has {B.shape}")
    x_sq, res_sq = map_reduce(B, _ResidualBlock(approx.to("cpu")))
    x_sq, res_sq = float(x_sq), float(res_sq)
    return math.sqrt(res_sq / x_sq) if x_sq > 0 else math.sqrt(res_sq)


class _SweepBlock:
    """Per block: the MTTKRPs of ``modes`` against the factor rows the block touches (summed over blocks
    they give the full MTTKRPs), and with ``masked`` the missing (NaN) cells filled by the current model
    first (EM), plus the observed ``||X||^2``, residual and count."""

    def __init__(self, shape, weights, factors, modes, masked: bool):
        self.shape, self.weights, self.factors, self.modes, self.masked = shape, weights, factors, modes, masked

    def __call__(self, slices, B):
        sub = [f[s].to(B.dtype) for f, s in zip(self.factors, slices)]
        out = []
        if self.masked:
            obs = ~torch.isnan(B)
            model = CPTensor(self.weights.to(B.dtype), tuple(sub)).to_tensor()
            B = torch.where(obs, B, model)
            R = (B - model).double()
            out += [torch.sum(B.double() ** 2 * obs), torch.sum(R * R), torch.sum(B.double() ** 2)]
        for n in self.modes:
            M = torch.zeros(self.shape[n], sub[0].shape[1], dtype=torch.float64)
            M[slices[n]] = mttkrp(B, sub, n).double()
            out.append(M)
        return out


class _MaskedView:
    """Blocks of ``data`` with the cells where ``mask`` is False (or NaN when no mask) set to ``fill``:
    NaN marks them missing for the EM pass, 0 feeds the sketch that seeds it."""

    def __init__(self, data, mask, fill: float):
        self.data, self.mask, self.fill = data, mask, fill
        self.shape = tuple(data.shape)

    def __getitem__(self, slices):
        block = _as_torch(self.data[slices])
        obs = ~torch.isnan(block) if self.mask is None else _as_torch(self.mask[slices])
        return torch.where(obs, block, torch.full_like(block, self.fill))


def _as_torch(a) -> torch.Tensor:
    import numpy as np

    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def _masked_inputs(B, mask):
    """(data with NaN at missing cells, zero-filled data) as blocked inputs; checks ``mask``."""
    import dataclasses

    import numpy as np

    if mask is not None:
        shape = tuple(int(n) for n in mask.shape)
        if shape != B.shape:
            raise ShapeError(f"mask has shape {shape}, data has {B.shape}")
        dt = mask.dtype
        if not (dt == torch.bool or (not isinstance(dt, torch.dtype) and np.dtype(dt) == np.bool_)):
            raise InvalidArgumentError(f"mask must be a boolean array (True = observed), got dtype {dt}")
    if B.is_dask:
        import dask.array as da

        arr = B.data
        obs = ~da.isnan(arr) if mask is None else da.asarray(_np_mask(mask)).rechunk(arr.chunks) & ~da.isnan(arr)
        return (dataclasses.replace(B, data=da.where(obs, arr, np.nan)),
                dataclasses.replace(B, data=da.where(obs, arr, 0)))
    m = None if mask is None else _np_mask(mask)
    return (dataclasses.replace(B, data=_MaskedView(B.data, m, float("nan"))),
            dataclasses.replace(B, data=_MaskedView(B.data, m, 0.0)))


def _np_mask(mask):
    return mask.numpy() if isinstance(mask, torch.Tensor) else mask


def _factor_update(M, V, A_old, nonnegative: bool, inner: int = 10) -> torch.Tensor:
    """The mode's new (weighted) factor from its MTTKRP ``M`` and Hadamard Gram ``V``: the least-squares
    solution, or for nonnegative fits ``inner`` HALS rounds from ``A_old`` (cheap: no data touched)."""
    from tensorfold.decomp.cp import solve_normal

    if not nonnegative:
        return solve_normal(M, V)
    A = A_old.clamp(min=0).clone()
    for _ in range(inner):
        for r in range(A.shape[1]):
            if V[r, r] > 0:
                A[:, r] = (A[:, r] + (M[:, r] - A @ V[:, r]) / V[r, r]).clamp(min=0)
    return A


def _nonnegative_seed(weights, factors):
    """Sign-align each component (flips in pairs keep the model) and clip: a nonnegative start."""
    out = [f.clone() for f in factors]
    w = weights.clone()
    for r in range(w.shape[0]):
        for f in out:
            if float(f[:, r].sum()) < 0:
                f[:, r] = -f[:, r]
                w[r] = -w[r]
    w = w.abs()
    out = [f.clamp(min=0) for f in out]
    return w, out


def cp_chunked(
    X,
    rank: int,
    *,
    n_iter_max: int = 10,
    tol: float = 1e-6,
    sweep: str = "one-pass",
    nonnegative: bool = False,
    mask=None,
    core_margin: int | None = None,
    n_starts: int = 16,
    seed: int | torch.Generator | None = 0,
    chunks: int | Sequence[int] | None = None,
    scheduler=None,
    callback: Callable[[int, float], bool | None] | None = None,
) -> CPTensor:
    """CP decomposition of a tensor read block by block: sketched core, CP-ALS on it, refinement sweeps.

    Parameters
    ----------
    X : any input of :func:`tensorfold.tucker_sketch` (tensor, memmap, dask array, Zarr, HDF5, path).
    rank : number of components R.
    n_iter_max : refinement sweeps on the data at most (0: the core's answer, expanded).
    tol : stop when the fit changes by less than ``tol`` between sweeps.
    sweep : "exact" (Gauss-Seidel ALS: one pass over the data per mode) or "one-pass" (block-Jacobi ALS:
        the MTTKRPs of all modes at the sweep's start factors in one pass, then every factor updated; the
        same pass gives the fit of those factors, and a sweep that lowers the fit is undone and the run
        continues with exact sweeps, so the fit never decreases).
    nonnegative : nonnegative factors (HALS updates from the same MTTKRPs and Grams).
    mask : boolean array of X's shape (True = observed; same chunking for dask inputs), ``"nan"`` (the
        missing cells are NaN in X itself), or None (NaN in X is an error). Masked fits are EM: each pass
        fills the missing cells of a block with the current model before its MTTKRPs; the fit is measured
        on the observed cells.
    core_margin : sketch columns per mode beyond R (default ``max(5, R // 2)``).
    n_starts : CP-ALS starts on the small core (the SVD start, then random ones); the best fit seeds the sweeps.
    seed, chunks, scheduler : as in :func:`tensorfold.tucker_sketch`.
    callback : ``callback(sweep, fit)`` after every refinement sweep (sweep 0: the seed from the core);
        returning True stops.

    Returns a :class:`CPTensor` (unit-norm factor columns, norms in ``weights``, X's dtype);
    ``info.fit_history`` holds the fit to X of the seed and after each sweep, ``info.details["passes"]``
    the passes over the data (sketch included).

    >>> import tensorfold as tf
    >>> X = tf.testing.random_cp((20, 21, 22), rank=3, seed=0).to_tensor()
    >>> approx = tf.cp_chunked(X, 3, chunks=(7, 7, 7))
    >>> tf.relative_error(X, approx) < 1e-6
    True
    """
    from tensorfold.decomp.cp import cp, hadamard_grams, normalize_factors
    from tensorfold.decomp.sketch import tucker_sketch

    start = time.perf_counter()
    B = as_blocked(X, chunks=chunks, scheduler=scheduler)
    rank = check_rank(rank, "rank", max_rank=math.prod(B.shape), what=f"a tensor of shape {B.shape}")
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 0:
        raise InvalidArgumentError(f"n_iter_max must be a non-negative integer, got {n_iter_max!r}")
    if sweep not in ("exact", "one-pass"):
        raise InvalidArgumentError(f"sweep must be 'exact' or 'one-pass', got {sweep!r}")
    tol = check_positive(tol, "tol", allow_zero=True)
    margin = max(5, rank // 2) if core_margin is None else int(core_margin)
    n_starts = check_rank(n_starts, "n_starts")
    k = [min(n, rank + margin) for n in B.shape]
    if isinstance(mask, str) and mask != "nan":
        raise InvalidArgumentError(f"mask must be a boolean array, 'nan' or None, got {mask!r}")
    masked = mask is not None
    data, seed_data = _masked_inputs(B, None if isinstance(mask, str) else mask) if masked else (B, B)

    # Passes 1-3: sketched subspaces (2k+1 columns), one HOOI pass down to k, the exact core on those bases.
    # Two passes (the sketch at k columns, then its core) leave a seed tilted by noise (fit 0.68 where the
    # noise floor is 0.90 on the benchmark's data); the HOOI pass makes the seed sit at the floor.
    # Masked data: the sketch reads the zero-filled tensor (a rough seed; the EM passes correct it).
    sketch = tucker_sketch(seed_data, k, passes=3, seed=seed)
    norm_sq = float(sketch.info.details["norm_sq"])
    if norm_sq == 0:
        raise InvalidArgumentError("X is all zeros; it has no CP decomposition to fit")
    core = sketch.core.double()
    core_sq = float((core**2).sum())
    # CP-ALS on the small core, best of several starts: the core costs milliseconds against a pass over the
    # data, and ALS stalls in swamps from a single start on cores barely larger than the rank (measured: 15^3
    # cores of a rank-10 tensor with equal weights stalled at fit 0.68 from the SVD start in 6 cases of 6,
    # from 1 random start in about 60%; the best of 8 starts failed once in 10).
    gen = make_generator(seed)
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for s in range(n_starts):
            run = cp(core, rank, init="svd" if s == 0 else "random", seed=int(torch.randint(0, 2**31 - 1, (1,),
                     generator=gen)), n_iter_max=500, tol=1e-10)
            fit = run.info.fit_history[-1]
            if best is not None and abs(fit - best.info.fit_history[-1]) < 1e-8 and fit > 0.9:
                break  # a second start found the same good fit: further starts are not needed
            if best is None or fit > best.info.fit_history[-1]:
                best = run
    small = best
    factors = [Q.double() @ A for Q, A in zip(sketch.factors, small.factors)]
    weights, factors = normalize_factors(small.weights, factors)
    if nonnegative:
        weights, factors = _nonnegative_seed(weights, factors)
        weights, factors = normalize_factors(weights, factors)
    # Pythagoras: X - Y = (X - PX) + (PX - Y) with Y in the sketched subspace.
    core_res_sq = max(core_sq - 2 * _cp_inner_dense(core, small) + float(small.norm()) ** 2, 0.0)
    fit = 1.0 - math.sqrt(max(norm_sq - core_sq + core_res_sq, 0.0) / norm_sq)
    history = [fit]
    stopped = bool(callback(0, fit)) if callback is not None else False
    d = len(B.shape)
    passes = 3

    def run_pass(modes):
        nonlocal passes
        passes += 1
        fn = _SweepBlock(B.shape, weights, [f.to(B.dtype) for f in factors], modes, masked)
        out = map_reduce(data, fn, allow_nan=masked)
        return ([float(t) for t in out[:3]] if masked else None), (out[3:] if masked else out)

    def fit_of(stats, inner, model_sq, x_sq):
        if stats is not None:  # masked: the residual on the observed cells, measured directly
            return 1.0 - math.sqrt(stats[1] / stats[0]) if stats[0] > 0 else 0.0
        return 1.0 - math.sqrt(max(x_sq - 2 * inner + model_sq, 0.0) / x_sq)

    grams = [A.T @ A for A in factors]
    mode = sweep
    best_state = None  # (fit, weights, factors) of the best evaluated one-pass state
    n_iter, converged, first, pending = 0, n_iter_max == 0, True, False
    while n_iter < n_iter_max and not stopped:
        if mode == "one-pass":
            stats, Ms = run_pass(list(range(d)))
            inner = float(((Ms[0] * factors[0]).sum(0) * weights).sum())
            fit = fit_of(stats, inner, float(weights @ hadamard_grams(grams) @ weights), norm_sq)
            pending = False
            if first:
                # The start's fit (the seed's, or an exact sweep's) measured on the data (masked: observed cells).
                history[-1], first = fit, False
            elif best_state is not None and fit < best_state[0] - 1e-12:
                # The Jacobi step overshot: undo it, take one exact (monotone) sweep, then try Jacobi again.
                _, weights, factors = best_state
                grams = [A.T @ A for A in factors]
                mode, first = "exact", True
                continue
            else:
                history.append(fit)
                if callback is not None and bool(callback(n_iter, fit)):
                    stopped = True
                    break
                if abs(history[-1] - history[-2]) < tol:
                    converged = True
                    break
            best_state = (fit, weights, list(factors))
            new = [_factor_update(Ms[n], hadamard_grams(grams, skip=n), factors[n] * weights, nonnegative)
                   for n in range(d)]
            norms = torch.stack([torch.linalg.vector_norm(A, dim=0) for A in new])
            # Every mode's update estimates the component norms given the others' old directions: average
            # them (taking each mode's scale in turn would multiply the scale error by d - 1 per sweep).
            weights = norms.mean(0)
            factors = [A / torch.where(nr > 0, nr, torch.ones_like(nr)) for A, nr in zip(new, norms)]
            grams = [A.T @ A for A in factors]
            n_iter, pending = n_iter + 1, True
            continue
        pending = False
        n_iter += 1
        for n in range(d):
            stats, (M,) = run_pass([n])
            A = _factor_update(M, hadamard_grams(grams, skip=n), factors[n] * weights, nonnegative)
            norms = torch.linalg.vector_norm(A, dim=0)
            weights = torch.where(norms > 0, norms, torch.ones_like(norms))
            factors[n] = A / weights
            grams[n] = factors[n].T @ factors[n]
        inner = float(((M * factors[-1]).sum(0) * weights).sum())
        model_sq = float(weights @ hadamard_grams(grams) @ weights)
        # Masked: the observed residual measured by the sweep's last pass (the model before its last mode's
        # update): measured, not inferred, since the completion changes with every pass.
        fit = fit_of(stats, inner, model_sq, norm_sq)
        history.append(fit)
        if callback is not None and bool(callback(n_iter, fit)):
            stopped = True
        if abs(history[-1] - history[-2]) < tol:
            converged = True
            break
        mode = sweep
    if pending:
        # The last update was never measured: return the best measured state (its fit is in the history).
        _, weights, factors = best_state
    details = {"core_shape": list(core.shape), "norm_sq": norm_sq, "fit_after_core": history[0],
               "sweeps": len(history) - 1, "passes": passes, "sweep": sweep, "nonnegative": nonnegative,
               "masked": masked, "input": sketch.info.details["input"]}
    info = FitInfo("cp-chunked", n_iter=len(history) - 1, converged=converged or stopped,
                   fit_history=tuple(history), seconds=time.perf_counter() - start, details=details)
    return CPTensor(weights.to(B.dtype), tuple(f.to(B.dtype) for f in factors), info)


def _cp_inner_dense(T: torch.Tensor, approx: CPTensor) -> float:
    from tensorfold.core.norms import cp_inner

    return float(cp_inner(T, approx.weights.to(T.dtype), [f.to(T.dtype) for f in approx.factors]))
