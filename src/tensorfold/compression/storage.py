"""Saving and loading compressed models: ``plan.json`` plus the weights as safetensors.

The directory holds ``plan.json`` (the plan, with the model's source: a built-in name or
``module:factory``) and ``weights.safetensors`` (the compressed model's full state dict: the factor
weights and every other parameter, so fine-tuned models round-trip too). Loading rebuilds the
base model (from the zoo for a built-in model, by calling the factory for ``module:factory``, or the
``base_model`` you pass), swaps in factored layers of the planned structure, and loads the weights.
The directory is written to a temporary sibling and renamed, so it never exists half-written.

>>> import torch, tempfile, tensorfold as tf
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> small, p = tf.compress(model, budget=0.5, methods=("svd",))
>>> d = tempfile.mkdtemp() + "/out"
>>> tf.save_compressed(small, p, d)
>>> again = tf.load_compressed(d, base_model=model)
>>> x = torch.randn(4, 32)
>>> bool(torch.equal(again(x), small(x)))
True
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from tensorfold.compression.candidates import build_skeleton
from tensorfold.compression.plan import Plan
from tensorfold.compression.walk import set_submodule
from tensorfold.errors import FileFormatError, InvalidArgumentError, TensorfoldError
from tensorfold.io import atomic_directory
from tensorfold.nn import layer_class_for
from tensorfold.nn.base import DenseSpec

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage (tied weights): store independent contiguous copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def write_compressed(model: nn.Module, plan: Plan, directory: Path, extra_files: dict[str, str] | None = None) -> None:
    """Write plan and weights (and ``extra_files``: name -> text) into an existing ``directory``."""
    from safetensors.torch import save_file

    (directory / PLAN_FILE).write_text(plan.to_json())
    save_file(_state_tensors(model), str(directory / WEIGHTS_FILE), metadata={"format": "tensorfold-compressed"})
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)


def save_compressed(model: nn.Module, plan: Plan, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``plan.json`` and ``weights.safetensors`` for ``model`` into ``directory`` (atomically)."""
    if not isinstance(plan, Plan):
        raise InvalidArgumentError(f"plan must be a tensorfold Plan, got {type(plan).__name__}")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_compressed(model, plan, tmp)


def _base_from_source(source: str | None) -> nn.Module:
    if not source:
        raise InvalidArgumentError("this plan does not name its model; pass base_model=")
    from tensorfold import zoo

    if source in zoo.names():
        return zoo.get(source).load()
    if ":" in source:
        return load_factory(source)()
    raise InvalidArgumentError(f"cannot rebuild the model {source!r}; pass base_model=")


def load_factory(spec: str):
    """The callable named by ``"module:function"`` (``module`` importable from ``sys.path``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidArgumentError(f"a model factory is given as 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(f"cannot import {module_name!r} for the model factory: {exc}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InvalidArgumentError(f"{module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise InvalidArgumentError(f"{spec!r} is not callable")
    return factory


def restructure(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by uninitialised factored layers."""
    for lp in plan.layers:
        if not lp.factored:
            continue
        try:
            layer = model.get_submodule(lp.name)
        except AttributeError:
            raise FileFormatError(f"the saved plan's layer {lp.name!r} is not in the base model") from None
        found = layer_class_for(lp.method, layer)
        if found is None:
            raise FileFormatError(f"method {lp.method!r} does not apply to the base model's layer {lp.name!r}")
        cls, opts = found
        opts.update(lp.options)
        weight = layer.weight
        set_submodule(model, lp.name, build_skeleton(cls, DenseSpec.of(layer), lp.rank, opts,
                                                     dtype=weight.dtype, device=weight.device))
    return model


def load_compressed(directory: str | os.PathLike, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` (``base_model`` is not modified)."""
    import copy

    from safetensors.torch import load_file

    directory = Path(directory)
    plan = Plan.load(directory / PLAN_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileFormatError(f"{weights_path}: no such file")
    base = copy.deepcopy(base_model) if base_model is not None else _base_from_source(plan.model_name)
    model = restructure(base, plan)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise FileFormatError(f"{weights_path}: cannot read ({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(f"{weights_path} does not fit the rebuilt model: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model


def read_plan(directory: str | os.PathLike) -> Plan:
    """The plan saved in ``directory``."""
    return Plan.load(Path(directory) / PLAN_FILE)


def read_metrics(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: {exc}") from None


__all__ = ["load_compressed", "save_compressed", "load_factory", "read_plan", "TensorfoldError"]
