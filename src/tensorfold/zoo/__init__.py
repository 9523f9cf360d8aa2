"""Built-in models that ship (or train) offline, with their calibration data and quality metrics.

A :class:`BuiltinModel` bundles what ``tensorfold compress --model NAME`` needs: how to load the
model, calibration batches (kept apart from the evaluation data), a quality evaluation comparing an
original with a compressed model, example inputs for speed measurements and, optionally, data for
fine-tuning. Entries live in their own modules and are imported on first use, so listing the names
imports nothing heavy. This package is a leaf: it never imports ``tensorfold.compression`` or ``tensorfold.nn``.

>>> from tensorfold import zoo
>>> "minilm" in zoo.names()
True
>>> entry = zoo.get("minilm")          # doctest: +SKIP
>>> model = entry.load()               # a SentenceTransformer, loaded offline  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tensorfold.errors import InvalidArgumentError

# name -> module exposing builtin(name) -> BuiltinModel
_REGISTRY: dict[str, str] = {
    "minilm": "tensorfold.zoo.minilm",
    "digits-cnn": "tensorfold.zoo.vision",
    "resnet20-shapes": "tensorfold.zoo.vision",
}


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model and the data that goes with it.

    ``calibration(n, seed)`` returns a list of input batches holding ``n`` samples in all (tensors,
    tuples whose first item is the input, or dicts of keyword inputs); ``evaluate(original,
    compressed)`` returns quality metrics (higher is better unless the name says otherwise);
    ``example_inputs(batch_size)`` one input batch for speed measurements; ``finetune_data(batch_size,
    seed)`` optional ``(train, val)`` iterables of batches. ``exclude`` lists name patterns of layers a
    plan skips by default (e.g. layers whose output the model never uses); ``output_fn`` extracts
    the tensor to compare from the model's output. ``extra`` may carry a fine-tuning recipe:
    ``finetune_recipe="transformers"`` and ``finetune_<setting>`` values (see
    :func:`tensorfold.compression.finetune.model_finetune_config`).
    """

    name: str
    description: str
    load: Callable[[], Any]
    calibration: Callable[..., list]
    evaluate: Callable[[Any, Any], dict[str, float]]
    example_inputs: Callable[[int], Any]
    finetune_data: Callable[..., tuple] | None = None
    exclude: tuple[str, ...] = ()
    output_fn: Callable[[Any], Any] | None = None
    extra: dict = field(default_factory=dict)


def calibration_samples(entry: BuiltinModel, wanted: int) -> tuple[int, str | None]:
    """``wanted`` calibration samples, or all of ``entry``'s calibration corpus when it holds fewer
    (``extra["calibration_limit"]``); the second item says so when it clamped (else None).

    Defaults (256 samples in a sweep) must work for every built-in model; an explicit count is the
    caller's to check.
    """
    limit = entry.extra.get("calibration_limit")
    if limit is not None and wanted > limit:
        return int(limit), (f"{entry.name} has {limit} calibration samples; using all of them "
                            f"(the default asks {wanted})")
    return wanted, None


def names() -> list[str]:
    """Names of the built-in models."""
    return sorted(_REGISTRY)


def get(name: str) -> BuiltinModel:
    """The built-in model called ``name`` (see :func:`names`)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidArgumentError(f"unknown built-in model {name!r}; choose one of {', '.join(names())}")
    module = importlib.import_module(_REGISTRY[name])
    return module.builtin(name)


__all__ = ["BuiltinModel", "calibration_samples", "get", "names"]
