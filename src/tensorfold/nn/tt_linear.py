"""Tensor-train (MPO) Linear layer: the weight as a chain of small 4-way cores, never rebuilt in forward.

The weight ``W (out, in)`` with ``out = m_1 ... m_d`` and ``in = n_1 ... n_d`` is read as the tensor
``W[(i_1..i_d), (j_1..j_d)]`` and stored as cores ``G_k (r_{k-1}, m_k, n_k, r_k)`` (``r_0 = r_d = 1``)
with ``W[i, j] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]``. ``from_dense``
finds the cores by TT-SVD of the weight with the ``(i_k, j_k)`` pairs grouped together (exact at full
ranks). The forward contracts the input with one core at a time (one matmul each), sweeping left to
right or right to left; when cheaper for the number of input rows it first merges adjacent cores into
a bigger one (never all of them: that would be the dense weight). :func:`candidate_plans` lists them.

The dims default to the ``"skewed"`` geometry (:func:`skewed_geometry`): on trained weights it
approximated better than balanced factorisations at equal parameters and costs far fewer
multiply-adds; ``geometry="balanced"`` gives the classic near-equal factors (768 -> 8*8*12).

>>> import torch
>>> from tensorfold.nn import TTLinear
>>> dense = torch.nn.Linear(96, 64)
>>> layer = TTLinear.from_dense(dense, rank=16)
>>> layer.in_dims, layer.out_dims
((2, 24, 2), (2, 2, 16))
>>> TTLinear.from_dense(dense, rank=16, geometry="balanced").in_dims
(4, 4, 6)
>>> full = TTLinear.from_dense(dense, rank=TTLinear.max_rank(dense))
>>> x = torch.randn(3, 96)
>>> bool(torch.allclose(full(x), dense(x), atol=1e-5))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tensorfold.core.svd import truncated_svd
from tensorfold.core.validate import check_count, check_rank
from tensorfold.errors import InvalidArgumentError, NotCompressibleError, RankError, ShapeError
from tensorfold.nn.base import DenseSpec, FactorizedLayer, compute_dtype, dense_bias_of, dense_weight_of


def balanced_factors(n: int, parts: int) -> tuple[int, ...]:
    """``n`` as a product of ``parts`` factors as equal as possible, ascending (768, 3 -> (8, 8, 12)).

    Prime factors are handed out largest first, each to the currently smallest part; a prime ``n``
    leaves ones in the other parts.
    """
    if n < 1 or parts < 1:
        raise InvalidArgumentError(f"cannot split {n} into {parts} factors")
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    bins = [1] * parts
    for q in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= q
    return tuple(sorted(bins))


def skewed_factors(n: int, parts: int) -> tuple[int, ...]:
    """``n`` as ``parts`` factors: its smallest prime factors first, the large remainder last (768, 3 -> (2, 2, 192)).

    A remainder that is prime is kept whole (ones fill the small slots), so the last factor is always the
    big one.
    """
    if n < 1 or parts < 1:
        raise InvalidArgumentError(f"cannot split {n} into {parts} factors")
    small, rest = [], n
    for _ in range(parts - 1):
        p = next((q for q in range(2, math.isqrt(rest) + 1) if rest % q == 0), 1)
        small.append(p)
        rest //= p
    return (*small, rest)


GEOMETRIES = ("skewed", "balanced")


def _check_dims(dims, total: int, name: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a sequence of ints, got {dims!r}") from None
    if not dims or any(d < 1 for d in dims) or math.prod(dims) != total:
        raise ShapeError(f"{name}={dims} must be positive ints whose product is {total}")
    return dims


def skewed_geometry(in_features: int, out_features: int, n_cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in_dims, out_dims)`` of the skewed MPO: its last bond splits the weight almost into rows and columns.

    Core ``d-1`` holds nearly all of the input indices and core ``d`` nearly all of the output indices;
    every other dim is a smallest prime factor. On 12 trained Linear layers of MiniLM at 1/2, 1/4 and
    1/10 of the parameters (bench/tt_geometry.py, docs/layers.md) its output error was 0.76-0.99x the
    balanced geometry's (0.86-0.94x on average) and its cheapest contraction 0.24-1.3x the dense
    multiply-adds at 32 rows where the balanced one needs 2.1-5.6x. (768, 3072, 3) -> ((2, 192, 2), (2, 2, 768)).
    """
    s, t = skewed_factors(in_features, n_cores), skewed_factors(out_features, n_cores)
    return (*s[:-2], s[-1], s[-2]), t


def _tt_geometry(spec: DenseSpec, in_dims=None, out_dims=None, n_cores: int = 3, geometry: str = "skewed", **other):
    """(in_dims, out_dims) for a Linear spec: given, or the ``geometry`` rule with ``n_cores`` cores."""
    check_count(n_cores, "n_cores", minimum=2)
    if other:
        raise InvalidArgumentError(f"unknown TTLinear option(s) {sorted(other)}")
    if geometry not in GEOMETRIES:
        raise InvalidArgumentError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if in_dims is not None:
        in_dims = _check_dims(in_dims, spec.in_features, "in_dims")
    if out_dims is not None:
        out_dims = _check_dims(out_dims, spec.out_features, "out_dims")
    if in_dims is None and out_dims is None and geometry == "skewed":
        return skewed_geometry(spec.in_features, spec.out_features, n_cores)
    # One side given: the other is balanced into as many factors (the pre-"skewed" behaviour).
    d = len(in_dims) if in_dims is not None else (len(out_dims) if out_dims is not None else n_cores)
    in_dims = in_dims or balanced_factors(spec.in_features, d)
    out_dims = out_dims or balanced_factors(spec.out_features, d)
    if len(in_dims) != len(out_dims):
        raise ShapeError(f"in_dims {in_dims} and out_dims {out_dims} need the same number of cores")
    return in_dims, out_dims


def _bond_limits(in_dims, out_dims) -> tuple[int, ...]:
    """Full TT rank of each inner bond: the smaller side of the unfolding at that bond."""
    sizes = [m * n for m, n in zip(out_dims, in_dims)]
    total = math.prod(sizes)
    limits, left = [], 1
    for s in sizes[:-1]:
        left *= s
        limits.append(min(left, total // left))
    return tuple(limits)


def _sweep_costs(in_dims, out_dims, ranks) -> tuple[int, int]:
    """Multiply-adds per input row of the left-to-right and right-to-left sweeps."""
    full = (1, *ranks, 1)
    d = len(in_dims)
    l2r = r2l = 0
    for k in range(d):
        core = full[k] * in_dims[k] * out_dims[k] * full[k + 1]
        l2r += core * math.prod(out_dims[:k]) * math.prod(in_dims[k + 1:])
        r2l += core * math.prod(in_dims[:k]) * math.prod(out_dims[k + 1:])
    return l2r, r2l


PLAN_ROWS = 32  # default row count for contraction_plan


def _merge_cost(in_dims, out_dims, full_ranks, a: int, b: int) -> int:
    """Multiply-adds of merging cores ``a..b-1`` left to right into one core."""
    cost, size = 0, out_dims[a] * in_dims[a]
    for k in range(a + 1, b):
        cost += full_ranks[a] * size * full_ranks[k] * out_dims[k] * in_dims[k] * full_ranks[k + 1]
        size *= out_dims[k] * in_dims[k]
    return cost


def candidate_plans(in_dims, out_dims, ranks) -> list[tuple[list[tuple[int, int]], bool, int, int]]:
    """Every way to apply the MPO without rebuilding the dense weight: ``(groups, reverse, sweep, merge)``.

    Adjacent cores may first be merged into one bigger core (``merge`` multiply-adds, paid once per
    call), then the merged chain is swept left to right or right to left (``sweep`` multiply-adds per
    input row). Every split of the chain into at least two consecutive groups is listed.
    """
    d = len(in_dims)
    full = (1, *ranks, 1)
    plans = []
    for mask in range(1, 2 ** (d - 1)):  # cut positions; mask 0 (one group) would be the dense weight
        bounds = [0, *[k + 1 for k in range(d - 1) if mask >> k & 1], d]
        groups = list(zip(bounds[:-1], bounds[1:]))
        g_in = [math.prod(in_dims[a:b]) for a, b in groups]
        g_out = [math.prod(out_dims[a:b]) for a, b in groups]
        merge = sum(_merge_cost(in_dims, out_dims, full, a, b) for a, b in groups)
        l2r, r2l = _sweep_costs(g_in, g_out, [full[b] for _, b in groups[:-1]])
        plans.append((groups, False, l2r, merge))
        plans.append((groups, True, r2l, merge))
    return plans


def contraction_plan(in_dims, out_dims, ranks, rows: int = PLAN_ROWS):
    """The cheapest plan of :func:`candidate_plans` for ``rows`` input rows: ``(groups, reverse, cost)``."""
    groups, reverse, sweep, merge = min(candidate_plans(in_dims, out_dims, ranks), key=lambda p: rows * p[2] + p[3])
    return groups, reverse, rows * sweep + merge


def _plan_flops(in_dims, out_dims, ranks, rows: int) -> int:
    return contraction_plan(in_dims, out_dims, ranks, rows)[2]


def _merge_pair(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cores ``(r0, m1, n1, r1)`` and ``(r1, m2, n2, r2)`` -> one core ``(r0, m1*m2, n1*n2, r2)``."""
    r0, m1, n1, r1 = A.shape[0], A.shape[1], A.shape[2], A.shape[3]
    m2, n2, r2 = B.shape[1], B.shape[2], B.shape[3]
    T = (A.reshape(r0 * m1 * n1, r1) @ B.reshape(r1, m2 * n2 * r2)).reshape(r0, m1, n1, m2, n2, r2)
    return T.permute(0, 1, 3, 2, 4, 5).reshape(r0, m1 * m2, n1 * n2, r2)


class TTLinear(FactorizedLayer):
    """Linear layer whose weight is a tensor train (MPO) of ``len(in_dims)`` cores.

    ``rank``: an int (the same bond rank everywhere, capped at each bond's full rank), a tuple of the
    ``d - 1`` bond ranks, or (in ``from_dense``) a float fraction of the dense parameters.
    ``in_dims``/``out_dims`` default to the ``geometry`` rule (``"skewed"`` or ``"balanced"``) with
    ``n_cores`` cores; explicit dims win (a missing partner of a given side is balanced).
    """

    def __init__(
        self,
        spec,
        rank,
        *,
        in_dims: Sequence[int] | None = None,
        out_dims: Sequence[int] | None = None,
        n_cores: int = 3,
        geometry: str = "skewed",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.spec = spec = self.check_layer(spec)
        out_features, bias = spec.out_features, spec.bias
        self.in_dims, self.out_dims = _tt_geometry(spec, in_dims, out_dims, n_cores=n_cores, geometry=geometry)
        self.rank = self._validate_rank(spec, rank, in_dims=self.in_dims, out_dims=self.out_dims)
        full = (1, *self.rank, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], m, n, full[k + 1], device=device, dtype=dtype))
            for k, (m, n) in enumerate(zip(self.out_dims, self.in_dims))
        )
        for core, n in zip(self.cores, self.in_dims):
            # Variance chosen so the product of the d cores has nn.Linear's default scale.
            nn.init.normal_(core, std=(1.0 / (n * core.shape[0])) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        # The forward picks the cheapest plan for the actual number of rows (merging cores pays off
        # only for many rows). Plain attributes: TorchScript compiles ints, bools and lists of them.
        self.in_features, self.out_features = spec.in_features, spec.out_features
        plans = candidate_plans(self.in_dims, self.out_dims, self.rank)
        self._plan_starts = [[a for a, _ in groups] for groups, _, _, _ in plans]
        self._plan_stops = [[b for _, b in groups] for groups, _, _, _ in plans]
        self._plan_reverse = [reverse for _, reverse, _, _ in plans]
        self._plan_sweep = [sweep for _, _, sweep, _ in plans]
        self._plan_merge = [merge for _, _, _, merge in plans]
        self._plan_in = [[math.prod(self.in_dims[a:b]) for a, b in groups] for groups, _, _, _ in plans]
        self._plan_out = [[math.prod(self.out_dims[a:b]) for a, b in groups] for groups, _, _, _ in plans]
        self.force_plan = -1  # >= 0 pins a plan (tests); -1 chooses per call
        self.batch_last = -1  # 0/1 pins where the batch goes in the sweep (tests); -1 chooses per call
        # Core matrices up to this many entries (256 KB in float32) run as one matmul per output prefix
        # (the core stays in cache); bigger ones as one GEMM after a transposed copy of the state, which
        # measured 1.6x faster at batch 1 for a (522, 768) core than re-reading it per prefix.
        self._bmm_below = 65536

    def _layer_opts(self) -> dict:
        return {"in_dims": self.in_dims, "out_dims": self.out_dims}

    @classmethod
    def pinned_options(cls, layer, **opts) -> dict:
        in_dims, out_dims = _tt_geometry(cls.check_layer(layer, **opts), **opts)
        rest = {k: v for k, v in opts.items() if k not in ("in_dims", "out_dims", "n_cores", "geometry")}
        return {**rest, "in_dims": in_dims, "out_dims": out_dims}

    # ---- rank and cost ----------------------------------------------------------------------------

    @classmethod
    def _check_spec(cls, spec: DenseSpec, **opts) -> None:
        if spec.is_conv:
            raise NotCompressibleError(f"TTLinear factors nn.Linear layers, not {spec.describe()}")

    @classmethod
    def max_rank(cls, layer, **geometry) -> tuple[int, ...]:
        """Full bond ranks for the geometry options (``in_dims``, ``out_dims``, ``n_cores``, ``geometry``)."""
        spec = cls.check_layer(layer)
        return _bond_limits(*_tt_geometry(spec, **geometry))

    @classmethod
    def _validate_rank(cls, spec: DenseSpec, rank, **geometry):
        limits = _bond_limits(*_tt_geometry(spec, **geometry))
        if isinstance(rank, (tuple, list)):
            if len(rank) != len(limits):
                raise RankError(f"TTLinear with {len(limits) + 1} cores needs {len(limits)} bond ranks, got {rank!r}")
            return tuple(check_rank(r, f"rank[{i}]", max_rank=lim, what=f"bond {i}")
                         for i, (r, lim) in enumerate(zip(rank, limits)))
        r = check_rank(rank, max_rank=max(limits), what=f"{spec.describe()} as TT with bonds {limits}")
        return tuple(min(r, lim) for lim in limits)

    @classmethod
    def _n_levels(cls, spec: DenseSpec, **geometry) -> int:
        return max(_bond_limits(*_tt_geometry(spec, **geometry)))

    @classmethod
    def _rank_at_level(cls, spec: DenseSpec, level: int, **geometry):
        return tuple(min(level, lim) for lim in _bond_limits(*_tt_geometry(spec, **geometry)))

    @classmethod
    def _params_at(cls, spec: DenseSpec, rank, **geometry) -> int:
        in_dims, out_dims = _tt_geometry(spec, **geometry)
        full = (1, *rank, 1)
        cores = sum(full[k] * m * n * full[k + 1] for k, (m, n) in enumerate(zip(out_dims, in_dims)))
        return cores + (spec.out_features if spec.bias else 0)

    @classmethod
    def _flops_at(cls, spec: DenseSpec, rank, input_shape, **geometry) -> int:
        batch, _ = spec.split_input_shape(input_shape)
        return _plan_flops(*_tt_geometry(spec, **geometry), rank, batch)

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank, **geometry) -> TTLinear:
        """TT-SVD of a trained Linear layer's weight (the best TT of these ranks up to a factor sqrt(d-1))."""
        spec = cls.check_layer(layer)
        in_dims, out_dims = _tt_geometry(spec, **geometry)
        geometry = {"in_dims": in_dims, "out_dims": out_dims}
        ranks = cls.resolve_rank(spec, rank, **geometry)
        weight = dense_weight_of(layer)
        d = len(in_dims)
        # W[(i_1..i_d), (j_1..j_d)] -> T[(i_1 j_1), ..., (i_d j_d)]
        T = weight.to(compute_dtype(weight)).reshape(*out_dims, *in_dims)
        T = T.permute(*[p for k in range(d) for p in (k, d + k)])
        cores, r_prev = [], 1
        C = T.reshape(out_dims[0] * in_dims[0], -1)
        for k in range(d - 1):
            t = truncated_svd(C, ranks[k])
            r = t.S.shape[0]
            cores.append(t.U.reshape(r_prev, out_dims[k], in_dims[k], r))
            C = (t.S[:, None] * t.V.T).reshape(r * out_dims[k + 1] * in_dims[k + 1], -1)
            r_prev = r
        cores.append(C.reshape(r_prev, out_dims[-1], in_dims[-1], 1))
        return cls.from_factors(spec, cores, dense_bias_of(layer), dtype=weight.dtype, **geometry)

    @classmethod
    def _rank_of_factors(cls, spec: DenseSpec, factors, **geometry) -> tuple[int, ...]:
        """``factors``: the cores ``(r_{k-1}, m_k, n_k, r_k)``, first to last."""
        if any(f.ndim != 4 for f in factors):
            raise ShapeError(f"TT cores are 4-way (r_prev, m, n, r_next), got {[tuple(f.shape) for f in factors]}")
        return tuple(int(f.shape[3]) for f in factors[:-1])

    def factor_weights(self) -> list[torch.Tensor]:
        return list(self.cores)

    # ---- forward and inspection -------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = self.in_features, self.out_features
        lead = list(x.shape[:-1])
        B = x.reshape(-1, n_in).shape[0]  # (not numel: ONNX would get a ReduceProd)
        plan = self.force_plan
        if plan < 0:
            plan = 0
            for i in range(len(self._plan_sweep)):
                if B * self._plan_sweep[i] + self._plan_merge[i] < B * self._plan_sweep[plan] + self._plan_merge[plan]:
                    plan = i
        cores: list[torch.Tensor] = []
        for core in self.cores:
            cores.append(core)
        reverse = self._plan_reverse[plan]
        mats: list[torch.Tensor] = []  # per merged core, the matrix A[(m r_k), (r_{k-1} n)] of the sweep
        for a, b in zip(self._plan_starts[plan], self._plan_stops[plan]):
            G = cores[a]
            for k in range(a + 1, b):
                G = _merge_pair(G, cores[k])
            if reverse:  # the right-to-left sweep is the left-to-right sweep of the mirrored chain
                mats.insert(0, G.permute(1, 0, 3, 2).reshape(G.shape[1] * G.shape[0], G.shape[3] * G.shape[2]))
            else:
                mats.append(G.permute(1, 3, 0, 2).reshape(G.shape[1] * G.shape[3], G.shape[0] * G.shape[2]))
        in_dims, out_dims = self._plan_in[plan], self._plan_out[plan]
        d = len(mats)
        order = list(range(1, d + 1))  # input axes in sweep order
        if reverse:
            in_dims, out_dims, order = in_dims[::-1], out_dims[::-1], order[::-1]
        # The state X is a contiguous (P, r n_k, Q): P runs over the outputs done so far, r n_k is what
        # core k contracts, Q over the inputs still to come. Each step is one matmul A @ X whose result
        # (P, m r_k, Q) is already the next step's (P m, r_k n_{k+1}, Q'): no copy between small cores.
        # The batch goes last (in Q) so the first core is one GEMM over all rows and only the input and
        # the output are transposed; batch-first (P) computes the same and is kept for tests. Measured
        # on 768x3072 (bench/layers.py): batch-last was 0.8-0.9x the time of batch-first at batch 32.
        batch_last = 1 if self.batch_last < 0 else self.batch_last
        X = x.reshape([B] + self._plan_in[plan])
        if batch_last == 1:
            X = X.permute(order + [0])
            P, Q = 1, B * n_in
        else:
            X = X.permute([0] + order)
            P, Q = B, n_in
        X = X.contiguous()
        for k in range(d):
            A = mats[k]
            Q = Q // in_dims[k]
            if P == 1:
                X = A @ X.reshape(A.shape[1], Q)
            elif Q == 1:
                X = X.reshape(P, A.shape[1]) @ A.t()
            elif A.numel() <= self._bmm_below:  # small core: one matmul per P, the core stays in cache
                X = torch.matmul(A, X.reshape(P, A.shape[1], Q))
            else:  # big core: one GEMM over all P and Q, paying a transposed copy of the state
                X = X.reshape(P, A.shape[1], Q).transpose(1, 2).reshape(P * Q, A.shape[1]) @ A.t()
                X = X.reshape(P, Q, A.shape[0]).transpose(1, 2).contiguous()
            P = P * out_dims[k]
        if batch_last == 1:
            X = X.reshape(out_dims + [B])
            X = X.permute([d] + (list(range(d - 1, -1, -1)) if reverse else list(range(d))))
        elif reverse:
            X = X.reshape([B] + out_dims).permute([0] + list(range(d, 0, -1)))
        out = X.reshape(lead + [n_out])
        if self.bias is not None:
            out = out + self.bias
        return out

    def dense_weight(self) -> torch.Tensor:
        d = len(self.in_dims)
        T = self.cores[0]
        for core in list(self.cores)[1:]:
            T = torch.tensordot(T, core, dims=([T.ndim - 1], [0]))
        T = T.reshape([m for pair in zip(self.out_dims, self.in_dims) for m in pair])
        T = T.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))
        return T.reshape(self.spec.out_features, self.spec.in_features)

    def bias_tensor(self) -> torch.Tensor | None:
        return self.bias

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={s.in_features}, out_features={s.out_features}, in_dims={self.in_dims}, "
                f"out_dims={self.out_dims}, rank={self.rank}, bias={s.bias}")
