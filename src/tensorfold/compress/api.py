"""``tensorfold.plan``, ``tensorfold.apply`` and ``tensorfold.compress``: compress any nn.Module.

``plan`` finds the Linear/Conv layers, builds a candidate menu per layer and method, measures each
layer's sensitivity on calibration data when given, and allocates one global budget; ``apply``
builds a new model (the input is never modified) with the chosen factorized layers, fitting each
SVD-type layer to its outputs on the calibration data *in forward order*, so every layer sees (and
corrects for) the already-compressed layers before it.

>>> import torch, tensorfold as tf
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
>>> calib = [torch.randn(64, 32, generator=torch.Generator().manual_seed(0))]
>>> small, p = tf.compress(model, budget=0.5, methods=("svd",), calib=calib)
>>> p.fraction <= 0.5 and p.fraction > 0.48
True
>>> small(calib[0]).shape
torch.Size([64, 10])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from tensorfold.compress.allocators import ALLOCATORS, TARGETS, allocate, check_budget
from tensorfold.compress.calibration import (
    GramStats,
    call_model,
    collect_grams,
    forward_order_and_shared_inputs,
    layer_input_grams,
    materialize,
    run_checked,
)
from tensorfold.compress.candidates import LatencyModel, layer_menu
from tensorfold.compress.fitting import build_factored, supports_whitening
from tensorfold.compress.plan import LayerPlan, Plan
from tensorfold.compress.sensitivity import measure_sensitivities
from tensorfold.compress.walk import check_methods, find_layers, set_submodule
from tensorfold.core.validate import make_generator, randn
from tensorfold.errors import InvalidArgumentError, NotCompressibleError, ShapeError
from tensorfold.nn.base import DenseSpec

DEFAULT_METHODS = ("svd", "tucker", "cp", "tt")
CURVE_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SENSITIVITY_SAMPLES = 64

Progress = Callable[[str, int, int], None]


class Compressed(NamedTuple):
    model: nn.Module
    plan: Plan


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put models in eval mode (no dropout, frozen batch-norm statistics) and restore their flags."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _count_samples(batch) -> int:
    from tensorfold.compress.calibration import batch_input

    x = batch_input(batch)
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.ndim else 1
    for v in dict(x).values():
        if isinstance(v, torch.Tensor) and v.ndim:
            return int(v.shape[0])
    return 1


def _input_shapes(model, layers, batches, example_inputs, input_shape) -> dict[str, tuple | None]:
    """Each layer's input shape, from one forward pass over the first available input."""
    if example_inputs is not None:
        sample = example_inputs
    elif batches:
        sample = batches[0]
    elif input_shape is not None:
        param = next(iter(model.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        sample = randn(*tuple(int(s) for s in input_shape), generator=make_generator(0), dtype=dtype)
    else:
        return dict.fromkeys(layers)
    stats = collect_grams(model, layers, [sample], grams=False)
    return {name: st.input_shape for name, st in stats.items()}


class Planner:
    """The expensive half of :func:`plan` (layer discovery, calibration statistics, candidate menus,
    sensitivities), kept so that plans for several budgets or allocators cost one allocation each.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> planner = Planner(model, methods=("svd",))
    >>> [round(planner.plan(b).fraction, 2) <= b for b in (0.3, 0.6)]
    [True, True]
    """

    def __init__(
        self,
        model: nn.Module,
        budget: float = 0.5,
        target: str = "params",
        methods: Sequence[str] | str = DEFAULT_METHODS,
        include=None,
        exclude=None,
        calib=None,
        allocator: str = "auto",
        input_shape: Sequence[int] | None = None,
        example_inputs=None,
        *,
        output_fn: Callable | None = None,
        sensitivity: bool = True,
        model_name: str | None = None,
        progress: Progress | None = None,
        no_slower: bool = False,
    ):
        check_budget(budget)
        if target not in TARGETS:
            raise InvalidArgumentError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
        if allocator not in ALLOCATORS:
            raise InvalidArgumentError(f"allocator must be one of {', '.join(ALLOCATORS)}; got {allocator!r}")
        self.budget, self.target, self.allocator = float(budget), target, allocator
        self.methods = methods = check_methods(methods)
        self.model_name = model_name
        self.include = tuple([include] if isinstance(include, str) else include) if include else None
        self.exclude = tuple([exclude] if isinstance(exclude, str) else exclude) if exclude else None
        found = find_layers(model, methods=methods, include=include, exclude=exclude)
        layers = {ref.name: ref.module for ref in found.layers}
        batches = materialize(calib)
        report = progress or (lambda stage, done, total: None)
        self.model_params = sum(p.numel() for p in model.parameters())
        with eval_mode(model), torch.no_grad():
            grams: dict[str, GramStats] = {}
            if batches:
                grams = collect_grams(model, layers, batches,
                                      progress=lambda i: report("calibration", i, len(batches)))
                shapes = {name: st.input_shape for name, st in grams.items()}
                if example_inputs is not None or input_shape is not None:
                    shapes = _input_shapes(model, layers, [], example_inputs, input_shape)
            else:
                shapes = _input_shapes(model, layers, [], example_inputs, input_shape)
            unused = [n for n, s in shapes.items() if s is None and (batches or example_inputs is not None)]
            self.no_slower = bool(no_slower)
            if self.no_slower and all(s is None for s in shapes.values()):
                raise InvalidArgumentError("no_slower needs the layers' input shapes: pass calib or example_inputs")
            latency = LatencyModel() if (target == "latency" or self.no_slower) else None
            menus = []
            for i, (name, layer) in enumerate(layers.items()):
                if name in unused:
                    continue
                menus.append(layer_menu(name, layer, methods, input_shape=shapes.get(name), gram=grams.get(name),
                                        latency=latency))
                report("candidates", i + 1, len(layers))
            self.skipped = [(s.name, s.reason) for s in found.skipped]
            self.skipped += [(n, "never called on the given inputs") for n in unused]
            if not menus or all(len(m.options) == 1 for m in menus):
                raise NotCompressibleError("no layer has a factorisation that saves anything")
            self.calibrated = bool(batches)
            if self.calibrated and sensitivity:
                sens_batches, n = [], 0
                for b in batches:
                    sens_batches.append(b)
                    n += _count_samples(b)
                    if n >= SENSITIVITY_SAMPLES:
                        break
                values = measure_sensitivities(model, menus, sens_batches, budget=budget, methods=methods,
                                               grams=grams, output_fn=output_fn,
                                               progress=lambda d, t: report("sensitivity", d, t))
                for m, s in zip(menus, values):
                    m.sensitivity = s
        self.menus = menus

    def plan(self, budget: float | None = None, allocator: str | None = None, *, curve: bool = True) -> Plan:
        """The plan for ``budget`` (default: the one given at construction) with ``allocator``."""
        budget = self.budget if budget is None else check_budget(budget)
        allocator = allocator or self.allocator
        menus, target, methods = self.menus, self.target, self.methods
        alloc = allocate(menus, budget, target=target, allocator=allocator, methods=methods, no_slower=self.no_slower)
        curve_points = []
        if curve:
            for b in sorted(set(CURVE_BUDGETS) | {float(budget)}):
                try:
                    curve_points.append((b, allocate(menus, b, target=target, allocator=allocator,
                                                     methods=methods, no_slower=self.no_slower).objective))
                except NotCompressibleError:
                    continue
        layer_plans = []
        for menu, choice in zip(menus, alloc.choices):
            layer_plans.append(LayerPlan(
                name=menu.name, layer=menu.description, method=choice.method, rank=choice.rank,
                options=dict(menu.opts.get(choice.method, {})), params=choice.params,
                dense_params=menu.dense.params, flops=choice.flops, dense_flops=menu.dense.flops,
                latency=choice.latency, dense_latency=menu.dense.latency, error=choice.error,
                sensitivity=menu.sensitivity, input_shape=menu.input_shape,
            ))
        return Plan(
            layers=layer_plans, skipped=list(self.skipped), budget=float(budget), target=target,
            allocator="knapsack" if allocator == "auto" else allocator, methods=methods,
            calibrated=self.calibrated, model_params=self.model_params, model_name=self.model_name,
            include=self.include, exclude=self.exclude, objective=alloc.objective, curve=curve_points,
            spectra={m.name: m.spectrum for m in menus if m.spectrum is not None},
        )


def plan(
    model: nn.Module,
    budget: float = 0.5,
    target: str = "params",
    methods: Sequence[str] | str = DEFAULT_METHODS,
    include=None,
    exclude=None,
    calib=None,
    allocator: str = "auto",
    input_shape: Sequence[int] | None = None,
    example_inputs=None,
    *,
    output_fn: Callable | None = None,
    sensitivity: bool = True,
    model_name: str | None = None,
    curve: bool = True,
    progress: Progress | None = None,
    no_slower: bool = False,
) -> Plan:
    """Plan the compression of ``model`` to ``budget`` of the ``target`` cost of its Linear/Conv layers.

    Parameters
    ----------
    budget: fraction in (0, 1] of the covered layers' params, FLOPs or latency to keep.
    target: "params", "flops" or "latency" (FLOPs and latency need an input: ``calib``,
        ``example_inputs`` or ``input_shape``; latency comes from the shipped table or is measured,
        and a factorisation predicted slower than its dense layer is never chosen).
    methods: planner methods among "svd", "spatial", "tucker", "cp", "tt" (those that apply per layer).
    include, exclude: shell-style patterns on layer names (an include pattern matching nothing is an error).
    calib: iterable of input batches (tensors, tuples with the input first, or dicts of keyword
        inputs); errors become output errors and each layer's sensitivity is measured.
    allocator: "uniform", "energy", "balanced", "knapsack" or "auto" (= knapsack).
    output_fn: picks the output tensor from the model's output (default: see ``output_tensor``).
    no_slower: with any target, never choose a factorisation predicted (shipped latency table, else
        measured on the spot) slower than its dense layer; needs the layers' input shapes.

    Returns a :class:`~tensorfold.compress.plan.Plan`.
    """
    planner = Planner(model, budget, target, methods, include, exclude, calib, allocator, input_shape,
                      example_inputs, output_fn=output_fn, sensitivity=sensitivity, model_name=model_name,
                      progress=progress, no_slower=no_slower)
    return planner.plan(curve=curve)


def apply(
    model: nn.Module,
    plan: Plan,
    calib=None,
    *,
    correct_upstream: bool = False,
    ridge: float = 1e-6,
    progress: Progress | None = None,
) -> nn.Module:
    """A new model with ``plan``'s factorized layers (``model`` itself is never modified).

    With ``calib`` batches, SVD-type layers are fitted to their outputs in forward order: each one is
    fitted on the inputs it sees in the partly compressed model (so it adapts to the compressed
    layers before it). ``correct_upstream=True`` instead regresses onto the outputs the original
    layer gives in the original model (a full least-squares fit: it needs many more calibration
    tokens than input features, else it overfits; on MiniLM with 128 sentences it lost 0.02 mean
    cosine). ``ridge`` regularises the input Gram matrix (relative to its mean diagonal). Other
    methods and layers use weight-space fitting.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise InvalidArgumentError(f"plan must be a tensorfold Plan, got {type(plan).__name__}")
    batches = materialize(calib)
    report = progress or (lambda stage, done, total: None)
    new = copy.deepcopy(model)
    todo = [lp for lp in plan.layers if lp.factored]
    with eval_mode(model, new), torch.no_grad():
        layers = {}
        for lp in todo:
            try:
                layer = new.get_submodule(lp.name)
            except AttributeError:
                raise ShapeError(f"the plan's layer {lp.name!r} does not exist in this model") from None
            try:
                description = DenseSpec.of(layer).describe()
            except NotCompressibleError:
                description = type(layer).__name__
            if description != lp.layer:
                raise ShapeError(f"the plan's layer {lp.name!r} is {lp.layer} but the model has {description}")
            layers[lp.name] = layer
        leader: dict[str, str] = {}
        if batches:
            run_checked(model, batches[0], 0)
            whitenable = {lp.name: model.get_submodule(lp.name) for lp in todo
                          if supports_whitening(layers[lp.name], lp.method)}
            order, leader = forward_order_and_shared_inputs(model, whitenable, batches[0])
            rank_of = {name: i for i, name in enumerate(order)}
            todo.sort(key=lambda lp: rank_of.get(lp.name, len(order)))
        shared: dict[str, object] = {}
        for i, lp in enumerate(todo):
            layer = layers[lp.name]
            stats = None
            if batches and lp.name in leader:
                # Layers fed the very same tensor (query/key/value) share one capture: their input
                # does not depend on each other's compression.
                key = leader[lp.name]
                if key not in shared:
                    shared[key] = layer_input_grams(
                        new, layer, batches,
                        original=model if correct_upstream else None,
                        original_layer=model.get_submodule(lp.name) if correct_upstream else None)
                stats = shared[key]
            built = build_factored(layer, lp.method, lp.rank, stats, correct_upstream=correct_upstream, ridge=ridge)
            set_submodule(new, lp.name, built)
            report("fitting", i + 1, len(todo))
    return new


def compress(
    model: nn.Module,
    budget: float = 0.5,
    target: str = "params",
    methods: Sequence[str] | str = DEFAULT_METHODS,
    include=None,
    exclude=None,
    calib=None,
    allocator: str = "auto",
    input_shape: Sequence[int] | None = None,
    example_inputs=None,
    **kwargs,
) -> Compressed:
    """:func:`plan` then :func:`apply` (same calibration batches); returns ``(model, plan)``."""
    batches = materialize(calib) if calib is not None else None
    apply_kwargs = {k: kwargs.pop(k) for k in ("correct_upstream", "ridge") if k in kwargs}
    p = plan(model, budget, target, methods, include, exclude, batches, allocator, input_shape, example_inputs,
             **kwargs)
    return Compressed(apply(model, p, batches, progress=kwargs.get("progress"), **apply_kwargs), p)


def model_outputs(model: nn.Module, batches, output_fn=None) -> list[torch.Tensor]:
    """The output tensors of ``model`` on ``batches`` (eval mode, no gradients)."""
    from tensorfold.compress.calibration import output_tensor

    with eval_mode(model), torch.no_grad():
        return [output_tensor(call_model(model, b), output_fn) for b in materialize(batches)]
