"""Bookkeeping shared by the iterative fits of completion and nonnegative decompositions.

One :class:`FitTracker` per run records ``1 - relative error`` per iteration, calls the user's
``callback(iteration, fit)`` (iterations counted from 1; returning True stops), applies the stopping
rule and warns once when the iteration limit is reached first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from tensorfold.errors import ConvergenceWarning


class FitTracker:
    """Stop when the relative error changes by less than ``tol`` (absolute, or relative to the error with
    ``relative=True``), falls below ``tol`` (``relative`` mode), or stops changing at ``dtype``'s resolution.

    >>> t = FitTracker("demo", n_iter_max=10, tol=1e-3)
    >>> t.update(0.5), t.update(0.4999), t.converged, t.history
    (False, True, True, [0.5, 0.5001])
    """

    def __init__(self, name: str, *, n_iter_max: int, tol: float,
                 callback: Callable[[int, float], object] | None = None, relative: bool = False,
                 dtype: torch.dtype | None = None):
        self.name, self.n_iter_max, self.tol, self.callback = name, n_iter_max, tol, callback
        self.relative = relative
        self.resolution = 10 * torch.finfo(dtype).eps if dtype is not None else 0.0
        self.history: list[float] = []
        self.converged = False
        self.stopped = False
        self.error = math.inf

    def update(self, err: float) -> bool:
        """Record this iteration's relative error; True when the loop should stop."""
        previous, self.error = self.error, err
        self.history.append(1.0 - err)
        if self.callback is not None and bool(self.callback(len(self.history), 1.0 - err)):
            self.stopped = True
        change = abs(previous - err)
        if self.relative:
            settled = err < self.tol or change < self.tol * err
        else:
            settled = change < self.tol
        self.converged = settled or change < self.resolution
        return self.converged or self.stopped

    def finish(self, stacklevel: int = 3) -> None:
        """Warn when the iteration limit ended the run (not the tolerance, not the callback).

        ``tol=0`` asks for exactly ``n_iter_max`` iterations (as in ``cp``), so it does not warn."""
        if not self.converged and not self.stopped and self.tol > 0:
            warnings.warn(f"{self.name} stopped after {self.n_iter_max} iterations before meeting tol={self.tol}",
                          ConvergenceWarning, stacklevel=stacklevel + 1)
