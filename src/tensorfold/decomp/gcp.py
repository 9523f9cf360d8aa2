"""Generalized CP (Hong, Kolda and Duersch, SIAM Review 2020): CP fitted under a loss other than least squares.

The model ``M = [[A_1, ..., A_d]]`` is fitted by minimising ``sum_i f(M_i, X_i)`` for an elementwise loss
``f`` chosen to match the data: counts (Poisson), binary events (Bernoulli), positive data (Gamma,
Rayleigh), or data with outliers (Huber). The gradient with respect to ``A_n`` is the MTTKRP of the
elementwise derivative tensor ``Y = df/dm``, so every loss shares one code path.

Two solvers:

* ``"lbfgsb"``: SciPy's L-BFGS-B on the full objective (dense data, or sparse data up to a size where the
  model can be formed); losses with a positive domain bound the factors below by 0.
* ``"adam"``: stochastic gradients from samples of entries (GCP-Adam). Sparse data (a
  :class:`~tensorfold.decomp.sparse.COOTensor` listing the nonzeros; every other entry is 0) is sampled
  *stratified*: nonzeros and zeros are drawn separately and weighted by their stratum sizes, so the rare
  nonzeros are always seen. An epoch whose estimated objective (a fixed sample) rises is undone and the
  step size divided by 10.

The start (``init="auto"``) matters for recovery, so it is chosen per loss from a least-squares fit to a
linearisation of the data: CP-ALS for Gaussian and Huber, nonnegative CP for the positive losses, CP of
``4 (X - 1/2)`` for Bernoulli-logit (``sigmoid(m) ~ 1/2 + m/4``) and of ``log(X + 1/2)`` for Poisson-log.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tensorfold.core.mttkrp import mttkrp_from_partial, partial_mttkrp
from tensorfold.core.validate import check_choice, check_positive, check_rank, check_tensor, make_generator
from tensorfold.decomp.results import CPTensor, FitInfo
from tensorfold.decomp.sparse import COOTensor, row_products
from tensorfold.errors import ConvergenceWarning, InvalidArgumentError, InvalidTensorError, ShapeError

_EPS = 1e-10  # keeps log / division away from m = 0 for the positive losses (as in pyttb)
_MAX_DENSE_ENTRIES = 50_000_000  # sparse data is densified for L-BFGS-B up to this many entries


@dataclass(frozen=True)
class Loss:
    """An elementwise loss ``f(m, x)``, its derivative in ``m``, and the factors' lower bound (or None)."""

    name: str
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lower: float | None
    data_check: str | None = None  # "binary", "count", "positive", "nonnegative"


def _huber(delta: float) -> Loss:
    def f(m, x):
        r = (x - m).abs()
        return torch.where(r <= delta, r * r, 2 * delta * r - delta * delta)

    def g(m, x):
        r = x - m
        return torch.where(r.abs() <= delta, -2 * r, -2 * delta * torch.sign(r))

    return Loss("huber", f, g, None)


LOSSES: dict[str, Loss] = {
    "gaussian": Loss("gaussian", lambda m, x: (m - x) ** 2, lambda m, x: 2 * (m - x), None),
    "bernoulli-logit": Loss("bernoulli-logit", lambda m, x: torch.nn.functional.softplus(m) - x * m,
                            lambda m, x: torch.sigmoid(m) - x, None, "binary"),
    "poisson": Loss("poisson", lambda m, x: m - x * torch.log(m + _EPS), lambda m, x: 1 - x / (m + _EPS), 0.0,
                    "count"),
    "poisson-log": Loss("poisson-log", lambda m, x: torch.exp(m) - x * m, lambda m, x: torch.exp(m) - x, None,
                        "count"),
    "gamma": Loss("gamma", lambda m, x: x / (m + _EPS) + torch.log(m + _EPS),
                  lambda m, x: -x / (m + _EPS) ** 2 + 1 / (m + _EPS), 0.0, "positive"),
    "rayleigh": Loss("rayleigh", lambda m, x: 2 * torch.log(m + _EPS) + (math.pi / 4) * (x / (m + _EPS)) ** 2,
                     lambda m, x: 2 / (m + _EPS) - (math.pi / 2) * x * x / (m + _EPS) ** 3, 0.0, "positive"),
    "huber": _huber(0.25),
}


def gcp(
    X,
    rank: int,
    *,
    loss: str = "gaussian",
    solver: str = "lbfgsb",
    init: str | CPTensor = "auto",
    mask=None,
    n_iter_max: int = 1000,
    tol: float = 1e-10,
    huber_delta: float = 0.25,
    lr: float = 1e-3,
    epochs: int = 50,
    epoch_iters: int = 100,
    n_samples: int | tuple[int, int] | None = None,
    seed: int | torch.Generator | None = 0,
    callback: Callable[[int, float], bool | None] | None = None,
    chunks: int | Sequence[int] | None = None,
    scheduler=None,
) -> CPTensor:
    """Generalized CP decomposition of ``X`` under ``loss``.

    Parameters
    ----------
    X : dense tensor (torch/numpy, float32/float64) or a :class:`COOTensor` of the nonzeros (the rest is 0);
        or a tensor read block by block (a ``.npy`` memmap, dask array, Zarr array, HDF5 dataset, or a path):
        then L-BFGS-B evaluates the objective and gradient in one pass over the blocks per evaluation
        (``chunks``/``scheduler`` as in :func:`tensorfold.tucker_sketch`), starting from ``init`` (``"auto"``
        is :func:`tensorfold.cp_chunked` for the Gaussian and Huber losses and ``"random"`` for the others).
    rank : number of components R.
    loss : ``"gaussian"``, ``"bernoulli-logit"`` (data in {0, 1}), ``"poisson"`` (identity link, counts,
        nonnegative factors), ``"poisson-log"`` (log link), ``"gamma"``, ``"rayleigh"`` (positive data,
        nonnegative factors) or ``"huber"`` (threshold ``huber_delta``).
    solver : ``"lbfgsb"`` or ``"adam"`` (stochastic; stratified sampling for sparse data).
    init : ``"auto"`` (a least-squares fit to a linearisation of the data, see the module notes),
        ``"random"``, or a :class:`CPTensor`.
    mask : dense data only: boolean tensor of the observed entries (the others are left out of the loss).
    n_iter_max, tol : L-BFGS-B iterations and its tolerance on the relative change of the objective.
    lr, epochs, epoch_iters, n_samples : Adam's step size, epochs of ``epoch_iters`` steps each, and the
        entries sampled per gradient (an int, or ``(nonzeros, zeros)`` for sparse data).
    seed : seed of the random init and the samples.
    callback : ``callback(iteration, objective)`` per L-BFGS-B iteration or Adam epoch; True stops.

    Returns a :class:`CPTensor` (unit-norm columns). ``info.fit_history`` holds the objective ``sum f``
    per iteration (per epoch for Adam: the fixed-sample estimate); ``info.details`` the loss and solver.

    >>> import torch, tensorfold as tf
    >>> X = tf.testing.random_cp((10, 11, 12), rank=2, seed=0).to_tensor()
    >>> approx = tf.gcp(X, 2, loss="gaussian")
    >>> tf.relative_error(X, approx) < 1e-4
    True
    """
    start = time.perf_counter()
    check_choice(loss, "loss", tuple(LOSSES))
    check_choice(solver, "solver", ("lbfgsb", "adam"))
    spec = _huber(check_positive(huber_delta, "huber_delta")) if loss == "huber" else LOSSES[loss]
    from tensorfold.decomp.blocks import is_blocked_input

    if is_blocked_input(X):
        return _gcp_blocked(X, rank, loss, huber_delta, solver, init, mask, n_iter_max, tol, seed, callback,
                            chunks, scheduler, start)
    sparse = isinstance(X, COOTensor)
    if sparse:
        if mask is not None:
            raise InvalidArgumentError("mask applies to dense data; a COOTensor already lists its nonzeros")
        shape, dtype = X.shape, X.dtype
        _check_values(X.values, spec, "X")
    else:
        X = check_tensor(X, "X", min_order=2)
        shape, dtype = tuple(X.shape), X.dtype
        _check_values(X, spec, "X")
        if mask is not None:
            mask = torch.as_tensor(mask).to(torch.bool)
            if tuple(mask.shape) != shape:
                raise ShapeError(f"mask has shape {tuple(mask.shape)}, X has {shape}")
    rank = check_rank(rank, "rank")
    gen = make_generator(seed)
    factors = _initial(X, rank, init, spec, gen, shape, dtype)

    if solver == "lbfgsb":
        if sparse:
            if math.prod(shape) > _MAX_DENSE_ENTRIES:
                raise InvalidArgumentError(
                    f"solver='lbfgsb' forms the full model; a tensor of shape {shape} is too large: use solver='adam'"
                )
            X = X.to_dense() if hasattr(X, "to_dense") else _densify(X)
        X = X.double()
        factors, history, n_iter, converged = _lbfgsb(
            lambda fs: _objective_and_gradient(X, fs, spec, mask), factors, spec, n_iter_max, tol, callback)
    else:
        factors, history, n_iter, converged = _adam(X, factors, spec, mask, sparse, gen, lr, epochs, epoch_iters,
                                                    n_samples, callback)
    details = {"loss": loss, "solver": solver, "init": init if isinstance(init, str) else "given"}
    info = FitInfo(f"gcp-{solver}", n_iter=n_iter, converged=converged, fit_history=tuple(history),
                   seconds=time.perf_counter() - start, details=details)
    weights = torch.ones(rank, dtype=dtype)
    return CPTensor(weights, tuple(f.to(dtype) for f in factors), info).normalize()


# --- objective and gradient ------------------------------------------------------------------------


def _model(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    return CPTensor(torch.ones(factors[0].shape[1], dtype=factors[0].dtype), factors).to_tensor()


def _objective_and_gradient(X, factors, spec: Loss, mask):
    M = _model(factors)
    F = spec.f(M, X)
    Y = spec.g(M, X)
    if mask is not None:
        F = torch.where(mask, F, torch.zeros_like(F))
        Y = torch.where(mask, Y, torch.zeros_like(Y))
    return float(F.sum()), _all_mttkrps(Y, factors)


def _all_mttkrps(Y: torch.Tensor, factors) -> list[torch.Tensor]:
    """The MTTKRP of every mode at the same factors, from two passes over Y (a two-level dimension tree)."""
    d = Y.ndim
    h = max(1, d // 2)
    out = []
    for keep in (list(range(h)), list(range(h, d))):
        P = partial_mttkrp(Y, factors, keep)
        out += [mttkrp_from_partial(P, factors, keep, n) for n in keep]
    return out


def _lbfgsb(evaluate, factors, spec: Loss, n_iter_max, tol, callback):
    """L-BFGS-B over the concatenated factors; ``evaluate(factors) -> (objective, gradients)``."""
    from scipy.optimize import minimize

    shapes = [f.shape for f in factors]
    sizes = [math.prod(s) for s in shapes]

    def unpack(v):
        out, pos = [], 0
        for s, n in zip(shapes, sizes):
            out.append(torch.from_numpy(v[pos : pos + n].copy()).reshape(s))
            pos += n
        return out

    def fun(v):
        F, grads = evaluate(unpack(v))
        return F, torch.cat([g.reshape(-1) for g in grads]).numpy()

    history: list[float] = []

    class _Stop(Exception):
        pass

    def cb(intermediate_result):
        history.append(float(intermediate_result.fun))
        if callback is not None and bool(callback(len(history), history[-1])):
            raise StopIteration  # SciPy >= 1.11 ends the run cleanly on StopIteration from a callback

    v0 = torch.cat([f.double().reshape(-1) for f in factors]).numpy()
    bounds = None if spec.lower is None else [(spec.lower, None)] * v0.size
    res = minimize(fun, v0, jac=True, method="L-BFGS-B", bounds=bounds, callback=cb,
                   options={"maxiter": n_iter_max, "ftol": tol, "gtol": 1e-12, "maxcor": 10})
    if not history or history[-1] != float(res.fun):
        history.append(float(res.fun))
    converged = bool(res.success) or res.status == 99
    if res.nit >= n_iter_max:
        warnings.warn(f"gcp: L-BFGS-B stopped after {n_iter_max} iterations before meeting tol={tol}",
                      ConvergenceWarning, stacklevel=3)
    return unpack(res.x), history, int(res.nit), converged


# --- out of core: one pass over the blocks per evaluation ----------------------------------------------


class _GCPBlock:
    """The block's share of the objective and of every gradient (picklable: the loss travels by name)."""

    def __init__(self, shape, factors, loss: str, huber_delta: float):
        self.shape, self.factors, self.loss, self.huber_delta = shape, factors, loss, huber_delta

    def __call__(self, slices, B):
        spec = _huber(self.huber_delta) if self.loss == "huber" else LOSSES[self.loss]
        _check_values(B, spec, "X")
        sub = [f[s] for f, s in zip(self.factors, slices)]
        F, grads = _objective_and_gradient(B.double(), sub, spec, None)
        out = [torch.tensor(F, dtype=torch.float64)]
        for n, (g, s) in enumerate(zip(grads, slices)):
            full = torch.zeros(self.shape[n], g.shape[1], dtype=torch.float64)
            full[s] = g
            out.append(full)
        return out


def _gcp_blocked(X, rank, loss, huber_delta, solver, init, mask, n_iter_max, tol, seed, callback, chunks,
                 scheduler, start) -> CPTensor:
    from tensorfold.decomp.blocks import as_blocked, map_reduce

    if solver != "lbfgsb" or mask is not None:
        raise InvalidArgumentError("out-of-core GCP runs solver='lbfgsb' without mask")
    B = as_blocked(X, chunks=chunks, scheduler=scheduler)
    rank = check_rank(rank, "rank")
    spec = _huber(huber_delta) if loss == "huber" else LOSSES[loss]
    gen = make_generator(seed)
    if isinstance(init, CPTensor):
        factors = _initial(None, rank, init, spec, gen, B.shape, B.dtype)
    elif init == "auto" and spec.lower is None and loss in ("gaussian", "huber"):
        from tensorfold.decomp.chunked import cp_chunked

        start_cp = cp_chunked(B, rank, seed=_seed_of(gen))
        factors = _spread([f.double() for f in start_cp.factors], start_cp.weights.double())
    else:
        check_choice(init, "init", ("auto", "random"))
        factors = _initial(None, rank, "random", spec, gen, B.shape, B.dtype)

    def evaluate(fs):
        parts = map_reduce(B, _GCPBlock(B.shape, fs, loss, huber_delta))
        return float(parts[0]), parts[1:]

    factors, history, n_iter, converged = _lbfgsb(evaluate, factors, spec, n_iter_max, tol, callback)
    details = {"loss": loss, "solver": solver, "init": init if isinstance(init, str) else "given",
               "input": "dask" if B.is_dask else type(B.data).__name__, "passes": "one per evaluation"}
    info = FitInfo("gcp-lbfgsb-blocks", n_iter=n_iter, converged=converged, fit_history=tuple(history),
                   seconds=time.perf_counter() - start, details=details)
    return CPTensor(torch.ones(rank, dtype=B.dtype), tuple(f.to(B.dtype) for f in factors), info).normalize()


# --- Adam with (stratified) sampling -----------------------------------------------------------------


class _Sampler:
    """Draws entries and their weights: uniform for dense data, stratified (nonzeros / zeros) for sparse."""

    def __init__(self, X, mask, sparse: bool, n_samples, gen):
        self.gen, self.sparse = gen, sparse
        if sparse:
            self.shape = X.shape
            self.indices, self.values = X.indices, X.values.double()
            strides = torch.tensor([math.prod(X.shape[m + 1 :]) for m in range(len(X.shape))])
            self.strides = strides
            self.linear = torch.sort((X.indices * strides).sum(1)).values
            self.n_zeros = math.prod(X.shape) - X.nnz
            if isinstance(n_samples, tuple):
                self.p, self.q = n_samples
            else:
                total = n_samples or max(1000, min(100_000, X.nnz))
                self.p, self.q = total, total
        else:
            self.X = X.double()
            self.shape = tuple(X.shape)
            self.mask_idx = mask.nonzero() if mask is not None else None
            self.s = int(n_samples) if n_samples else max(1000, min(100_000, X.numel() // 10))

    def draw(self):
        """(indices (s, d), values (s,), weights (s,))."""
        if not self.sparse:
            if self.mask_idx is not None:
                pick = torch.randint(len(self.mask_idx), (self.s,), generator=self.gen)
                idx = self.mask_idx[pick]
                pop = len(self.mask_idx)
            else:
                idx = torch.stack([torch.randint(n, (self.s,), generator=self.gen) for n in self.shape], 1)
                pop = math.prod(self.shape)
            vals = self.X[tuple(idx.T)]
            return idx, vals, torch.full((self.s,), pop / self.s, dtype=torch.float64)
        nz = torch.randint(len(self.values), (self.p,), generator=self.gen)
        zi = self._zeros(self.q)
        idx = torch.cat([self.indices[nz], zi])
        vals = torch.cat([self.values[nz], torch.zeros(len(zi), dtype=torch.float64)])
        w = torch.cat([torch.full((self.p,), len(self.values) / self.p, dtype=torch.float64),
                       torch.full((len(zi),), self.n_zeros / max(len(zi), 1), dtype=torch.float64)])
        return idx, vals, w

    def _zeros(self, q):
        # Rejection sampling: uniform cells, dropping those that are nonzeros (rare when the data is sparse).
        out, have = [], 0
        for _ in range(20):
            cand = torch.stack([torch.randint(n, (2 * q,), generator=self.gen) for n in self.shape], 1)
            lin = (cand * self.strides).sum(1)
            pos = torch.searchsorted(self.linear, lin).clamp_max(len(self.linear) - 1)
            keep = cand[self.linear[pos] != lin]
            out.append(keep)
            have += len(keep)
            if have >= q:
                break
        return torch.cat(out)[:q]


def _sampled_objective_and_gradient(idx, vals, w, factors, spec: Loss):
    rows = [F.index_select(0, idx[:, m]) for m, F in enumerate(factors)]
    K = row_products(factors, idx)
    m = K.sum(1)
    F = float((w * spec.f(m, vals)).sum())
    y = w * spec.g(m, vals)
    grads = []
    for n, F_n in enumerate(factors):
        others = torch.ones_like(K)
        for k, r in enumerate(rows):
            if k != n:
                others = others * r
        grads.append(torch.zeros_like(F_n).index_add_(0, idx[:, n], others * y[:, None]))
    return F, grads


def _adam(X, factors, spec: Loss, mask, sparse, gen, lr, epochs, epoch_iters, n_samples, callback):
    factors = [f.double().clone() for f in factors]
    sampler = _Sampler(X, mask, sparse, n_samples, gen)
    fixed = sampler.draw()  # the objective estimate is always taken on the same sample
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    mom = [torch.zeros_like(f) for f in factors]
    var = [torch.zeros_like(f) for f in factors]
    step = 0
    best = _sampled_objective_and_gradient(*fixed, factors, spec)[0]
    history = [best]
    fails, converged = 0, False
    epoch = 0
    for epoch in range(1, epochs + 1):
        saved = ([f.clone() for f in factors], [m.clone() for m in mom], [v.clone() for v in var], step)
        for _ in range(epoch_iters):
            step += 1
            _, grads = _sampled_objective_and_gradient(*sampler.draw(), factors, spec)
            for n, g in enumerate(grads):
                mom[n].mul_(beta1).add_(g, alpha=1 - beta1)
                var[n].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                mhat = mom[n] / (1 - beta1**step)
                vhat = var[n] / (1 - beta2**step)
                factors[n] = factors[n] - lr * mhat / (vhat.sqrt() + eps)
                if spec.lower is not None:
                    factors[n] = factors[n].clamp_min(spec.lower)
        estimate = _sampled_objective_and_gradient(*fixed, factors, spec)[0]
        if not math.isfinite(estimate) or estimate > best:
            factors, mom, var, step = saved  # undo the epoch, smaller steps
            lr /= 10
            fails += 1
            if fails > 2:
                converged = True
                break
        else:
            best = estimate
        history.append(best)
        if callback is not None and bool(callback(epoch, best)):
            break
    return factors, history, epoch, converged


# --- starts and checks -----------------------------------------------------------------------------


def _densify(coo: COOTensor) -> torch.Tensor:
    out = torch.zeros(coo.shape, dtype=coo.dtype)
    out[tuple(coo.indices.T)] = coo.values
    return out


def _initial(X, rank, init, spec: Loss, gen, shape, dtype) -> list[torch.Tensor]:
    import tensorfold as tf

    if isinstance(init, CPTensor):
        if tuple(init.shape) != tuple(shape) or init.rank != rank:
            raise ShapeError(f"init has shape {init.shape} and rank {init.rank}; X needs {shape}, rank {rank}")
        return _spread([f.double() for f in init.factors], init.weights.double())
    check_choice(init, "init", ("auto", "random"))
    if init == "random":
        if spec.lower is not None:
            return [torch.rand(n, rank, generator=gen, dtype=torch.float64) for n in shape]
        return [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    D = _densify(X).double() if isinstance(X, COOTensor) else X.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if spec.lower is not None:
            fit = tf.nonnegative_cp(D, rank, n_iter_max=200, seed=_seed_of(gen))
        elif spec.name == "bernoulli-logit":
            fit = tf.cp(4 * (D - 0.5), rank, seed=_seed_of(gen))
        elif spec.name == "poisson-log":
            fit = tf.cp(torch.log(D + 0.5), rank, seed=_seed_of(gen))
        else:
            fit = tf.cp(D, rank, seed=_seed_of(gen))
    factors = _spread([f.double() for f in fit.factors], fit.weights.double())
    if spec.lower is not None:  # L-BFGS-B starts inside the bounds; tiny positive floor for the log losses
        factors = [f.clamp_min(1e-3 * float(f.max())) for f in factors]
    return factors


def _spread(factors: list[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    """Absorb the weights evenly into every factor (balanced scales suit gradient methods)."""
    scale = weights.abs().clamp_min(1e-300) ** (1.0 / len(factors))
    out = [f * scale for f in factors]
    out[0] = out[0] * torch.sign(weights + (weights == 0).to(weights.dtype))
    return out


def _seed_of(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def _check_values(V: torch.Tensor, spec: Loss, name: str) -> None:
    kind = spec.data_check
    if kind is None:
        return
    if kind == "binary" and not bool(((V == 0) | (V == 1)).all()):
        raise InvalidTensorError(f"{name}: loss {spec.name!r} needs binary data (0 or 1)")
    if kind == "count" and not bool(((V >= 0) & (V.round() == V)).all()):
        raise InvalidTensorError(f"{name}: loss {spec.name!r} needs counts (nonnegative integers)")
    if kind == "positive" and not bool((V >= 0).all()):
        raise InvalidTensorError(f"{name}: loss {spec.name!r} needs nonnegative data")


def factor_match_score(a: CPTensor, b: CPTensor, *, weight_penalty: bool = True) -> float:
    """Factor match score of two CP tensors of one shape and rank: the components are paired optimally
    (Hungarian assignment), and each pair scores the product of its factor cosines, times
    ``1 - |w_a - w_b| / max(w_a, w_b)`` with ``weight_penalty``; the mean over components, in [0, 1].

    >>> import tensorfold as tf
    >>> a = tf.testing.random_cp((5, 6, 7), rank=3, seed=0)
    >>> round(factor_match_score(a, a), 12)
    1.0
    """
    from scipy.optimize import linear_sum_assignment

    if tuple(a.shape) != tuple(b.shape) or a.rank != b.rank:
        raise ShapeError(f"CP tensors differ: shapes {a.shape} / {b.shape}, ranks {a.rank} / {b.rank}")
    a, b = a.to(dtype=torch.float64).normalize(), b.to(dtype=torch.float64).normalize()
    score = torch.ones(a.rank, b.rank, dtype=torch.float64)
    wa, wb = a.weights, b.weights
    for fa, fb in zip(a.factors, b.factors):
        na = fa / torch.linalg.vector_norm(fa, dim=0).clamp_min(1e-300)
        nb = fb / torch.linalg.vector_norm(fb, dim=0).clamp_min(1e-300)
        score = score * (na.T @ nb).abs()
    if weight_penalty:
        big = torch.maximum(wa.abs()[:, None], wb.abs()[None, :]).clamp_min(1e-300)
        score = score * (1 - (wa.abs()[:, None] - wb.abs()[None, :]).abs() / big)
    rows, cols = linear_sum_assignment(-score.numpy())
    return float(np.mean(score.numpy()[rows, cols]))
