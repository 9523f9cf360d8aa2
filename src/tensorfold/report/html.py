"""A self-contained HTML report of a compression: tables, metrics and plots embedded as base64 PNG.

>>> import torch, tensorfold as tf
>>> from tensorfold.report import render_report
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> html = render_report(tf.plan(model, 0.5, methods=("svd",)), {"quality": {"rel_error": 0.1}})
>>> html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
True
"""

from __future__ import annotations

import base64
import html as html_lib
import os

from tensorfold.io import write_text_atomic
from tensorfold.report import plots

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.kv td:first-child{font-weight:600;text-align:left}
.warn{color:#a40000;font-weight:600}
"""


def png_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` tag holding ``png`` inline (base64), so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html_lib.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html_lib.escape(str(v))


def table_html(rows: list[dict], columns: list[str], left: tuple[str, ...] = ()) -> str:
    """A table of ``rows``; a column with no value in any row (e.g. latency without a measurement) is left out."""
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)] if rows else columns
    head = "".join(f'<th class="{"l" if c in left else ""}">{html_lib.escape(c)}</th>' for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if c in left else ""}">{_fmt(r.get(c))}</td>' for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def kv_html(items: dict) -> str:
    """A two-column table; entries without a value (None) are left out rather than shown empty."""
    return '<table class="kv">' + "".join(
        f"<tr><td>{html_lib.escape(str(k).replace('_', ' '))}</td><td>{_fmt(v)}</td></tr>"
        for k, v in items.items() if v is not None
    ) + "</table>"


def finetune_html(record: dict) -> str:
    """Fine-tuning: loss per epoch, quality before and after, which model was kept (and why)."""
    parts = ["<h2>Fine-tuning</h2>"]
    if record.get("warning"):
        parts.append(f'<p class="warn">Warning: {html_lib.escape(record["warning"])}</p>')
    epochs = record.get("epochs") or []
    if epochs:
        columns = ["epoch", "train_loss", *(["val_loss"] if any("val_loss" in e for e in epochs) else [])]
        parts.append(table_html(epochs, columns))
    before, after = record.get("quality_before") or {}, record.get("quality_after") or {}
    rows = [{"quality": k, "before fine-tuning": before.get(k), "after": after.get(k)} for k in before]
    if rows:
        parts.append(table_html(rows, ["quality", "before fine-tuning", "after"], left=("quality",)))
    kept = ("the fine-tuned model" if record.get("kept", "fine-tuned") == "fine-tuned"
            else "the model from before fine-tuning")
    best = f" (best epoch {record['best_epoch']})" if record.get("best_epoch") and "fine-tuned" in kept else ""
    parts.append(f"<p>Kept: {kept}{best}.</p>")
    return "".join(parts)


def render_report(plan, metrics: dict | None = None, title: str | None = None) -> str:
    """The report page for ``plan`` and ``metrics`` (as written to metrics.json by the CLI)."""
    metrics = metrics or {}
    rows = plan.rows()
    parts = [f"<h1>{html_lib.escape(title or 'tensorfold compression report')}</h1>",
             f"<p>{html_lib.escape(plan.title())}</p>"]
    parts.append("<h2>Totals</h2>" + kv_html(plan.totals()))
    if metrics.get("quality"):
        parts.append("<h2>Quality (original vs compressed)</h2>" + kv_html(metrics["quality"]))
    if metrics.get("finetune"):
        parts.append(finetune_html(metrics["finetune"]))
    if plan.speed_rounds:
        parts.append(f"<h2>Speed goal {plan.speedup:g}x: the rounds timed while planning</h2><p>The plan kept is the "
                     "most faithful (lowest predicted error) of those that measured at least the goal.</p>"
                     + table_html(plan.speed_rounds, ["round", "fraction", "objective", "predicted", "measured",
                                                      "outcome", "then"], left=("outcome", "then")))
    if metrics.get("speed"):
        parts.append("<h2>Measured speed (end to end)</h2>" + kv_html(metrics["speed"]))
    parts.extend(_hf_sections(metrics))
    parts.append("<h2>Per-layer decisions</h2>")
    parts.append(png_tag(plots.layer_choice_plot(
        [r["layer"] for r in rows], [r["kept"] for r in rows], [r["method"] for r in rows],
        [str(r["rank"]) for r in rows]), "per-layer method and rank"))
    parts.append(table_html(rows, ["layer", "shape", "method", "rank", "params", "kept", "flops", "latency_ms",
                                   "error", "sensitivity"], left=("layer", "shape", "method")))
    if plan.spectra:
        ranks = {lp.name: (lp.rank if lp.method == "svd" else None) for lp in plan.layers}
        parts.append("<h2>Singular-value spectra</h2>" + png_tag(plots.spectra_plot(plan.spectra, ranks), "spectra"))
    # a budget of 1.0 keeps every layer whole (error 0): on a log axis it would squash the others to 1e-12
    curve = [(x, y) for x, y in (plan.curve or []) if y > 0]
    if curve:
        xs, ys = zip(*curve)
        exact = [x for x, y in plan.curve if y <= 0]
        note = (f" Budgets with no predicted error ({', '.join(f'{x:g}' for x in exact)}) are not drawn."
                if exact else "")
        parts.append("<h2>Predicted error vs budget</h2><p>Objective: sum over layers of sensitivity x squared "
                     f"relative layer error, for the same allocator at other budgets.{note}</p>")
        parts.append(png_tag(plots.line_plot({plan.allocator: (list(xs), list(ys))},
                                             f"budget (fraction of {plan.target})", "predicted error",
                                             "Predicted error vs budget", logy=True, mark_x=plan.budget),
                             "predicted error vs budget"))
    curve = metrics.get("quality_curve") or []
    if curve:
        keys = [k for k in curve[0] if k not in ("budget", "fraction") and isinstance(curve[0][k], (int, float))]
        shown = [k for k in ("mean_cos", "min_cos", "nn_agreement", "accuracy", "rel_error") if k in keys] or keys[:3]
        series = {k: ([r["budget"] for r in curve], [r[k] for r in curve]) for k in shown}
        parts.append("<h2>Quality vs budget</h2>" + png_tag(
            plots.line_plot(series, f"budget (fraction of {plan.target})", "quality", "Measured quality vs budget",
                            mark_x=plan.budget), "quality vs budget"))
        parts.append(table_html(curve, ["budget", "fraction", *shown]))
    if plan.skipped:
        parts.append("<h2>Skipped layers</h2>" + table_html(
            [{"layer": n, "reason": r} for n, r in plan.skipped], ["layer", "reason"], left=("layer", "reason")))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html_lib.escape(title or 'tensorfold')}"
            f"</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _int8_graph(export: dict) -> str:
    """Which graph the int8 file was quantized from and its ops (exports since the fused int8 recipe)."""
    if not export.get("int8_ops"):
        return ""
    return (f" The int8 file was quantized from the {html_lib.escape(export.get('int8_from', '?'))}; its ops: "
            f"{html_lib.escape(', '.join(export['int8_ops']))}.")


def _hf_sections(metrics: dict) -> list[str]:
    """Calibration text, export variants (speed and quality side by side) and memory, when recorded."""
    parts = []
    if metrics.get("data"):
        parts.append("<h2>Text data (seeded split)</h2>" + kv_html(metrics["data"]))
    export = metrics.get("export") or {}
    rows = export.get("variants") or []
    if rows:
        keys = rows[0].get("quality_keys", [])
        parts.append(f"<h2>Export: the four variants</h2><p>batch {export.get('batch')}, {export.get('threads')} "
                     f"threads, medians over the timed rounds (speedup: the median of per-round ratios); fp32 "
                     f"runs in PyTorch, int8 in ONNX Runtime (dynamic int8 "
                     f"weights, one scale per output channel); quality against the dense fp32 model on the held-out "
                     f"text. Files: {html_lib.escape(', '.join(export.get('files', [])))}; ops: "
                     f"{html_lib.escape(', '.join(export.get('ops', [])))}.{_int8_graph(export)}</p>")
        parts.append(table_html(rows, ["variant", "runtime", "seconds", "speedup", *keys], left=("variant", "runtime")))
        if keys:
            series = {r["variant"]: ([r["speedup"]], [r[keys[0]]]) for r in rows}
            parts.append(png_tag(plots.line_plot(series, "speedup over dense fp32", keys[0], "Speed and quality"),
                                 "speed and quality of the export variants"))
    if metrics.get("memory"):
        parts.append("<h2>Memory</h2>" + kv_html(metrics["memory"]))
    seconds = metrics.get("seconds") or {}
    if seconds.get("stages"):
        parts.append("<h2>Time per stage (seconds)</h2>" + kv_html(
            {**seconds["stages"], "compression (plan + apply)": seconds.get("compression"),
             "total": seconds.get("total")}))
    return parts


def write_report(path: str | os.PathLike, plan, metrics: dict | None = None, title: str | None = None) -> None:
    """Write :func:`render_report` to ``path`` atomically."""
    write_text_atomic(path, render_report(plan, metrics, title))
