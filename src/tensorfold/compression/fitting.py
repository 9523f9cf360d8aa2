"""Building the factored layer for one decision: data-aware when input statistics are known.

SVD-type layers (``LowRankLinear``; ``SVDConv`` channel and input schemes on an ungrouped Conv2d) are
fitted to their outputs by activation-whitened truncated SVD when a Gram matrix of their inputs is given
(see :mod:`tensorfold.compression.calibration`); every other case uses the layer class's own
``from_dense`` (weight-space fitting: truncated SVD, HOSVD, CP-ALS, TT-SVD).

>>> import torch
>>> from tensorfold.compression.fitting import build_factored
>>> layer = torch.nn.Linear(16, 8)
>>> built = build_factored(layer, "svd", 8)
>>> bool(torch.allclose(built(torch.ones(2, 16)), layer(torch.ones(2, 16)), atol=1e-5))
True
"""

from __future__ import annotations

from torch import nn

from tensorfold.compression.calibration import GramStats, whitened_lowrank
from tensorfold.errors import NotCompressibleError
from tensorfold.nn import METHODS, FactorizedLayer, LowRankLayer, layer_class_for
from tensorfold.nn.base import DenseSpec, compute_dtype


def supports_whitening(layer: nn.Module, method: str) -> bool:
    """True when ``method`` on ``layer`` can be fitted to its outputs by whitened SVD (a low-rank layer
    class that says so for this layer)."""
    found = layer_class_for(method, layer) if method in METHODS else None
    if found is None:
        return False
    cls, opts = found
    return issubclass(cls, LowRankLayer) and cls.whitenable(DenseSpec.of(layer), **opts)


def build_factored(layer: nn.Module, method: str, rank, stats: GramStats | None = None, *,
                   correct_upstream: bool = True, ridge: float = 1e-6, options: dict | None = None) -> FactorizedLayer:
    """The factored replacement of ``layer`` by ``method`` at ``rank`` (``options``: the plan's layer
    options, over the method's defaults).

    ``stats``: Gram matrix of the inputs (and optionally the cross Gram with the uncompressed
    model's inputs, used when ``correct_upstream``) for output-aware fitting.
    """
    found = layer_class_for(method, layer)
    if found is None:
        raise NotCompressibleError(f"method {method!r} does not apply to {type(layer).__name__}")
    cls, opts = found
    opts.update(options or {})
    spec = DenseSpec.of(layer)
    gram = None
    if stats is not None and stats.gram is not None and issubclass(cls, LowRankLayer):
        gram = cls.matrix_gram(spec, stats.gram, **opts)
    if gram is None:
        return cls.from_dense(layer, rank, **opts)
    rank = cls.resolve_rank(spec, rank, **opts)
    weight = layer.weight.detach()
    dtype = compute_dtype(weight)
    cross = cls.matrix_gram(spec, stats.cross, **opts) if correct_upstream and stats.cross is not None else None
    fit = whitened_lowrank(cls.matrices(weight, spec, **opts)[0], gram, rank, cross=cross, ridge=ridge)
    left = fit.second.to(device=weight.device, dtype=dtype)
    right = fit.first.to(device=weight.device, dtype=dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    return cls.from_lowrank(spec, [left], [right], bias, **opts).to(weight.dtype)
