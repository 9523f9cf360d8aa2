"""Tensor-train (MPO) Linear layer: the weight as a chain of small 4-way cores, never rebuilt in forward.

The weight ``W (out, in)`` with ``out = m_1 ... m_d`` and ``in = n_1 ... n_d`` is read as the tensor
``W[(i_1..i_d), (j_1..j_d)]`` and stored as cores ``G_k (r_{k-1}, m_k, n_k, r_k)`` (``r_0 = r_d = 1``)
with ``W[i, j] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]``. ``from_dense``
finds the cores by TT-SVD of the weight with the ``(i_k, j_k)`` pairs grouped together (exact at full
ranks). The forward contracts the input with one core at a time (one matmul each), sweeping left to
right or right to left; when cheaper for the number of input rows it first merges adjacent cores into
a bigger one (never all of them: that would be the dense weight). :func:`candidate_plans` lists them.

>>> import torch
>>> from tensorfold.nn import TTLinear
>>> dense = torch.nn.Linear(96, 64)
>>> layer = TTLinear.from_dense(dense, rank=16)
>>> layer.in_dims, layer.out_dims
((4, 4, 6), (4, 4, 4))
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
from tensorfold.core.validate import check_rank
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


def _check_dims(dims, total: int, name: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a sequence of ints, got {dims!r}") from None
    if not dims or any(d < 1 for d in dims) or math.prod(dims) != total:
        raise ShapeError(f"{name}={dims} must be positive ints whose product is {total}")
    return dims


def _tt_geometry(spec: DenseSpec, in_dims=None, out_dims=None, n_cores: int = 3):
    """(in_dims, out_dims) for a Linear spec: given, or balanced factorisations with ``n_cores`` parts."""
    if isinstance(n_cores, bool) or not isinstance(n_cores, int) or n_cores < 2:
        raise InvalidArgumentError(f"n_cores must be an int >= 2, got {n_cores!r}")
    if in_dims is not None:
        in_dims = _check_dims(in_dims, spec.in_features, "in_dims")
    if out_dims is not None:
        out_dims = _check_dims(out_dims, spec.out_features, "out_dims")
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
    ``in_dims``/``out_dims`` default to balanced factorisations of the feature sizes into ``n_cores``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank,
        bias: bool = True,
        *,
        in_dims: Sequence[int] | None = None,
        out_dims: Sequence[int] | None = None,
        n_cores: int = 3,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.spec = spec = DenseSpec(int(in_features), int(out_features), bool(bias))
        self.in_dims, self.out_dims = _tt_geometry(spec, in_dims, out_dims, n_cores)
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

    def _layer_opts(self) -> dict:
        return {"in_dims": self.in_dims, "out_dims": self.out_dims}

    # ---- rank and cost ----------------------------------------------------------------------------

    @classmethod
    def _check_spec(cls, spec: DenseSpec, **opts) -> None:
        if spec.is_conv:
            raise NotCompressibleError(f"TTLinear factors nn.Linear layers, not {spec.describe()}")

    @classmethod
    def max_rank(cls, layer, *, in_dims=None, out_dims=None, n_cores: int = 3) -> tuple[int, ...]:
        spec = cls.check_layer(layer)
        return _bond_limits(*_tt_geometry(spec, in_dims, out_dims, n_cores))

    @classmethod
    def _validate_rank(cls, spec: DenseSpec, rank, *, in_dims=None, out_dims=None, n_cores: int = 3, **opts):
        limits = _bond_limits(*_tt_geometry(spec, in_dims, out_dims, n_cores))
        if isinstance(rank, (tuple, list)):
            if len(rank) != len(limits):
                raise RankError(f"TTLinear with {len(limits) + 1} cores needs {len(limits)} bond ranks, got {rank!r}")
            return tuple(check_rank(r, f"rank[{i}]", max_rank=lim, what=f"bond {i}")
                         for i, (r, lim) in enumerate(zip(rank, limits)))
        r = check_rank(rank, max_rank=max(limits), what=f"{spec.describe()} as TT with bonds {limits}")
        return tuple(min(r, lim) for lim in limits)

    @classmethod
    def _n_levels(cls, spec: DenseSpec, *, in_dims=None, out_dims=None, n_cores: int = 3, **opts) -> int:
        return max(_bond_limits(*_tt_geometry(spec, in_dims, out_dims, n_cores)))

    @classmethod
    def _rank_at_level(cls, spec: DenseSpec, level: int, *, in_dims=None, out_dims=None, n_cores: int = 3, **opts):
        return tuple(min(level, lim) for lim in _bond_limits(*_tt_geometry(spec, in_dims, out_dims, n_cores)))

    @classmethod
    def _params_at(cls, spec: DenseSpec, rank, *, in_dims=None, out_dims=None, n_cores: int = 3, **opts) -> int:
        in_dims, out_dims = _tt_geometry(spec, in_dims, out_dims, n_cores)
        full = (1, *rank, 1)
        cores = sum(full[k] * m * n * full[k + 1] for k, (m, n) in enumerate(zip(out_dims, in_dims)))
        return cores + (spec.out_features if spec.bias else 0)

    @classmethod
    def _flops_at(cls, spec: DenseSpec, rank, input_shape, *, in_dims=None, out_dims=None, n_cores: int = 3,
                  **opts) -> int:
        batch, _ = spec.split_input_shape(input_shape)
        return _plan_flops(*_tt_geometry(spec, in_dims, out_dims, n_cores), rank, batch)

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank, *, in_dims=None, out_dims=None, n_cores: int = 3) -> TTLinear:
        """TT-SVD of a trained Linear layer's weight (the best TT of these ranks up to a factor sqrt(d-1))."""
        spec = cls.check_layer(layer)
        in_dims, out_dims = _tt_geometry(spec, in_dims, out_dims, n_cores)
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
        layer_out = cls(spec.in_features, spec.out_features, ranks, spec.bias, device=weight.device,
                        dtype=weight.dtype, **geometry)
        with torch.no_grad():
            for param, core in zip(layer_out.cores, cores):
                param.copy_(core)
            if spec.bias:
                layer_out.bias.copy_(dense_bias_of(layer))
        return layer_out

    # ---- forward and inspection -------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = self.in_features, self.out_features
        lead = list(x.shape[:-1])
        Z = x.reshape(-1, n_in)
        B = Z.shape[0]
        plan = self.force_plan
        if plan < 0:
            plan = 0
            for i in range(len(self._plan_sweep)):
                if B * self._plan_sweep[i] + self._plan_merge[i] < B * self._plan_sweep[plan] + self._plan_merge[plan]:
                    plan = i
        cores: list[torch.Tensor] = []
        for core in self.cores:
            cores.append(core)
        merged: list[torch.Tensor] = []
        for a, b in zip(self._plan_starts[plan], self._plan_stops[plan]):  # the plan's merged cores
            G = cores[a]
            for k in range(a + 1, b):
                G = _merge_pair(G, cores[k])
            merged.append(G)
        d = len(merged)
        reverse = self._plan_reverse[plan]
        mats: list[torch.Tensor] = []
        if reverse:  # the right-to-left sweep is the left-to-right sweep of the mirrored chain
            Z = Z.reshape([B] + self._plan_in[plan]).permute([0] + list(range(d, 0, -1))).reshape(B, n_in)
            in_dims, out_dims = self._plan_in[plan][::-1], self._plan_out[plan][::-1]
            for G in merged:
                mats.insert(0, G.permute(3, 2, 1, 0))  # (r_k, n, m, r_{k-1})
        else:
            in_dims, out_dims = self._plan_in[plan], self._plan_out[plan]
            for G in merged:
                mats.append(G.permute(0, 2, 1, 3))  # (r_{k-1}, n, m, r_k)
        M, rest = 1, n_in
        for k in range(d):
            mat, n, m = mats[k], in_dims[k], out_dims[k]
            r, r2 = mat.shape[0], mat.shape[3]
            rest = rest // n
            # Z holds (B, M, r, n, rest): contract (r, n) with the core in one matmul.
            Z = Z.reshape(B * M, r * n, rest).transpose(1, 2).reshape(B * M * rest, r * n)
            Z = Z @ mat.reshape(r * n, m * r2)
            Z = Z.reshape(B, M, rest, m * r2).transpose(2, 3)
            M = M * m
        if reverse:
            Z = Z.reshape([B] + out_dims).permute([0] + list(range(d, 0, -1)))
        out = Z.reshape(lead + [n_out])
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
