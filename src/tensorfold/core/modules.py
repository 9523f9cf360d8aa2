"""Small helpers for torch modules and batches that every floor shares (one definition each).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
>>> with eval_mode(net):
...     net.training, net[1].training
(False, False)
>>> net.training
True
>>> move_to({"x": torch.zeros(2), "n": 3}, "cpu")["n"]
3
>>> batch_input((torch.zeros(4, 2), torch.zeros(4)))
tensor([[0., 0.],
        [0., 0.],
        [0., 0.],
        [0., 0.]])
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["eval_mode", "move_to", "module_device", "batch_input", "Batch", "split_batch", "call_model", "takes_dict",
           "set_submodule"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put models in eval mode (no dropout, frozen batch-norm statistics) and restore every module's flag."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def move_to(obj, device):
    """``obj`` with every tensor in it (nested dicts, tuples and lists) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---- reading a batch (one reading for calibration, evaluation and training) -------------------------
# A batch is a tensor (the input), a dict (keyword inputs, Hugging Face style) or a tuple/list whose
# first item is the input and whose second, when training, holds the targets.


def batch_input(batch):
    """The model input of a batch: the first item of a tuple/list batch ``(inputs, targets...)``, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def takes_dict(model: nn.Module, batch: Mapping) -> bool:
    """True when ``forward`` wants the dict as one positional argument (its required first
    parameter is not one of the dict's keys), as ``SentenceTransformer.forward(input)`` does."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        return False
    first = positional[0]
    return first.default is inspect.Parameter.empty and first.name not in batch


@dataclass(frozen=True)
class Batch:
    """One batch split into model inputs (positional ``args`` or keyword ``kwargs``) and optional targets."""

    args: tuple
    kwargs: dict
    targets: Any = None

    @classmethod
    def of_input(cls, inputs, targets=None) -> Batch:
        """A dict of inputs goes in as keywords, anything else as the one positional input."""
        if isinstance(inputs, Mapping):
            return cls((), dict(inputs), targets)
        return cls((inputs,), {}, targets)

    def to(self, device) -> Batch:
        return Batch(move_to(self.args, device), move_to(self.kwargs, device), move_to(self.targets, device))

    def __call__(self, model: nn.Module):
        if not self.args and self.kwargs and takes_dict(model, self.kwargs):
            # SentenceTransformer-style forward(features): the dict goes in whole, as a fresh copy
            # because such models add their outputs to it.
            return model(dict(self.kwargs))
        return model(*self.args, **self.kwargs)


def split_batch(item) -> Batch:
    """A training batch: a tensor or a dict is an input batch alone; an ``(inputs, targets)`` pair
    carries targets; a 1-tuple is inputs alone."""
    from tensorfold.errors import ShapeError

    if isinstance(item, (tuple, list)):
        if len(item) == 0 or len(item) > 2:
            raise ShapeError(f"a batch must be inputs or (inputs, targets); got a sequence of {len(item)} items")
        return Batch.of_input(item[0], item[1] if len(item) == 2 else None)
    if isinstance(item, (torch.Tensor, Mapping)):
        return Batch.of_input(item)
    raise ShapeError(f"a batch must be a tensor, a dict of inputs or an (inputs, targets) pair, got {type(item)}")


def call_model(model: nn.Module, batch):
    """Run ``model`` on the input of one batch (anything after the input in a tuple batch is ignored),
    moved to the model's device."""
    return Batch.of_input(batch_input(batch)).to(module_device(model))(model)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new`` (model surgery itself is
    :func:`tensorfold.compression.replace.replace_layers`' job; this is its one primitive)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
