"""A mixin for settings objects: frozen dataclasses checked in ``__post_init__`` and serialised as JSON.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Knobs(Settings):
...     size: int = 1
...     names: tuple = ()
>>> Knobs.from_json(Knobs(2, ("a",)).to_json())
Knobs(size=2, names=['a'])
>>> Knobs.build(Knobs(), size=3)
Knobs(size=3, names=())
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from typing import Any

from tensorfold.errors import FileFormatError, InvalidArgumentError

__all__ = ["Settings"]


class Settings:
    """Serialisation and keyword-building for frozen dataclass configs of JSON-friendly fields.

    Tuples are written as lists; the config's ``__post_init__`` turns them back into its canonical form.
    """

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict):
        """The config of ``d`` (unknown keys are an error: a file from a newer version is not guessed at)."""
        if not isinstance(d, dict):
            raise FileFormatError(f"a {cls.__name__} is a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FileFormatError(f"{cls.__name__} has no setting(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str):
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{cls.__name__} is not valid JSON: {exc}") from None

    def replace(self, **changes):
        """A copy with ``changes`` (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, config=None, **settings):
        """``config`` (a config, or None for the defaults) with ``settings`` replaced: what the keyword
        entry points do with their arguments. Unknown settings are an InvalidArgumentError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if config is None:
            return cls(**settings)
        if not isinstance(config, cls):
            raise InvalidArgumentError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **settings) if settings else config
