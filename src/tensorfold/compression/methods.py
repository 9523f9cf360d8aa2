"""The registry of planner methods: which names ``CompressConfig(methods=...)`` accepts.

Two kinds of method compete in one knapsack:

- *layer methods* replace one ``nn.Linear``/``nn.ConvNd`` by a factorized layer; they are registered
  in :mod:`tensorfold.nn` (:func:`tensorfold.nn.register_method`: method -> layer family -> class
  and options) and their candidates are built by :mod:`tensorfold.compression.candidates`;
- *other methods* (e.g. methods acting on whole transformer blocks) register their name here with
  :func:`register_method` and supply their own candidates.

Registering is additive and idempotent; no tuple of names has to be edited.

A *preset* names a set of methods (``CompressConfig(methods="structured")``): ``structured`` is the
transformer block methods, whose options all leave smaller DENSE matrices (fewer feed-forward neurons,
fewer query/key/value dimensions per head, fewer blocks), so every compressed layer stays one MatMul.
They speed up fp32 and int8 alike, where a low-rank pair becomes two smaller MatMuls, which dynamic
int8 quantization speeds up less than one (docs/export.md).

>>> from tensorfold.compression.methods import known_methods, register_method
>>> "svd" in known_methods()
True
>>> register_method("my-method", description="an example")
>>> "my-method" in known_methods()
True
>>> unregister_method("my-method")
>>> expand_presets(("structured",))
('mlp-select', 'qk-select', 'vo-svd', 'drop')
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorfold.errors import InvalidArgumentError


@dataclass(frozen=True)
class MethodInfo:
    """A planner method that is not a plain layer method; ``owner`` names the module that handles it."""

    name: str
    description: str = ""
    owner: str | None = None


_EXTRA: dict[str, MethodInfo] = {}


def register_method(name: str, *, description: str = "", owner: str | None = None) -> None:
    """Make ``name`` a valid planner method (for methods whose candidates are not a layer class's)."""
    if not isinstance(name, str) or not name or "," in name or name == "dense":
        raise InvalidArgumentError(f"a method name is a non-empty string without commas (not 'dense'), got {name!r}")
    _EXTRA[name] = MethodInfo(name, description, owner)


def unregister_method(name: str) -> None:
    """Forget a method registered with :func:`register_method` (tests; unknown names are ignored)."""
    _EXTRA.pop(name, None)


def layer_methods() -> tuple[str, ...]:
    """Methods that replace one dense layer by a factorized layer class (:data:`tensorfold.nn.METHODS`)."""
    from tensorfold.nn import METHODS

    return tuple(METHODS)


def extra_methods() -> dict[str, MethodInfo]:
    return dict(_EXTRA)


def expand_presets(methods) -> tuple[str, ...]:
    """``methods`` with every preset name replaced by its methods (order kept, duplicates dropped)."""
    out: list[str] = []
    for m in methods:
        out.extend(PRESETS.get(m, (m,)))
    return tuple(dict.fromkeys(out))


def known_methods() -> tuple[str, ...]:
    """Every method name the planner accepts, layer methods first."""
    return tuple(dict.fromkeys((*layer_methods(), *_EXTRA)))


# The transformer block methods: their candidates come from tensorfold.compression.blocks.
for _name, _description in (
    ("mlp-select", "keep k feed-forward neurons, refit the down projection on calibration activations"),
    ("qk-select", "keep r query/key dimensions per attention head (CR decomposition, keys refitted)"),
    ("vo-svd", "rank-r whitened SVD of each attention head's value-output product"),
    ("drop", "remove a whole transformer block, keeping the residual stream"),
):
    register_method(_name, description=_description, owner="tensorfold.compression.blocks")

# Named method sets; a preset name is accepted wherever a method name is.
PRESETS: dict[str, tuple[str, ...]] = {"structured": ("mlp-select", "qk-select", "vo-svd", "drop")}
