"""What every factorized layer shares: the dense layer's description, cost counting and rank resolution.

Costs are counted the same way for dense and factored layers so the planner can compare them:
``params`` counts every parameter (bias included) and ``flops`` counts the multiply-adds of one
forward pass over an input of the given shape, batch dimension included (bias additions are not
counted, for either side).

>>> import torch
>>> from tensorfold.nn import dense_flops, dense_params
>>> dense_params(torch.nn.Linear(768, 3072))
2362368
>>> dense_flops(torch.nn.Linear(768, 3072), (8, 768))
18874368
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tensorfold.errors import InvalidArgumentError, NotCompressibleError, RankError, ShapeError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerCost:
    """Parameters and multiply-adds of one layer for one input shape (batch included)."""

    params: int
    flops: int


@dataclass(frozen=True)
class DenseSpec:
    """The hyper-parameters of a dense ``nn.Linear`` or ``nn.ConvNd``, without its weights.

    Factorized layers keep one so that they can count their own cost, rebuild the dense layer and
    answer cost queries without holding (or building) any weights.
    """

    in_features: int
    out_features: int
    bias: bool
    kernel_size: tuple[int, ...] = ()  # () for Linear
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel_size)

    @property
    def dim(self) -> int:
        """Spatial dimensions: 0 for Linear, 1/2/3 for ConvNd."""
        return len(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if not self.is_conv:
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)

    @classmethod
    def of(cls, layer) -> DenseSpec:
        """The spec of a dense layer (or the spec itself, or the spec kept by a factorized layer)."""
        if isinstance(layer, DenseSpec):
            return layer
        if isinstance(layer, FactorizedLayer):
            return layer.spec
        if isinstance(layer, nn.Linear):
            return cls(int(layer.in_features), int(layer.out_features), layer.bias is not None)
        if isinstance(layer, _CONV_TYPES):
            if getattr(layer, "transposed", False):
                raise NotCompressibleError(f"{type(layer).__name__}: transposed convolutions are not supported")
            padding = layer.padding if isinstance(layer.padding, str) else tuple(int(p) for p in layer.padding)
            return cls(
                int(layer.in_channels),
                int(layer.out_channels),
                layer.bias is not None,
                tuple(int(k) for k in layer.kernel_size),
                tuple(int(s) for s in layer.stride),
                padding,
                tuple(int(d) for d in layer.dilation),
                int(layer.groups),
                str(layer.padding_mode),
            )
        raise NotCompressibleError(
            f"cannot factorize a {type(layer).__name__}: only nn.Linear and nn.Conv1d/2d/3d layers are supported"
        )

    # ---- geometry ---------------------------------------------------------------------------------

    def explicit_padding(self) -> tuple[int, ...] | str:
        """Numeric padding where possible: 'valid' -> 0, symmetric 'same' -> d*(k-1)/2; else the string.

        Numbers export to ONNX as a plain Conv attribute; an asymmetric 'same' (even effective kernel)
        stays a string and torch pads it itself.
        """
        if not isinstance(self.padding, str):
            return self.padding
        if self.padding == "valid":
            return (0,) * self.dim
        total = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
        if all(t % 2 == 0 for t in total):
            return tuple(t // 2 for t in total)
        return "same"

    def output_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the output for an input of spatial size ``spatial``."""
        return conv_output_size(spatial, self.kernel_size, self.stride, self.padding, self.dilation)

    def split_input_shape(self, input_shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
        """``(batch, spatial)`` of an input shape; ``batch`` counts every leading dimension."""
        shape = tuple(int(s) for s in input_shape)
        if not self.is_conv:
            if not shape or shape[-1] != self.in_features:
                raise ShapeError(f"input shape {shape} does not end in in_features={self.in_features}")
            return math.prod(shape[:-1]), ()
        if len(shape) == self.dim + 1:  # unbatched (C, *spatial)
            shape = (1, *shape)
        if len(shape) != self.dim + 2 or shape[1] != self.in_features:
            raise ShapeError(
                f"input shape {shape} does not fit a Conv{self.dim}d with {self.in_features} input channels "
                f"(expected (N, {self.in_features}, {', '.join('L' * self.dim)}))"
            )
        return shape[0], shape[2:]

    def build(self, *, device=None, dtype=None) -> nn.Module:
        """An uninitialised dense layer with these hyper-parameters."""
        if not self.is_conv:
            return nn.Linear(self.in_features, self.out_features, bias=self.bias, device=device, dtype=dtype)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.dim - 1]
        return conv(
            self.in_features,
            self.out_features,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
            device=device,
            dtype=dtype,
        )

    def describe(self) -> str:
        if not self.is_conv:
            return f"Linear({self.in_features}, {self.out_features})"
        k = "x".join(map(str, self.kernel_size))
        return f"Conv{self.dim}d({self.in_features}, {self.out_features}, {k})"


def conv_output_size(spatial, kernel_size, stride, padding, dilation) -> tuple[int, ...]:
    """``floor((L + 2p - d(k-1) - 1) / s) + 1`` per spatial dimension (PyTorch's formula)."""
    out = []
    for i, L in enumerate(spatial):
        if isinstance(padding, str):
            if padding == "same":
                out.append(int(L))
                continue
            p = 0
        else:
            p = padding[i]
        n = (int(L) + 2 * p - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
        if n <= 0:
            raise ShapeError(f"input of spatial size {tuple(spatial)} is too small for kernel {tuple(kernel_size)}")
        out.append(n)
    return tuple(out)


def conv_macs(in_channels: int, out_channels: int, groups: int, kernel_size: Sequence[int], positions: int) -> int:
    """Multiply-adds of a convolution producing ``positions`` output positions (batch included)."""
    return positions * out_channels * (in_channels // groups) * math.prod(kernel_size)


def dense_params(layer) -> int:
    """Number of parameters of a dense nn.Linear / nn.ConvNd (weight and bias)."""
    spec = DenseSpec.of(layer)
    return math.prod(spec.weight_shape) + (spec.out_features if spec.bias else 0)


def dense_flops(layer, input_shape: Sequence[int]) -> int:
    """Multiply-adds of a dense nn.Linear / nn.ConvNd forward over ``input_shape`` (batch included).

    ``input_shape`` is ``(..., in_features)`` for Linear and ``(N, C, *spatial)`` for ConvNd.
    """
    spec = DenseSpec.of(layer)
    batch, spatial = spec.split_input_shape(input_shape)
    if not spec.is_conv:
        return batch * spec.in_features * spec.out_features
    positions = batch * math.prod(spec.output_spatial(spatial))
    return conv_macs(spec.in_features, spec.out_features, spec.groups, spec.kernel_size, positions)


def check_fraction(rank: float) -> float:
    if not (0.0 < rank < 1.0) or math.isnan(rank):
        raise RankError(f"a float rank is a fraction of the dense parameters and must lie in (0, 1), got {rank}")
    return float(rank)


# Every FactorizedLayer subclass, by class name (filled as the classes are defined).
LAYER_KINDS: dict[str, type[FactorizedLayer]] = {}


class FactorizedLayer(nn.Module):
    """Base class of the layers that hold a dense layer's weight in factored form: the layer contract.

    Construction (the same shape for every class):

    - ``Cls(spec, rank, *, device=None, dtype=None, **opts)``: a layer of that structure with
      placeholder weights; ``spec`` is a :class:`DenseSpec` or the dense layer itself;
    - ``Cls.empty(spec, rank, **opts)``: the same, from plan data (JSON lists become tuples);
    - ``Cls.from_dense(layer, rank, **opts)``: fitted to a trained dense layer (``rank`` may be a
      float fraction of its parameters);
    - ``Cls.from_factors(spec, factors, bias, **opts)``: from the factor weights as
      :meth:`factor_weights` lists them (so ``from_factors(l.spec, l.factor_weights(), l.bias_tensor(),
      **l.options())`` rebuilds ``l``).

    Subclasses describe their ranks through *levels*: an integer ``level`` in ``1..n_levels`` maps to
    a concrete rank (an int, or a tuple for TuckerConv/TTLinear) and the parameter count grows with
    the level. That is all :meth:`resolve_rank` needs to turn a fraction of the dense parameters into
    a rank. Subclasses implement ``__init__``, ``_check_spec``, ``_validate_rank``, ``_n_levels``,
    ``_rank_at_level``, ``_params_at``, ``_flops_at``, ``max_rank``, ``from_dense``, ``factor_weights``,
    ``_rank_of_factors``, ``dense_weight``, ``bias_tensor`` and ``forward``; a subclass defined anywhere
    registers itself (:func:`tensorfold.nn.layer_kind`) and plugs into the planner through
    :func:`tensorfold.nn.register_method`.

    >>> import torch
    >>> from tensorfold.nn import LowRankLinear
    >>> dense = torch.nn.Linear(64, 32)
    >>> LowRankLinear.resolve_rank(dense, 0.5)
    10
    >>> LowRankLinear.cost(dense, 8, (4, 64))
    LayerCost(params=800, flops=3072)
    >>> layer = LowRankLinear.from_dense(dense, 8)
    >>> again = LowRankLinear.from_factors(layer.spec, layer.factor_weights(), layer.bias_tensor())
    >>> bool(torch.equal(again.dense_weight(), layer.dense_weight()))
    True
    """

    __jit_unused_properties__ = ["n_params"]  # TorchScript compiles only the forward path

    # Instances set ``self.spec`` (the DenseSpec) and ``self.rank`` (the concrete rank). They are not
    # declared as class annotations because TorchScript would try to compile them.

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            LAYER_KINDS[cls.__name__] = cls

    # ---- hooks for subclasses -------------------------------------------------------------------

    @classmethod
    def _check_spec(cls, spec: DenseSpec, **opts) -> None:
        """Raise NotCompressibleError / InvalidArgumentError when this layer type cannot factor ``spec``."""
        raise NotImplementedError

    @classmethod
    def _validate_rank(cls, spec: DenseSpec, rank, **opts):
        """Check an explicit (int or tuple) rank and return it in canonical form."""
        raise NotImplementedError

    @classmethod
    def _n_levels(cls, spec: DenseSpec, **opts) -> int:
        raise NotImplementedError

    @classmethod
    def _rank_at_level(cls, spec: DenseSpec, level: int, **opts):
        raise NotImplementedError

    @classmethod
    def _params_at(cls, spec: DenseSpec, rank, **opts) -> int:
        raise NotImplementedError

    @classmethod
    def _flops_at(cls, spec: DenseSpec, rank, input_shape: Sequence[int], **opts) -> int:
        raise NotImplementedError

    @classmethod
    def max_rank(cls, layer, **opts):
        """The full rank: the smallest rank at which the factorization is exact."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, layer, rank, **opts) -> FactorizedLayer:
        raise NotImplementedError

    @classmethod
    def _rank_of_factors(cls, spec: DenseSpec, factors: Sequence[torch.Tensor], **opts):
        """The rank that factor weights of these shapes have (shapes are checked when they are copied)."""
        raise NotImplementedError

    def factor_weights(self) -> list[torch.Tensor]:
        """The factor weights (parameters), in the order :meth:`from_factors` takes them."""
        raise NotImplementedError

    def _layer_opts(self) -> dict:
        """Options this instance was built with that change its structure (e.g. SVDConv's scheme)."""
        return {}

    def options(self) -> dict:
        """The options that rebuild this layer's structure: ``type(l).empty(l.spec, l.rank, **l.options())``."""
        return dict(self._layer_opts())

    @classmethod
    def pinned_options(cls, layer, **opts) -> dict:
        """``opts`` with every default that shapes the layer made explicit, for saving in a plan.

        A plan saved with these options rebuilds the same layer structure even if a default changes
        later (TTLinear's automatic in/out dims, for instance).
        """
        cls.check_layer(layer, **opts)
        return dict(opts)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def empty(cls, spec, rank, *, device=None, dtype=None, **opts) -> FactorizedLayer:
        """A layer of this structure with placeholder weights, from plan data (lists become tuples):
        to load a state dict into, or to time."""
        def plain(v):
            return tuple(v) if isinstance(v, list) else v

        return cls(spec, plain(rank), device=device, dtype=dtype, **{k: plain(v) for k, v in opts.items()})

    @classmethod
    def from_factors(cls, spec, factors: Sequence[torch.Tensor], bias: torch.Tensor | None = None, *,
                     dtype: torch.dtype | None = None, **opts) -> FactorizedLayer:
        """The layer holding ``factors`` (in :meth:`factor_weights` order) and ``bias`` (given exactly when
        the spec has one); ``dtype`` defaults to the factors'."""
        spec = cls.check_layer(spec, **opts)
        factors = list(factors)
        if not factors or not all(isinstance(f, torch.Tensor) for f in factors):
            raise ShapeError(f"{cls.__name__}.from_factors needs a list of factor tensors")
        ref = factors[0]
        layer = cls(spec, cls._rank_of_factors(spec, factors, **opts), device=ref.device, dtype=dtype or ref.dtype,
                    **opts)
        targets = layer.factor_weights()
        if len(targets) != len(factors):
            raise ShapeError(f"{cls.__name__} of {spec.describe()} has {len(targets)} factors, got {len(factors)}")
        with torch.no_grad():
            for i, (target, value) in enumerate(zip(targets, factors)):
                if tuple(value.shape) != tuple(target.shape):
                    raise ShapeError(f"{cls.__name__} factor {i} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(value)
            if (bias is None) != (not spec.bias):
                raise ShapeError(f"{spec.describe()} {'has' if spec.bias else 'has no'} bias; "
                                 f"the given bias does not match")
            if bias is not None:
                target = layer.bias_tensor()
                if tuple(bias.shape) != tuple(target.shape):
                    raise ShapeError(f"bias has shape {tuple(bias.shape)}, expected {tuple(target.shape)}")
                target.copy_(bias)
        return layer

    # ---- shared logic ---------------------------------------------------------------------------

    @classmethod
    def check_layer(cls, layer, **opts) -> DenseSpec:
        """The layer's spec, after checking that this class can factor it."""
        if isinstance(layer, int) and not isinstance(layer, bool):
            raise InvalidArgumentError(
                f"{cls.__name__}(spec, rank, ...) takes a DenseSpec or the dense layer first, got the number {layer} "
                f"(for the old {cls.__name__}(in, out, rank) write {cls.__name__}(DenseSpec(in, out, bias), rank))")
        spec = DenseSpec.of(layer)
        cls._check_spec(spec, **opts)
        return spec

    @classmethod
    def resolve_rank(cls, layer, rank, **opts):
        """The concrete rank for ``rank`` (int, tuple, or a float fraction of the dense parameters).

        A fraction picks the largest rank whose parameter count is at most that fraction of the
        dense layer's (bias included on both sides); when even the smallest rank exceeds it, the
        smallest rank is returned (check :meth:`cost` to see whether factoring pays off).
        """
        spec = cls.check_layer(layer, **opts)
        if isinstance(rank, bool) or rank is None:
            raise RankError(f"rank must be an int, a tuple of ints or a float in (0, 1), got {rank!r}")
        if isinstance(rank, float):
            budget = check_fraction(rank) * dense_params(spec)
            lo, hi = 1, cls._n_levels(spec, **opts)
            while lo < hi:  # largest level whose parameter count fits the budget
                mid = (lo + hi + 1) // 2
                if cls._params_at(spec, cls._rank_at_level(spec, mid, **opts), **opts) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            return cls._rank_at_level(spec, lo, **opts)
        return cls._validate_rank(spec, rank, **opts)

    @classmethod
    def cost(cls, layer, rank, input_shape: Sequence[int], **opts) -> LayerCost:
        """Parameters and multiply-adds of the factored layer, without building it."""
        spec = cls.check_layer(layer, **opts)
        r = cls.resolve_rank(spec, rank, **opts)
        return LayerCost(cls._params_at(spec, r, **opts), cls._flops_at(spec, r, input_shape, **opts))

    @property
    def n_params(self) -> int:
        """Number of parameters actually held (factors and bias)."""
        return sum(p.numel() for p in self.parameters())

    def flops(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of one forward over ``input_shape`` (batch included), as for :func:`dense_flops`."""
        return type(self)._flops_at(self.spec, self.rank, input_shape, **self._layer_opts())

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this layer represents (built from the factors; for inspection and export)."""
        raise NotImplementedError

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """An equivalent dense nn.Linear / nn.ConvNd (same dtype and device)."""
        w = self.dense_weight()
        layer = self.spec.build(device=w.device, dtype=w.dtype)
        layer.weight.copy_(w)
        if self.spec.bias:
            layer.bias.copy_(self.bias_tensor())
        return layer

    def bias_tensor(self) -> torch.Tensor | None:
        raise NotImplementedError


class LowRankLayer(FactorizedLayer):
    """A factorized layer of two factors with the rank between them: the low-rank interface.

    Per group, the dense weight read as the matrix :meth:`matrices` gives is ``left @ right`` with the
    rank in the middle; :meth:`from_lowrank` builds the layer from those two sides, so truncated SVDs
    (``from_dense``), whitened SVDs fitted to calibration data and the planner's spectra all go
    through the class, never through a test of which class it is. :meth:`matrix_gram` maps the Gram
    matrix of the layer's (patch) inputs to the Gram over the matrix's columns when output-aware
    fitting applies; :meth:`lowrank_sides` names the two modules whose weights hold the factors.
    """

    @classmethod
    def matrices(cls, weight: torch.Tensor, spec: DenseSpec, **opts) -> list[torch.Tensor]:
        """The matrices (one per group) whose truncated SVD the layer keeps."""
        raise NotImplementedError

    @classmethod
    def from_lowrank(cls, spec, lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor],
                     bias: torch.Tensor | None = None, **opts) -> LowRankLayer:
        """The layer with ``matrices(W)[g] ~ lefts[g] @ rights[g]`` for every group ``g``."""
        raise NotImplementedError

    @classmethod
    def whitenable(cls, spec: DenseSpec, **opts) -> bool:
        """True when output-aware (whitened) fitting applies: one group, inputs that are plain rows."""
        return False

    @classmethod
    def matrix_gram(cls, spec: DenseSpec, gram: torch.Tensor, **opts) -> torch.Tensor | None:
        """The Gram over the columns of the (single-group) matrix, from the Gram of the layer's input
        rows (``(in, in)`` for Linear, the unfolded patches' for a conv); None when it does not apply."""
        return None

    def lowrank_sides(self) -> tuple[nn.Module, nn.Module]:
        """``(inner, outer)``: the modules holding the factors, rank components along dim 0 of
        ``inner.weight`` and dim 1 of ``outer.weight`` (per group)."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, layer, rank, *, svd_method: str = "exact", seed: int = 0, **opts) -> LowRankLayer:
        """Best rank-``rank`` (per group) approximation of a trained layer (``rank``: int or a float fraction
        of its parameters); ``svd_method="randomized"`` is faster for a small rank of a large weight."""
        from tensorfold.core.validate import check_choice

        check_choice(svd_method, "svd_method", ("exact", "randomized"))
        spec = cls.check_layer(layer, **opts)
        r = cls.resolve_rank(spec, rank, **opts)
        lefts, rights = [], []
        for M in cls.matrices(dense_weight_of(layer), spec, **opts):
            left, right, _ = svd_factors(M, r, method=svd_method, seed=seed)
            lefts.append(left)
            rights.append(right)
        return cls.from_lowrank(spec, lefts, rights, dense_bias_of(layer), **opts)


def dense_weight_of(layer) -> torch.Tensor:
    """The weight of a dense layer, detached (never modified)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise NotCompressibleError(f"{type(layer).__name__} has no weight tensor")
    if weight.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise InvalidArgumentError(f"cannot factorize a weight of dtype {weight.dtype}")
    return weight.detach()


def dense_bias_of(layer) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else bias.detach()


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """Half-precision weights are factored in float32 (SVD/ALS need it) and cast back."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def svd_factors(M: torch.Tensor, rank: int, *, method: str = "exact", seed: int = 0):
    """``M ~ left @ right`` with ``left = U sqrt(S)`` (m, r) and ``right = sqrt(S) V^T`` (r, n).

    Splitting the singular values evenly keeps both factors on the same scale, which trains better
    than putting them all on one side. Returns ``(left, right, tail_sq)``.
    """
    from tensorfold.core.svd import truncated_svd

    work = M.to(compute_dtype(M))
    t = truncated_svd(work, rank, method=method, seed=seed)
    root = t.S.sqrt()
    left = (t.U * root).to(M.dtype)
    right = (t.V * root).T.to(M.dtype)
    return left, right.contiguous(), t.tail_sq
