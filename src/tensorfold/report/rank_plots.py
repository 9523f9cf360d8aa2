"""Plots for rank selection: CP fit and core consistency against rank, and the spectrum of every mode.

Uses matplotlib's object API with the Agg canvas directly, so nothing global (the pyplot backend,
open figures) is touched. Files are written atomically.

>>> import tempfile, pathlib
>>> from tensorfold.report.rank_plots import plot_cp_rank_curve
>>> out = pathlib.Path(tempfile.mkdtemp()) / "cp.png"
>>> _ = plot_cp_rank_curve([1, 2, 3], [0.5, 0.9, 0.91], [100.0, 98.0, 20.0], out, suggested=2)
>>> out.read_bytes()[:4] == b"\\x89PNG"
True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tensorfold.io import atomic_path


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, bbox_inches="tight")
    return path


def plot_cp_rank_curve(ranks: Sequence[int], fits: Sequence[float], consistency: Sequence[float],
                       path: str | Path, *, suggested: int | None = None) -> Path:
    """Fit (left axis) and CORCONDIA in percent (right axis, clipped to [-10, 105]) against CP rank."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(list(ranks), list(fits), "o-", color="tab:blue", label="fit")
    ax.set_xlabel("CP rank")
    ax.set_ylabel("fit = 1 - relative error", color="tab:blue")
    ax2 = ax.twinx()
    clipped = [min(max(c, -10.0), 105.0) for c in consistency]
    ax2.plot(list(ranks), clipped, "s--", color="tab:red", label="core consistency")
    ax2.set_ylabel("CORCONDIA (%)", color="tab:red")
    ax2.set_ylim(-12, 108)
    if suggested is not None:
        ax.axvline(suggested, color="gray", linestyle=":", label=f"suggested rank {suggested}")
    ax.set_xticks(list(ranks))
    ax.set_title("CP rank: fit and core consistency")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right")
    return _save(fig, path)


def plot_mode_spectra(spectra: Sequence, path: str | Path, *, ranks: Sequence[int] | None = None,
                      squared: bool = True) -> Path:
    """Singular values of each unfolding (log scale), normalised by the largest, with chosen ranks marked.

    ``spectra`` are per-mode 1-D sequences; ``squared=True`` means they hold squared singular values
    (as :func:`tensorfold.decomp.rank_selection.mode_spectra` returns).
    """
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for n, s in enumerate(spectra):
        s = np.asarray(s, dtype=np.float64)
        s = np.sqrt(np.clip(s, 0, None)) if squared else np.abs(s)
        top = s.max() if s.size and s.max() > 0 else 1.0
        line = ax.semilogy(np.arange(1, s.size + 1), np.clip(s / top, 1e-17, None), ".-", label=f"mode {n}")[0]
        if ranks is not None:
            ax.axvline(ranks[n], color=line.get_color(), linestyle=":", alpha=0.8)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title("Spectrum of each unfolding" + (f" (chosen ranks {tuple(ranks)})" if ranks is not None else ""))
    ax.legend()
    return _save(fig, path)
