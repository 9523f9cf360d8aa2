"""The settings of an adapter, as one validated object (in the style of PEFT's ``LoraConfig``).

>>> from tensorfold.adapters import AdapterConfig
>>> config = AdapterConfig(method="tt", rank=4, target_modules="all-linear")
>>> config.scaling
1.0
>>> AdapterConfig.from_json(config.to_json()) == config
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tensorfold.core.settings import Settings
from tensorfold.core.validate import check_count, check_strings
from tensorfold.errors import InvalidArgumentError, RankError

METHODS = ("lora", "tt", "tucker", "cp", "tr")
INITS = ("zero", "dota")
FORWARDS = ("auto", "factored", "sum")
# target_modules strings with a meaning of their own (any other string is a regular expression)
SPECIAL_TARGETS = ("all-linear", "all-conv", "all")


@dataclass(frozen=True)
class AdapterConfig(Settings):
    """How to adapt a model: which layers, which factorized update, which rank.

    Parameters
    ----------
    method: ``"lora"`` (``B A``, the reference), ``"tt"`` (tensor-train / MPO cores), ``"tucker"``
        (core and one factor matrix per mode; FLoRA for convs), ``"cp"`` (one factor per mode, shared
        rank), ``"tr"`` (tensor ring).
    rank: an int for every bond/mode, or a tuple: per inner bond for ``tt`` (``n_cores - 1`` entries
        for a Linear), per bond for ``tr``, per mode for ``tucker``. Ranks larger than a layer allows
        are clipped to its full rank (so a huge rank means "exact").
    alpha: the update is scaled by ``alpha / max(rank)`` (PEFT's ``lora_alpha / r``); ``None`` scales by 1.
    dropout: dropout on the adapter's input during training (PEFT's ``lora_dropout``).
    target_modules: module names (a name matches a module whose full name equals it or ends with
        ``"." + name``), one regular expression matched against the full name, ``"all-linear"``,
        ``"all-conv"`` or ``"all"`` (every Linear and Conv layer).
    exclude_modules: names (same matching) never adapted, e.g. the classifier under ``"all-linear"``.
    modules_to_save: modules trained in full (and saved with the adapter), e.g. a new classifier head.
    n_cores: a Linear layer's weight is read as a tensor of ``2 * n_cores`` modes (its out and in sizes
        split into ``n_cores`` near-equal factors) for the ``tt``, ``tucker``, ``cp`` and ``tr`` methods.
    init: ``"zero"`` (one factor zero: outputs unchanged at the start) or ``"dota"`` (the factors are a
        decomposition of the pretrained weight at this rank and the residual is frozen in the base).
    share_factors: LoTR-style: ``tucker`` adapters of layers with the same weight shape share their
        factor matrices; each layer trains its own core.
    forward: ``"auto"`` picks, per layer and batch size, the cheaper of the factored path and folding
        the update into the weight; ``"factored"`` or ``"sum"`` force one.
    seed: seeds the random factors.
    """

    method: str = "lora"
    rank: int | tuple[int, ...] = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    n_cores: int = 3
    init: str = "zero"
    share_factors: bool = False
    forward: str = "auto"
    seed: int = 0

    def __post_init__(self):
        _check_choice(self.method, "method", METHODS)
        _check_choice(self.init, "init", INITS)
        _check_choice(self.forward, "forward", FORWARDS)
        object.__setattr__(self, "rank", _check_rank(self.rank))
        if self.alpha is not None:
            alpha = _number(self.alpha, "alpha")
            if not alpha > 0:
                raise InvalidArgumentError(f"alpha must be > 0 (or None for a scaling of 1), got {self.alpha!r}")
            object.__setattr__(self, "alpha", alpha)
        dropout = _number(self.dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise InvalidArgumentError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", dropout)
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
        for field in ("exclude_modules", "modules_to_save"):
            object.__setattr__(self, field, check_strings(getattr(self, field), field, "module names"))
        check_count(self.n_cores, "n_cores", minimum=1)
        if not isinstance(self.share_factors, bool):
            raise InvalidArgumentError(f"share_factors must be True or False, got {self.share_factors!r}")
        if self.share_factors and self.method != "tucker":
            raise InvalidArgumentError(
                f"share_factors (LoTR) shares Tucker factor matrices across layers: it needs method='tucker', "
                f"got method={self.method!r}"
            )
        if self.share_factors and self.init == "dota":
            raise InvalidArgumentError("share_factors=True cannot start from each layer's decomposition (init='dota')")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidArgumentError(f"seed must be an int, got {self.seed!r}")
        if self.method == "lora" and isinstance(self.rank, tuple) and len(self.rank) != 1:
            raise RankError(f"method 'lora' takes one rank, got {self.rank}")

    @property
    def scaling(self) -> float:
        """The factor applied to the update: ``alpha / max(rank)``, or 1 without ``alpha``."""
        if self.alpha is None:
            return 1.0
        return self.alpha / max(self.rank if isinstance(self.rank, tuple) else (self.rank,))


def _check_choice(value, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _number(value, name: str) -> float:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
    return v


def _check_rank(rank) -> int | tuple[int, ...]:
    def one(r) -> int:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise RankError(f"rank must be a positive int or a tuple of them, got {rank!r}")
        return int(r)

    if isinstance(rank, (tuple, list)):
        if not rank:
            raise RankError("rank must not be an empty tuple")
        return tuple(one(r) for r in rank)
    return one(rank)


def _check_targets(value) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if value not in SPECIAL_TARGETS:
            try:
                re.compile(value)
            except re.error as exc:
                raise InvalidArgumentError(
                    f"target_modules {value!r} is not a valid regular expression: {exc}") from None
        return value
    items = check_strings(value, "target_modules", "module names")
    if not items:
        raise InvalidArgumentError("target_modules must name at least one module")
    return items
