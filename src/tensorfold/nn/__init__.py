"""Factorized drop-in replacements for trained nn.Linear and nn.ConvNd layers.

>>> import torch
>>> from tensorfold.nn import layer_class_for
>>> cls, opts = layer_class_for("svd", torch.nn.Conv2d(16, 32, 3))
>>> cls.__name__, opts
('SVDConv', {'scheme': 'channel'})
>>> layer = cls.from_dense(torch.nn.Conv2d(16, 32, 3), rank=0.5, **opts)
"""

from __future__ import annotations

import importlib

from torch import nn

from tensorfold.errors import InvalidArgumentError, TensorfoldError
from tensorfold.nn.base import (
    LAYER_KINDS,
    FactorizedLayer,
    LayerCost,
    LowRankLayer,
    dense_flops,
    dense_params,
)
from tensorfold.nn.linear import LowRankLinear

__all__ = [
    "FactorizedLayer",
    "LowRankLayer",
    "LAYER_KINDS",
    "layer_kind",
    "LayerCost",
    "LowRankLinear",
    "SVDConv",
    "TuckerConv",
    "CPConv",
    "TTLinear",
    "dense_params",
    "dense_flops",
    "measure_latency",
    "steady_allocator",
    "LatencyTable",
    "METHODS",
    "layer_class_for",
    "register_method",
]

# Layer families in their own modules, imported on first use.
_LAZY = {
    "SVDConv": "tensorfold.nn.conv",
    "TuckerConv": "tensorfold.nn.conv",
    "CPConv": "tensorfold.nn.conv",
    "TTLinear": "tensorfold.nn.tt_linear",
    "measure_latency": "tensorfold.nn.latency",
    "steady_allocator": "tensorfold.nn.latency",
    "LatencyTable": "tensorfold.nn.latency",
}

# planner method name -> {layer family: (class or class name, options)}; "linear" covers nn.Linear, "conv"
# nn.ConvNd. Open: register_method adds to it.
METHODS: dict[str, dict[str, tuple[str | type, dict]]] = {
    "svd": {"linear": ("LowRankLinear", {}), "conv": ("SVDConv", {"scheme": "channel"})},
    "spatial": {"conv": ("SVDConv", {"scheme": "spatial"})},
    "svd-input": {"conv": ("SVDConv", {"scheme": "input"})},
    "tucker": {"conv": ("TuckerConv", {})},
    "cp": {"conv": ("CPConv", {})},
    "tt": {"linear": ("TTLinear", {})},
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tensorfold.nn' has no attribute {name!r}")


def layer_kind(name: str) -> type[FactorizedLayer]:
    """The factorized layer class named ``name`` (every subclass of :class:`FactorizedLayer` registers itself).

    >>> layer_kind("TuckerConv").__name__
    'TuckerConv'
    """
    if name not in LAYER_KINDS:
        for module in set(_LAZY.values()):  # the built-in families register themselves when imported
            importlib.import_module(module)
    if name not in LAYER_KINDS:
        raise InvalidArgumentError(f"no factorized layer class {name!r}; known: {', '.join(sorted(LAYER_KINDS))}")
    return LAYER_KINDS[name]


def register_method(method: str, family: str, cls: type[FactorizedLayer] | str, options: dict | None = None) -> None:
    """Let planner ``method`` replace layers of ``family`` ("linear" or "conv") by ``cls`` built with ``options``.

    >>> from tensorfold.nn import LowRankLinear
    >>> register_method("svd-linear-only", "linear", LowRankLinear)
    >>> layer_class_for("svd-linear-only", nn.Linear(8, 8))[0].__name__
    'LowRankLinear'
    >>> del METHODS["svd-linear-only"]
    """
    if family not in ("linear", "conv"):
        raise InvalidArgumentError(f"family must be 'linear' or 'conv', got {family!r}")
    if not isinstance(method, str) or not method or "," in method or method == "dense":
        raise InvalidArgumentError(f"a method name is a non-empty string without commas (not 'dense'), got {method!r}")
    METHODS.setdefault(method, {})[family] = (cls, dict(options or {}))


def layer_class_for(method: str, layer: nn.Module) -> tuple[type[FactorizedLayer], dict] | None:
    """The factorized layer class and options for a planner ``method`` on ``layer``.

    Returns ``None`` when the method does not apply: a layer type the method does not cover (e.g.
    "tt" on a conv, "tucker" on a Linear, anything on an LSTM) or a layer the class refuses (the
    spatial scheme on a Conv1d/Conv3d or on a kernel with a side of 1).
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if isinstance(layer, nn.Linear):
        family = "linear"
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        family = "conv"
    else:
        return None
    entry = METHODS[method].get(family)
    if entry is None:
        return None
    cls, opts = entry
    if isinstance(cls, str):
        cls = globals()[cls] if cls in globals() else __getattr__(cls)
    try:
        cls.check_layer(layer, **opts)
    except TensorfoldError:
        return None
    return cls, dict(opts)
