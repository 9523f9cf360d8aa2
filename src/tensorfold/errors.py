"""Exception types raised by tensorfold.

Every error a user can trigger with bad input derives from :class:`TensorfoldError`, so callers
(and the CLI) can catch one type and print one clear line instead of a deep torch traceback.
The value-like errors also derive from :class:`ValueError` so generic handlers keep working.
"""

from __future__ import annotations


class TensorfoldError(Exception):
    """Base class of every error tensorfold raises on purpose."""


class InvalidTensorError(TensorfoldError, ValueError):
    """The input tensor cannot be used: NaN/Inf entries, empty, wrong dtype or wrong order."""


class ShapeError(TensorfoldError, ValueError):
    """Shapes of the inputs do not fit together."""


class RankError(TensorfoldError, ValueError):
    """A requested rank is not positive or larger than the data allows."""


class InvalidArgumentError(TensorfoldError, ValueError):
    """An option has a value outside its allowed set or range."""


class FileFormatError(TensorfoldError):
    """A file is missing, corrupt, of an unknown format, or lacks the requested key."""


class NotCompressibleError(TensorfoldError):
    """A model or layer has nothing that can be factorized with a saving."""


class ConvergenceWarning(UserWarning):
    """An iterative method stopped at its iteration limit before meeting its tolerance."""
