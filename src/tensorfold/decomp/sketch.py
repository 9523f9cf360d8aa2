"""Tucker from a single streaming pass: the randomized sketches of Sun, Guo, Luo, Tropp and Udell.

"Low-rank Tucker approximation of a tensor from streaming data" (SIAM J. Math. Data Sci. 2020). Two
linear sketches of X are kept, so every block of X adds its contribution once, in any order, on any
worker, and storage is proportional to the output, not to X:

* a *factor sketch* per mode, ``V_n = unfold(X, n) @ Omega_n`` (``I_n x k``), with ``Omega_n`` the
  Khatri-Rao product of small Gaussian matrices of the other modes (their "tensor random projection":
  ``d`` matrices of ``I_m x k`` numbers instead of one of ``prod(I_m) x k``);
* a *core sketch* ``H = X x_1 Phi_1 x_2 ... x_d Phi_d`` with Gaussian ``Phi_n`` of shape ``s x I_n``.

One pass: ``Q_n = qr(V_n)`` spans the range of each unfolding, and the core is recovered from the core
sketch by least squares, ``W = H x_n pinv(Phi_n Q_n)``; a (ST-)HOSVD of the small ``W`` truncates to the
requested ranks. Two passes (``passes=2``): the second pass forms the exact core ``W = X x_n Q_n^T``, which
makes the error ``||X||^2 - ||G||^2`` exact and is close to HOOI's (the paper's two-pass algorithm).
Defaults follow the paper: ``k = 2 r + 1`` and ``s = 2 k + 1`` per mode, capped by the mode size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from tensorfold.core.mttkrp import mttkrp
from tensorfold.core.tenalg import multi_mode_dot
from tensorfold.core.validate import check_ranks, make_generator, randn
from tensorfold.decomp.blocks import BlockedTensor, as_blocked, map_reduce
from tensorfold.decomp.results import FitInfo, TuckerTensor
from tensorfold.errors import InvalidArgumentError


class _SketchBlock:
    """``fn(slices, block)`` for :func:`map_reduce`: the block's share of ``||X||^2``, every factor sketch
    and the core sketch (float64 accumulators; picklable for Dask workers)."""

    def __init__(self, shape, omegas, phis):
        self.shape, self.omegas, self.phis = shape, omegas, phis

    def __call__(self, slices, B):
        out = [torch.sum(B * B, dtype=torch.float64)]  # one block-sized temporary, float64 sum
        sub = [om[s].to(B.dtype) for om, s in zip(self.omegas, slices)]
        for n, s in enumerate(slices):
            V = torch.zeros(self.shape[n], sub[0].shape[1], dtype=torch.float64)
            V[s] = mttkrp(B, sub, n).double()
            out.append(V)
        out.append(multi_mode_dot(B, [phi[:, s].to(B.dtype) for phi, s in zip(self.phis, slices)]).double())
        return out


class _HOOIBlock:
    """The block's share of ``Y_n = unfold(X x_{m != n} U_m^T, n)`` for every mode n (one HOOI step for
    all modes from the same factors), each ``I_n x prod_{m != n} r_m``."""

    def __init__(self, shape, bases):
        self.shape, self.bases = shape, bases

    def __call__(self, slices, B):
        mats = [U[s].T.to(B.dtype) for U, s in zip(self.bases, slices)]
        out = []
        for n, s in enumerate(slices):
            T = multi_mode_dot(B, mats, skip=n)
            Y = torch.zeros(self.shape[n], T.numel() // T.shape[n], dtype=torch.float64)
            Y[s] = T.movedim(n, 0).reshape(T.shape[n], -1).double()
            out.append(Y)
        return out


class _ProjectBlock:
    """The block's share of the exact core ``X x_n Q_n^T`` (second pass)."""

    def __init__(self, bases):
        self.bases = bases

    def __call__(self, slices, B):
        mats = [Q[s].T.to(B.dtype) for Q, s in zip(self.bases, slices)]
        return [multi_mode_dot(B, mats).double()]


def tucker_sketch(
    X,
    ranks: int | Sequence[int],
    *,
    k: int | Sequence[int] | None = None,
    s: int | Sequence[int] | None = None,
    passes: int = 1,
    truncate: bool = True,
    seed: int | torch.Generator | None = 0,
    chunks: int | Sequence[int] | None = None,
    scheduler=None,
    progress: Callable[[int, int], None] | None = None,
) -> TuckerTensor:
    """Tucker approximation of ``X`` from one (or two) streaming passes over its blocks.

    Parameters
    ----------
    X : a torch tensor or numpy array, a ``.npy`` memmap, a ``dask.array.Array``, a Zarr array, an HDF5
        dataset, or a path to one of those (see :func:`tensorfold.decomp.blocks.open_tensor`).
    ranks : Tucker ranks of the result (an int for every mode).
    k, s : factor- and core-sketch sizes per mode (default ``2 r_n + 1`` and ``2 k_n + 1``, at most ``I_n``).
    passes : 1 (the single-pass sketch), 2 (exact core on the sketched subspaces: more accurate), or
        ``p >= 3``: ``p - 2`` passes of HOOI steps (every mode updated from the others' current bases,
        all in the same pass) between the sketch and the core pass; one such pass reaches HOOI's error
        when the sketch has found the signal subspaces but is still tilted by noise.
    truncate : False keeps the sketch-sized result (ranks ``k_n``) without the final (ST-)HOSVD.
    seed : seed of the random test matrices (the same seed gives the same answer for every input kind).
    chunks : block shape for in-memory / memmap inputs, or a rechunking of dask inputs.
    scheduler : for Dask inputs: None (threads), "synchronous", or a ``dask.distributed.Client``.
    progress : ``progress(done, total)`` after each block of a serial input.

    Returns a :class:`TuckerTensor` with orthonormal factors. ``info.details`` holds ``norm_sq``
    (``||X||^2``, from the same pass), the sketch sizes and, for two passes, the exact fit.

    >>> import tensorfold as tf
    >>> X = tf.testing.random_tucker((30, 31, 32), (3, 3, 3), seed=0).to_tensor()
    >>> approx = tf.tucker_sketch(X, 3, seed=1)
    >>> approx.rank, tf.relative_error(X, approx) < 1e-8
    ((3, 3, 3), True)
    """
    start = time.perf_counter()
    B = as_blocked(X, chunks=chunks, scheduler=scheduler)
    ranks = check_ranks(ranks, B.shape)
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise InvalidArgumentError(f"passes must be a positive integer, got {passes!r}")
    ks = _sizes(k, [2 * r + 1 for r in ranks], ranks, B.shape, "k")
    ss = _sizes(s, [2 * kk + 1 for kk in ks], ks, B.shape, "s")
    gen = make_generator(seed)
    kmax = max(ks)
    omegas = [randn(n, kmax, generator=gen, dtype=torch.float64) for n in B.shape]
    phis = [randn(sn, n, generator=gen, dtype=torch.float64) for sn, n in zip(ss, B.shape)]

    parts = map_reduce(B, _SketchBlock(B.shape, omegas, phis), progress=progress)
    norm_sq = float(parts[0])
    bases = [torch.linalg.qr(V[:, :kn])[0] for V, kn in zip(parts[1:-1], ks)]
    if passes == 1:
        # Least squares against the core sketch: H = W x_n (Phi_n Q_n) + noise.
        W = multi_mode_dot(parts[-1], [torch.linalg.pinv(phi @ Q) for phi, Q in zip(phis, bases)])
    else:
        if passes > 2:
            if not truncate:
                raise InvalidArgumentError("refinement passes (passes >= 3) need truncate=True")
            # Start the HOOI steps from the leading r_n directions of the sketched subspaces.
            W = multi_mode_dot(parts[-1], [torch.linalg.pinv(phi @ Q) for phi, Q in zip(phis, bases)])
            bases = list(_finish(W, bases, ranks, torch.float64).factors)
            for _ in range(passes - 2):
                Ys = map_reduce(B, _HOOIBlock(B.shape, bases), progress=progress)
                bases = [_leading(Y, r) for Y, r in zip(Ys, ranks)]
        (W,) = map_reduce(B, _ProjectBlock(bases), progress=progress)
    result = _finish(W, bases, ranks if truncate else tuple(W.shape), B.dtype)
    details = {"k": ks, "s": ss, "passes": passes, "norm_sq": norm_sq, "input": _kind(B)}
    history: tuple[float, ...] = ()
    if passes >= 2:  # orthonormal factors and the exact projected core: the error is exact
        core_sq = float((result.core.double() ** 2).sum())
        history = (1.0 - math.sqrt(max(norm_sq - core_sq, 0.0) / norm_sq) if norm_sq > 0 else 1.0,)
    info = FitInfo(f"tucker-sketch-{passes}pass", n_iter=passes, converged=True, fit_history=history,
                   seconds=time.perf_counter() - start, details=details)
    return TuckerTensor(result.core, result.factors, info)


def _leading(Y: torch.Tensor, r: int) -> torch.Tensor:
    """Leading ``r`` left singular vectors of ``Y`` (``n x m``), from the smaller Gram matrix."""
    n, m = Y.shape
    if m >= n:
        return torch.linalg.eigh(Y @ Y.T)[1][:, n - r :].flip(-1)
    evals, V = torch.linalg.eigh(Y.T @ Y)
    return torch.linalg.qr(Y @ V[:, m - r :].flip(-1))[0]


def _finish(W: torch.Tensor, bases, ranks, dtype) -> TuckerTensor:
    """Truncate the small core ``W`` (on the bases ``Q_n``) to ``ranks`` with ST-HOSVD."""
    from tensorfold.decomp.tucker import _sthosvd

    ranks = [min(r, n) for r, n in zip(ranks, W.shape)]
    if list(ranks) != list(W.shape):
        core, small, _ = _sthosvd(W, ranks)
        factors = [Q @ U for Q, U in zip(bases, small)]
    else:
        core, factors = W, list(bases)
    return TuckerTensor(core.to(dtype), tuple(f.to(dtype) for f in factors))


def _sizes(given, default, lower, shape, name) -> list[int]:
    if given is None:
        vals = default
    elif isinstance(given, int) and not isinstance(given, bool):
        vals = [given] * len(shape)
    else:
        vals = [int(v) for v in given]
        if len(vals) != len(shape):
            raise InvalidArgumentError(f"{name} needs {len(shape)} entries, got {len(vals)}")
    out = []
    for n, (v, lo, size) in enumerate(zip(vals, lower, shape)):
        v = min(int(v), int(size))
        if v < min(lo, size):
            raise InvalidArgumentError(f"{name}[{n}]={v} must be at least {lo} (the rank it sketches for)")
        out.append(v)
    return out


def _kind(B: BlockedTensor) -> str:
    return "dask" if B.is_dask else type(B.data).__name__


# --- tensor train from one pass (streaming TT approximation) -----------------------------------------------

_IDX = "abcdefghijklmnopqrstuvw"  # tensor modes; 'x' / 'y' are the left / right sketch columns


class _TTSketchBlock:
    """The block's share of the TT sketches (Kressner, Vandereycken and Voorhaar, "Streaming tensor train
    approximation", SIAM J. Sci. Comput. 2023): for every bond ``mu``, ``Omega_mu = L_mu X R_mu`` and
    ``Psi_mu = X contracted with L_{mu-1} on modes < mu and R_mu on modes > mu`` (``r'_{mu-1} x I_mu x r_mu``).
    ``L_mu`` / ``R_mu`` are Khatri-Rao products of per-mode Gaussian matrices, so they are never formed."""

    def __init__(self, shape, lefts, rights):
        self.shape, self.lefts, self.rights = shape, lefts, rights

    def __call__(self, slices, B):
        d = B.ndim
        out = []
        for mu in range(d):  # Psi_mu
            ops, terms = [B], [_IDX[:d]]
            if mu > 0:
                for m in range(mu):
                    ops.append(self.lefts[mu - 1][m][slices[m]].to(B.dtype))
                    terms.append(_IDX[m] + "x")
            if mu < d - 1:
                for m in range(mu + 1, d):
                    ops.append(self.rights[mu][m - mu - 1][slices[m]].to(B.dtype))
                    terms.append(_IDX[m] + "y")
            res = ("x" if mu > 0 else "") + _IDX[mu] + ("y" if mu < d - 1 else "")
            part = torch.einsum(",".join(terms) + "->" + res, *ops).double()
            full = torch.zeros(self.lefts[mu - 1][0].shape[1] if mu > 0 else 1, self.shape[mu],
                               self.rights[mu][0].shape[1] if mu < d - 1 else 1, dtype=torch.float64)
            full[:, slices[mu], :] = part.reshape(full.shape[0], -1, full.shape[2])
            out.append(full)
        for mu in range(d - 1):  # Omega_mu
            ops, terms = [B], [_IDX[:d]]
            for m in range(d):
                if m <= mu:
                    ops.append(self.lefts[mu][m][slices[m]].to(B.dtype))
                    terms.append(_IDX[m] + "x")
                else:
                    ops.append(self.rights[mu][m - mu - 1][slices[m]].to(B.dtype))
                    terms.append(_IDX[m] + "y")
            out.append(torch.einsum(",".join(terms) + "->xy", *ops).double())
        return out


def tt_sketch(
    X,
    ranks: int | Sequence[int],
    *,
    sketch: int | Sequence[int] | None = None,
    left: int | Sequence[int] | None = None,
    seed: int | torch.Generator | None = 0,
    chunks: int | Sequence[int] | None = None,
    scheduler=None,
    progress: Callable[[int, int], None] | None = None,
):
    """Tensor train of ``X`` from a single streaming pass (STTA: Kressner, Vandereycken, Voorhaar 2023).

    Two families of linear sketches are summed over the blocks (any order, any worker): ``Psi_mu`` (one
    ``r'_{mu-1} x I_mu x r_mu`` tensor per mode) and ``Omega_mu`` (one ``r'_mu x r_mu`` matrix per bond); the
    cores are ``pinv(Omega_{mu-1}) Psi_mu``. Storage is proportional to the output. The sketch is taken at
    oversampled ranks and rounded to ``ranks`` (:func:`tensorfold.tt_round`): at the target rank itself
    the pseudo-inverses of ``Omega`` amplify noise (measured: 10x the TT-SVD error at 5% noise, against
    1.3-3x with the default oversampling).

    Parameters
    ----------
    X : any input of :func:`tucker_sketch`.
    ranks : bond ranks ``r_mu`` of the result (an int for every bond, or ``d - 1`` ints).
    sketch : right-sketch sizes, the TT ranks before rounding (default ``2 r_mu + 1``).
    left : left-sketch sizes, at least ``sketch`` (default ``2 sketch_mu + 1``).
    seed, chunks, scheduler, progress : as in :func:`tucker_sketch`.

    Returns a :class:`TTTensor` with bond ranks ``min(r_mu, I_1...I_mu, I_mu+1...I_d)``.

    >>> import tensorfold as tf
    >>> X = tf.testing.random_tt((6, 7, 8, 9), (2, 3, 2), seed=0).to_tensor()
    >>> tt = tf.tt_sketch(X, (2, 3, 2), seed=1)
    >>> tf.relative_error(X, tt) < 1e-8
    True
    """
    from tensorfold.decomp.results import TTTensor

    start = time.perf_counter()
    B = as_blocked(X, chunks=chunks, scheduler=scheduler)
    d = len(B.shape)
    limits = [min(math.prod(B.shape[: mu + 1]), math.prod(B.shape[mu + 1 :])) for mu in range(d - 1)]
    rs = [ranks] * (d - 1) if isinstance(ranks, int) and not isinstance(ranks, bool) else list(ranks)
    if len(rs) != d - 1 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rs):
        raise InvalidArgumentError(f"ranks must be a positive int or {d - 1} positive ints, got {ranks!r}")
    target = [min(r, lim) for r, lim in zip(rs, limits)]
    rs = _sizes(sketch, [2 * r + 1 for r in target], target, limits, "sketch")
    ls = _sizes(left, [2 * r + 1 for r in rs], rs, limits, "left")
    gen = make_generator(seed)
    lefts = [[randn(B.shape[m], ls[mu], generator=gen, dtype=torch.float64) for m in range(mu + 1)]
             for mu in range(d - 1)]
    rights = [[randn(B.shape[m], rs[mu], generator=gen, dtype=torch.float64) for m in range(mu + 1, d)]
              for mu in range(d - 1)]
    parts = map_reduce(B, _TTSketchBlock(B.shape, lefts, rights), progress=progress)
    psis, omegas = parts[:d], parts[d:]
    cores = [psis[0]]
    for mu in range(1, d):
        P = psis[mu]
        cores.append((torch.linalg.pinv(omegas[mu - 1]) @ P.reshape(P.shape[0], -1)).reshape(-1, *P.shape[1:]))
    from tensorfold.decomp.tt import tt_round

    rounded = tt_round(TTTensor(tuple(cores)), max_rank=target)
    info = FitInfo("tt-sketch", n_iter=1, converged=True, seconds=time.perf_counter() - start,
                   details={"sketch": rs, "left": ls, "input": _kind(B)})
    return TTTensor(tuple(c.to(B.dtype) for c in rounded.cores), info)
