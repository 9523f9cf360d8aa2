"""Whole-model timing for plans with a speed goal (``plan(..., speedup=1.3)``).

A layer timed alone runs faster than the same layer inside its network: its input, weights and
intermediate buffers stay in cache between the repeated calls. On resnet20-shapes (batch 32,
2 threads) the plain 50%-FLOPs plan's layers summed to 8.6 ms timed alone and 11.5 ms inside the
model (a 16-channel CP chain: 835 us alone, 1458 us in the model; the dense convs only 5-10% more),
so the model ran at 0.69x where the isolated timings predicted 0.88x. Predictions for a speed
goal are therefore checked on the model itself: the plan's structure is built with random weights
(no fitting needed, so a check costs a few forward passes), timed side by side with the dense model,
and each layer's time inside the model is read with forward hooks. :class:`SpeedCheck` keeps the
dense model's in-model layer times and corrects the candidates' predicted latencies by what the
checks measure.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> total, per_layer = layer_times(model, ["0", "2"], torch.randn(8, 16), repeats=3)
>>> sorted(per_layer) == ["0", "2"] and total > 0
True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from tensorfold.compression.calibration import call_model
from tensorfold.compression.plan import Plan
from tensorfold.compression.replace import replace_layers
from tensorfold.core.modules import eval_mode


def skeleton_model(model: nn.Module, plan: Plan, *, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with ``plan``'s factored layers in place, random weights (for timing only)."""
    return replace_layers(model, plan, "random", seed=seed)


def layer_times(model: nn.Module, names: Sequence[str], sample, *, threads: int = 2, repeats: int = 20,
                warmup: int = 3) -> tuple[float, dict[str, float]]:
    """Median seconds of a whole forward of ``model`` on ``sample`` and of each named layer inside it
    (forward hooks; a layer called several times per forward counts its summed time). Eval mode,
    inference mode, ``threads`` intra-op threads (restored afterwards)."""
    started: dict[str, float] = {}
    spent: dict[str, float] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def before(mod, args, name=name):
            started[name] = time.perf_counter()

        def after(mod, args, out, name=name):
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]

        hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    totals: list[float] = []
    per: dict[str, list[float]] = {name: [] for name in names}
    try:
        with eval_mode(model), torch.inference_mode():
            for i in range(warmup + repeats):
                spent.clear()
                t0 = time.perf_counter()
                call_model(model, sample)
                if i >= warmup:
                    totals.append(time.perf_counter() - t0)
                    for name in names:
                        per[name].append(spent.get(name, 0.0))
    finally:
        torch.set_num_threads(old)
        for h in hooks:
            h.remove()
    return statistics.median(totals), {name: statistics.median(v) for name, v in per.items()}


def _shape_key(menu) -> tuple:
    return (menu.description, tuple(menu.input_shape) if menu.input_shape is not None else None)


class SpeedCheck:
    """The dense model's measured time, its layers' times inside it, and corrections of the menus'
    predicted latencies from timing plans inside the model.

    ``rest`` is the part of the model's time outside the covered layers (norms, activations,
    pooling, residual adds), which no factorisation changes.
    """

    def __init__(self, model: nn.Module, menus, sample, *, threads: int = 2, repeats: int = 20):
        self.model, self.sample, self.threads, self.repeats = model, sample, threads, repeats
        names = [m.name for m in menus]
        self.dense_total, per = layer_times(model, names, sample, threads=threads, repeats=repeats)
        self.rest = max(self.dense_total - sum(per.values()), 0.0)
        self._corrected: set[tuple] = set()  # (layer shape, input shape, method) whose latencies were corrected
        # the dense candidates take their in-model times; factored ones keep the isolated prediction
        # until a check measures their kind inside the model
        for m in menus:
            m.options[0] = replace(m.options[0], latency=per[m.name])

    def cap(self, menus, speedup: float) -> float:
        """The covered layers' latency fraction of dense that gives ``speedup`` of the whole model."""
        dense = sum(m.dense.latency for m in menus)
        return (self.dense_total / speedup - self.rest) / dense

    def check(self, menus, plan: Plan, *, rounds: int = 3) -> float:
        """Measured whole-model speedup of ``plan``'s structure (dense and compressed alternately, the
        best of ``rounds`` medians each); corrects the predicted latency of every menu option of the
        same layer shape and method as a factored layer of the plan by the ratio measured for it, and
        the options of kinds never measured yet by the median ratio of this check (isolated timings
        are optimistic for every kind; correcting only the chosen ones made the next round switch to
        the uncorrected kinds, round after round)."""
        names = [lp.name for lp in plan.layers]
        skeleton = skeleton_model(self.model, plan)
        best_dense = best_small = float("inf")
        in_model: dict[str, list[float]] = {}
        for _ in range(rounds):
            t_dense, _ = layer_times(self.model, [], self.sample, threads=self.threads, repeats=self.repeats)
            t_small, per = layer_times(skeleton, names, self.sample, threads=self.threads, repeats=self.repeats)
            best_dense, best_small = min(best_dense, t_dense), min(best_small, t_small)
            for name, t in per.items():
                in_model.setdefault(name, []).append(t)
        ratios: dict[tuple, list[float]] = {}
        by_name = {m.name: m for m in menus}
        for lp in plan.layers:
            if lp.factored and lp.latency:
                key = (*_shape_key(by_name[lp.name]), lp.method)
                ratios.setdefault(key, []).append(min(in_model[lp.name]) / lp.latency)
        factors = {key: statistics.median(v) for key, v in ratios.items()}
        default = statistics.median([r for v in ratios.values() for r in v]) if ratios else None
        for m in menus:
            for i, c in enumerate(m.options):
                key = (*_shape_key(m), c.method)
                factor = factors.get(key, default if key not in self._corrected else None)
                if i > 0 and factor is not None and c.latency is not None:
                    m.options[i] = replace(c, latency=c.latency * factor)
        self._corrected |= {(*_shape_key(m), c.method) for m in menus for c in m.options[1:]} if ratios else set()
        return best_dense / best_small
