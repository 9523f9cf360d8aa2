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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

from torch import nn

from tensorfold.compression.api import apply, plan
from tensorfold.compression.config import CompressConfig, FinetuneConfig, check_budget
from tensorfold.compression.finetune import finetune as run_finetune
from tensorfold.compression.plan import Plan
from tensorfold.compression.replace import densify
from tensorfold.core.validate import check_count
from tensorfold.errors import InvalidArgumentError

__all__ = ["iterative_compress", "IterativeResult", "budget_schedule", "densify"]


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
    check_count(steps, "steps", minimum=1)
    return [budget ** (k / steps) for k in range(1, steps + 1)]


def iterative_compress(
    model: nn.Module,
    config: CompressConfig | float | None = None,
    *,
    data: Iterable,
    steps: int = 3,
    teacher: nn.Module | None = None,
    calib=None,
    example_inputs=None,
    finetune: FinetuneConfig | None = None,
    val_data: Iterable | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    **settings,
) -> IterativeResult:
    """Compress ``model`` to ``config.budget`` in ``steps`` rounds of plan + apply + fine-tune.

    ``config`` (a :class:`~tensorfold.compression.config.CompressConfig` or a budget) and
    ``finetune`` (a :class:`~tensorfold.compression.config.FinetuneConfig`, one epoch per round by
    default) hold the settings; keyword ``settings`` amend them by name (``methods``, ``allocator``,
    ``target``... go to the compression config, ``lr``, ``epochs``, ``progress``... to the fine-tuning
    config; ``seed`` to both, fine-tuning round ``k`` using ``seed + k``). ``data``, ``val_data`` and
    ``teacher`` (default: ``model`` itself) go to :func:`tensorfold.finetune`; ``calib`` batches and
    ``example_inputs`` to :func:`tensorfold.plan`. ``evaluate(model) -> dict`` (optional) is recorded
    after every round. ``model`` is not modified.
    """
    compress_names = {f.name for f in fields(CompressConfig)}
    finetune_names = {f.name for f in fields(FinetuneConfig)}
    if "epochs_per_step" in settings:  # the name of older releases
        settings["epochs"] = settings.pop("epochs_per_step")
    unknown = sorted(set(settings) - compress_names - finetune_names)
    if unknown:
        raise InvalidArgumentError(f"unknown setting(s) {', '.join(unknown)} for iterative_compress")
    cfg = CompressConfig.of(config, **{k: v for k, v in settings.items() if k in compress_names})
    tune = FinetuneConfig.build(finetune, **{k: v for k, v in settings.items() if k in finetune_names})
    budgets = budget_schedule(cfg.budget, steps)
    teacher = model if teacher is None else teacher
    current, last_plan, rounds = model, None, []
    for k, b in enumerate(budgets, start=1):
        dense = densify(current) if k > 1 else model
        last_plan = plan(dense, cfg.replace(budget=b, curve=False), calib=calib, example_inputs=example_inputs)
        compressed = apply(dense, last_plan, calib)
        current = run_finetune(compressed, data, tune.replace(seed=tune.seed + k), teacher=teacher,
                               val_data=val_data)
        record = {"round": k, "budget": b, "fraction": last_plan.fraction}
        if evaluate is not None:
            record.update(evaluate(current))
        rounds.append(record)
    return IterativeResult(current, last_plan, rounds)
