"""Adapting a whole model: choosing the layers, wrapping them, merging, saving and loading the adapters.

>>> import torch, tensorfold as tf
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
>>> adapted = tf.adapt(model, tf.AdapterConfig(method="tt", rank=4, target_modules=["0"]))
>>> trainable_parameters(adapted)
(352, 3114)
>>> x = torch.randn(3, 32)
>>> bool(torch.equal(adapted(x), model(x)))
True
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tensorfold.adapters.config import AdapterConfig
from tensorfold.adapters.formats import factor_layout, layer_modes, n_cores_for
from tensorfold.adapters.layer import AdapterLayer, SharedFactors, _kind, shared_factor_tensors, weight_shape
from tensorfold.errors import FileFormatError, InvalidArgumentError, NotCompressibleError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterRow:
    """One layer an adapter would wrap: its name, type, weight shape, tensor modes and trainable parameters."""

    name: str
    layer: str
    weight_shape: tuple[int, ...]
    modes: tuple[int, ...]
    trainable: int


@dataclass(frozen=True)
class AdapterSummary:
    """What :func:`adapt` targets (``dry_run=True`` returns it): rows, and trainable vs all parameters."""

    method: str
    rows: tuple[AdapterRow, ...]
    trainable: int
    total: int
    saved_modules: tuple[str, ...] = ()

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"adapter {self.method}: {len(self.rows)} layers"]
        lines.append(f"{'layer':<{width}}  {'type':<12} {'weight':<18} {'modes':<22} trainable")
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {r.layer:<12} {'x'.join(map(str, r.weight_shape)):<18} "
                         f"{'x'.join(map(str, r.modes)):<22} {r.trainable:>9,}")
        if self.saved_modules:
            lines.append(f"trained in full: {', '.join(self.saved_modules)}")
        share = 100.0 * self.trainable / max(1, self.total)
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}")
        return "\n".join(lines)


def adapt(model: nn.Module, config: AdapterConfig | None = None, *, dry_run: bool = False, **options):
    """A copy of ``model`` whose target layers carry trainable factorized adapters (``model`` is untouched).

    Parameters
    ----------
    model: any ``torch.nn.Module``; its nn.Linear and nn.Conv1d/2d/3d layers (groups=1), and the inner
        layers or Linear-like factorized layers of a model compressed by tensorfold, can be adapted.
    config: an :class:`AdapterConfig`; keyword ``options`` build one (or override fields of ``config``).
    dry_run: print and return the :class:`AdapterSummary` of what would be adapted, build nothing.

    Returns the adapted copy: every parameter frozen except the adapters' factors and the parameters of
    ``modules_to_save``. A target that matches nothing, or matches a layer type an adapter cannot wrap,
    raises :class:`~tensorfold.errors.InvalidArgumentError` listing the layers that could be targeted.

    Example: ``adapted = tf.adapt(model, tf.AdapterConfig(method="tucker", rank=4, target_modules="all"))``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = AdapterConfig(**options)
    elif not isinstance(config, AdapterConfig):
        raise InvalidArgumentError(f"config must be an AdapterConfig, got {type(config).__name__}")
    elif options:
        config = dataclasses.replace(config, **options)
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise InvalidArgumentError("the model already carries adapters; merge/unload them or adapt the original")
    targets = select_targets(model, config)
    saved = _saved_modules(model, config)
    if dry_run:
        summary = describe(model, config)
        print(summary)
        return summary
    adapted = copy.deepcopy(model)
    for p in adapted.parameters():
        p.requires_grad_(False)
    modules = dict(adapted.named_modules())
    shared: dict[tuple, SharedFactors] = {}
    for index, name in enumerate(targets):
        base = modules[name]
        group = None
        if config.share_factors:
            shape = weight_shape(base)
            layout = factor_layout(config.method, layer_modes(shape, _cores(config, shape)), config.rank, len(shape))
            key = (shape, tuple(f.shape for f in layout))
            if key not in shared:
                ref = next(base.parameters())
                shared[key] = SharedFactors(shared_factor_tensors(layout, config.seed + 7919 * len(shared), ref))
                shared[key].to(device=ref.device, dtype=ref.dtype)
            group = shared[key]
        layer = AdapterLayer(
            base, config.method, config.rank, n_cores=config.n_cores, scaling=config.scaling,
            dropout=config.dropout, init=config.init, forward=config.forward, seed=config.seed + index, shared=group,
        )
        _set_module(adapted, name, layer)
    for name in saved:
        for p in adapted.get_submodule(name).parameters():
            p.requires_grad_(True)
    adapted.tensorfold_adapter = {"config": config, "targets": tuple(targets), "saved": tuple(saved)}
    return adapted


def _cores(config: AdapterConfig, shape) -> int:
    return n_cores_for(config.method, shape, config.n_cores)


def candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer an adapter can wrap, by name: Linear and Conv layers (groups=1), and factorized Linear
    layers that hold no inner Linear (TTLinear; a LowRankLinear offers its two inner Linear layers)."""
    out = []
    for name, module in model.named_modules():
        if not name or _kind(module) is None:
            continue
        if _kind(module) == "factorized" and any(
            _kind(m) in ("linear", "conv") for n, m in module.named_modules() if n
        ):
            continue
        if _inside_wrappable(model, name):
            continue
        out.append((name, module))
    return out


def _inside_wrappable(model: nn.Module, name: str) -> bool:
    """A Linear inside a Linear-like module we would wrap whole never counts separately."""
    parts = name.split(".")
    for k in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:k]))
        if _kind(parent) == "factorized" and not any(
            _kind(m) in ("linear", "conv") for n, m in parent.named_modules() if n
        ):
            return True
    return False


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def select_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the layers ``config`` adapts, in model order; clear errors when a target cannot be met."""
    cands = candidates(model)
    kinds = {name: _kind(m) for name, m in cands}
    listing = _listing(cands)
    target = config.target_modules
    if target in ("all-linear", "all-conv", "all"):
        wanted = {"all-linear": ("linear", "factorized"), "all-conv": ("conv",),
                  "all": ("linear", "factorized", "conv")}
        chosen = [n for n, _ in cands if kinds[n] in wanted[target]]
    elif isinstance(target, str):
        pattern = re.compile(target)
        chosen = [n for n, _ in cands if pattern.fullmatch(n)]
        if not chosen:
            others = [n for n, m in model.named_modules() if n and pattern.fullmatch(n)]
            if others:
                types = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in others[:10])
                raise InvalidArgumentError(
                    f"target_modules {target!r} matches only layers an adapter cannot wrap: {types}. "
                    f"Layers that can be adapted:\n{listing}"
                )
    else:
        chosen = []
        names = dict(model.named_modules())
        for key in target:
            hits = [n for n in names if n and _matches(n, key)]
            if not hits:
                raise InvalidArgumentError(f"target_modules entry {key!r} matches no module. Layers that can be "
                                           f"adapted:\n{listing}")
            bad = [n for n in hits if n not in kinds]
            if bad:
                types = ", ".join(f"{n} ({type(names[n]).__name__})" for n in bad[:10])
                raise InvalidArgumentError(
                    f"target_modules entry {key!r} matches {types}, which an adapter cannot wrap (adapters wrap "
                    f"nn.Linear, nn.Conv1d/2d/3d with groups=1 and Linear-like tensorfold layers). Layers that "
                    f"can be adapted:\n{listing}"
                )
            chosen += hits
    excluded = [n for n in chosen if any(_matches(n, key) for key in config.exclude_modules)]
    saved = config.modules_to_save
    chosen = [n for n in dict.fromkeys(chosen) if n not in excluded
              and not any(n == s or n.startswith(s + ".") or _matches(n, s) for s in saved)]
    order = [n for n, _ in cands]
    chosen.sort(key=order.index)
    if not chosen:
        raise InvalidArgumentError(f"target_modules {target!r} selects no layer to adapt (after exclusions). "
                                   f"Layers that can be adapted:\n{listing}")
    return chosen


def _listing(cands) -> str:
    if not cands:
        return "  (none: the model has no nn.Linear or nn.Conv layer)"
    lines = [f"  {n} ({type(m).__name__} {'x'.join(map(str, weight_shape(m)))})" for n, m in cands[:40]]
    if len(cands) > 40:
        lines.append(f"  ... and {len(cands) - 40} more")
    return "\n".join(lines)


def _saved_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    out = []
    for key in config.modules_to_save:
        hits = [n for n in names if _matches(n, key)]
        if not hits:
            raise InvalidArgumentError(f"modules_to_save entry {key!r} matches no module; modules: "
                                       f"{', '.join(names[:30])}{' ...' if len(names) > 30 else ''}")
        out += hits
    return list(dict.fromkeys(out))


def describe(model: nn.Module, config: AdapterConfig) -> AdapterSummary:
    """What :func:`adapt` would do with ``config``, without building anything."""
    targets = select_targets(model, config)
    saved = _saved_modules(model, config)
    modules = dict(model.named_modules())
    rows, seen_shared = [], set()
    for name in targets:
        shape = weight_shape(modules[name])
        modes = layer_modes(shape, _cores(config, shape))
        layout = factor_layout(config.method, modes, config.rank, len(shape))
        own = [f for f in layout if not (config.share_factors and f.role == "factor")]
        count = sum(math.prod(f.shape) for f in own)
        if config.share_factors:
            key = (shape, tuple(f.shape for f in layout))
            if key not in seen_shared:
                seen_shared.add(key)
                count += sum(math.prod(f.shape) for f in layout if f.role == "factor")
        rows.append(AdapterRow(name, type(modules[name]).__name__, shape, tuple(m.size for m in modes), count))
    full = sum(p.numel() for n in saved for p in modules[n].parameters())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(r.trainable for r in rows) + full
    return AdapterSummary(config.method, tuple(rows), trainable, total + trainable - full, tuple(saved))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / max(1, total)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter's update into its base weight, in place (outputs unchanged up to rounding)."""
    layers = adapter_layers(model)
    if not layers:
        raise InvalidArgumentError("the model carries no adapters to merge")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged update back out of its base weight, in place."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """A copy of ``model`` with every adapter layer replaced by its base layer: merged (the adapted model
    as plain layers, nothing extra at inference) or, with ``merge=False``, the original layers back."""
    if not merge and any(layer.init == "dota" for _, layer in adapter_layers(model)):
        raise InvalidArgumentError(
            "unload(merge=False) gives the original layers back, but an init='dota' adapter's base holds the "
            "residual W - scaling * delta W_0, not W: use the original model, or unload(merge=True)"
        )
    out = copy.deepcopy(model)
    for name, layer in adapter_layers(out):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_module(out, name, layer.base)
    for p in out.parameters():
        p.requires_grad_(True)
    if hasattr(out, "tensorfold_adapter"):
        del out.tensorfold_adapter
    return out


def _info(model: nn.Module) -> dict:
    info = getattr(model, "tensorfold_adapter", None)
    if not isinstance(info, dict):
        raise InvalidArgumentError("the model was not made by tensorfold.adapt (no adapter information on it)")
    return info


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' trainable tensors (each shared tensor once) and the modules trained in full."""
    info = _info(model)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, layer in adapter_layers(model):
        for pname, p in layer.named_parameters(prefix=name):
            if pname.startswith(f"{name}.base."):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                state[pname] = p.detach()
    for name in info["saved"]:
        module = model.get_submodule(name)
        for pname, t in [*module.named_parameters(prefix=name), *module.named_buffers(prefix=name)]:
            if id(t) not in seen:
                seen.add(id(t))
                state[pname] = t.detach()
    return state


def save_adapter(model: nn.Module, path) -> Path:
    """Write the adapters alone to directory ``path``: ``adapter.safetensors`` and ``adapter_config.json``."""
    from safetensors.torch import save_file

    from tensorfold.io import atomic_directory

    info = _info(model)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    header = {"format": "tensorfold-adapter", "version": FORMAT_VERSION, "config": info["config"].to_dict(),
              "targets": list(info["targets"]), "modules_to_save": list(info["saved"])}
    path = Path(path)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "tensorfold-adapter"})
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2, sort_keys=True))
    return path


def load_adapter(model: nn.Module, path) -> nn.Module:
    """``model`` (the base model the adapter was trained on) adapted with the adapter saved at ``path``.

    The frozen part comes from ``model``; with ``init="dota"`` its residual is recomputed from the same
    seeded decomposition. Returns a new model; ``model`` is untouched.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        header = json.loads((path / CONFIG_FILE).read_text())
        state = load_file(str(path / WEIGHTS_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise FileFormatError(f"cannot read an adapter from {path}: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != "tensorfold-adapter":
        raise FileFormatError(f"{path / CONFIG_FILE} is not a tensorfold adapter config")
    config = AdapterConfig.from_dict(header["config"])
    try:
        adapted = adapt(model, config)
    except (InvalidArgumentError, NotCompressibleError) as exc:
        raise FileFormatError(f"the adapter at {path} does not fit this model: {exc}") from None
    if list(adapted.tensorfold_adapter["targets"]) != header.get("targets"):
        raise FileFormatError(f"the adapter at {path} was trained on layers {header.get('targets')}, but this model "
                              f"offers {list(adapted.tensorfold_adapter['targets'])}")
    own = adapter_state_dict(adapted)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise FileFormatError(f"adapter file {path / WEIGHTS_FILE} does not match: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    with torch.no_grad():
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise FileFormatError(f"{key}: saved shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[key])
    return adapted
