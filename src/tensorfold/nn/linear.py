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

from tensorfold.core.validate import check_rank
from tensorfold.errors import NotCompressibleError
from tensorfold.nn.base import DenseSpec, LowRankLayer


class LowRankLinear(LowRankLayer):
    """``y = second(first(x))`` with ``first = Linear(in, rank, bias=False)``, ``second = Linear(rank, out)``.

    ``LowRankLinear(spec, rank)`` (``spec``: a :class:`~tensorfold.nn.base.DenseSpec` or an
    ``nn.Linear``) builds the structure; ``rank`` ranges from 1 to ``min(in_features, out_features)``
    (exact there). ``from_dense`` keeps the best rank-``rank`` approximation of the weight (truncated
    SVD, Eckart-Young).
    """

    def __init__(self, spec, rank: int, *, device=None, dtype=None):
        super().__init__()
        self.spec = spec = self.check_layer(spec)
        self.rank = self._validate_rank(spec, rank)
        self.first = nn.Linear(spec.in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(self.rank, spec.out_features, bias=spec.bias, device=device, dtype=dtype)

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

    # ---- the low-rank interface -------------------------------------------------------------------

    @classmethod
    def matrices(cls, weight: torch.Tensor, spec: DenseSpec, **opts) -> list[torch.Tensor]:
        return [weight]

    @classmethod
    def from_lowrank(cls, spec, lefts, rights, bias=None, **opts) -> LowRankLinear:
        """``W ~ left @ right``: ``left`` ``(out, r)`` is the second layer's weight, ``right`` ``(r, in)``
        the first's."""
        (left,), (right,) = lefts, rights
        return cls.from_factors(spec, [right, left], bias)

    @classmethod
    def whitenable(cls, spec: DenseSpec, **opts) -> bool:
        return True

    @classmethod
    def matrix_gram(cls, spec: DenseSpec, gram: torch.Tensor, **opts) -> torch.Tensor | None:
        return gram if tuple(gram.shape) == (spec.in_features, spec.in_features) else None

    def lowrank_sides(self) -> tuple[nn.Module, nn.Module]:
        return self.first, self.second

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def _rank_of_factors(cls, spec: DenseSpec, factors, **opts) -> int:
        """``factors``: ``[first_weight (rank, in), second_weight (out, rank)]``."""
        return int(factors[0].shape[0])

    def factor_weights(self) -> list[torch.Tensor]:
        return [self.first.weight, self.second.weight]

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
