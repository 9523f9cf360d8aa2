"""``tensorfold sweep``: accuracy-vs-size and accuracy-vs-latency curves of a built-in model.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
"""

from __future__ import annotations

from pathlib import Path

import typer

from tensorfold.errors import InvalidArgumentError

EPILOG = (
    "Examples:\n\n"
    "  tensorfold sweep --model digits-cnn --budgets 0.9,0.7,0.5,0.3,0.2 --target params "
    "--allocators uniform,energy,balanced,knapsack --out runs/digits-sweep\n\n"
    "  tensorfold sweep --model resnet20-shapes --budgets 0.5,0.3 --finetune-epochs 1 --out runs/resnet-sweep\n\n"
    "Writes sweep.json, accuracy_vs_size.png, accuracy_vs_latency.png and index.html into --out (all or nothing)."
)


def _csv(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InvalidArgumentError(f"{option} needs at least one comma-separated value")
    return items


def sweep(
    model: str = typer.Option("digits-cnn", "--model", "-m", help="Built-in model name (see tensorfold compress)."),
    budgets: str = typer.Option("0.9,0.7,0.5,0.3,0.2", "--budgets", help="Comma-separated fractions in (0, 1]."),
    target: str = typer.Option("params", "--target", help="params, flops or latency."),
    allocators: str = typer.Option("uniform,energy,balanced,knapsack", "--allocators", show_default=False,
                                   help="Comma-separated, from uniform, energy, balanced, knapsack, auto "
                                        "(default: uniform, energy, balanced, knapsack)."),
    methods: str = typer.Option("svd,svd-input,spatial,tucker,cp", "--methods", show_default=False,
                                help="Comma-separated planner methods (default: svd, svd-input, spatial, tucker, cp)."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="Fine-tune every point for N epochs."),
    finetune_lr: float = typer.Option(None, "--finetune-lr", help="Adam learning rate (default: the model's)."),
    calib: int = typer.Option(None, "--calib", help="Calibration samples (default 256, or the model's whole "
                                                    "calibration corpus when smaller: minilm has 197 sentences)."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling and fine-tuning."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for the latency measurement."),
    batch_size: int = typer.Option(32, "--batch-size", help="Batch size of the latency measurement."),
    no_latency: bool = typer.Option(False, "--no-latency", help="Skip the latency measurement."),
    speedup: float = typer.Option(None, "--speedup",
                                  help="Knapsack plans must also reach this measured whole-model speedup, e.g. 1.3."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Compress a built-in model at several budgets with each allocator and plot quality vs size and latency."""
    from tensorfold.cli import USER_OMP_WAIT_POLICY
    from tensorfold.cli.common import check_output_path, stderr_console, stdout_console

    try:
        budget_values = [float(b) for b in _csv(budgets, "--budgets")]
    except ValueError:
        raise InvalidArgumentError(f"--budgets takes comma-separated fractions, got {budgets!r}") from None
    if calib is None:
        from tensorfold import zoo

        calib, note = zoo.calibration_samples(zoo.get(model), 256)
        if note:
            stderr_console().print(note)
    if finetune_epochs < 0 or threads < 1 or batch_size < 1 or calib < 1:
        raise InvalidArgumentError("--finetune-epochs must be >= 0 and --threads, --batch-size, --calib >= 1")
    from tensorfold.compression.config import CompressConfig

    config = CompressConfig(target=target, methods=_csv(methods, "--methods"), calib_samples=calib, seed=seed,
                            speedup=speedup)
    check_output_path(out, overwrite=overwrite, kind="dir")

    from tensorfold.compression.speed import describe_timing
    from tensorfold.compression.sweep import sweep as run_sweep
    from tensorfold.compression.sweep import write_sweep

    err = stderr_console()
    result = run_sweep(
        model, budget_values, config=config, allocators=_csv(allocators, "--allocators"),
        finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
        latency=not no_latency, threads=threads, batch_size=batch_size, progress=lambda msg: err.print(msg),
        # timed as a deployed model runs: a fresh process with the user's OpenMP wait policy, not this
        # command's PASSIVE one (which slows small-kernel models more: MiniLM 50% 1.54x here, 2.02x there)
        speed_in="fresh", speed_wait_policy=USER_OMP_WAIT_POLICY,
    )
    write_sweep(result, out, overwrite=overwrite)
    console = stdout_console()
    metric = result.metric
    console.print(f"{result.model}: dense {metric} {result.dense_metrics[metric]:.4f}")
    for p in result.points:
        if p.error:
            console.print(f"{p.allocator:>9} @ {p.budget:<4g} skipped: {p.error}")
            continue
        shown = (p.metrics_finetuned or p.metrics)[metric]
        speed = f"  speedup {p.speedup:.2f}x" + (" (busy machine)" if p.noisy else "") if p.speedup else ""
        console.print(f"{p.allocator:>9} @ {p.budget:<4g} fraction {p.fraction:.3f}  {metric} {shown:.4f}{speed}")
    if result.dense_latency:
        console.print(f"dense latency {result.dense_latency * 1e3:.2f} ms (median, measured once); speedups are "
                      "medians of paired dense/compressed timings")
    where = describe_timing(result.timing)
    if where:
        console.print(f"latencies {where}")
    if any(p.noisy for p in result.points):
        console.print("warning: some timings were taken while the CPU was busy (marked); rerun on a quiet machine "
                      "for figures to quote")
    console.print(f"wrote {out}/sweep.json, accuracy_vs_size.png, accuracy_vs_latency.png, index.html")


def register(app: typer.Typer) -> None:
    app.command("sweep", epilog=EPILOG)(sweep)
