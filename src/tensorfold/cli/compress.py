"""``tensorfold compress``: plan, apply and evaluate the compression of a model, write the results.

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
    "  tensorfold compress --model minilm --budget 0.5 --target params --calib 128 --out runs/minilm-50\n\n"
    "  tensorfold compress --model mypkg.models:build --weights model.safetensors --calib 0 --budget 0.3 "
    "--methods svd,tucker --out runs/mine\n\n"
    "  tensorfold compress --model path/to/sentence-transformers-dir --calib-data texts.txt --budget 0.5 "
    "--export onnx-int8 --out runs/mine\n\n"
    "Writes plan.json, weights.safetensors, metrics.json and report.html into --out (all or nothing)."
)


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [p.strip() for v in values for p in v.split(",") if p.strip()]
    return out or None


FOREVER = 10_000  # epochs of a fine-tune bounded by --finetune-minutes alone

# config settings whose CLI option has another name
_OPTIONS = {"calib_samples": "--calib", "epochs": "--finetune-epochs", "no_slower": "--no-slower",
            "precision": "--finetune-precision"}


def _as_option(message: str) -> str:
    """A config error worded with the CLI option: "budget must be ..." -> "--budget must be ..."."""
    setting, _, rest = message.partition(" ")
    option = _OPTIONS.get(setting, "--" + setting.replace("_", "-"))
    return f"{option} {rest}" if setting.isidentifier() and rest.startswith("must") else message


def _floats(text: str | None, option: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InvalidArgumentError(f"{option} takes comma-separated fractions, got {text!r}") from None


def compress(
    model: str = typer.Option(
        "minilm", "--model", "-m",
        help="Built-in model (minilm, digits-cnn, resnet20-shapes), a local Hugging Face / sentence-transformers "
             "directory (modules.json or config.json; loaded offline, never run as code), or 'module:factory': a "
             "Python file module.py in "
             "the working directory (or an importable module) whose factory() returns the torch model; define "
             "calibration(n, seed) there too (a list of input batches, n samples in all) unless --calib 0. "
             "Fine-tuning data: --data module:function returning (train_batches, val_batches)."),
    budget: float = typer.Option(0.5, "--budget", "-b", help="Fraction (0, 1] of the target cost to keep."),
    target: str = typer.Option("params", "--target", help="params, flops or latency."),
    calib: int = typer.Option(128, "--calib", help="Calibration samples (0: weight-only fitting)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    methods: str = typer.Option("svd,svd-input,spatial,tucker,cp,tt,mlp-select,qk-select,vo-svd,drop", "--methods",
                                show_default=False,
                                help="Comma-separated, from svd, svd-input, spatial, tucker, cp, tt and the "
                                     "transformer block methods mlp-select, qk-select, vo-svd, drop (used where "
                                     "blocks are recognised and --calib > 0); 'structured' = the four block "
                                     "methods (smaller dense matrices only: fastest with --export onnx-int8); "
                                     "default: all of them."),
    allocator: str = typer.Option("auto", "--allocator", help="uniform, energy, balanced, knapsack or auto."),
    include: list[str] = typer.Option(None, "--include", help="Only layers matching this pattern (repeatable)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Skip layers matching this pattern (repeatable)."),
    weights: str = typer.Option(None, "--weights", help="State dict to load (safetensors or torch, loaded safely)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="Fine-tune with distillation for N epochs."),
    finetune_minutes: float = typer.Option(
        0, "--finetune-minutes",
        help="Fine-tune with distillation for at most M minutes of wall clock, validation included (with "
             "--finetune-epochs: whichever ends first); the learning-rate schedule spans the time."),
    finetune_precision: str = typer.Option(
        None, "--finetune-precision",
        help="Arithmetic of the fine-tune's training steps: float32, bfloat16 (CPU or CUDA), float16 (CUDA) or "
             "auto (bfloat16 where the hardware computes it natively); weights stay float32. Default: the "
             "model's recipe (auto for minilm and model directories, float32 otherwise)."),
    data: str = typer.Option(None, "--data", help="Fine-tuning data: 'builtin' or 'module:function'."),
    curve: str = typer.Option(None, "--curve", help="Extra budgets for the quality-vs-budget plot, e.g. 0.3,0.7."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling and fine-tuning."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the end-to-end speed measurement."),
    speed_threads: int = typer.Option(2, "--speed-threads", help="CPU threads for the speed measurement."),
    no_slower: bool = typer.Option(False, "--no-slower",
                                   help="Never pick a factorisation predicted slower than its dense layer."),
    speedup: float = typer.Option(None, "--speedup",
                                  help="Also reach this whole-model speedup (e.g. 1.3), measured while planning "
                                       "(knapsack allocator)."),
    speed_tolerance: float = typer.Option(0.0, "--speed-tolerance",
                                          help="Transformer blocks: the predicted error may exceed its optimum by "
                                               "this fraction to choose faster options (0: error alone)."),
    remeasure: bool = typer.Option(False, "--remeasure/--no-remeasure",
                                   help="Transformer blocks: fit the plan once, re-price each sub-block by its "
                                        "real error on held-out calibration batches, plan and fit again."),
    calib_data: Path = typer.Option(None, "--calib-data",
                                    help="Text for calibration, fine-tuning and held-out evaluation: .txt (a sample "
                                         "a line), .jsonl or .csv (model directories and minilm)."),
    text_field: str = typer.Option(None, "--text-field", help="The .jsonl field or .csv column holding the text."),
    standalone: bool = typer.Option(False, "--standalone",
                                    help="Copy the base model directory into --out (else its path is recorded)."),
    export: str = typer.Option(None, "--export", help="Also write model.onnx (onnx) and model-int8.onnx "
                                                       "(onnx-int8), verified and compared with PyTorch."),
) -> None:
    """Compress a model to a budget: per-layer plan, factorized weights, metrics and an HTML report."""
    from tensorfold.cli import USER_OMP_WAIT_POLICY
    from tensorfold.cli.common import check_output_path, stderr_console, stdout_console
    from tensorfold.compression.config import CompressConfig, FinetuneConfig
    from tensorfold.compression.job import JobOptions

    # the options become one config each, validated once there (errors name the option)
    if finetune_epochs < 0:
        raise InvalidArgumentError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if not finetune_minutes >= 0:
        raise InvalidArgumentError(f"--finetune-minutes must be >= 0, got {finetune_minutes}")
    try:
        config = CompressConfig(budget=budget, target=target, methods=methods, allocator=allocator,
                                include=_split(include), exclude=_split(exclude), no_slower=no_slower,
                                speedup=speedup, speed_tolerance=speed_tolerance, calib_samples=calib, seed=seed,
                                remeasure=remeasure)
        tune = None
        if finetune_epochs or finetune_minutes:
            # minutes alone: as many epochs as the time allows (early stopping may end it sooner)
            tune = FinetuneConfig(epochs=finetune_epochs or FOREVER, seed=seed,
                                  max_seconds=60.0 * finetune_minutes if finetune_minutes else None)
            if finetune_precision is not None:
                tune = tune.replace(precision=finetune_precision)
        elif finetune_precision is not None:
            raise InvalidArgumentError("--finetune-precision is only used with --finetune-epochs N or "
                                       "--finetune-minutes M")
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(_as_option(str(exc))) from None
    check_output_path(out, overwrite=overwrite, kind="dir")
    options = JobOptions(out=out, overwrite=overwrite, weights=weights, data=data,
                         curve_budgets=_floats(curve, "--curve"), speed=not no_speed, threads=speed_threads,
                         calib_data=str(calib_data) if calib_data is not None else None, text_field=text_field,
                         standalone=standalone, export=export,
                         # timed as a deployed model runs: a fresh process with the user's OpenMP wait policy,
                         # not this command's PASSIVE one (which slows small-kernel models more)
                         speed_in="fresh", speed_wait_policy=USER_OMP_WAIT_POLICY)

    import sys

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tensorfold.compression.job import run_job

    # a pipe or a log file gets a wide table instead of one folded into 80 columns
    console = stdout_console() if sys.stdout.isatty() else stdout_console(width=150)
    err = stderr_console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    def log(msg: str) -> None:
        err.print(msg)

    with progress:
        result = run_job(model, config, options, finetune=tune, progress=on_progress, log=log)
    plan = result.plan
    console.print(plan.table())
    console.print(plan.summary())
    if "plan_timing" in result.metrics:
        from tensorfold.compression.speed import describe_timing

        console.print(f"the budget's latencies {describe_timing(result.metrics['plan_timing'])}")
    for name, reason in plan.skipped:
        console.print(f"skipped {name}: {reason}")
    quality = result.metrics.get("quality", {})
    console.print("quality: " + ", ".join(f"{k} {v:.4f}" for k, v in quality.items()))
    speed = result.metrics.get("speed")
    if speed:
        from tensorfold.compression.evaluate import describe_speed

        console.print(describe_speed(speed))
    from tensorfold.compression.export import describe_variant

    for row in result.metrics.get("export", {}).get("variants", []):
        console.print(describe_variant(row))
    seconds = result.metrics.get("seconds", {})
    if seconds.get("stages"):
        console.print(f"time: compression {seconds['compression']:.1f} s (" + ", ".join(
            f"{k} {v:.1f}" for k, v in seconds["stages"].items()) + f"), total {seconds['total']:.1f} s")
    memory = result.metrics.get("memory", {})
    if memory and "data" in result.metrics:  # a model directory: large models are where memory matters
        console.print(f"peak memory {memory['peak_rss_mb']:.0f} MB")
    console.print(f"wrote {out}/plan.json, weights.safetensors, metrics.json, report.html")


def register(app: typer.Typer) -> None:
    app.command("compress", epilog=EPILOG)(compress)
