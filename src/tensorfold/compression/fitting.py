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

import torch
from torch import nn

from tensorfold.compression.calibration import GramStats, channel_gram, whitened_lowrank
from tensorfold.compression.candidates import weight_matrix
from tensorfold.errors import NotCompressibleError
from tensorfold.nn import FactorizedLayer, LowRankLinear, layer_class_for
from tensorfold.nn.conv import input_matrix, input_scheme_weights


def supports_whitening(layer: nn.Module, method: str) -> bool:
    """True when ``method`` on ``layer`` can be fitted to its outputs by whitened SVD."""
    if method not in ("svd", "svd-input"):
        return False
    if isinstance(layer, nn.Linear):
        return method == "svd"
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and isinstance(layer.padding, tuple)


def build_factored(layer: nn.Module, method: str, rank, stats: GramStats | None = None, *,
                   correct_upstream: bool = True, ridge: float = 1e-6) -> FactorizedLayer:
    """The factored replacement of ``layer`` by ``method`` at ``rank``.

    ``stats``: Gram matrix of the inputs (and optionally the cross Gram with the uncompressed
    model's inputs, used when ``correct_upstream``) for output-aware fitting.
    """
    found = layer_class_for(method, layer)
    if found is None:
        raise NotCompressibleError(f"method {method!r} does not apply to {type(layer).__name__}")
    cls, opts = found
    usable = stats is not None and stats.gram is not None and supports_whitening(layer, method)
    if usable and stats.gram.shape[0] != weight_matrix(layer).shape[1]:
        usable = False
    if not usable:
        return cls.from_dense(layer, rank, **opts)
    rank = cls.resolve_rank(layer, rank, **opts)
    weight = layer.weight.detach()
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    cross = stats.cross if correct_upstream else None
    if method == "svd-input":  # the channels are projected first: fit against the channel statistics
        n_in = layer.in_channels
        cross = None if cross is None else channel_gram(cross, n_in)
        fit = whitened_lowrank(input_matrix(layer.weight.detach()), channel_gram(stats.gram, n_in), rank, cross=cross,
                               ridge=ridge)
    else:
        fit = whitened_lowrank(weight_matrix(layer), stats.gram, rank, cross=cross, ridge=ridge)
    first = fit.first.to(device=weight.device, dtype=dtype)
    second = fit.second.to(device=weight.device, dtype=dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    if isinstance(layer, nn.Linear):
        built = LowRankLinear.from_factors(first, second, bias)
    elif method == "svd-input":
        built = cls.from_factors(layer, *input_scheme_weights(second, first, layer.kernel_size), bias, **opts)
    else:
        k = tuple(layer.kernel_size)
        built = cls.from_factors(layer, first.reshape(rank, layer.in_channels, *k),
                                 second.reshape(layer.out_channels, rank, *([1] * len(k))), bias, **opts)
    return built.to(weight.dtype)
