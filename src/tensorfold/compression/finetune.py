"""Fine-tune a compressed model, with knowledge distillation from the original.

Compression loses accuracy; a short fine-tune wins most of it back (Lebedev et al. 2015, Kim et al.
2016, ALDS). :func:`finetune` trains a deep copy of the compressed model on labelled batches, on
inputs alone (pure distillation from the teacher), or both, and returns the copy; neither the
compressed model nor the teacher is changed.

>>> import torch
>>> from torch import nn
>>> teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
>>> student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
>>> inputs = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
>>> tuned = finetune(student, inputs, teacher=teacher, epochs=2, progress=False)
>>> tuned is student
False
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorfold.compression.calibration import output_tensor
from tensorfold.compression.config import DISTILL_LOSSES, DISTILL_MODES, PRECISIONS, SCHEDULES, FinetuneConfig
from tensorfold.core.modules import Batch, eval_mode, split_batch  # noqa: F401  (Batch re-exported)
from tensorfold.core.validate import make_generator
from tensorfold.errors import InvalidArgumentError, ShapeError

__all__ = ["finetune", "FinetuneConfig", "FinetuneHistory", "DISTILL_MODES", "DISTILL_LOSSES", "SCHEDULES",
           "PRECISIONS", "balance_factors", "balance_value_output", "block_feature_layers", "bfloat16_native",
           "distillation_loss", "feature_loss", "lr_factor", "model_finetune_config", "resolve_precision"]


@dataclass
class FinetuneHistory:
    """What happened during :func:`finetune`: one entry per epoch (``train_loss``, ``val_loss``)."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 0 = the model as given was best on the validation data
    best_val_loss: float | None = None
    steps: int = 0
    stopped_early: bool = False
    checks: list[dict[str, float]] = field(default_factory=list)  # validations between epochs (eval_every)
    seconds: float = 0.0  # wall-clock time of the whole fine-tune (by its clock)
    out_of_time: bool = False  # stopped by ``max_seconds``
    precision: str = "float32"  # the training steps' arithmetic that ran (``precision="auto"`` resolved)
    notes: list[str] = field(default_factory=list)  # e.g. why "auto" fell back to float32
    on_epoch: Callable[[dict], object] | None = field(default=None, repr=False, compare=False)
    # the clock the run is timed with (``max_seconds``, ``seconds``): seconds as a float
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False, compare=False)


def default_output(outputs) -> torch.Tensor:
    """The tensor to train on (see :func:`tensorfold.compression.calibration.output_tensor`)."""
    return output_tensor(outputs)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 2.0,
                      kind: str = "kl") -> torch.Tensor:
    """Distance of ``student`` outputs from ``teacher`` outputs.

    ``kind="kl"``: Hinton's KL(teacher || student) on softened logits (last dimension = classes),
    scaled by temperature**2 so gradients keep their size; ``"mse"``: mean squared error relative to
    the teacher's mean square; ``"cosine"``: mean of 1 - cosine similarity along the last dimension.
    """
    if student.shape != teacher.shape:
        raise ShapeError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    if kind == "kl":
        t = float(temperature)
        log_p_student = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher.flatten(0, -2) / t, dim=-1)
        return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t
    if kind == "mse":
        return feature_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise InvalidArgumentError(f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}, got {kind!r}")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of two feature maps relative to the teacher's mean square.

    ``mask`` (e.g. a Hugging Face ``attention_mask``, shape ``(batch, tokens)``) keeps only the positions
    where it is nonzero, so padding tokens count neither in the error nor in the teacher's mean square;
    it applies when the feature maps start with its shape (``(batch, tokens, ...)``) and is ignored
    otherwise (pooled outputs, conv maps).

    >>> t = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])     # one sentence, 2 tokens (the second is padding)
    >>> s = torch.tensor([[[2.0, 1.0], [0.0, 0.0]]])
    >>> float(feature_loss(s, t, torch.tensor([[1, 0]])))  # (1 + 0) / (1 + 1)
    0.5
    """
    if student.shape != teacher.shape:
        raise ShapeError(f"student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} differ")
    if mask is None or student.dim() < mask.dim() or tuple(student.shape[: mask.dim()]) != tuple(mask.shape):
        return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
    keep = (mask != 0).to(student.dtype).reshape(*mask.shape, *([1] * (student.dim() - mask.dim())))
    # sums over the kept positions: the ratio of the means, each over the same kept entries
    return ((student - teacher).pow(2) * keep).sum() / (teacher.pow(2) * keep).sum().clamp_min(1e-12)


def lr_factor(progress: float, schedule: str = "constant", warmup: float = 0.0) -> float:
    """The learning rate's multiplier when ``progress`` (0 to 1) of the run is done: a linear warmup from 0
    over the first ``warmup`` of the run, then ``schedule``: "constant" (1), "linear" (down to 0 at the end)
    or "cosine" (half a cosine down to 0).

    >>> [round(lr_factor(p, "linear", warmup=0.2), 3) for p in (0.1, 0.2, 0.6, 1.0)]
    [0.5, 1.0, 0.5, 0.0]
    >>> round(lr_factor(0.5, "cosine"), 3)
    0.5
    """
    p = min(max(float(progress), 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    done = (p - warmup) / (1 - warmup) if warmup < 1 else 1.0
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done))
    raise InvalidArgumentError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def bfloat16_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (a CPU with AVX512-BF16 or AMX, a CUDA
    GPU that supports bfloat16). Elsewhere bfloat16 autocast still gives the right answers, but by
    conversion and emulation: slower than float32, so ``precision="auto"`` keeps float32 there."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:  # oneDNN's own check of the CPU's instructions (what its bfloat16 kernels need)
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN or without the check
        return False


def resolve_precision(precision: str | None, device: torch.device | str = "cpu") -> tuple[str, str | None]:
    """The arithmetic a fine-tune on ``device`` runs for ``precision`` (:data:`PRECISIONS`; None: float32), and
    a note when "auto" fell back to float32. float16 needs CUDA (on a CPU it is emulated and slow, and its narrow range
    needs loss scaling): elsewhere it is an InvalidArgumentError rather than a silent change.

    >>> resolve_precision("float32")
    ('float32', None)
    >>> resolve_precision("bfloat16", "cpu")
    ('bfloat16', None)
    """
    if precision is None:
        return "float32", None
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    device = torch.device(device)
    if precision == "float16" and device.type != "cuda":
        raise InvalidArgumentError(f"precision 'float16' needs a CUDA device (the model is on {device.type}); "
                                   "use 'bfloat16' or 'auto' on a CPU")
    if precision == "bfloat16" and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise InvalidArgumentError(f"precision 'bfloat16' is not available on {device.type}")
    if precision != "auto":
        return precision, None
    if bfloat16_native(device):
        return "bfloat16", None
    return "float32", (f"precision 'auto': this {device.type} has no native bfloat16 arithmetic "
                       "(AVX512-BF16/AMX or a bfloat16 GPU), so the fine-tune ran in float32")


class _Precision:
    """Autocast of the training forward passes and, for float16, loss scaling. The weights and the optimizer
    stay float32 (the small updates of a low learning rate would round away in 8 bits of mantissa) and
    every loss is computed in float32 from upcast outputs."""

    def __init__(self, precision: str, device: torch.device):
        self.name, self.note = resolve_precision(precision, device)
        self.device_type = device.type
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.name)
        # float16's range (6e-5 .. 65504) loses small gradients: scale the loss up, the gradients back down
        self.scaler = torch.amp.GradScaler(self.device_type) if self.name == "float16" else None

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        if self.dtype is None or not enabled:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype))
        if self.device_type == "cpu":
            # the CPU's fused (flash) attention is ~4x slower backward in bfloat16 than in float32 (MiniLM
            # fine-tune: 23 ms against 6 ms a call), which ate most of bfloat16's gain; the composed kernel's
            # bfloat16 matrix products are fast (16 steps: 7.4 s against 8.3 s fused, 9.3 s float32)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when autocast made it half or bfloat16 (losses are computed in float32); other
    dtypes (a float64 model) unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def task_loss(outputs: torch.Tensor, targets) -> torch.Tensor:
    """Cross-entropy for integer class targets, mean squared error for float targets of the output's shape."""
    if not isinstance(targets, torch.Tensor):
        raise ShapeError(f"targets must be a tensor, got {type(targets).__name__}")
    if not targets.is_floating_point():
        if outputs.dim() < 2 or targets.shape != outputs.shape[:1] + outputs.shape[2:]:
            raise ShapeError(f"integer targets {tuple(targets.shape)} do not fit logits {tuple(outputs.shape)}")
        return F.cross_entropy(outputs, targets)
    if targets.shape != outputs.shape:
        raise ShapeError(f"float targets {tuple(targets.shape)} do not match outputs {tuple(outputs.shape)}")
    return F.mse_loss(outputs, targets.to(outputs.dtype))


def feature_layer_names(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Modules present under the same name in both models whose type differs (the replaced layers)."""
    teacher_modules = dict(teacher.named_modules())
    names = []
    for name, module in student.named_modules():
        if not name or name not in teacher_modules:
            continue
        if type(module) is not type(teacher_modules[name]) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def block_feature_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """The transformer blocks of ``teacher`` (:func:`~tensorfold.compression.blocks.find_blocks`) that the
    student keeps under the same name: each student block's output should reproduce the teacher's block
    of that name, whatever was dropped before it. A dropped block (a ``SkipBlock``) has no output of its
    own to match and is left out. Empty when no block is recognised."""
    from tensorfold.compression.blocks import find_blocks
    from tensorfold.nn.transformer import SkipBlock

    student_modules = dict(student.named_modules())
    return [b.name for b in find_blocks(teacher)
            if b.name in student_modules and not isinstance(student_modules[b.name], SkipBlock)]


def model_finetune_config(extra: Mapping[str, Any], config: FinetuneConfig | None = None, *,
                          embeddings: bool = False) -> FinetuneConfig:
    """``config`` completed by a model's own fine-tuning recipe (a :class:`~tensorfold.zoo.BuiltinModel`'s
    ``extra``), for the settings ``config`` leaves at their defaults (values set on purpose stay):

    - ``extra["finetune_recipe"] == "transformers"``: :meth:`FinetuneConfig.for_transformers` (layer-wise
      distillation of the blocks, warmup and cosine decay, no dropout, embeddings fixed, bfloat16 steps where
      the hardware computes them natively);
    - ``extra["finetune_<setting>"]``: that one setting (e.g. ``finetune_lr``);
    - ``embeddings=True`` (the compared output is an embedding, e.g. a sentence embedding): cosine rather
      than KL, unless ``extra["distill_loss"]`` says otherwise.

    >>> model_finetune_config({"finetune_recipe": "transformers", "finetune_lr": 3e-4},
    ...                       FinetuneConfig(max_seconds=60), embeddings=True).lr
    0.0003
    """
    config = config if config is not None else FinetuneConfig()
    defaults, changes = FinetuneConfig(), {}
    if config.distill_loss == defaults.distill_loss:
        if embeddings:
            changes["distill_loss"] = "cosine"
        if "distill_loss" in extra:
            changes["distill_loss"] = extra["distill_loss"]  # a model directory: cosine or KL by its kind
    recipe = FinetuneConfig.for_transformers() if extra.get("finetune_recipe") == "transformers" else defaults
    for key in defaults.to_dict():
        if key == "distill_loss" or getattr(config, key) != getattr(defaults, key):
            continue  # set on purpose
        if f"finetune_{key}" in extra:
            changes[key] = extra[f"finetune_{key}"]
        elif getattr(recipe, key) != getattr(defaults, key):
            changes[key] = getattr(recipe, key)
    return config.replace(**changes)


def finetune(
    compressed: nn.Module,
    data: Iterable,
    config: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_data: Iterable | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    history: FinetuneHistory | None = None,
    **settings,
) -> nn.Module:
    """Fine-tune a deep copy of ``compressed`` and return it (the best one on ``val_data`` if given).

    Parameters
    ----------
    compressed: the model to train (not modified). Every parameter is trained, unless some are frozen and
        others not (an adapted model from :func:`tensorfold.adapt`): then only the trainable ones.
    data: re-iterable batches, each ``(inputs, targets)`` or inputs alone; inputs are a tensor or a dict
        of keyword arguments. Inputs alone need a ``teacher`` (pure distillation). A list of batches is
        visited in a new seeded order each epoch; a loader is used as it iterates.
    config: a :class:`~tensorfold.compression.config.FinetuneConfig`; keyword ``settings`` build or
        amend it (``epochs``, ``lr``, ``distill``, ``alpha``, ``temperature``, ``distill_loss``,
        ``feature_layers``, ``feature_weight``, ``patience``, ``seed``, ``weight_decay``, ``max_steps``,
        ``progress``):

        - distill: "logits" (match the teacher's outputs), "features" (outputs plus the outputs of every
          layer whose type differs between student and teacher, or of ``feature_layers``), "blocks"
          (outputs plus every transformer block's output, :func:`block_feature_layers`: layer-wise
          distillation in the TinyBERT/CoFi manner; the replaced layers when no block is recognised), or
          None. Feature terms (:func:`feature_loss`, averaged over the layers, times ``feature_weight``)
          compare every token, leaving out padding when the batch is a dict with an ``attention_mask``.
        - alpha: weight of the distillation term when targets are present: ``alpha * distill + (1 - alpha)
          * task``. Without targets the loss is the distillation term alone.
        - temperature, distill_loss: softening of the KL on logits; "kl" (default), "mse" or "cosine" (for
          embeddings, e.g. with ``output_fn`` picking a sentence embedding).
        - patience: with ``val_data``, training stops after this many validations in a row without
          improvement (one per epoch, and one every ``eval_every`` steps when set).
        - seed: seeds the batch order and any dropout (torch's global generator is restored afterwards).
        - max_steps: stop after this many optimizer steps in total; progress: a progress bar on stderr.
        - eval_every: with ``val_data``, also validate every this many steps (epochs longer than the time).
        - freeze: parameter-name patterns (shell-style) that stay fixed, e.g. ``("*embeddings*",)``: the
          layers compression left alone need not move (and a large embedding table makes every step slow).
        - train_mode: False trains the student in eval mode (no dropout, batch norm on its running
          statistics): a short distillation that repairs a compressed model matches the teacher's
          deterministic outputs better without dropout noise.
        - schedule, warmup: the learning rate warms up linearly from 0 over the first ``warmup`` of the run,
          then stays ("constant") or decays to 0 ("linear", "cosine", :func:`lr_factor`). The run's length
          is its steps (``max_steps`` or epochs x batches) or ``max_seconds``, whichever ends it first.
        - max_seconds: a wall-clock budget for the whole call, validations included: no step starts once
          the time left would not cover the final validation (measured as the last one took).
        - precision: the training steps' forward passes (student and teacher) under autocast in "bfloat16"
          (CPU or CUDA) or "float16" (CUDA, with loss scaling); "auto" = bfloat16 where the device computes
          it natively (:func:`bfloat16_native`), float32 elsewhere (with a note in the history); None (the
          default) or "float32": no autocast. Weights,
          optimizer state and losses stay float32, and validation runs in float32: the checkpoint is chosen
          on the model as it is returned. More steps per minute on a CPU with AVX512-BF16 (measured on
          MiniLM, docs/compress.md), at the cost of rounding noise in each step's gradients.
    teacher: the original model; its outputs are the distillation targets (it is run in eval mode and
        left as it was).
    val_data: batches for early stopping: the validation loss (same objective) is measured before
        training and after every epoch, and the best weights (possibly the untouched input) are returned.
    output_fn: maps the model output to the tensor compared (default :func:`default_output`).
    loss_fn: ``loss_fn(outputs, targets)`` for the task term (default :func:`task_loss`).
    history: a :class:`FinetuneHistory` to fill with per-epoch losses (its ``on_epoch`` callback, if
        any, receives each epoch's record as it ends; its ``clock``, ``time.perf_counter`` by default,
        times the run for ``max_seconds``).

    Example: ``tuned = finetune(small, train_batches, teacher=model, epochs=3, val_data=val_batches)``.
    """
    if not isinstance(compressed, nn.Module):
        raise InvalidArgumentError(f"compressed must be a torch.nn.Module, got {type(compressed).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise InvalidArgumentError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    record = history if history is not None else FinetuneHistory()
    if callable(settings.get("progress")):  # progress=callable: the per-epoch callback of older releases
        record.on_epoch = settings.pop("progress")
        settings["progress"] = False
    cfg = FinetuneConfig.build(config, **settings)
    epochs, max_steps, patience = cfg.epochs, cfg.max_steps, cfg.patience
    data = _reiterable(data, "data")
    val_data = None if val_data is None else _reiterable(val_data, "val_data")
    use_teacher = teacher is not None and cfg.distill is not None
    output_fn = output_fn or default_output
    loss_fn = loss_fn or task_loss

    student = copy.deepcopy(compressed)
    flags = [p.requires_grad for p in student.parameters()]
    if all(flags) or not any(flags):
        balance_factors(student)
        balance_value_output(student, teacher)
        for p in student.parameters():
            p.requires_grad_(True)
    # else a partly frozen model (e.g. from tensorfold.adapt: frozen base, trainable adapters) trains
    # only what it left trainable.
    for name, p in student.named_parameters():
        if cfg.freeze and any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.freeze):
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.is_floating_point() and p.requires_grad]
    if not params:
        raise InvalidArgumentError("the compressed model has no trainable floating-point parameters")
    device = params[0].device
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    precision = _Precision(cfg.precision, device)
    record.precision = precision.name
    if precision.note:
        record.notes.append(precision.note)

    features = None
    if use_teacher and cfg.distill in ("features", "blocks"):
        if cfg.feature_layers is not None:
            names = list(cfg.feature_layers)
        else:
            names = block_feature_layers(student, teacher) if cfg.distill == "blocks" else []
            names = names or feature_layer_names(student, teacher)
        features = _FeatureTaps(student, teacher, names)
    run = _RunLength(cfg, data, record.clock)

    objective = _Objective(student, teacher if use_teacher else None, features, output_fn, loss_fn, cfg, precision)
    generator = make_generator(cfg.seed)
    reporter = _Progress(cfg.progress, record.on_epoch, epochs, data)

    try:
        with eval_mode(*([teacher] if teacher is not None else [])), _seeded_global_rng(cfg.seed), reporter:
            best_state, best_val = None, math.inf
            if val_data is not None:
                best_val = run.timed(objective.mean_loss, val_data, device)
                best_state = copy.deepcopy(student.state_dict())
                record.best_val_loss = best_val
            bad = 0  # validations in a row without improvement

            def validate(epoch: int) -> float:
                nonlocal best_val, best_state, bad
                val = run.timed(objective.mean_loss, val_data, device)
                if val < best_val:
                    best_val, bad = val, 0
                    best_state = copy.deepcopy(student.state_dict())
                    record.best_epoch, record.best_val_loss = epoch, val
                else:
                    bad += 1
                student.train(cfg.train_mode)
                return val

            every = cfg.eval_every if val_data is not None else None
            stop, lr = False, cfg.lr
            for epoch in range(1, epochs + 1):
                student.train(cfg.train_mode)
                total, count = 0.0, 0
                for item in _epoch_order(data, generator):
                    if run.out_of_time(val_data is not None):
                        record.out_of_time = True
                        break
                    lr = cfg.lr * run.factor(record.steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    run.step_started()
                    loss = objective.loss(split_batch(item).to(device))
                    precision.step(loss, optimizer)
                    run.step_ended()
                    total, count = total + float(loss.detach()), count + 1
                    record.steps += 1
                    reporter.step(epoch, float(loss.detach()))
                    if max_steps is not None and record.steps >= max_steps:
                        break
                    if every is not None and record.steps % every == 0:
                        record.checks.append({"epoch": epoch, "steps": record.steps, "lr": lr,
                                              "val_loss": validate(epoch), "seconds": run.elapsed()})
                        if patience is not None and bad >= patience:
                            stop = True
                            break
                if record.out_of_time and count == 0:
                    break  # the time ran out before this epoch's first step: nothing new to validate
                entry = {"epoch": epoch, "train_loss": total / max(1, count), "steps": record.steps, "lr": lr}
                if val_data is not None:
                    checked = record.checks and record.checks[-1]["steps"] == record.steps
                    entry["val_loss"] = record.checks[-1]["val_loss"] if checked else validate(epoch)
                record.epochs.append(entry)
                reporter.epoch(entry)
                if record.out_of_time or (max_steps is not None and record.steps >= max_steps):
                    break
                if stop or (patience is not None and val_data is not None and bad >= patience):
                    record.stopped_early = stop or epoch < epochs
                    break
            if best_state is not None:
                student.load_state_dict(best_state)
            record.seconds = run.elapsed()
    finally:
        if features is not None:
            features.remove()
    student.eval()
    return student


@torch.no_grad()
def balance_factors(model: nn.Module) -> int:
    """Give the two factors of every low-rank layer (LowRankLinear, SVDConv...) equal norms per rank
    component, in place.

    Data-aware fitting can leave one factor tiny and the other huge (the whitening goes to one side).
    The layer computes the same function either way, but Adam moves every weight by about ``lr``
    whatever its scale, so a factor with entries around 1e-3 is wiped out by the first steps. Scaling
    component ``i`` of the first factor by ``c_i`` and of the second by ``1 / c_i`` changes nothing in
    the outputs (no bias or nonlinearity sits between them). Returns the number of layers balanced.
    """
    from tensorfold.nn import LowRankLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LowRankLayer):
            continue
        first, second = module.lowrank_sides()
        groups = getattr(first, "groups", 1)
        if first.bias is not None or second.weight.shape[1] * groups != first.weight.shape[0]:
            continue
        w1, w2 = first.weight, second.weight
        rank = w2.shape[1]  # components per group
        n1 = w1.flatten(1).norm(dim=1)  # (groups * rank,)
        # second factor: rows of group k use its input channels k*rank .. (k+1)*rank-1 as columns 0..rank-1
        w2g = w2.reshape(groups, w2.shape[0] // groups, rank, -1)
        n2 = w2g.transpose(1, 2).reshape(groups * rank, -1).norm(dim=1)
        ok = (n1 > 0) & (n2 > 0)
        scale = torch.where(ok, (n2 / n1.where(ok, torch.ones_like(n1))).sqrt(), torch.ones_like(n1))
        w1.mul_(scale.reshape(-1, *([1] * (w1.dim() - 1))))
        w2g.div_(scale.reshape(groups, 1, rank, 1))
        count += 1
    return count


@torch.no_grad()
def balance_value_output(model: nn.Module, reference: nn.Module | None = None, *, ratio: float = 4.0) -> int:
    """Give each value channel of an attention and the output projection's columns that read it equal
    norms, in place, where they are far apart (more than ``ratio`` on the geometric mean); returns the
    number of attentions balanced.

    A value/output pair fitted as one product (``vo-svd``) leaves the value rows tiny (norms ~1e-3) and the
    output columns huge (~1e2). Adam moves every weight by about ``lr`` whatever its scale, so the first
    steps of a fine-tune wipe the value rows out and the model gets worse before it gets better (measured:
    a MiniLM plan's validation loss 0.064 -> 0.103 after 4 steps at lr 2e-5). Scaling value channel ``j``
    (and its bias) by ``c_j`` and the output columns that read it by ``1 / c_j`` changes nothing: the
    attention weights mix value rows linearly, per channel. Blocks are found on ``reference`` (the
    teacher, whose attentions are recognisable) or on ``model``; only plain ``nn.Linear`` pairs are touched.
    """
    from tensorfold.compression.blocks import find_blocks

    modules = dict(model.named_modules())
    count = 0
    for block in find_blocks(reference if reference is not None else model):
        group = block.attention
        if group is None:
            continue
        value, output = modules.get(group.v), modules.get(group.o)
        if type(value) is not nn.Linear or type(output) is not nn.Linear:
            continue
        # a compressed pair keeps fewer dimensions per head than the reference's head_dim
        rep, kept = group.heads // group.kv_heads, value.out_features // group.kv_heads
        if value.out_features % group.kv_heads or output.in_features != kept * group.heads:
            continue
        # output column of head h, dimension i reads value channel (h // rep) * kept + i
        heads = output.weight.reshape(output.out_features, group.kv_heads, rep, -1)
        col_norm = heads.pow(2).sum(dim=(0, 2)).reshape(-1).sqrt()
        row_norm = value.weight.norm(dim=1)
        ok = (col_norm > 0) & (row_norm > 0)
        if not bool(ok.any()):
            continue
        spread = (col_norm[ok] / row_norm[ok]).log().mean().exp()
        if 1 / ratio <= float(spread) <= ratio:
            continue
        scale = torch.where(ok, (col_norm / row_norm.where(ok, torch.ones_like(row_norm))).sqrt(),
                            torch.ones_like(row_norm))
        value.weight.mul_(scale[:, None])
        if value.bias is not None:
            value.bias.mul_(scale)
        heads.div_(scale.reshape(1, group.kv_heads, 1, -1))
        count += 1
    return count


class _Objective:
    """The training loss: task term, distillation on outputs and optionally on features."""

    def __init__(self, student, teacher, features, output_fn, loss_fn, config: FinetuneConfig,
                 precision: _Precision):
        self.student, self.teacher, self.features = student, teacher, features
        self.output_fn, self.loss_fn = output_fn, loss_fn
        self.alpha, self.temperature = config.alpha, config.temperature
        self.kind, self.feature_weight = config.distill_loss, config.feature_weight
        self.precision = precision

    def loss(self, batch: Batch, mixed: bool = True) -> torch.Tensor:
        """The loss of one batch; ``mixed``: the forward passes in the configured precision (training
        steps), else in the weights' own (validation measures the model as it is returned)."""
        if self.features is not None:
            self.features.clear()
        with self.precision.autocast(mixed):
            out = self.output_fn(batch(self.student))
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_out = self.output_fn(batch(self.teacher))
        out = _full(out)
        task = None if batch.targets is None else self.loss_fn(out, batch.targets)
        if self.teacher is None:
            if task is None:
                raise InvalidArgumentError("batches without targets need a teacher and distill='logits'/'features'")
            return task
        teacher_out = _full(teacher_out).to(out.dtype)
        dist = distillation_loss(out, teacher_out, temperature=self.temperature, kind=self.kind)
        if self.features is not None:
            dist = dist + self.feature_weight * self.features.loss(batch.kwargs.get("attention_mask"))
        return dist if task is None else self.alpha * dist + (1 - self.alpha) * task

    @torch.no_grad()
    def mean_loss(self, data: Iterable, device: torch.device) -> float:
        total, count = 0.0, 0
        with eval_mode(self.student):
            for item in data:
                total, count = total + float(self.loss(split_batch(item).to(device), mixed=False)), count + 1
        if count == 0:
            raise InvalidArgumentError("val_data yielded no batches")
        return total / count


class _FeatureTaps:
    """Forward hooks capturing the outputs of the same-named layers in student and teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str]):
        student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
        missing = [n for n in names if n not in student_modules or n not in teacher_modules]
        if missing:
            raise InvalidArgumentError(f"feature_layers not found in both models: {', '.join(missing)}")
        self.names = list(names)
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in self.names:
            self.handles.append(student_modules[name].register_forward_hook(self._saver(self.student_out, name)))
            self.handles.append(teacher_modules[name].register_forward_hook(self._saver(self.teacher_out, name)))

    @staticmethod
    def _saver(store, name):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)) and output:  # (hidden_states, ...) of transformer blocks
                output = output[0]
            if isinstance(output, torch.Tensor):
                store[name] = output
        return hook

    def clear(self) -> None:
        self.student_out.clear()
        self.teacher_out.clear()

    def loss(self, mask: torch.Tensor | None = None) -> torch.Tensor | float:
        terms = []
        for n in self.names:
            if n in self.student_out and n in self.teacher_out:
                student = _full(self.student_out[n])  # float32 losses under autocast
                terms.append(feature_loss(student, _full(self.teacher_out[n]).detach().to(student.dtype), mask))
        return torch.stack(terms).mean() if terms else 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _RunLength:
    """How far the run has gone (steps and seconds against their limits): the learning-rate schedule's
    progress and the wall-clock stop."""

    def __init__(self, cfg: FinetuneConfig, data, clock: Callable[[], float]):
        self.cfg, self.clock, self.start = cfg, clock, clock()
        total = cfg.epochs * len(data) if hasattr(data, "__len__") else None
        if cfg.max_steps is not None:
            total = cfg.max_steps if total is None else min(total, cfg.max_steps)
        self.total_steps = total
        self.reserve = 0.0  # seconds the last validation took: the final one must still fit
        self.step_seconds, self._step_start = 0.0, 0.0  # the last step's duration: the next one must fit too
        if (cfg.schedule != "constant" or cfg.warmup > 0) and total is None and cfg.max_seconds is None:
            raise InvalidArgumentError("a learning-rate schedule or warmup needs a run length: data with a length, "
                                       "max_steps or max_seconds")

    def elapsed(self) -> float:
        return self.clock() - self.start

    def timed(self, fn, *args):
        t = self.clock()
        out = fn(*args)
        self.reserve = self.clock() - t
        return out

    def step_started(self) -> None:
        self._step_start = self.clock()

    def step_ended(self) -> None:
        self.step_seconds = self.clock() - self._step_start

    def out_of_time(self, validating: bool) -> bool:
        """Whether the next step (as long as the last one), and the final validation when ``validating``,
        would end past ``max_seconds``."""
        limit = self.cfg.max_seconds
        need = self.step_seconds + (self.reserve if validating else 0.0)
        return limit is not None and self.elapsed() + need > limit

    def factor(self, steps_done: int) -> float:
        """The learning-rate multiplier for the next step (step ``steps_done + 1``)."""
        if self.cfg.schedule == "constant" and self.cfg.warmup == 0:
            return 1.0
        progress = 0.0
        if self.total_steps:
            progress = (steps_done + 1) / self.total_steps
        if self.cfg.max_seconds is not None:
            progress = max(progress, self.elapsed() / self.cfg.max_seconds)
        return lr_factor(progress, self.cfg.schedule, self.cfg.warmup)


class _Progress:
    """A rich progress bar on stderr, a user callback, or nothing."""

    def __init__(self, progress: bool, callback, epochs: int, data):
        self.callback = callback
        self.enabled = progress
        self.epochs = epochs
        self.per_epoch = len(data) if hasattr(data, "__len__") else None
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("fine-tune {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(file=sys.stderr), transient=True)
            self._bar.__enter__()
            total = None if self.per_epoch is None else self.per_epoch * self.epochs
            self._task = self._bar.add_task("", total=total)
        return self

    def step(self, epoch: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"epoch {epoch}/{self.epochs} loss {loss:.4f}")

    def epoch(self, entry: dict) -> None:
        if self.callback is not None:
            self.callback(dict(entry))

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


def _reiterable(data, name: str):
    if data is None:
        raise InvalidArgumentError(f"{name} must be an iterable of batches, got None")
    if isinstance(data, (torch.Tensor, Mapping)):
        raise InvalidArgumentError(f"{name} must be an iterable of batches (e.g. a list), not a single "
                                   f"{type(data).__name__}")
    try:
        iterator = iter(data)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an iterable of batches, got {type(data).__name__}") from None
    if iterator is data:  # a one-shot iterator: keep its batches so that every epoch sees them
        data = list(data)
    if hasattr(data, "__len__") and len(data) == 0:
        raise InvalidArgumentError(f"{name} holds no batches")
    return data


def _epoch_order(data, generator: torch.Generator):
    if isinstance(data, Sequence):
        return [data[int(i)] for i in torch.randperm(len(data), generator=generator)]
    return data


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    """Dropout and friends draw from torch's global generator: seed it for the run, then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) if isinstance(seed, int) else 0)
        yield
