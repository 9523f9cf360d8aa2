"""Iterative compression: compress a little, fine-tune, repeat down to the target budget.

ALDS (Liebenwein et al. 2021) and others report that several small compress/fine-tune rounds keep
more accuracy than one big cut. Each round here multiplies the budget by the same factor
(``budget ** (k / steps)`` after round ``k``), plans and applies it with :func:`tensorfold.plan` /
:func:`tensorfold.apply` on the *dense form* of the current model (every factorized layer folded back
into a plain Linear/Conv), so the budget always refers to the original layers, and then fine-tunes
with distillation from the original model. Folding back is exact: the re-plan at the next budget
starts from the fine-tuned low-rank weights.

>>> import torch, tensorfold as tf
>>> from tensorfold.compression.iterative import iterative_compress
>>> g = torch.Generator().manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> data = [torch.randn(32, 16, generator=g) for _ in range(4)]
>>> result = iterative_compress(model, 0.4, data=data, steps=2, methods=("svd",), progress=False)
>>> result.plan.fraction <= 0.4
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from tensorfold.compression.allocators import check_budget
from tensorfold.compression.api import DEFAULT_METHODS, apply, plan
from tensorfold.compression.finetune import finetune
from tensorfold.compression.plan import Plan
from tensorfold.compression.walk import set_submodule
from tensorfold.errors import InvalidArgumentError
from tensorfold.nn import FactorizedLayer


@dataclass
class IterativeResult:
    """The final model and plan, and one record per round (budget, achieved fraction, metrics)."""

    model: nn.Module
    plan: Plan
    rounds: list[dict] = field(default_factory=list)


def budget_schedule(budget: float, steps: int) -> list[float]:
    """Geometric budgets from 1 down to ``budget`` in ``steps`` rounds: ``budget ** (k / steps)``.

    >>> [round(b, 3) for b in budget_schedule(0.25, 2)]
    [0.5, 0.25]
    """
    check_budget(budget)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be a positive integer, got {steps!r}")
    return [budget ** (k / steps) for k in range(1, steps + 1)]


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every factorized layer replaced by its equivalent dense layer."""
    dense = copy.deepcopy(model)
    factored = [name for name, m in dense.named_modules() if isinstance(m, FactorizedLayer)]
    outermost = [n for n in factored if not any(n.startswith(p + ".") for p in factored if p != n)]
    for name in outermost:
        set_submodule(dense, name, dense.get_submodule(name).to_dense())
    return dense


def iterative_compress(
    model: nn.Module,
    budget: float,
    *,
    data: Iterable,
    steps: int = 3,
    teacher: nn.Module | None = None,
    target: str = "params",
    methods: Sequence[str] | str = DEFAULT_METHODS,
    allocator: str = "auto",
    calib=None,
    example_inputs=None,
    epochs_per_step: int = 1,
    val_data: Iterable | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    seed: int = 0,
    progress: bool = True,
    **finetune_options,
) -> IterativeResult:
    """Compress ``model`` to ``budget`` in ``steps`` rounds of plan + apply + fine-tune.

    ``data`` (and ``val_data``, ``teacher``, ``finetune_options``) go to :func:`tensorfold.finetune`;
    the teacher defaults to ``model`` itself. ``calib`` batches, ``methods``, ``allocator``, ``target``
    and ``example_inputs`` go to :func:`tensorfold.plan`. ``evaluate(model) -> dict`` (optional) is
    recorded after every round. ``model`` is not modified.
    """
    budgets = budget_schedule(budget, steps)
    teacher = model if teacher is None else teacher
    current, last_plan, rounds = model, None, []
    for k, b in enumerate(budgets, start=1):
        dense = densify(current) if k > 1 else model
        last_plan = plan(dense, b, target=target, methods=methods, allocator=allocator, calib=calib,
                         example_inputs=example_inputs, curve=False)
        compressed = apply(dense, last_plan, calib)
        current = finetune(compressed, data, teacher=teacher, epochs=epochs_per_step, val_data=val_data,
                           seed=seed + k, progress=progress, **finetune_options)
        record = {"round": k, "budget": b, "fraction": last_plan.fraction}
        if evaluate is not None:
            record.update(evaluate(current))
        rounds.append(record)
    return IterativeResult(current, last_plan, rounds)
