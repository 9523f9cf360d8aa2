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


class FactorizedLayer(nn.Module):
    """Base class of the layers that hold a dense layer's weight in factored form.

    Subclasses describe their ranks through *levels*: an integer ``level`` in ``1..n_levels`` maps to
    a concrete rank (an int, or a tuple for TuckerConv/TTLinear) and the parameter count grows with
    the level. That is all :meth:`resolve_rank` needs to turn a fraction of the dense parameters into
    a rank. Subclasses implement ``_check_spec``, ``_validate_rank``, ``_n_levels``, ``_rank_at_level``,
    ``_params_at``, ``_flops_at``, ``max_rank``, ``from_dense`` and ``forward``.

    >>> import torch
    >>> from tensorfold.nn import LowRankLinear
    >>> dense = torch.nn.Linear(64, 32)
    >>> LowRankLinear.resolve_rank(dense, 0.5)
    10
    >>> LowRankLinear.cost(dense, 8, (4, 64))
    LayerCost(params=800, flops=3072)
    """

    __jit_unused_properties__ = ["n_params"]  # TorchScript compiles only the forward path

    # Instances set ``self.spec`` (the DenseSpec) and ``self.rank`` (the concrete rank). They are not
    # declared as class annotations because TorchScript would try to compile them.

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

    def _layer_opts(self) -> dict:
        """Options this instance was built with that change its cost (e.g. SVDConv's scheme)."""
        return {}

    @classmethod
    def pinned_options(cls, layer, **opts) -> dict:
        """``opts`` with every default that shapes the layer made explicit, for saving in a plan.

        A plan saved with these options rebuilds the same layer structure even if a default changes
        later (TTLinear's automatic in/out dims, for instance).
        """
        cls.check_layer(layer, **opts)
        return dict(opts)

    # ---- shared logic ---------------------------------------------------------------------------

    @classmethod
    def check_layer(cls, layer, **opts) -> DenseSpec:
        """The layer's spec, after checking that this class can factor it."""
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
