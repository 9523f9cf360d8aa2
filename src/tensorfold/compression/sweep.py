"""Accuracy-vs-size and accuracy-vs-latency curves: compress a built-in model at several budgets.

For every allocator and budget, :func:`sweep` plans and applies a compression (with calibration
data), optionally fine-tunes it with distillation from the original, evaluates it with the model's
own metric (test accuracy for the vision models) and measures its CPU latency side by side with the
dense model. :func:`write_sweep` writes ``sweep.json`` (every number), ``accuracy_vs_size.png``,
``accuracy_vs_latency.png`` (one line per allocator) and a self-contained ``index.html`` into a
new directory, atomically (a temporary directory renamed into place).

>>> from tensorfold.compression.sweep import sweep, write_sweep
>>> result = sweep("digits-cnn", budgets=(0.5, 0.3), allocators=("uniform", "knapsack"),
...                methods=("svd",), latency=False, progress=False)  # doctest: +SKIP
>>> write_sweep(result, "runs/digits-sweep")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tensorfold.compression.api import Planner, apply
from tensorfold.compression.config import ALLOCATORS, CompressConfig, FinetuneConfig, check_budget
from tensorfold.compression.evaluate import paired_timing
from tensorfold.compression.finetune import finetune as run_finetune
from tensorfold.compression.speed import Timer, describe_timing
from tensorfold.core.validate import check_count
from tensorfold.errors import InvalidArgumentError, TensorfoldError
from tensorfold.io import atomic_directory

CONV_METHODS = ("svd", "svd-input", "spatial", "tucker", "cp")
FILES = ("sweep.json", "accuracy_vs_size.png", "accuracy_vs_latency.png", "index.html")


@dataclass
class SweepPoint:
    """One compressed model of the sweep."""

    allocator: str
    budget: float
    fraction: float | None  # achieved fraction of the covered layers' target cost
    model_fraction: float | None  # whole-model parameter fraction
    params: int
    flops: int | None
    metrics: dict[str, float]
    metrics_finetuned: dict[str, float] | None = None
    latency: float | None = None  # median seconds per batch, CPU
    dense_latency: float | None = None  # the dense model's median, timed in pairs with this point
    seconds: float = 0.0  # plan + apply (+ fine-tune) time
    methods_used: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # why this point failed, if it did
    ratio: float | None = None  # median of the paired dense/compressed time ratios
    ratio_spread: tuple[float, float] | None = None  # its interquartile range
    noisy: bool = False  # timed while the machine was busy (wide spread, or the dense time moved)
    timed_in: str | None = None  # "fresh" (a fresh process with the user's OpenMP wait policy) or "this"

    @property
    def speedup(self) -> float | None:
        if self.ratio is not None:
            return self.ratio
        if self.latency is None or self.dense_latency is None or self.latency <= 0:
            return None
        return self.dense_latency / self.latency


@dataclass
class SweepResult:
    model: str
    target: str
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    allocators: tuple[str, ...]
    metric: str
    dense_metrics: dict[str, float]
    dense_params: int
    dense_latency: float | None
    finetune_epochs: int
    threads: int
    batch_size: int
    points: list[SweepPoint] = field(default_factory=list)
    dense_latency_spread: tuple[float, float] | None = None  # interquartile range of the dense timing
    calib_samples: int | None = None  # calibration samples each point was planned and fitted with
    # where the latencies (and a speedup goal's checks) were timed: process, omp_wait_policy and, when a
    # fresh process failed and this one timed the rest, fresh_error (see compression/fresh_speed.py)
    timing: dict | None = None

    def curve(self, allocator: str) -> list[SweepPoint]:
        """The points of one allocator, largest budget first."""
        return sorted((p for p in self.points if p.allocator == allocator and p.error is None),
                      key=lambda p: -p.budget)

    def to_dict(self) -> dict:
        d = asdict(self)
        for p, raw in zip(self.points, d["points"]):
            raw["speedup"] = p.speedup
        return d


def resolve_builtin(model):
    """A BuiltinModel from a name (or the object itself)."""
    if isinstance(model, str):
        from tensorfold import zoo

        return zoo.get(model)
    for attr in ("load", "calibration", "evaluate", "example_inputs"):
        if not callable(getattr(model, attr, None)):
            raise InvalidArgumentError(f"model must be a built-in model name or a BuiltinModel, got {model!r}")
    return model


def _check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    values = tuple(sorted({check_budget(float(b)) for b in budgets}, reverse=True))
    if not values:
        raise InvalidArgumentError("give at least one budget")
    return values


def _check_allocators(allocators: Sequence[str]) -> tuple[str, ...]:
    allocators = tuple(allocators)
    unknown = [a for a in allocators if a not in ALLOCATORS]
    if unknown or not allocators:
        raise InvalidArgumentError(f"allocators must be among {', '.join(ALLOCATORS)}; got {', '.join(allocators)}")
    return allocators


def _finetune_config(entry, finetune: FinetuneConfig | None, epochs: int, lr: float | None,
                     seed: int) -> FinetuneConfig | None:
    """The fine-tuning config of a sweep: ``finetune``, else one from ``finetune_epochs``/``finetune_lr``
    (None: no fine-tuning); the learning rate defaults to the model's."""
    if finetune is None and epochs:
        if lr is None:
            lr = float((getattr(entry, "extra", None) or {}).get("finetune_lr", 1e-3))
        finetune = FinetuneConfig(epochs=epochs, lr=lr, seed=seed, progress=False)
    elif finetune is not None and (epochs or lr is not None):
        raise InvalidArgumentError("give finetune= or finetune_epochs/finetune_lr, not both")
    if finetune is not None and getattr(entry, "finetune_data", None) is None:
        raise InvalidArgumentError(f"{entry.name} has no fine-tuning data; use finetune_epochs=0")
    return finetune


def paired_latency(dense: nn.Module, small: nn.Module, inputs: torch.Tensor, *, threads: int = 2,
                   rounds: int = 3, repeats: int = 10) -> tuple[float, float]:
    """(dense, small) median seconds per call over ``rounds * repeats`` alternating pairs.

    Alternating the two models call by call makes the ratio robust to load that comes and goes on a
    shared machine (see :func:`tensorfold.compression.evaluate.paired_timing` for the spread).
    """
    t = paired_timing(dense, small, inputs, threads=threads, repeats=rounds * repeats)
    return t["first_median"], t["second_median"]


# a point whose paired dense time moves this far from the sweep's one dense measurement was timed
# under different load than the dense reference: flagged, not hidden
DENSE_DRIFT = 0.25


def sweep(
    model,
    budgets: Sequence[float] = (0.9, 0.7, 0.5, 0.3, 0.2),
    *,
    config: CompressConfig | None = None,
    allocators: Sequence[str] = ("uniform", "energy", "balanced", "knapsack"),
    finetune: FinetuneConfig | None = None,
    latency: bool = True,
    threads: int = 2,
    batch_size: int = 32,
    progress: bool | Callable[[str], None] = True,
    speed_in: str = "this",
    speed_wait_policy: str | None = None,
    **settings,
) -> SweepResult:
    """Compress the built-in ``model`` at every budget with every allocator; see the module docstring.

    ``config`` (default: ``CompressConfig(methods=CONV_METHODS, calib_samples=256)``) holds the
    compression settings, amended by keyword ``settings`` (``target``, ``methods``, ``calib_samples``,
    ``seed``, ``speedup``...); each point replaces its budget and allocator. ``speedup`` (e.g. 1.3) asks
    the knapsack allocator's plans for that measured whole-model speedup too; the other allocators
    ignore it. A point that fails (e.g. a budget no allocator can reach) is kept with its ``error`` and
    left out of the curves.

    ``finetune`` (a :class:`~tensorfold.compression.config.FinetuneConfig`; ``finetune_epochs=N`` and
    ``finetune_lr=`` build one) fine-tunes every point, with the model's ``finetune_data``; the learning
    rate defaults to the model's ``extra["finetune_lr"]`` (else 1e-3): a trained ResNet with batch norm
    wants 1e-4, where 1e-3 makes a 47-step fine-tune worse than none.

    ``speed_in`` ("this" or "fresh") says where latencies and a speedup goal's plans are timed: in this
    process, or in one fresh process whose ``OMP_WAIT_POLICY`` is ``speed_wait_policy`` (None: the runtime's
    default), as a deployed model runs (:class:`~tensorfold.compression.fresh_speed.FreshTimer`; the
    ``tensorfold`` command asks for it because it runs itself with ``PASSIVE``). ``result.timing`` and each
    point's ``timed_in`` record where; a fresh process that fails hands over to this one, saying why.
    """
    if speed_in not in ("this", "fresh"):
        raise InvalidArgumentError(f"speed_in must be 'this' or 'fresh', got {speed_in!r}")
    entry = resolve_builtin(model)
    budgets = _check_budgets(budgets)
    allocators = _check_allocators(allocators)
    epochs, lr = settings.pop("finetune_epochs", 0), settings.pop("finetune_lr", None)
    default_calib = config is None and "calib_samples" not in settings
    config = CompressConfig.build(config or CompressConfig(methods=CONV_METHODS, calib_samples=256), **settings)
    finetune = _finetune_config(entry, finetune, epochs, lr, config.seed)
    for name, value in (("threads", threads), ("batch_size", batch_size)):
        check_count(value, name, minimum=1)
    finetune_epochs = finetune.epochs if finetune is not None else 0
    target, methods, seed = config.target, config.methods, config.seed
    say = progress if callable(progress) else ((lambda msg: print(msg, file=sys.stderr)) if progress else None)
    if default_calib:  # the default count must work for every built-in model: clamp to its corpus, and say so
        from tensorfold.zoo import calibration_samples

        n, note = calibration_samples(entry, config.calib_samples)
        if note:
            config = config.replace(calib_samples=n)
            if say:
                say(note)

    original = entry.load()
    calib = entry.calibration(config.calib_samples, seed)
    inputs = entry.example_inputs(batch_size)
    dense_metrics = entry.evaluate(original, original)
    metric = "accuracy" if "accuracy" in dense_metrics else next(iter(dense_metrics))
    result = SweepResult(
        model=entry.name, target=target, methods=tuple(methods), budgets=budgets, allocators=allocators,
        metric=metric, dense_metrics=dense_metrics, dense_params=sum(p.numel() for p in original.parameters()),
        dense_latency=None, finetune_epochs=finetune_epochs, threads=threads, batch_size=batch_size,
        calib_samples=config.calib_samples,
    )
    data = entry.finetune_data(64, seed) if finetune is not None else None
    if speed_in == "fresh":
        from tensorfold.compression.fresh_speed import FreshTimer

        timer: Timer = FreshTimer(entry.name, original, wait_policy=speed_wait_policy, log=say).snapshot()
    else:
        timer = Timer()
    with timer:
        run = _Run(entry, original, config, inputs, calib, timer, threads, say)
        _sweep_points(result, run, budgets, allocators, finetune, data, latency)
        timed = latency or config.speedup is not None or config.target == "latency"
        result.timing = timer.record() if timed else None
    # reported allocator by allocator, budgets in the order given
    result.points.sort(key=lambda pt: (allocators.index(pt.allocator), budgets.index(pt.budget)))
    return result


@dataclass
class _Run:
    """What every point of a sweep is made and timed with."""

    entry: object
    original: nn.Module
    config: CompressConfig
    inputs: object  # the timed batch
    calib: object
    timer: Timer
    threads: int
    say: Callable[[str], None] | None


def _sweep_points(result: SweepResult, run: _Run, budgets, allocators, finetune: FinetuneConfig | None, data,
                  latency: bool) -> None:
    """The dense reference and every point of :func:`sweep`, timed by ``run.timer``."""
    metric, entry, original, config, inputs, calib = (result.metric, run.entry, run.original, run.config,
                                                      run.inputs, run.calib)
    timer, threads, say = run.timer, run.threads, run.say
    if latency:  # the dense reference, measured once (paired with itself for its spread)
        ref = timer.pair(original, original, None, inputs, threads=threads, repeats=20)
        result.dense_latency = ref["seconds_original"]
        q = sorted([ref["seconds_original"] * ref["speedup_q1"], ref["seconds_original"] * ref["speedup_q3"]])
        result.dense_latency_spread = (q[0], q[1])
    # Budget by budget: the planner's calibration statistics, menus and sensitivities (measured at the
    # budget) are shared by the allocators, as in plan(); only allocators with a speedup goal need their own.
    for budget in budgets:
        planners: dict[float | None, Planner | TensorfoldError] = {}
        for allocator in allocators:
            start = time.perf_counter()
            try:
                point_config = config.replace(budget=budget, allocator=allocator, curve=False,
                                              speedup=config.speedup if allocator in ("knapsack", "auto") else None)
                if point_config.speedup not in planners:
                    try:
                        planners[point_config.speedup] = Planner(original, point_config, calib=calib,
                                                                 example_inputs=inputs, model_name=entry.name)
                    except TensorfoldError as exc:  # the same for every allocator of this budget
                        planners[point_config.speedup] = exc
                planner = planners[point_config.speedup]
                if isinstance(planner, TensorfoldError):
                    raise planner
                p = planner.plan(allocator=allocator)
                small = apply(original, p, calib)
            except TensorfoldError as exc:
                result.points.append(SweepPoint(allocator, budget, None, None, 0, None, {},
                                                error=f"{type(exc).__name__}: {exc}"))
                if say:
                    say(f"{allocator} @ {budget:g}: skipped ({exc})")
                continue
            point = SweepPoint(allocator, budget, p.fraction, p.model_fraction, p.model_params_after, p.flops,
                               entry.evaluate(original, small))
            for lp in p.layers:
                point.methods_used[lp.method] = point.methods_used.get(lp.method, 0) + 1
            if finetune is not None:
                train, val = data
                small = run_finetune(small, train, finetune, teacher=original, val_data=val,
                                     output_fn=getattr(entry, "output_fn", None))
                point.metrics_finetuned = entry.evaluate(original, small)
            point.seconds = time.perf_counter() - start
            if latency:
                t = timer.pair(original, small, p, inputs, threads=threads, repeats=30)
                point.dense_latency, point.latency = t["seconds_original"], t["seconds_compressed"]
                point.ratio, point.ratio_spread = t["speedup"], (t["speedup_q1"], t["speedup_q3"])
                point.timed_in = t["process"]
                drift = abs(point.dense_latency / result.dense_latency - 1) if result.dense_latency else 0.0
                point.noisy = bool(t["noisy"] or drift > DENSE_DRIFT)
            result.points.append(point)
            if say:
                shown = point.metrics_finetuned or point.metrics
                speed = f", speedup {point.speedup:.2f}x" if point.speedup else ""
                say(f"{allocator} @ {budget:g}: fraction {point.fraction:.3f}, {metric} {shown[metric]:.4f}{speed}")


# ---------------------------------------------------------------------------------------------------
# report


def _curve_values(result: SweepResult, point: SweepPoint) -> float:
    metrics = point.metrics_finetuned or point.metrics
    return metrics[result.metric]


def plot_sweep(result: SweepResult, x: str, path: str | os.PathLike) -> None:
    """One line per allocator: the metric against the size fraction (``x="size"``) or latency."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for allocator in result.allocators:
        pts = result.curve(allocator)
        if x == "latency":
            # the dense reference over the paired ratio: every point on the same scale as the dense star,
            # whatever the load was when each pair was timed
            pts = [p for p in pts if p.speedup and result.dense_latency]
            xs = [result.dense_latency / p.speedup * 1e3 for p in pts]
        else:
            xs = [p.fraction for p in pts]
        if pts:
            ax.plot(xs, [_curve_values(result, p) for p in pts], marker="o", label=allocator)
    dense_y = result.dense_metrics[result.metric]
    if x == "latency" and result.dense_latency:
        ax.plot([result.dense_latency * 1e3], [dense_y], marker="*", markersize=12, color="black", ls="",
                label="dense")
        ax.set_xlabel(f"measured CPU latency, ms per batch of {result.batch_size} ({result.threads} threads)")
    else:
        ax.axhline(dense_y, color="black", lw=0.8, ls="--", label="dense")
        ax.set_xlabel(f"fraction of the layers' {result.target} kept")
    tuned = " after fine-tuning" if result.finetune_epochs else ""
    ax.set_ylabel(f"{result.metric}{tuned}")
    ax.set_title(f"{result.model}: {result.metric} vs {'latency' if x == 'latency' else 'size'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def _table_html(result: SweepResult) -> str:
    tuned = bool(result.finetune_epochs)
    head = ["allocator", "budget", "fraction", "model params", result.metric, "drop"]
    head += [f"{result.metric} tuned", "drop tuned"] if tuned else []
    head += ["latency ms", "speedup", "methods"]
    rows = []
    for p in sorted(result.points, key=lambda p: (result.allocators.index(p.allocator), -p.budget)):
        if p.error:
            rows.append([p.allocator, f"{p.budget:g}", html.escape(p.error)])
            continue
        drop = p.metrics.get(f"{result.metric}_drop")
        cells = [p.allocator, f"{p.budget:g}", f"{p.fraction:.3f}", f"{p.params:,}", f"{p.metrics[result.metric]:.4f}",
                 "" if drop is None else f"{drop:+.4f}"]
        if tuned:
            tdrop = p.metrics_finetuned.get(f"{result.metric}_drop")
            cells += [f"{p.metrics_finetuned[result.metric]:.4f}", "" if tdrop is None else f"{tdrop:+.4f}"]
        cells += ["" if p.latency is None else f"{p.latency * 1e3:.2f}",
                  "" if p.speedup is None else f"{p.speedup:.2f}x" + (" (busy)" if p.noisy else ""),
                  ", ".join(f"{k}: {v}" for k, v in sorted(p.methods_used.items()))]
        rows.append(cells)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(result: SweepResult, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the two curves (embedded PNGs) and the table of every point."""
    figs = "".join(
        f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for name, data in images.items()
    )
    dense = ", ".join(f"{k} {v:.4f}" for k, v in result.dense_metrics.items() if not k.endswith("_drop"))
    lat = f"; dense latency {result.dense_latency * 1e3:.2f} ms" if result.dense_latency else ""
    where = describe_timing(result.timing)
    lat += f" ({html.escape(where)})" if where else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tensorfold sweep: {html.escape(result.model)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:48%;margin:4px}}</style></head>
<body><h1>Compression sweep: {html.escape(result.model)}</h1>
<p>target {html.escape(result.target)}; methods {html.escape(", ".join(result.methods))};
fine-tuning epochs {result.finetune_epochs}; dense: {html.escape(dense)}{lat}
(batch {result.batch_size}, {result.threads} threads).</p>
{figs}
{_table_html(result)}
</body></html>
"""


def write_sweep(result: SweepResult, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the sweep's files into the new directory ``out`` (atomically); refuses an existing one
    unless ``overwrite``."""
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False))
        images = {}
        for name, x in (("accuracy_vs_size.png", "size"), ("accuracy_vs_latency.png", "latency")):
            plot_sweep(result, x, tmp / name)
            images[name] = (tmp / name).read_bytes()
        (tmp / "index.html").write_text(render_html(result, images))
    return out
