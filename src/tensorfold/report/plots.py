"""Plots for compression reports (matplotlib, Agg backend: no display needed), returned as PNG bytes.

>>> from tensorfold.report.plots import line_plot
>>> png = line_plot({"ours": ([0.3, 0.5], [0.8, 0.9])}, "budget", "mean cos", "quality vs budget")
>>> png[:4] == b"\\x89PNG"
True
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

METHOD_COLOURS = {"dense": "#9e9e9e", "svd": "#1f77b4", "svd-input": "#aec7e8", "spatial": "#17becf",
                  "tucker": "#2ca02c", "cp": "#d62728", "tt": "#9467bd"}


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
    fig.savefig(buf, format="png", bbox_inches="tight")  # legends placed outside the axes stay in the image
    return buf.getvalue()


def short_names(names: Sequence[str]) -> tuple[list[str], str]:
    """``names`` without the dotted prefix they all share (``0.model.encoder.``), and that prefix."""
    import os

    names = list(names)
    if len(names) < 2:
        return names, ""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]  # cut at a dot: never half a name
    return [n[len(prefix):] or n for n in names], prefix


def layer_choice_plot(names: Sequence[str], kept: Sequence[float], methods: Sequence[str],
                      ranks: Sequence[str]) -> bytes:
    """One horizontal bar per layer: fraction of its parameters kept, coloured by method, labelled with
    the method and rank. Names lose their shared prefix (named in the title) so labels stay readable."""
    labels, prefix = short_names(names)
    n = len(labels)
    fig = _figure(9.0, max(2.5, 0.26 * n + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(n))
    colours = [METHOD_COLOURS.get(m, "#ff7f0e") for m in methods]
    ax.barh(y, kept, color=colours, height=0.75)
    for yi, k, m, r in zip(y, kept, methods, ranks):
        ax.text(min(k, 1.0) + 0.01, yi, f"{m} {r}" if m != "dense" else "dense", va="center", ha="left", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()  # first layer on top, as in the table
    ax.set_xlabel("fraction of the layer's parameters kept")
    ax.set_xlim(0, 1.35)
    ax.set_title("Per-layer method and rank" + (f" (layers under {prefix})" if prefix else ""), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=METHOD_COLOURS.get(m, "#ff7f0e"), label=m) for m in dict.fromkeys(methods)]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    return _png(fig)


def spectra_plot(spectra: Mapping[str, Sequence[float]], ranks: Mapping[str, int | None], max_lines: int = 12) -> bytes:
    """Normalised singular-value spectra (log scale) with the chosen rank marked; the legend sits beside
    the axes (never over the lines, never cut) and names layers without their shared prefix."""
    names = list(spectra)
    total = len(names)
    if len(names) > max_lines:
        # spread over the whole list, first and last included (a fixed stride aliases with the block
        # structure and shows the same two layer types of every block)
        picks = sorted({round(i * (len(names) - 1) / (max_lines - 1)) for i in range(max_lines)})
        names = [names[i] for i in picks]
    labels, prefix = short_names(list(spectra))
    label_of = dict(zip(spectra, labels))
    fig = _figure(10.0, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    for name in names:
        s = [v for v in spectra[name]]
        if not s or s[0] <= 0:
            continue
        norm = [v / s[0] for v in s]
        (line,) = ax.semilogy(range(1, len(norm) + 1), norm, lw=1, label=label_of[name])
        r = ranks.get(name)
        if isinstance(r, int) and 1 <= r <= len(norm):
            ax.plot([r], [norm[r - 1]], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    shown = f"{len(names)} of {total} layers" if total > len(names) else f"{total} layers"
    ax.set_title(f"Singular-value spectra, {shown} (whitened when calibrated); dots: chosen rank", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              title=f"under {prefix}" if prefix else None, title_fontsize=8)
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
