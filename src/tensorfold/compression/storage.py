"""Saving and loading compressed models: ``plan.json`` plus the weights as safetensors.

The directory holds ``plan.json`` (the plan, with the model's source: a built-in name or
``module:factory``) and ``weights.safetensors`` (the compressed model's full state dict: the factor
weights and every other parameter, so fine-tuned models round-trip too). Loading rebuilds the
base model (the ``base_model`` or ``factory`` you pass, else from the zoo for a built-in model),
swaps in factored layers of the planned structure, and loads the weights. The directory is written to
a temporary sibling and renamed, so it never exists half-written.

Opening a directory is as safe as opening a safetensors file: a ``module:factory`` named in
``plan.json`` is data, never imported or called unless the caller says it trusts the directory
(``trust_factory=True``; ``--trust-factory`` on the command line). A plan saying ``"os:abort"`` is
refused with an error that says how to opt in.

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

from tensorfold.compression.plan import Plan
from tensorfold.compression.replace import replace_layers
from tensorfold.errors import FileFormatError, InvalidArgumentError, ShapeError, TensorfoldError
from tensorfold.io import atomic_directory

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


def user_factory_named(directory: str | os.PathLike) -> str | None:
    """The ``module:factory`` that loading ``directory`` without a base model would import and call, or None
    (a built-in model, a Hugging Face directory rebuilt from its data files, or no model named).

    Reads ``plan.json`` only: callers (a CLI command) can refuse before anything is rebuilt."""
    directory = Path(directory)
    if (directory / "hf.json").is_file():
        return None
    source = Plan.load(directory / PLAN_FILE).model_name
    return source if _is_user_factory(source) else None


def _is_user_factory(source: str | None) -> bool:
    from tensorfold import zoo

    return bool(source) and source not in zoo.names() and ":" in source


def _base_from_source(source: str | None, trust_factory: bool = False) -> nn.Module:
    if not source:
        raise InvalidArgumentError("this plan does not name its model; pass base_model=")
    from tensorfold import zoo

    if source in zoo.names():
        return zoo.get(source).load()  # built from shipped data only
    if _is_user_factory(source):
        if not trust_factory:
            raise InvalidArgumentError(
                f"the saved plan names the model factory {source!r}; loading would import and run that code. "
                "Pass base_model= (the uncompressed model) or factory= (a callable), or trust_factory=True "
                "(--trust-factory on the command line) if you trust this directory")
        return call_factory(load_factory(source), source)
    raise InvalidArgumentError(f"cannot rebuild the model {source!r}; pass base_model=")


def call_factory(factory, spec: str) -> nn.Module:
    """``factory()`` as a model: a factory that needs arguments, raises or returns something else is a
    clear error naming ``spec`` (the user's code, so the cause is kept for ``--debug``)."""
    import inspect

    try:
        required = [p.name for p in inspect.signature(factory).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # builtins without a signature
        required = []
    if required:
        raise InvalidArgumentError(f"the model factory {spec} needs arguments ({', '.join(required)}); "
                                   "it must build the model when called with none")
    try:
        model = factory()
    except TensorfoldError:
        raise
    except Exception as exc:
        raise InvalidArgumentError(f"the model factory {spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"the model factory {spec} returned a {type(model).__name__}, "
                                   "not a torch.nn.Module")
    return model


def describe_state_mismatch(model: nn.Module, state: dict) -> str:
    """Every difference between ``model``'s state dict and ``state``: missing and unexpected keys and
    shape mismatches (the first few of each, with counts), on one line."""
    own = model.state_dict()

    def some(names, n=6):
        names = sorted(names)
        return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")

    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)} expected" for k in sorted(set(own) & set(state))
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:6])}"
                     f"{f' and {len(shapes) - 6} more' if len(shapes) > 6 else ''})")
    return "; ".join(parts) or "the tensors do not load"


def load_state(model: nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch is one FileFormatError with all of it."""
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        detail = describe_state_mismatch(model, state) if isinstance(state, dict) else str(exc)
        raise FileFormatError(f"{what} does not fit the model: {detail}") from None


def load_factory(spec: str):
    """The callable named by ``"module:function"``: ``module`` is imported from ``sys.path``, else from the
    working directory (as ``python -m`` would find it: ``mymodels:build`` beside ``mymodels.py``).

    This imports and so runs the module's code: only for names the user gave, never for names read
    from a file unless the caller trusts it (see :func:`load_compressed`).
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidArgumentError(f"a model factory is given as 'module:function', got {spec!r}")
    try:
        module = _import_user_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(f"cannot import {module_name!r} for {spec}: {exc} (looked in sys.path and "
                                   f"the working directory {os.getcwd()})") from None
    except Exception as exc:  # the user's module failed while importing
        raise InvalidArgumentError(f"importing {module_name!r} for {spec} raised {type(exc).__name__}: {exc}"
                                   ) from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InvalidArgumentError(f"{module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise InvalidArgumentError(f"{spec!r} is not callable")
    return factory


def _import_user_module(module_name: str):
    import sys

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.partition(".")[0]
        cwd = os.getcwd()
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise
    # appended, not prepended: a file in the working directory never shadows an installed module
    sys.path.append(cwd)
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def restructure(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by factored layers with placeholder weights."""
    try:
        return replace_layers(model, plan, "empty", inplace=True)
    except ShapeError as exc:
        raise FileFormatError(f"the saved plan does not fit the base model: {exc}") from None


def load_compressed(directory: str | os.PathLike, base_model: nn.Module | None = None, *,
                    factory=None, trust_factory: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` (``base_model`` is not modified).

    The uncompressed model comes from ``base_model``, else ``factory()``, else the built-in model the
    plan names. A ``module:function`` named in the plan is imported and called only with
    ``trust_factory=True``: a directory from elsewhere cannot make this call run code.
    """
    import copy

    from safetensors.torch import load_file

    directory = Path(directory)
    plan = Plan.load(directory / PLAN_FILE)
    if base_model is None and factory is None and (directory / "hf.json").is_file():
        # a Hugging Face / sentence-transformers model: rebuilt from its base directory's data files
        from tensorfold.compression.hf_storage import load_hf_compressed

        return load_hf_compressed(directory, plan)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileFormatError(f"{weights_path}: no such file")
    if base_model is not None:
        base = copy.deepcopy(base_model)
    elif factory is not None:
        if not callable(factory):
            raise InvalidArgumentError(f"factory must be callable, got {type(factory).__name__}")
        base = call_factory(factory, getattr(factory, "__qualname__", "factory"))
    else:
        base = _base_from_source(plan.model_name, trust_factory)
    model = restructure(base, plan)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise FileFormatError(f"{weights_path}: cannot read ({type(exc).__name__}: {exc})") from None
    load_state(model, state, str(weights_path))
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


__all__ = ["load_compressed", "save_compressed", "load_factory", "call_factory", "read_plan", "user_factory_named",
           "TensorfoldError"]
