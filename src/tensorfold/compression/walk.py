"""Finding the layers of a model that a plan can factorize.

Walks ``model.named_modules()``, keeps ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers (not those already
inside a factorized layer), applies include/exclude name patterns (shell-style, ``fnmatch``), and lists
every layer it leaves out with the reason: no method applies (e.g. a grouped conv no class can factor),
or factoring cannot save anything at any rank.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
>>> found = find_layers(model, methods=("svd",))
>>> [layer.name for layer in found.layers], [s.name for s in found.skipped]
(['0'], ['2'])
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from tensorfold.errors import InvalidArgumentError, NotCompressibleError, TensorfoldError
from tensorfold.nn import METHODS, FactorizedLayer, dense_params, layer_class_for

DENSE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerRef:
    """A dense layer of the model, by its dotted name."""

    name: str
    module: nn.Module

    @property
    def kind(self) -> str:
        return "linear" if isinstance(self.module, nn.Linear) else type(self.module).__name__.lower()


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


@dataclass
class FoundLayers:
    layers: list[LayerRef] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)


def _patterns(patterns) -> tuple[str, ...]:
    """Patterns as a tuple (already validated by CompressConfig; a single string is one pattern)."""
    if patterns is None:
        return ()
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _smallest_saving(layer: nn.Module, methods: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Methods that apply to ``layer`` and can save parameters; or the reason none can."""
    applicable, reasons = [], []
    dense = dense_params(layer)
    for method in methods:
        found = layer_class_for(method, layer)
        if found is None:
            continue
        cls, opts = found
        try:
            smallest = cls.cost(layer, smallest_rank(cls, layer, opts), _probe_shape(layer), **opts)
        except TensorfoldError as exc:
            reasons.append(f"{method}: {exc}")
            continue
        if smallest.params < dense:
            applicable.append(method)
        else:
            reasons.append(f"{method}: even the smallest rank has {smallest.params} >= {dense} parameters")
    if applicable:
        return applicable, None
    if not reasons:
        return [], f"no method of ({', '.join(methods)}) applies to {_describe(layer)}"
    return [], "factoring saves nothing (" + "; ".join(reasons) + ")"


def smallest_rank(cls, layer: nn.Module, opts: dict):
    """The smallest rank ``cls`` offers for ``layer`` (a tiny parameter fraction resolves to it)."""
    return cls.resolve_rank(layer, 1e-9, **opts)


def _probe_shape(layer: nn.Module) -> tuple[int, ...]:
    """A small input shape for cost queries that only need the parameter count."""
    if isinstance(layer, nn.Linear):
        return (1, layer.in_features)
    k = layer.kernel_size
    dims = len(k)
    size = [max(int(k[i]) * int(layer.dilation[i]), 1) + 8 for i in range(dims)]
    return (1, layer.in_channels, *size)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear({layer.in_features}, {layer.out_features})"
    extra = f", groups={layer.groups}" if getattr(layer, "groups", 1) != 1 else ""
    return f"{type(layer).__name__}({layer.in_channels}, {layer.out_channels}, {tuple(layer.kernel_size)}{extra})"


def find_layers(
    model: nn.Module,
    *,
    methods: Sequence[str] = ("svd",),
    include=None,
    exclude=None,
) -> FoundLayers:
    """The layers of ``model`` a plan may factorize, and the skipped ones with reasons.

    ``include``/``exclude``: shell-style patterns on dotted module names (``"encoder.*.dense"``);
    an include pattern that matches no Linear/Conv layer raises :class:`InvalidArgumentError`.
    Raises :class:`NotCompressibleError` when no layer can be factorized.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # only layer methods pick layers here; other registered methods (tensorfold.compression.methods)
    # find their own targets
    methods = tuple(m for m in methods if m in METHODS)
    include_p, exclude_p = _patterns(include), _patterns(exclude)
    dense: list[tuple[str, nn.Module]] = []
    inside_factored: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            inside_factored.add(name)
            continue
        if any(name.startswith(prefix + ".") for prefix in inside_factored):
            continue
        if isinstance(module, DENSE_TYPES) and not getattr(module, "transposed", False):
            dense.append((name, module))
    if not dense:
        raise NotCompressibleError(f"{type(model).__name__} has no nn.Linear or nn.Conv1d/2d/3d layer to factorize")
    unmatched = [p for p in include_p if not any(fnmatch.fnmatchcase(n, p) for n, _ in dense)]
    if unmatched:
        raise InvalidArgumentError(
            f"include pattern(s) {', '.join(map(repr, unmatched))} match no Linear/Conv layer; "
            f"layer names look like {', '.join(repr(n) for n, _ in dense[:3])}"
        )
    found = FoundLayers()
    for name, module in dense:
        if include_p and not _matches(name, include_p):
            continue
        if _matches(name, exclude_p):
            found.skipped.append(SkippedLayer(name, "excluded by pattern"))
            continue
        applicable, reason = _smallest_saving(module, methods)
        if reason is not None:
            found.skipped.append(SkippedLayer(name, reason))
            continue
        found.layers.append(LayerRef(name, module))
    if not found.layers:
        why = "; ".join(f"{s.name}: {s.reason}" for s in found.skipped[:5])
        raise NotCompressibleError(f"no layer of {type(model).__name__} can be factorized with a saving ({why})")
    return found
