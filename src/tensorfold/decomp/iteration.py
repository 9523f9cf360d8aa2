"""The loop contract every iterative solver follows (CP, Tucker/HOOI, tensor ring, completion,
nonnegative decompositions).

One :class:`FitTracker` per run records ``1 - relative error`` per iteration, calls the user's
``callback(iteration, fit)`` (iterations counted from 1; returning True stops), applies the stopping
rule and warns once (:class:`~tensorfold.errors.ConvergenceWarning`) when the iteration limit is reached
first. A solver with its own convergence rule (CP's resolution-aware test) records through
:meth:`FitTracker.record` and sets ``converged`` itself; everything else is the same.
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

    ``initial_error`` is the error of the starting point, so the first iteration's change is measured
    against it (it is not part of ``history``).

    >>> t = FitTracker("demo", n_iter_max=10, tol=1e-3)
    >>> t.update(0.5), t.update(0.4999), t.converged, t.history
    (False, True, True, [0.5, 0.5001])
    >>> t = FitTracker("demo", n_iter_max=10, tol=1e-3, callback=lambda it, fit: it == 2)
    >>> t.update(0.5), t.update(0.3), t.stopped, t.converged
    (False, True, True, False)
    """

    def __init__(self, name: str, *, n_iter_max: int, tol: float,
                 callback: Callable[[int, float], object] | None = None, relative: bool = False,
                 dtype: torch.dtype | None = None, initial_error: float | None = None):
        self.name, self.n_iter_max, self.tol, self.callback = name, n_iter_max, tol, callback
        self.relative = relative
        self.resolution = 10 * torch.finfo(dtype).eps if dtype is not None else 0.0
        self.history: list[float] = []
        self.converged = False
        self.stopped = False
        self.error = math.inf if initial_error is None else float(initial_error)

    @property
    def n_iter(self) -> int:
        return len(self.history)

    def record(self, err: float) -> bool:
        """Record this iteration's relative error and call the callback; True when the callback asks to stop."""
        return self.record_fit(1.0 - err, err)

    def record_fit(self, fit: float, err: float | None = None) -> bool:
        """:meth:`record` for a solver that computes the fit itself (kept exactly as given)."""
        self.error = 1.0 - fit if err is None else err
        self.history.append(fit)
        if self.callback is not None and bool(self.callback(len(self.history), fit)):
            self.stopped = True
        return self.stopped

    def update(self, err: float) -> bool:
        """Record this iteration's relative error; True when the loop should stop (converged or the
        callback asked)."""
        previous = self.error
        self.record(err)
        change = abs(previous - err)
        if self.relative:
            settled = err < self.tol or change < self.tol * err
        else:
            settled = change < self.tol
        self.converged = settled or change < self.resolution
        return self.converged or self.stopped

    def finish(self, stacklevel: int = 3, hint: str = "") -> None:
        """Warn when the iteration limit ended the run (not the tolerance, not the callback).

        ``tol=0`` asks for exactly ``n_iter_max`` iterations, so it does not warn. ``hint`` ends the message."""
        if not self.converged and not self.stopped and self.tol > 0:
            warnings.warn(f"{self.name} stopped after {self.n_iter_max} iterations before meeting tol={self.tol:g}"
                          + (f"; {hint}" if hint else ""), ConvergenceWarning, stacklevel=stacklevel + 1)
