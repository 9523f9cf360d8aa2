"""The settings of a compression, checked once: :class:`CompressConfig` (and :class:`FinetuneConfig`).

In the spirit of PEFT's ``LoraConfig``: a frozen dataclass validated in ``__post_init__`` with
tensorfold's exceptions, serialised with the result (a :class:`~tensorfold.compression.plan.Plan`
stores its config in ``plan.json``) and passed whole to the entry points: ``tensorfold.plan(model,
config)``, ``tensorfold.compress(model, config)``, ``sweep``, ``iterative_compress``. Keyword
arguments of those entry points build the config (``tensorfold.plan(model, budget=0.3)``); nothing
below them checks a setting again.

>>> from tensorfold.compression.config import CompressConfig
>>> cfg = CompressConfig(budget=0.3, methods="svd,tucker", exclude="head")
>>> cfg.methods, cfg.exclude
(('svd', 'tucker'), ('head',))
>>> CompressConfig.from_json(cfg.to_json()) == cfg
True
>>> CompressConfig(budget=1.5)
Traceback (most recent call last):
...
tensorfold.errors.InvalidArgumentError: budget must be a fraction in (0, 1], got 1.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tensorfold.compression.methods import PRESETS, expand_presets, known_methods
from tensorfold.core.settings import Settings
from tensorfold.core.validate import check_choice, check_count, check_positive, check_strings
from tensorfold.errors import InvalidArgumentError

TARGETS = ("params", "flops", "latency")
ALLOCATORS = ("uniform", "energy", "balanced", "knapsack", "auto")
# each applies where it can (the transformer block methods where blocks are recognised and calib is
# given); methods registered later (tensorfold.compression.methods) are opt-in
DEFAULT_METHODS = ("svd", "svd-input", "spatial", "tucker", "cp", "tt", "mlp-select", "qk-select", "vo-svd", "drop")

# default CompressConfig.speed_tolerance: off. On MiniLM 5% bought a predicted 3.6% of the covered layers'
# latency that no end-to-end timing could separate from noise, and cost held-out quality at every budget
# measured (mean cos 0.8165 -> 0.8103 at 50%, 0.9055 -> 0.9026 at 70%; docs/transformers.md)
SPEED_TOLERANCE = 0.0

# default CompressConfig.remeasure (plan, fit on 3/4 of the calibration, re-price the block halves by their
# real held-out error, plan again): see compression/remeasure.py and docs/transformers.md for its figures
REMEASURE = False


def check_budget(budget, name: str = "budget") -> float:
    """A budget: a fraction in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or not 0 < budget <= 1:
        raise InvalidArgumentError(f"{name} must be a fraction in (0, 1], got {budget!r}")
    return float(budget)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")
    return value


def check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """Method names as a tuple (a comma-separated string is accepted), checked against the registry
    (:func:`tensorfold.compression.methods.known_methods`); a preset name (``"structured"``: the
    transformer block methods, dense options only) stands for its methods; duplicates dropped, order kept.

    >>> check_methods("structured")
    ('mlp-select', 'qk-select', 'vo-svd', 'drop')
    """
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        methods = tuple(methods)
    except TypeError:
        raise InvalidArgumentError(f"methods must be a sequence of method names, got {methods!r}") from None
    known = known_methods()
    choices = f"choose from {', '.join(known)} (or a preset: {', '.join(PRESETS)})"
    if not methods:
        raise InvalidArgumentError(f"give at least one method; {choices}")
    unknown = [m for m in methods if not isinstance(m, str) or (m not in known and m not in PRESETS)]
    if unknown:
        raise InvalidArgumentError(f"unknown method(s) {', '.join(map(repr, unknown))}; {choices}")
    return expand_presets(methods)


def check_patterns(patterns, name: str) -> tuple[str, ...] | None:
    """Layer-name patterns (one string or several) as a tuple; None or empty means none."""
    return None if patterns is None else (check_strings(patterns, name, "patterns") or None)


def check_speedup(speedup) -> float | None:
    if speedup is None:
        return None
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not 0 < speedup < 100:
        raise InvalidArgumentError(f"speedup must be a number > 0 (e.g. 1.3), got {speedup!r}")
    return float(speedup)


@dataclass(frozen=True)
class CompressConfig(Settings):
    """What to compress, how far and how; validated when built (bad values raise InvalidArgumentError).

    budget: fraction in (0, 1] of the covered layers' ``target`` cost to keep.
    target: "params", "flops" or "latency" (FLOPs and latency need an input shape: calibration
        batches, ``example_inputs`` or ``input_shape``).
    methods: planner methods (see :func:`tensorfold.compression.methods.known_methods`), each applied
        where it can; a comma-separated string is accepted.
    allocator: "uniform", "energy", "balanced", "knapsack" or "auto" (= knapsack).
    include, exclude: shell-style patterns on layer names (an include pattern matching nothing is an error).
    no_slower: never choose a factorisation predicted slower than its dense layer.
    speedup: also reach this measured whole-model speedup (e.g. 1.3; knapsack only).
    speed_tolerance: where transformer blocks are recognised (calibrated, block methods asked), the
        knapsack prices the options' predicted latency as a tie-break: the predicted error objective
        may exceed its optimum by at most this fraction to choose faster options (0: error alone).
    sensitivity: measure each layer's sensitivity on the calibration batches (when given).
    curve: record the predicted objective at a range of budgets in the plan.
    calib_samples: calibration samples a job draws (CLI ``--calib``; 0: weight-only fitting).
    seed: seed of the calibration sampling (and of fine-tuning in a job).
    correct_upstream, ridge: calibrated fitting (see :func:`tensorfold.apply`).
    remeasure: where transformer blocks are recognised, fit the plan on 3/4 of the calibration batches,
        measure each sub-block's real share of the output error on the other 1/4, re-price its options
        by real / predicted and allocate once more (:mod:`tensorfold.compression.remeasure`; one more fit).
    """

    budget: float = 0.5
    target: str = "params"
    methods: tuple[str, ...] = DEFAULT_METHODS
    allocator: str = "auto"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    no_slower: bool = False
    speedup: float | None = None
    speed_tolerance: float = SPEED_TOLERANCE
    sensitivity: bool = True
    curve: bool = True
    calib_samples: int = 128
    seed: int = 0
    correct_upstream: bool = False
    ridge: float = 1e-6
    remeasure: bool = REMEASURE

    def __post_init__(self):
        put = object.__setattr__  # frozen: canonical forms are stored once, here
        put(self, "budget", check_budget(self.budget))
        check_choice(self.target, "target", TARGETS)
        put(self, "methods", check_methods(self.methods))
        check_choice(self.allocator, "allocator", ALLOCATORS)
        put(self, "include", check_patterns(self.include, "include"))
        put(self, "exclude", check_patterns(self.exclude, "exclude"))
        check_flag(self.no_slower, "no_slower")
        put(self, "speedup", check_speedup(self.speedup))
        put(self, "speed_tolerance", check_positive(self.speed_tolerance, "speed_tolerance", allow_zero=True))
        check_flag(self.sensitivity, "sensitivity")
        check_flag(self.curve, "curve")
        put(self, "calib_samples", check_count(self.calib_samples, "calib_samples"))
        put(self, "seed", check_count(self.seed, "seed"))
        check_flag(self.correct_upstream, "correct_upstream")
        put(self, "ridge", check_positive(self.ridge, "ridge", allow_zero=True))
        check_flag(self.remeasure, "remeasure")
        if self.speedup is not None and self.allocator not in ("knapsack", "auto"):
            raise InvalidArgumentError(f"speedup needs allocator 'knapsack' (or 'auto'), got {self.allocator!r}")

    @classmethod
    def of(cls, config=None, **settings) -> CompressConfig:
        """The config an entry point's arguments mean: ``config`` (a CompressConfig, a number = the
        budget, or None) amended by keyword ``settings``.

        >>> CompressConfig.of(0.3, methods="svd").budget
        0.3
        """
        if config is None or isinstance(config, cls):
            return cls.build(config, **settings)
        if isinstance(config, bool) or not isinstance(config, (int, float)):
            raise InvalidArgumentError(f"config must be a CompressConfig or a budget, got {type(config).__name__}")
        if "budget" in settings:
            raise InvalidArgumentError("budget given twice (as config and as budget=)")
        return cls.build(None, budget=config, **settings)

    @property
    def resolved_allocator(self) -> str:
        """The allocator that runs ("auto" is the knapsack)."""
        return "knapsack" if self.allocator == "auto" else self.allocator


DISTILL_MODES = ("logits", "features", "blocks")
DISTILL_LOSSES = ("kl", "mse", "cosine")
SCHEDULES = ("constant", "linear", "cosine")
# arithmetic of a fine-tune's forward passes (autocast; the weights, optimizer state and losses stay float32):
# "float32" none; "bfloat16" on CPU or CUDA; "float16" on CUDA only (with loss scaling: its range is too
# narrow for gradients); "auto" bfloat16 where the device computes it natively (a CPU with AVX512-BF16 or
# AMX, a CUDA GPU that supports it), float32 elsewhere
PRECISIONS = ("float32", "bfloat16", "float16", "auto")
# Distilling a compressed transformer encoder back toward its original (measured on MiniLM at 50%, see
# docs/transformers.md): every kept block's output matched token by token (padding masked) plus the output,
# lr 3e-4 after a 10% warmup with cosine decay (a CPU fine-tune of minutes is a few hundred steps, so the rate
# must be high: in 2 minutes 2e-5 gained 0.014 of mean cosine, 3e-4 0.027; the rates above 1e-4 that used to
# make the first ~150 steps worse did so only while vo-svd pairs went unbalanced, see balance_value_output),
# no dropout, the embedding tables fixed, validation every 50 steps with no early stop (the best weights are
# kept; the steps or the time budget end the run); bfloat16 training steps where the hardware computes them
# natively ("auto": on this project's AVX512-BF16 CPU 229 steps in 120 s against 213 in float32, validation loss
# 0.1655 against 0.1662, the same mean cosine; docs/compress.md), float32 elsewhere.
TRANSFORMER_RECIPE = {"distill": "blocks", "lr": 3e-4, "warmup": 0.1, "schedule": "cosine", "train_mode": False,
                      "freeze": ("*embeddings*",), "eval_every": 50, "patience": None, "precision": "auto"}


@dataclass(frozen=True)
class FinetuneConfig(Settings):
    """Fine-tuning settings (in the spirit of transformers' ``TrainingArguments``); see
    :func:`tensorfold.finetune` for what each does.

    >>> FinetuneConfig(epochs=3, lr=1e-4).lr
    0.0001
    >>> FinetuneConfig(alpha=2.0)
    Traceback (most recent call last):
    ...
    tensorfold.errors.InvalidArgumentError: alpha must lie in [0, 1], got 2.0
    """

    epochs: int = 1
    lr: float = 1e-3
    distill: str | None = "logits"
    alpha: float = 0.5
    temperature: float = 2.0
    distill_loss: str = "kl"
    feature_layers: tuple[str, ...] | None = None
    feature_weight: float = 1.0
    patience: int | None = 2
    seed: int = 0
    weight_decay: float = 0.0
    max_steps: int | None = None
    progress: bool = True
    eval_every: int | None = None  # also validate every this many steps (long epochs), not only per epoch
    train_mode: bool = True  # False: train in eval mode (no dropout)
    freeze: tuple[str, ...] | None = None  # parameter-name patterns kept fixed (e.g. "*embeddings*")
    schedule: str = "constant"  # learning rate after warmup: constant, linear or cosine decay to 0
    warmup: float = 0.0  # fraction of the run (steps or seconds, whichever ends it first) warming up from 0
    max_seconds: float | None = None  # wall-clock budget of the whole fine-tune, validations included
    # the training steps' forward arithmetic (PRECISIONS; validation is float32); None: float32 unless a model's
    # recipe chooses (model_finetune_config), so that an explicit "float32" overrides a recipe's "auto"
    precision: str | None = None

    @classmethod
    def for_transformers(cls, **changes) -> FinetuneConfig:
        """The distillation recipe for a compressed transformer encoder (:data:`TRANSFORMER_RECIPE`:
        layer-wise distillation of the blocks' token outputs, warmup and cosine decay, no dropout,
        embeddings fixed, ``precision="auto"``), amended by ``changes`` (e.g. ``max_seconds=600``,
        ``distill_loss="cosine"`` for sentence embeddings).

        >>> FinetuneConfig.for_transformers(max_seconds=60).distill
        'blocks'
        """
        return cls.build(cls(**TRANSFORMER_RECIPE), **changes)

    def __post_init__(self):
        put = object.__setattr__
        put(self, "epochs", check_count(self.epochs, "epochs", minimum=1))
        put(self, "lr", check_positive(self.lr, "lr"))
        if self.distill is not None:
            check_choice(self.distill, "distill", DISTILL_MODES)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise InvalidArgumentError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        put(self, "alpha", float(self.alpha))
        put(self, "temperature", check_positive(self.temperature, "temperature"))
        check_choice(self.distill_loss, "distill_loss", DISTILL_LOSSES)
        put(self, "feature_layers", check_patterns(self.feature_layers, "feature_layers"))
        put(self, "feature_weight", check_positive(self.feature_weight, "feature_weight", allow_zero=True))
        if self.patience is not None:
            put(self, "patience", check_count(self.patience, "patience", minimum=1))
        put(self, "seed", check_count(self.seed, "seed"))
        put(self, "weight_decay", check_positive(self.weight_decay, "weight_decay", allow_zero=True))
        if self.max_steps is not None:
            put(self, "max_steps", check_count(self.max_steps, "max_steps", minimum=1))
        check_flag(self.progress, "progress")
        if self.eval_every is not None:
            put(self, "eval_every", check_count(self.eval_every, "eval_every", minimum=1))
        check_flag(self.train_mode, "train_mode")
        put(self, "freeze", check_patterns(self.freeze, "freeze"))
        check_choice(self.schedule, "schedule", SCHEDULES)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)) or not 0.0 <= self.warmup < 1.0:
            raise InvalidArgumentError(f"warmup must be a fraction of the run in [0, 1), got {self.warmup!r}")
        put(self, "warmup", float(self.warmup))
        if self.max_seconds is not None:
            put(self, "max_seconds", check_positive(self.max_seconds, "max_seconds"))
        if self.precision is not None:
            check_choice(self.precision, "precision", PRECISIONS)
