"""Plots for compression reports (matplotlib, Agg backend: no display needed), returned as PNG bytes.

>>> from tensorfold.report.plots import line_plot
>>> png = line_plot({"ours": ([0.3, 0.5], [0.8, 0.9])}, "budget", "mean cos", "quality vs budget")
>>> png[:4] == b"\\x89PNG"
True
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

METHOD_COLOURS = {"dense": "#9e9e9e", "svd": "#1f77b4", "spatial": "#17becf", "tucker": "#2ca02c",
                  "cp": "#d62728", "tt": "#9467bd"}


def _figure(width: float = 8.0, height: float = 4.0):
    # A bare Figure on the Agg canvas: no pyplot global state, no display, whatever the user's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def layer_choice_plot(names: Sequence[str], kept: Sequence[float], methods: Sequence[str],
                      ranks: Sequence[str]) -> bytes:
    """Bar per layer: fraction of its parameters kept, coloured by method, labelled with the rank."""
    fig = _figure(max(8.0, 0.28 * len(names) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(names)))
    colours = [METHOD_COLOURS.get(m, "#ff7f0e") for m in methods]
    ax.bar(x, kept, color=colours)
    for xi, k, r in zip(x, kept, ranks):
        ax.text(xi, k + 0.01, str(r), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("fraction of layer params kept")
    ax.set_ylim(0, 1.15)
    ax.set_title("Per-layer method and rank")
    from matplotlib.patches import Patch

    handles = [Patch(color=METHOD_COLOURS.get(m, "#ff7f0e"), label=m) for m in dict.fromkeys(methods)]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    return _png(fig)


def spectra_plot(spectra: Mapping[str, Sequence[float]], ranks: Mapping[str, int | None], max_lines: int = 12) -> bytes:
    """Normalised singular-value spectra (log scale) with the chosen rank marked."""
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    names = list(spectra)
    if len(names) > max_lines:
        step = len(names) / max_lines
        names = [names[int(i * step)] for i in range(max_lines)]
    for name in names:
        s = [v for v in spectra[name]]
        if not s or s[0] <= 0:
            continue
        norm = [v / s[0] for v in s]
        (line,) = ax.semilogy(range(1, len(norm) + 1), norm, lw=1, label=name[-40:])
        r = ranks.get(name)
        if isinstance(r, int) and 1 <= r <= len(norm):
            ax.plot([r], [norm[r - 1]], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title("Singular-value spectra (whitened when calibrated); dots: chosen rank")
    ax.legend(fontsize=6, ncol=2)
    return _png(fig)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str,
              *, logy: bool = False, mark_x: float | None = None) -> bytes:
    """One line per series ``name -> (xs, ys)``."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", label=name, ms=4)
    if logy:
        ax.set_yscale("log")
    if mark_x is not None:
        ax.axvline(mark_x, color="#888", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1 or any(series):
        ax.legend(fontsize=8)
    return _png(fig)
