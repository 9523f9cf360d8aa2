"""Low-rank Linear layer: ``W ~ U V`` as two thin Linear layers (exports to ONNX as MatMul/Gemm).

>>> import torch
>>> from tensorfold.nn import LowRankLinear
>>> dense = torch.nn.Linear(64, 32)
>>> layer = LowRankLinear.from_dense(dense, rank=32)  # full rank: exact
>>> x = torch.randn(4, 64)
>>> bool(torch.allclose(layer(x), dense(x), atol=1e-5))
True
>>> layer.extra_repr()
'in_features=64, out_features=32, rank=32, bias=True'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tensorfold.core.validate import check_choice, check_rank
from tensorfold.errors import NotCompressibleError, ShapeError
from tensorfold.nn.base import DenseSpec, FactorizedLayer, dense_bias_of, dense_weight_of, svd_factors


class LowRankLinear(FactorizedLayer):
    """``y = second(first(x))`` with ``first = Linear(in, rank, bias=False)``, ``second = Linear(rank, out)``.

    ``rank`` ranges from 1 to ``min(in_features, out_features)`` (exact there). ``from_dense`` keeps
    the best rank-``rank`` approximation of the weight (truncated SVD, Eckart-Young).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.spec = DenseSpec(int(in_features), int(out_features), bool(bias))
        self.rank = self._validate_rank(self.spec, rank)
        self.first = nn.Linear(in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(self.rank, out_features, bias=bias, device=device, dtype=dtype)

    # ---- rank and cost ----------------------------------------------------------------------------

    @classmethod
    def _check_spec(cls, spec: DenseSpec, **opts) -> None:
        if spec.is_conv:
            raise NotCompressibleError(f"LowRankLinear factors nn.Linear layers, not {spec.describe()}")

    @classmethod
    def max_rank(cls, layer, **opts) -> int:
        spec = cls.check_layer(layer)
        return min(spec.in_features, spec.out_features)

    @classmethod
    def _validate_rank(cls, spec: DenseSpec, rank, **opts) -> int:
        return check_rank(rank, max_rank=min(spec.in_features, spec.out_features), what=spec.describe())

    @classmethod
    def _n_levels(cls, spec: DenseSpec, **opts) -> int:
        return min(spec.in_features, spec.out_features)

    @classmethod
    def _rank_at_level(cls, spec: DenseSpec, level: int, **opts) -> int:
        return level

    @classmethod
    def _params_at(cls, spec: DenseSpec, rank: int, **opts) -> int:
        return rank * (spec.in_features + spec.out_features) + (spec.out_features if spec.bias else 0)

    @classmethod
    def _flops_at(cls, spec: DenseSpec, rank: int, input_shape: Sequence[int], **opts) -> int:
        batch, _ = spec.split_input_shape(input_shape)
        return batch * rank * (spec.in_features + spec.out_features)

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank, *, svd_method: str = "exact", seed: int = 0) -> LowRankLinear:
        """Best rank-``rank`` approximation of ``layer`` (``rank``: int or a float fraction of its parameters).

        ``svd_method="randomized"`` is faster for a small rank of a large weight.
        """
        check_choice(svd_method, "svd_method", ("exact", "randomized"))
        spec = cls.check_layer(layer)
        r = cls.resolve_rank(spec, rank)
        weight = dense_weight_of(layer)
        second, first, _ = svd_factors(weight, r, method=svd_method, seed=seed)
        return cls.from_factors(first, second, dense_bias_of(layer))

    @classmethod
    def from_factors(
        cls, first_weight: torch.Tensor, second_weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """The layer ``x -> x @ first_weight.T @ second_weight.T + bias``.

        ``first_weight`` has shape ``(rank, in)``, ``second_weight`` ``(out, rank)``, ``bias`` ``(out,)``.
        """
        if first_weight.ndim != 2 or second_weight.ndim != 2 or first_weight.shape[0] != second_weight.shape[1]:
            raise ShapeError(
                f"first_weight {tuple(first_weight.shape)} (rank, in) and second_weight "
                f"{tuple(second_weight.shape)} (out, rank) do not fit together"
            )
        rank, in_features = first_weight.shape
        out_features = second_weight.shape[0]
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ShapeError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        layer = cls(
            in_features, out_features, rank, bias=bias is not None, device=first_weight.device, dtype=first_weight.dtype
        )
        with torch.no_grad():
            layer.first.weight.copy_(first_weight)
            layer.second.weight.copy_(second_weight)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    # ---- forward and inspection -------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    def bias_tensor(self) -> torch.Tensor | None:
        return self.second.bias

    def extra_repr(self) -> str:
        s = self.spec
        return f"in_features={s.in_features}, out_features={s.out_features}, rank={self.rank}, bias={s.bias}"
