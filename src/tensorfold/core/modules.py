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
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["eval_mode", "move_to", "module_device", "batch_input", "set_submodule"]


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


def batch_input(batch):
    """The model input of a batch: the first item of a tuple/list batch ``(inputs, targets...)``, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new`` (model surgery itself is
    :func:`tensorfold.compression.replace.replace_layers`' job; this is its one primitive)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
