"""Rebuilding a model from a plan: the one place where planned layers are swapped into a model.

:func:`replace_layers` puts each factored decision of a plan in place of its dense layer, built one of
three ways:

- ``"fitted"``: fitted to the trained layer (``tensorfold.apply``; the sensitivity probe). With
  calibration batches, low-rank layers that support it are fitted to their outputs in forward order,
  each on the inputs it sees in the partly compressed model; otherwise weight-space fitting;
- ``"empty"``: the planned structure with placeholder weights, to load a state dict into
  (``load_compressed``);
- ``"random"``: the planned structure with small random weights drawn from ``seed``, for timing
  (the speed check): no fitting cost, never NaNs or denormals.

Every mode checks the plan against the model the same way (a missing layer or one of another shape
is a :class:`~tensorfold.errors.ShapeError`) and, unless ``inplace``, works on a deep copy.
:func:`densify` is the way back: every factorized layer folded into its dense equivalent.

>>> import torch, tensorfold as tf
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> p = tf.plan(model, 0.5, methods=("svd",), curve=False)
>>> shell = replace_layers(model, p, build="empty")
>>> [type(m).__name__ for m in shell]
['LowRankLinear', 'ReLU', 'Linear']
>>> type(model[0]).__name__  # the input model is never modified
'Linear'
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from tensorfold.compression.calibration import (
    GramStats,
    forward_order_and_shared_inputs,
    last_reads,
    layer_input_grams,
    materialize,
    run_checked,
)
from tensorfold.compression.fitting import build_factored, supports_whitening
from tensorfold.compression.plan import LayerPlan, Plan
from tensorfold.core.modules import eval_mode, set_submodule
from tensorfold.core.validate import check_choice, make_generator
from tensorfold.errors import NotCompressibleError, ShapeError
from tensorfold.nn import FactorizedLayer, layer_class_for
from tensorfold.nn.base import DenseSpec

__all__ = ["replace_layers", "densify", "set_submodule", "BUILD_MODES"]

BUILD_MODES = ("fitted", "empty", "random")
RANDOM_SCALE = 0.1  # std of the "random" build's weights


def replace_layers(
    model: nn.Module,
    plan: Plan | Sequence[LayerPlan],
    build: str = "fitted",
    *,
    calib=None,
    stats: Mapping[str, GramStats] | None = None,
    inplace: bool = False,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> nn.Module:
    """``model`` with the plan's factored layers in place (a deep copy unless ``inplace``).

    plan: a :class:`~tensorfold.compression.plan.Plan` (its ``config`` gives the fitting settings
        ``correct_upstream`` and ``ridge``) or a sequence of :class:`LayerPlan` decisions.
    build: "fitted", "empty" or "random" (see the module docs).
    calib: calibration batches for output-aware fitting ("fitted" only).
    stats: input statistics per layer name to fit with instead of capturing them from ``calib`` (right
        when each layer is replaced alone in an otherwise dense model, as the sensitivity probe does).
    seed: seeds the "random" build.
    progress: ``progress("fitting", done, total)``.
    """
    from tensorfold.compression.blocks.fit import apply_block_plan, restructure_blocks, uses_blocks

    check_choice(build, "build", BUILD_MODES)
    config = plan.config if isinstance(plan, Plan) else None
    decisions = [lp for lp in (plan.layers if isinstance(plan, Plan) else plan) if lp.factored]
    if build == "fitted" and uses_blocks(decisions):
        # transformer block methods: fitted unit by unit in forward order (tensorfold.compression.blocks)
        ridge = config.ridge if config is not None else 1e-6
        new = apply_block_plan(model, decisions, materialize(calib), ridge=ridge, progress=progress)
        if inplace:
            for name, child in list(new.named_children()):
                setattr(model, name, child)
            return model
        return new
    target = model if inplace else copy.deepcopy(model)
    generator = make_generator(seed)
    handled = restructure_blocks(target, decisions, generator=generator if build == "random" else None)
    decisions = [lp for lp in decisions if lp.name not in handled]
    layers = {lp.name: _planned_layer(target, lp) for lp in decisions}
    if build != "fitted":
        for lp in decisions:
            layer = layers[lp.name]
            built = _empty(layer, lp)
            if build == "random":
                with torch.no_grad():
                    for p in built.parameters():
                        p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * RANDOM_SCALE)
            set_submodule(target, lp.name, built.train(layer.training))
        return target
    correct_upstream = config.correct_upstream if config is not None else False
    ridge = config.ridge if config is not None else 1e-6
    batches = materialize(calib)
    report = progress or (lambda stage, done, total: None)
    # the dense original: where the fitted layers' inputs come from when they are captured
    original = copy.deepcopy(model) if inplace and batches else model
    with eval_mode(original, target), torch.no_grad():
        leader: dict[str, str] = {}
        if batches and stats is None:
            run_checked(original, batches[0], 0)
            whitenable = {lp.name: original.get_submodule(lp.name) for lp in decisions
                          if supports_whitening(layers[lp.name], lp.method)}
            order, leader = forward_order_and_shared_inputs(original, whitenable, batches[0])
            rank_of = {name: i for i, name in enumerate(order)}
            decisions.sort(key=lambda lp: rank_of.get(lp.name, len(order)))
        shared: dict[str, GramStats] = {}
        last = last_reads([lp.name for lp in decisions], leader)
        for i, lp in enumerate(decisions):
            layer = layers[lp.name]
            layer_stats = stats.get(lp.name) if stats is not None else None
            if batches and lp.name in leader:
                # Layers fed the very same tensor (query/key/value) share one capture: their input
                # does not depend on each other's compression.
                key = leader[lp.name]
                if key not in shared:
                    shared[key] = layer_input_grams(
                        target, layer, batches,
                        original=original if correct_upstream else None,
                        original_layer=original.get_submodule(lp.name) if correct_upstream else None)
                layer_stats = shared[key]
            built = build_factored(layer, lp.method, lp.rank, layer_stats, correct_upstream=correct_upstream,
                                   ridge=ridge, options=lp.options)
            set_submodule(target, lp.name, built)
            if lp.name in leader and last[leader[lp.name]] == i:
                shared.pop(leader[lp.name], None)
            report("fitting", i + 1, len(decisions))
    return target


def _planned_layer(model: nn.Module, lp: LayerPlan) -> nn.Module:
    """The dense layer a decision replaces, checked against the plan's description of it."""
    try:
        layer = model.get_submodule(lp.name)
    except AttributeError:
        raise ShapeError(f"the plan's layer {lp.name!r} does not exist in this model") from None
    try:
        description = DenseSpec.of(layer).describe()
    except NotCompressibleError:
        description = type(layer).__name__
    if description != lp.layer:
        raise ShapeError(f"the plan's layer {lp.name!r} is {lp.layer} but the model has {description}")
    return layer


def _empty(layer: nn.Module, lp: LayerPlan) -> FactorizedLayer:
    found = layer_class_for(lp.method, layer)
    if found is None:
        raise ShapeError(f"method {lp.method!r} does not apply to the model's layer {lp.name!r}")
    cls, opts = found
    opts.update(lp.options)
    weight = layer.weight
    return cls.empty(DenseSpec.of(layer), lp.rank, dtype=weight.dtype, device=weight.device, **opts)


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every factorized layer replaced by its equivalent dense layer."""
    dense = copy.deepcopy(model)
    factored = [name for name, m in dense.named_modules() if isinstance(m, FactorizedLayer)]
    outermost = [n for n in factored if not any(n.startswith(p + ".") for p in factored if p != n)]
    for name in outermost:
        set_submodule(dense, name, dense.get_submodule(name).to_dense())
    return dense
