"""Tensorized adapters: fine-tune a frozen model through small TT, Tucker, CP, tensor-ring or LoRA updates.

``tensorfold.adapt(model, config)`` returns a copy of ``model`` whose chosen Linear and Conv layers each
carry a trainable factorized update ``scaling * delta W`` next to their frozen weight; ``merge`` folds
the updates in, ``save_adapter``/``load_adapter`` keep the adapters alone (safetensors + JSON).
This package sits beside ``tensorfold.compress``: it uses ``nn``, ``decomp`` and ``core`` only.

>>> import torch, tensorfold as tf
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
>>> adapted = tf.adapt(model, tf.AdapterConfig(method="tucker", rank=3, exclude_modules=("2",)))
>>> tf.adapters.trainable_parameters(adapted)[0]
801
"""

from tensorfold.adapters.config import METHODS, AdapterConfig
from tensorfold.adapters.layer import AdapterLayer, SharedFactors
from tensorfold.adapters.model import (
    AdapterRow,
    AdapterSummary,
    adapt,
    adapter_layers,
    adapter_state_dict,
    candidates,
    describe,
    load_adapter,
    merge,
    print_trainable_parameters,
    save_adapter,
    select_targets,
    trainable_parameters,
    unload,
    unmerge,
)

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterRow",
    "AdapterSummary",
    "SharedFactors",
    "adapt",
    "adapter_layers",
    "adapter_state_dict",
    "candidates",
    "describe",
    "load_adapter",
    "merge",
    "print_trainable_parameters",
    "save_adapter",
    "select_targets",
    "trainable_parameters",
    "unload",
    "unmerge",
]
