"""One compression job end to end, as ``tensorfold compress`` runs it: resolve the model, plan,
apply, optionally fine-tune, evaluate quality and speed, and write the output directory
(``plan.json``, ``weights.safetensors``, ``metrics.json``, ``report.html``) atomically.

>>> from tensorfold.compression.job import JobOptions, run_job
>>> from tensorfold.compression.config import CompressConfig
>>> options = JobOptions(out="runs/minilm-50", overwrite=True)
>>> result = run_job("minilm", CompressConfig(budget=0.5, calib_samples=64), options)  # doctest: +SKIP
>>> result.metrics["quality"]["mean_cos"] > 0.8                                            # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tensorfold.compression.api import Planner, apply
from tensorfold.compression.calibration import materialize
from tensorfold.compression.config import CompressConfig, FinetuneConfig, check_budget
from tensorfold.compression.evaluate import count_params, output_fidelity
from tensorfold.compression.plan import Plan
from tensorfold.compression.speed import Timer
from tensorfold.compression.storage import call_factory, load_factory, load_state, write_compressed
from tensorfold.core.validate import check_count
from tensorfold.errors import FileFormatError, InvalidArgumentError
from tensorfold.io import atomic_directory, check_output


@dataclass
class ModelSource:
    """A model to compress and what goes with it (calibration, evaluation, example inputs)."""

    name: str
    model: nn.Module
    entry: object | None = None  # a tensorfold.zoo.BuiltinModel for built-in models
    calibration: Callable[[int, int], list] | None = None
    exclude: tuple[str, ...] = ()
    output_fn: Callable | None = None


@dataclass
class JobResult:
    plan: Plan
    model: nn.Module
    original: nn.Module
    metrics: dict
    out: Path | None
    curve: list[dict] = field(default_factory=list)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict from a safetensors file or a torch file (``weights_only=True``) into ``model``."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"{p}: no such weights file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for bad files
        raise FileFormatError(f"{p}: cannot read weights safely ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FileFormatError(f"{p}: expected a state dict, found {type(state).__name__}")
    load_state(model, state, str(p))


def is_directory_spec(spec: str) -> bool:
    """Whether ``--model spec`` names a model directory (or a hub name) rather than a built-in or a factory."""
    from tensorfold import zoo

    if spec in zoo.names():
        return False
    return Path(spec).expanduser().is_dir() or ":" not in spec and spec.count("/") >= 1


def _directory_source(path: str, weights: str | None, calib_data: str | None, text_field: str | None, calib: int,
                      seed: int) -> ModelSource:
    from tensorfold.zoo import hf

    entry = hf.entry(path, calib_data, text_field=text_field, n_calib=calib, seed=seed)
    model = entry.extra["model"]
    if weights:
        load_weights(model, weights)
    return ModelSource(entry.name, model, entry, entry.calibration, tuple(entry.exclude), entry.output_fn)


def resolve_model(spec: str, weights: str | None = None, *, calib_data: str | None = None,
                  text_field: str | None = None, calib: int = 128, seed: int = 0) -> ModelSource:
    """A built-in model name (see ``tensorfold.zoo.names()``), ``module:factory``, or a local Hugging Face /
    sentence-transformers directory (``calib_data``: a text file to calibrate, fine-tune and evaluate on)."""
    from tensorfold import zoo

    if calib_data is not None and spec == "minilm":
        # the built-in MiniLM is a sentence-transformers directory inside its package: the user's text applies
        from tensorfold.zoo import minilm

        spec = minilm.model_path()
    if is_directory_spec(spec):
        return _directory_source(spec, weights, calib_data, text_field, calib, seed)
    if calib_data is not None or text_field is not None:
        raise InvalidArgumentError("--calib-data/--text-field apply to a model directory (or minilm), not to "
                                   f"{spec!r}")
    if spec in zoo.names():
        entry = zoo.get(spec)
        model = entry.load()
        if weights:
            load_weights(model, weights)
        return ModelSource(spec, model, entry, entry.calibration, tuple(entry.exclude), entry.output_fn)
    if ":" not in spec:
        raise InvalidArgumentError(
            f"--model {spec!r} is neither a built-in model ({', '.join(zoo.names())}) nor 'module:factory'"
        )
    model = call_factory(load_factory(spec), spec)
    if weights:
        load_weights(model, weights)
    module = __import__(spec.partition(":")[0], fromlist=["_"])
    calibration = getattr(module, "calibration", None)
    return ModelSource(spec, model, None, calibration if callable(calibration) else None)


def _finetune(source: ModelSource, compressed: nn.Module, original: nn.Module, config: FinetuneConfig,
              data: str | None, history=None) -> nn.Module:
    from tensorfold.compression.finetune import finetune, model_finetune_config

    if data in (None, "builtin"):
        entry = source.entry
        if entry is None or getattr(entry, "finetune_data", None) is None:
            raise InvalidArgumentError(f"--finetune-epochs/--finetune-minutes need --data module:function for "
                                       f"{source.name}")
        train, val = entry.finetune_data(32, config.seed)
    else:
        fn = load_factory(data)
        try:
            loaded = fn()
        except TypeError as exc:
            raise InvalidArgumentError(f"--data {data}: {exc} (it is called with no arguments and returns "
                                       "(train_batches, val_batches) or train_batches)") from exc
        except Exception as exc:
            raise InvalidArgumentError(f"--data {data} raised {type(exc).__name__}: {exc}") from exc
        train, val = loaded if isinstance(loaded, tuple) and len(loaded) == 2 else (loaded, None)
    extra = source.entry.extra if source.entry is not None else {}
    tuned = model_finetune_config(extra, config, embeddings=source.output_fn is not None)
    return finetune(compressed, train, tuned, teacher=original, val_data=val, output_fn=source.output_fn,
                    history=history)


def headline_metric(quality: dict) -> tuple[str, bool] | None:
    """The quality figure that decides whether fine-tuning helped, and whether higher is better."""
    for key in ("accuracy", "mean_cos"):
        if key in quality:
            return key, True
    if "rel_error" in quality:
        return "rel_error", False
    return None


def finetune_and_keep_better(source: ModelSource, compressed: nn.Module, original: nn.Module,
                             config: FinetuneConfig, data: str | None, eval_batches: list,
                             log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """Fine-tune ``compressed``, log the loss per epoch, compare quality before and after on the evaluation
    data, and keep the better model (with a warning when fine-tuning made it worse); the record of it all
    goes to metrics.json as ``finetune``."""
    from tensorfold.compression.finetune import FinetuneHistory

    def on_epoch(entry: dict) -> None:
        val = f", validation loss {entry['val_loss']:.5g}" if "val_loss" in entry else ""
        log(f"fine-tune epoch {entry['epoch']}: training loss {entry['train_loss']:.5g}{val}")

    # the quality before and after is evaluation time, not fine-tuning time (the job's stage times)
    evaluating = 0.0

    def evaluated(model: nn.Module) -> dict:
        nonlocal evaluating
        start = time.perf_counter()
        quality = evaluate_pair(source, original, model, eval_batches)
        evaluating += time.perf_counter() - start
        return quality

    before = evaluated(compressed)
    history = FinetuneHistory(on_epoch=on_epoch)
    tuned = _finetune(source, compressed, original, config, data, history)
    for note in history.notes:  # e.g. precision "auto" fell back to float32 on this hardware
        log(note)
    after = evaluated(tuned)
    record = {"epochs": history.epochs, "best_epoch": history.best_epoch, "stopped_early": history.stopped_early,
              "steps": history.steps, "seconds": history.seconds, "out_of_time": history.out_of_time,
              "precision": history.precision, "notes": history.notes,
              "seconds_evaluating": evaluating,
              "quality_before": before, "quality_after": after, "kept": "fine-tuned"}
    head = headline_metric(before)
    if head is not None:
        key, higher = head
        worse = after[key] < before[key] if higher else after[key] > before[key]
        record["metric"] = key
        log(f"fine-tuning: {key} {before[key]:.4f} -> {after[key]:.4f}")
        if worse:
            record["kept"] = "before fine-tuning"
            record["warning"] = (f"fine-tuning made {key} worse ({before[key]:.4f} -> {after[key]:.4f}); "
                                 "kept the model from before fine-tuning")
            log("warning: " + record["warning"])
            return compressed, record
    return tuned, record


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports kilobytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def tensor_mb(model: nn.Module) -> float:
    """MB held by ``model``'s parameters and buffers (each storage counted once: tied weights share one)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / 2**20


class MemoryLog:
    """Peak resident memory after each stage of a job (the peak so far: stages only ever raise it), for
    metrics.json's ``memory`` section: ``peak_rss_mb``, ``peak_rss_mb_after_<stage>``, ``model_mb`` and
    ``compressed_mb`` (tensor bytes of the two models)."""

    def __init__(self):
        self.record: dict[str, float] = {"peak_rss_mb_at_start": peak_rss_mb()}

    def stage(self, name: str) -> None:
        self.record[f"peak_rss_mb_after_{name}"] = peak_rss_mb()

    def result(self, original: nn.Module, compressed: nn.Module) -> dict[str, float]:
        return {"peak_rss_mb": peak_rss_mb(), **self.record, "model_mb": tensor_mb(original),
                "compressed_mb": tensor_mb(compressed)}


def _write_directory_model(tmp: Path, source: ModelSource, compressed: nn.Module, original: nn.Module, plan: Plan,
                           metrics: dict, options: JobOptions, log: Callable[[str], None]) -> None:
    """Output of a model directory: the changed tensors and hf.json (base recorded or copied), the ONNX
    export and its comparison when asked, metrics.json last (it records the export)."""
    from tensorfold.compression.hf_storage import write_hf_compressed

    info = source.entry.extra
    write_hf_compressed(compressed, original, plan, tmp, kind=info["kind"], base_path=info["path"],
                        standalone=options.standalone, split=info.get("split_record"))
    if options.export:
        from tensorfold.compression.export import ExportInputs, export_directory

        inputs = ExportInputs(info["kind"], info["eval_batches"], source.entry.example_inputs(32), options.threads)
        metrics["export"] = export_directory(tmp, compressed, original, inputs, int8=options.export == "onnx-int8",
                                             log=log)
        metrics["export"]["held_out"] = {"samples": sum(len(b["input_ids"]) for b in info["eval_batches"]),
                                         "same_as_compress": True}
        if "memory" in metrics:  # exporting (tracing, ONNX Runtime sessions) can raise the peak
            metrics["memory"].update(peak_rss_mb=peak_rss_mb(), peak_rss_mb_after_export=peak_rss_mb())
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))


def job_timer(source: ModelSource, original: nn.Module, options: JobOptions,
              log: Callable[[str], None]) -> Timer:
    """Where the job times (a speed or latency budget's planning, the speed line): this process, or with
    ``options.speed_in == "fresh"`` one fresh process for all of it (a model directory is rebuilt from its
    path); a fresh process that fails hands over to this one and the records say why."""
    if options.speed_in != "fresh":
        return Timer()
    from tensorfold.compression.fresh_speed import FreshTimer

    extra = source.entry.extra if source.entry is not None else {}
    spec = extra["path"] if "kind" in extra else source.name
    return FreshTimer(spec, original, wait_policy=options.speed_wait_policy, log=log).snapshot()


def evaluate_pair(source: ModelSource, original: nn.Module, compressed: nn.Module, batches: list) -> dict:
    """Quality metrics: the built-in evaluation, else output fidelity on ``batches`` (if any)."""
    if source.entry is not None:
        return dict(source.entry.evaluate(original, compressed))
    if not batches:
        return {}
    return output_fidelity(original, compressed, batches, source.output_fn)


def evaluation_batches(source: ModelSource, calib: int, seed: int) -> list:
    """Held-out batches for a user model: its calibration function with another seed."""
    if source.entry is not None or source.calibration is None:
        return []
    return materialize(source.calibration(max(min(calib, 256), 32), seed + 1))


@dataclass(frozen=True)
class JobOptions:
    """What a job does besides compressing: where it writes, what else it measures (checked when built).

    out: the output directory (None: write nothing); overwrite: replace it if it exists.
    weights: a state dict to load into the model first. data: fine-tuning data ("builtin" or
    "module:function"; only with a fine-tuning config). curve_budgets: extra budgets for the
    quality-vs-budget curve. speed: measure the end-to-end speedup with ``threads`` CPU threads. For a model
    directory: calib_data (a .txt/.jsonl/.csv file; text_field its field or column), standalone (copy the
    base directory into the output) and export ("onnx" or "onnx-int8"). speed_in: time the speed in "this"
    process, or in a "fresh" one (:mod:`tensorfold.compression.fresh_speed`) whose OpenMP wait policy is
    speed_wait_policy (None: the runtime's default), as a deployed model runs; the ``tensorfold`` command
    asks for "fresh" because it runs itself with ``OMP_WAIT_POLICY=PASSIVE``.
    """

    out: str | Path | None = None
    overwrite: bool = False
    weights: str | None = None
    data: str | None = None
    curve_budgets: tuple[float, ...] = ()
    speed: bool = True
    threads: int = 2
    calib_data: str | None = None
    text_field: str | None = None
    standalone: bool = False
    export: str | None = None
    speed_in: str = "this"
    speed_wait_policy: str | None = None

    def __post_init__(self):
        if self.speed_in not in ("this", "fresh"):
            raise InvalidArgumentError(f"speed_in must be 'this' or 'fresh', got {self.speed_in!r}")
        if self.export not in (None, "onnx", "onnx-int8"):
            raise InvalidArgumentError(f"--export must be onnx or onnx-int8, got {self.export!r}")
        object.__setattr__(self, "curve_budgets", tuple(check_budget(b, "--curve budget") for b in self.curve_budgets))
        object.__setattr__(self, "out", Path(self.out) if self.out is not None else None)
        check_count(self.threads, "threads", minimum=1)


def run_job(
    model: str | ModelSource = "minilm",
    config: CompressConfig | None = None,
    options: JobOptions | None = None,
    *,
    finetune: FinetuneConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> JobResult:
    """Compress ``model`` with ``config`` and write the results to ``options.out`` (nothing is written
    if anything fails); ``finetune`` fine-tunes the compressed model with distillation first."""
    config = config if config is not None else CompressConfig()
    options = options if options is not None else JobOptions()
    if options.data is not None and finetune is None:
        raise InvalidArgumentError("--data is only used with --finetune-epochs N or --finetune-minutes M")
    out_path, overwrite = options.out, options.overwrite
    # refuse an output that cannot be written before minutes of work, not after
    if out_path is not None:
        check_output(out_path, overwrite=overwrite, kind="dir")

    t0 = time.perf_counter()
    memory = MemoryLog()
    calib, seed = config.calib_samples, config.seed
    source = model if isinstance(model, ModelSource) else resolve_model(
        model, options.weights, calib_data=options.calib_data, text_field=options.text_field, calib=calib, seed=seed)
    original = source.model
    memory.stage("load")
    log(f"model {source.name}: {count_params(original):,} parameters")
    hf_info = source.entry.extra if source.entry is not None and "kind" in source.entry.extra else None
    if hf_info is not None:
        log(f"{hf_info['kind']} model; text from {hf_info['data']}: " +
            ", ".join(f"{k} {v}" for k, v in hf_info["split"].items()) + " samples")
    elif options.standalone or options.export:
        raise InvalidArgumentError("--standalone and --export apply to a model directory (Hugging Face or "
                                   "sentence-transformers)")
    batches = []
    if calib:
        if source.calibration is None:
            raise InvalidArgumentError(
                f"--calib needs calibration data: {source.name} has none (define calibration(n, seed) beside the "
                f"factory, or pass --calib 0 for weight-only fitting)"
            )
        batches = materialize(source.calibration(calib, seed))
    if source.exclude and not config.include:  # the model's own exclusions (e.g. a classifier head)
        config = config.replace(exclude=(*(config.exclude or ()), *source.exclude))
    t_load = time.perf_counter()
    # one timer for the whole job: a fresh process, if asked, starts once (planning with a speed goal or the
    # speed line, whichever comes first) and ends with the job
    with job_timer(source, original, options, log) as timer:
        planner = Planner(original, config, calib=batches or None,
                          example_inputs=source.entry.example_inputs(32) if source.entry is not None else None,
                          output_fn=source.output_fn, model_name=source.name, progress=progress)
        plan = planner.plan()
        t_plan = time.perf_counter()
        memory.stage("plan")
        compressed = apply(original, plan, batches or None, progress=progress)
        t_apply = time.perf_counter()
        memory.stage("apply")
        eval_batches = evaluation_batches(source, calib, seed)
        tuning = None
        if finetune is not None:
            compressed, tuning = finetune_and_keep_better(source, compressed, original, finetune, options.data,
                                                          eval_batches, log)
            memory.stage("finetune")
        t_tune = time.perf_counter()
        quality = tuning["quality_after" if tuning["kept"] == "fine-tuned" else "quality_before"] if tuning else \
            evaluate_pair(source, original, compressed, eval_batches)
        t_eval = time.perf_counter()
        evaluating_tuned = tuning["seconds_evaluating"] if tuning else 0.0
        metrics = {
            "model": source.name,
            "budget": config.budget,
            "target": config.target,
            "allocator": plan.allocator,
            "calibration_samples": calib,
            "params_original": count_params(original),
            "params_compressed": count_params(compressed),
            "quality": quality,
            "plan_totals": plan.totals(),
            # compression = plan + apply; the stages say where the time went
            "seconds": {"plan": t_plan - t0, "apply": t_apply - t_plan, "compression": t_apply - t_load,
                        "stages": {"load": t_load - t0, **planner.seconds,
                                   # choosing under the budget (with a speed goal: the measured rounds)
                                   "allocation": max(t_plan - t_load - sum(planner.seconds.values()), 0.0),
                                   "fitting": t_apply - t_plan,
                                   **({"fine-tuning": t_tune - t_apply - evaluating_tuned}
                                      if tuning is not None else {}),
                                   "evaluation": t_eval - t_tune + evaluating_tuned}},
        }
        if tuning is not None:
            metrics["finetune"] = tuning
        if config.speedup is not None or config.target == "latency" or config.no_slower:
            metrics["plan_timing"] = timer.record()  # where the budget's latencies and checks were timed
        if plan.speed_rounds:  # the speed goal's rounds: what each measured, which was kept and why
            metrics["speed_rounds"] = plan.speed_rounds
        if plan.retimed_probes:  # latency probes timed again as implausible (a hiccup would reach a whole shape)
            metrics["retimed_probes"] = plan.retimed_probes
        if options.speed:
            example = (source.entry.example_inputs(32) if source.entry is not None
                       else (eval_batches[0] if eval_batches else None))
            if example is not None:
                t_speed = time.perf_counter()
                metrics["speed"] = timer.pair(original, compressed, plan, example, threads=options.threads)
                metrics["seconds"]["stages"]["speed"] = time.perf_counter() - t_speed
        budget = config.budget
        curve = [{"budget": budget, "fraction": plan.fraction, **quality}]
        for b in sorted(set(options.curve_budgets) - {budget}):
            p_b = planner.plan(b, curve=False)
            c_b = apply(original, p_b, batches or None)
            curve.append({"budget": b, "fraction": p_b.fraction, **evaluate_pair(source, original, c_b, eval_batches)})
        curve.sort(key=lambda r: r["budget"])
        metrics["quality_curve"] = curve
        if hf_info is not None:
            record = hf_info.get("split_record") or {}
            metrics["data"] = {"source": hf_info["data"], **hf_info["split"],
                               **{k: record[k] for k in ("seed", "sha256", "evaluation_sha256") if k in record}}
        memory.stage("evaluate")
        metrics["memory"] = memory.result(original, compressed)
        metrics["seconds"]["total"] = time.perf_counter() - t0
        if out_path is not None:
            from tensorfold.report import write_report

            with atomic_directory(out_path, overwrite=overwrite) as tmp:
                if hf_info is None:
                    write_compressed(compressed, plan, tmp, {"metrics.json": json.dumps(metrics, indent=1)})
                else:
                    _write_directory_model(tmp, source, compressed, original, plan, metrics, options, log)
                write_report(tmp / "report.html", plan, metrics)
        return JobResult(plan, compressed, original, metrics, out_path, curve)
