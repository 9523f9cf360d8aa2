"""One adapted layer: a frozen base layer plus a trainable factorized update ``scaling * delta W``.

>>> import torch
>>> from tensorfold.adapters.layer import AdapterLayer
>>> base = torch.nn.Linear(24, 12)
>>> layer = AdapterLayer(base, "tt", rank=3, n_cores=2)
>>> x = torch.randn(5, 24)
>>> bool(torch.equal(layer(x), base(x)))          # zero init: the output is unchanged
True
>>> [tuple(p.shape) for p in layer.factors]
[(3, 4, 3), (3, 4, 6)]
"""

from __future__ import annotations

import math

import opt_einsum
import torch
import torch.nn.functional as F
from torch import nn

from tensorfold.adapters.formats import (
    Factor,
    equation,
    factor_layout,
    layer_modes,
    n_cores_for,
    sites,
    zero_factor,
)
from tensorfold.core.tenalg import khatri_rao
from tensorfold.errors import InvalidArgumentError, NotCompressibleError, RankError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
FACTORED_CONV = ("lora", "tucker")  # methods with a conv chain that never builds the kernel-sized update
# The overhead of one tensor operation (dispatch, allocation, autograd node) in opt_einsum's cost units
# (2 x multiply-adds): about 30 microseconds on a CPU core doing ~20 GFLOP/s.
OP_COST = 600_000


class SharedFactors(nn.Module):
    """Factor matrices shared by the Tucker adapters of several layers (LoTR)."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.factors = nn.ParameterList([nn.Parameter(t) for t in tensors])


def wrappable(module: nn.Module) -> bool:
    """Whether an adapter can wrap ``module`` (a Linear, a Conv1d/2d/3d with groups=1, or a Linear-like
    factorized layer of tensorfold.nn such as TTLinear)."""
    return _kind(module) is not None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONVS) and not getattr(module, "transposed", False) and module.groups == 1:
        return "conv"
    from tensorfold.nn.base import FactorizedLayer

    if isinstance(module, FactorizedLayer) and not module.spec.is_conv:
        return "factorized"
    return None


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    kind = _kind(module)
    if kind is None:
        raise NotCompressibleError(
            f"cannot adapt a {type(module).__name__}: adapters wrap nn.Linear, nn.Conv1d/2d/3d with groups=1 "
            "and Linear-like tensorfold.nn layers"
        )
    if kind == "factorized":
        return module.spec.weight_shape
    return tuple(module.weight.shape)


class AdapterLayer(nn.Module):
    """``y = base(x) + scaling * delta(dropout(x))`` with ``base`` frozen and ``delta`` factorized.

    ``delta`` is the contraction of small factors (see :mod:`tensorfold.adapters.formats`): LoRA's
    ``B A``, tensor-train / tensor-ring cores, a Tucker core with factor matrices, or CP factors.

    The forward takes the cheaper of two exact paths, chosen per batch size from counted
    multiply-adds (``forward="auto"``): contracting the input with the factors one at a time (never
    building ``delta W``), or building ``delta W`` and folding it into the weight for one matmul/conv
    (cheap when the update is small next to the batch; in training it also costs the weight-sized
    gradient). A merged layer is the base layer alone.
    """

    def __init__(
        self,
        base: nn.Module,
        method: str,
        rank,
        *,
        n_cores: int = 3,
        scaling: float = 1.0,
        dropout: float = 0.0,
        init: str = "zero",
        forward: str = "auto",
        seed: int = 0,
        shared: SharedFactors | None = None,
    ):
        super().__init__()
        self.kind = _kind(base)
        shape = weight_shape(base)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.method = method
        self.scaling = float(scaling)
        self.forward_mode = forward
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight_shape = shape
        self.modes = layer_modes(shape, n_cores_for(method, shape, n_cores))
        self.layout = factor_layout(method, self.modes, rank, len(shape))
        self.merged = False
        self.init = init
        ref = self._reference_tensor()
        if init == "dota":
            tensors = self._decompose(seed)
        else:
            tensors = _random_factors(method, self.layout, seed, ref)
        # Own factors first; with LoTR sharing the per-mode factor matrices live in ``shared``.
        own = [k for k, f in enumerate(self.layout) if shared is None or f.role != "factor"]
        self._sources = []
        own_pos = {k: i for i, k in enumerate(own)}
        shared_pos = {k: i for i, k in enumerate(k for k, f in enumerate(self.layout) if f.role == "factor")}
        for k in range(len(self.layout)):
            self._sources.append(("own", own_pos[k]) if k in own_pos else ("shared", shared_pos[k]))
        self.factors = nn.ParameterList([nn.Parameter(tensors[k].to(ref)) for k in own])
        self.shared = shared
        # Rank sizes may shrink in a decomposition: read the layout back from the tensors held.
        self.layout = [Factor(f.name, f.labels, tuple(t.shape), f.role) for f, t in zip(self.layout, self._tensors())]
        mode_labels = [m.label for m in self.modes]
        self._dense_eq = equation(self.layout, mode_labels)
        self._apply_eq = equation(
            self.layout, [m.label for m in self.modes if m.is_out], [m.label for m in self.modes if not m.is_out]
        )
        self._paths: dict[tuple[int, bool], str] = {}
        self._expressions: dict[int, object] = {}
        self._build = None
        if init == "dota":
            if self.kind == "factorized":
                raise InvalidArgumentError("init='dota' needs a dense base weight; a factorized layer has none")
            with torch.no_grad():
                self.base.weight.sub_(self.scaling * self.delta_weight().to(self.base.weight.dtype))

    # ---- factors ----------------------------------------------------------------------------------

    def _reference_tensor(self) -> torch.Tensor:
        p = next(iter(self.base.parameters()), None)
        if p is None or not p.is_floating_point():
            return torch.empty(0)
        return torch.empty(0, dtype=p.dtype, device=p.device)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.factors[i] if src == "own" else self.shared.factors[i] for src, i in self._sources]

    @property
    def n_trainable(self) -> int:
        """Parameters of this layer's update (shared factors counted here too)."""
        return sum(t.numel() for t in self._tensors())

    def delta_weight(self) -> torch.Tensor:
        """``delta W`` (unscaled), shaped like the base weight."""
        tensors = self._tensors()
        if self.method == "cp":
            # Khatri-Rao products of the out-mode and in-mode factors and one matmul: einsum keeps the shared
            # rank index of all factors through every step (and its backward), several times slower here.
            rank = tensors[0].shape[1]
            sides = []
            for out_side in (True, False):
                mats = [t for f, t in zip(self.layout, tensors) if f.labels[0].startswith("o") == out_side]
                sides.append(khatri_rao(mats) if mats else tensors[0].new_ones(1, rank))
            return (sides[0] @ sides[1].T).reshape(self.weight_shape)
        if self._build is None:  # the contraction order, found once (torch.einsum would search it every call)
            self._build = opt_einsum.contract_expression(self._dense_eq, *[f.shape for f in self.layout])
        return self._build(*tensors, backend="torch").reshape(self.weight_shape)

    @torch.no_grad()
    def _decompose(self, seed: int) -> list[torch.Tensor]:
        """DoTA: the factors of a decomposition of ``W / scaling`` at this layer's rank."""
        from tensorfold.nn.base import svd_factors

        W = self.base.weight.detach().to(torch.float64) / self.scaling
        sizes = [m.size for m in self.modes]
        T = W.reshape(sizes)
        method, layout = self.method, self.layout
        if len(sizes) < 2 and method != "lora":
            raise InvalidArgumentError(
                f"init='dota' decomposes the weight as a tensor; a weight of shape {self.weight_shape} has only "
                f"one mode of size > 1 (use init='zero' or method='lora' for this layer)"
            )
        if method == "lora":
            out_size = math.prod(m.size for m in self.modes if m.is_out)
            B, A, _ = svd_factors(W.reshape(out_size, -1), layout[0].shape[0])
            return [A.reshape(layout[0].shape), B.reshape(layout[1].shape)]
        if method == "tucker":
            from tensorfold.decomp.tucker import tucker

            result = tucker(T, list(layout[0].shape), method="hooi", seed=seed)
            return [result.core, *result.factors]
        if method == "cp":
            from tensorfold.decomp.cp import cp

            result = cp(T, layout[0].shape[1], seed=seed)
            factors = list(result.factors)
            factors[0] = factors[0] * result.weights
            return factors
        chain = sites(self.modes, len(self.weight_shape))
        order = [self.modes.index(m) for site in chain for m in site]
        site_sizes = [math.prod(m.size for m in site) for site in chain]
        Ts = T.permute(order).reshape(site_sizes)
        K = len(chain)
        if method == "tt":
            from tensorfold.decomp.tt import tensor_train

            bonds = [f.shape[-1] for f in layout[:-1]]
            cores = list(tensor_train(Ts, max_rank=bonds if bonds else None).cores) if K > 1 else [Ts.reshape(1, -1, 1)]
            out = []
            for k, (c, site) in enumerate(zip(cores, chain)):
                full = c.reshape(c.shape[0], *[m.size for m in site], c.shape[-1])
                if k == K - 1:
                    full = full.squeeze(-1)
                if k == 0:
                    full = full.squeeze(0)
                out.append(full)
            return out
        from tensorfold.decomp.tr import tensor_ring

        bonds = [f.shape[-1] for f in layout]
        ranks = [bonds[-1], *bonds[:-1]]
        try:
            result = tensor_ring(Ts, ranks, seed=seed)
        except RankError:  # TR-SVD cannot split the first unfolding at these ranks: ALS from random cores
            result = tensor_ring(Ts, ranks, init="random", n_iter_max=50, seed=seed)
        return [c.reshape(c.shape[0], *[m.size for m in site], c.shape[-1]) for c, site in zip(result.cores, chain)]

    # ---- forward ----------------------------------------------------------------------------------

    def _path(self, x: torch.Tensor) -> str:
        """"factored", "sum" (fold delta W into the weight) or "dense" (apply delta W separately)."""
        training = torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors())
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        can_sum = self.kind != "factorized" and not dropping
        if self.forward_mode == "sum" and can_sum:
            return "sum"
        can_factor = self.kind == "linear" or self.kind == "factorized" or self.method in FACTORED_CONV
        if self.forward_mode == "factored" and can_factor:
            return "factored"
        rows = self._rows(x)
        key = (rows, training)
        if key not in self._paths:
            self._paths[key] = self._cheapest(rows, training, can_sum, can_factor)
        return self._paths[key]

    def _rows(self, x: torch.Tensor) -> int:
        if self.kind == "conv":
            return int(math.prod(x.shape[2:]) * (x.shape[0] if x.dim() == len(self.weight_shape) else 1))
        return max(1, x.numel() // self.weight_shape[1])

    def _cheapest(self, rows: int, training: bool, can_sum: bool, can_factor: bool) -> str:
        shapes = [f.shape for f in self.layout]
        build = opt_einsum.contract_path(self._dense_eq, *shapes, shapes=True)[1].opt_cost
        out_size, in_size = self.weight_shape[0], math.prod(self.weight_shape[1:])
        # Multiply-adds counted twice (multiply + add), as opt_einsum does. In training every term is
        # paid again twice by the backward pass; folding into the weight also pays the weight gradient.
        weight_grad = 2 * rows * out_size * in_size  # conv: rows = input positions, an upper bound
        if self.kind == "conv":
            factored = self._conv_chain_cost(rows)
        else:
            x_shape = (rows, *self._in_sizes())
            factored = opt_einsum.contract_path(self._apply_eq, x_shape, *shapes, shapes=True)[1].opt_cost
        mult = 3 if training else 1
        # Small layers are bound by per-operation overhead, not arithmetic: charge each op OP_COST.
        n_build = len(self.layout)  # contractions building delta W, plus the add or the extra product
        n_factored = len(self.layout) + (2 if self.kind == "conv" else 0)
        costs = {}
        if can_factor:
            costs["factored"] = mult * (factored + OP_COST * n_factored)
        if can_sum:
            costs["sum"] = mult * (build + OP_COST * n_build) + (weight_grad if training else 0)
        costs["dense"] = mult * (build + 2 * rows * out_size * in_size + OP_COST * (n_build + 1))
        return min(costs, key=costs.get)

    def _in_sizes(self) -> list[int]:
        return [m.size for m in self.modes if not m.is_out]

    def _conv_chain_cost(self, rows: int) -> int:
        out_c, in_c, *kernel = self.weight_shape
        k = math.prod(kernel)
        if self.method == "lora":
            r = self.layout[0].shape[0]
            return 2 * rows * r * (in_c * k + out_c)
        if self.method == "tucker":
            ranks = self.layout[0].shape
            r_out = ranks[0] if self.modes[0].is_out else out_c
            r_in = next((f.shape[1] for f in self.layout[1:] if f.labels[0] == "i0"), in_c)
            return 2 * rows * (in_c * r_in + r_in * r_out * k + r_out * out_c)
        return 1 << 62

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        path = self._path(x)
        s = self.scaling
        if path == "sum":
            weight = self.base.weight + s * self.delta_weight()
            if self.kind == "linear":
                return F.linear(x, weight, self.base.bias)
            return self.base._conv_forward(x, weight, self.base.bias)
        y = self.base(x)
        h = self.dropout(x)
        if path == "dense":
            delta = self.delta_weight()
            if self.kind == "conv":
                return y + s * self.base._conv_forward(h, delta, None)
            return y + s * F.linear(h, delta)
        if self.kind == "conv":
            return y + s * self._conv_chain(h)
        return y + s * self._apply(h)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, *self._in_sizes())
        rows = flat.shape[0]
        if rows not in self._expressions:
            shapes = [tuple(flat.shape)] + [f.shape for f in self.layout]
            self._expressions[rows] = opt_einsum.contract_expression(self._apply_eq, *shapes)
        out = self._expressions[rows](flat, *self._tensors(), backend="torch")
        return out.reshape(*lead, self.weight_shape[0])

    def _conv_chain(self, x: torch.Tensor) -> torch.Tensor:
        out_c, in_c, *kernel = self.weight_shape
        dim = len(kernel)
        conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
        ones = (1,) * dim
        tensors = self._tensors()
        if self.method == "lora":
            A, B = tensors
            h = self.base._conv_forward(x, A.reshape(A.shape[0], in_c, *kernel), None)
            return conv(h, B.reshape(out_c, -1, *ones))
        # Tucker (FLoRA): project the input channels, a small kxk conv on the core, expand the outputs.
        labels = [f.labels for f in self.layout]
        by_mode = {lab[0]: t for lab, t in zip(labels[1:], tensors[1:])}
        core = tensors[0]
        core_labels = list(labels[0])
        # kernel modes folded into the core: einsum of the core with the kernel-mode factors
        mids = [(lab, t) for lab, t in zip(labels[1:], tensors[1:]) if lab[0] not in ("o0", "i0")]
        keep = [lab for lab in core_labels if not any(lab == m[0][1] for m in mids)]
        mid_labels = keep + [m[0][0] for m in mids]
        eq = equation([Factor("c", tuple(core_labels), tuple(core.shape))] + [Factor("f", m[0], tuple(m[1].shape))
                                                                              for m in mids], mid_labels)
        mid = torch.einsum(eq, core, *[m[1] for m in mids]) if mids else core
        r_out = core.shape[0] if "o0" in by_mode else out_c
        r_in = by_mode["i0"].shape[1] if "i0" in by_mode else in_c
        kernel_w = mid.reshape(r_out, r_in, *kernel)
        h = x
        if "i0" in by_mode:
            h = conv(h, by_mode["i0"].T.reshape(r_in, in_c, *ones))
        h = self.base._conv_forward(h, kernel_w, None)
        if "o0" in by_mode:
            h = conv(h, by_mode["o0"].reshape(out_c, r_out, *ones))
        return h

    # ---- merging ----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * delta W`` into the base weight; the forward is then the base layer's."""
        if self.merged:
            return
        if self.kind == "factorized":
            raise InvalidArgumentError(
                f"cannot merge an adapter into a {type(self.base).__name__}: it holds no dense weight (adapt its "
                "inner factor layers instead, or keep the adapter unmerged)"
            )
        self.base.weight.add_(self.scaling * self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight."""
        if not self.merged:
            return
        self.base.weight.sub_(self.scaling * self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        ranks = sorted({s for f in self.layout for lab, s in zip(f.labels, f.shape) if lab.startswith("r")})
        return (f"method={self.method}, modes={[m.size for m in self.modes]}, ranks={ranks}, "
                f"scaling={self.scaling:g}, trainable={self.n_trainable}, merged={self.merged}")


def _random_factors(method: str, layout: list[Factor], seed: int, ref: torch.Tensor) -> list[torch.Tensor]:
    """Zero init: one factor zero (the update starts at 0), the others random with unit-gain scales."""
    gen = torch.Generator().manual_seed(int(seed))
    dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
    zero = zero_factor(method, layout)
    out = []
    for k, f in enumerate(layout):
        if k == zero:
            out.append(torch.zeros(f.shape, dtype=dtype))
        elif method == "lora":  # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(math.prod(f.shape[1:]))
            out.append((torch.rand(f.shape, generator=gen, dtype=dtype) * 2 - 1) * bound)
        elif f.role == "factor" and method == "tucker":  # orthonormal columns
            q, _ = torch.linalg.qr(torch.randn(f.shape, generator=gen, dtype=torch.float64))
            out.append(q.to(dtype))
        else:  # unit gain along the contraction: std 1/sqrt(fan-in of the next bond)
            fan = math.prod(f.shape) / f.shape[-1]
            out.append(torch.randn(f.shape, generator=gen, dtype=dtype) / math.sqrt(fan))
    return out


def shared_factor_tensors(layout: list[Factor], seed: int, ref: torch.Tensor) -> list[torch.Tensor]:
    """The random factor matrices of a LoTR group (the per-layer cores start at zero)."""
    tensors = _random_factors("tucker", layout, seed, ref)
    return [t for t, f in zip(tensors, layout) if f.role == "factor"]
