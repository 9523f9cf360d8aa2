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

import contextvars
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from tensorfold.compression.blocks.menus import GroupCandidate
from tensorfold.compression.calibration import call_model
from tensorfold.compression.evaluate import paired_ratios
from tensorfold.compression.plan import Plan
from tensorfold.compression.replace import replace_layers
from tensorfold.core.modules import eval_mode

# The whole-plan check's pairs (one dense and one skeleton forward each) and uncounted warm-up pairs: 63
# forwards of each side, about what the former three rounds of 20 (+3 warm-up) timed forwards of each cost.
CHECK_PAIRS, CHECK_WARMUP = 60, 3


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


_ACTIVE: contextvars.ContextVar[Timer | None] = contextvars.ContextVar("tensorfold_timer", default=None)


class Timer:
    """Where the planner and the sweep time models: this process (this class).

    ``with timer:`` makes it the active timer (:meth:`active`): a :class:`~tensorfold.compression.api.Planner`
    built inside times a speed or latency budget's layers and plans with it; leaving the block closes it.

    :class:`tensorfold.compression.fresh_speed.FreshTimer` answers the same three questions in a fresh
    process with the user's OpenMP wait policy (the ``tensorfold`` command runs itself with ``PASSIVE``,
    which slows models of many small kernels more than dense ones). ``plan=None`` means ``model`` itself,
    else the structure of ``plan`` on ``model`` with random weights (:func:`skeleton_model`).
    """

    def pair(self, original: nn.Module, compressed: nn.Module, plan: Plan | None, sample, *, threads: int = 2,
             repeats: int = 10, warmup: int = 2) -> dict:
        """:func:`~tensorfold.compression.evaluate.measure_speedup` of ``original`` vs ``compressed``
        (``plan`` is the compressed model's, for a timer that rebuilds it; None: ``original`` twice)."""
        from tensorfold.compression.evaluate import measure_speedup

        return {**measure_speedup(original, compressed, sample, threads=threads, repeats=repeats, warmup=warmup),
                "process": "this"}

    def layer_times(self, model: nn.Module, plan: Plan | None, names: Sequence[str], sample, *, threads: int = 2,
                    repeats: int = 20, warmup: int = 3) -> tuple[float, dict[str, float]]:
        """:func:`layer_times` of ``model`` (``plan`` None) or of ``plan``'s skeleton on ``model``."""
        if plan is None:
            timed = model
        else:  # a check times one plan's skeleton several rounds: built once
            cached = getattr(self, "_skeleton", None)
            if cached is None or cached[0] is not model or cached[1] is not plan:
                self._skeleton = cached = (model, plan, skeleton_model(model, plan))
            timed = cached[2]
        return layer_times(timed, names, sample, threads=threads, repeats=repeats, warmup=warmup)

    def latency(self, module: nn.Module, input_shape, *, threads: int = 2, repeats: int = 10,
                warmup: int = 2) -> float:
        """:func:`~tensorfold.nn.measure_latency` of one layer alone."""
        from tensorfold.nn import measure_latency

        return measure_latency(module, input_shape, threads=threads, repeats=repeats, warmup=warmup)

    @staticmethod
    def active() -> Timer:
        """The timer of the innermost ``with timer:`` block, else one for this process."""
        return _ACTIVE.get() or Timer()

    def __enter__(self) -> Timer:
        self.__dict__.setdefault("_tokens", []).append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())
        self.close()

    def close(self) -> None:
        """Free what the timer holds (nothing here; a FreshTimer's process)."""
        self.__dict__.pop("_skeleton", None)

    def record(self) -> dict:
        """Where the timings were taken: ``process`` and ``omp_wait_policy`` (and why not fresh)."""
        import os

        return {"process": "this", "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
                or "default"}


def describe_timing(timing: dict | None) -> str | None:
    """One line saying where a :meth:`Timer.record`'s timings were taken, or None when nothing was timed."""
    if not timing:
        return None
    policy = timing.get("omp_wait_policy", "default")
    if timing.get("process") == "fresh":
        return (f"timed in a fresh process with the {'default' if policy == 'default' else policy} OpenMP wait "
                "policy, as a deployed model runs")
    line = f"timed in this process (OMP_WAIT_POLICY {policy})"
    if timing.get("fresh_error"):
        line += f": the fresh process failed ({timing['fresh_error']}); timings after that are this process's"
    return line


def _shape_key(menu) -> tuple:
    return (menu.description, tuple(menu.input_shape) if menu.input_shape is not None else None)


def _is_block(menu) -> bool:
    return isinstance(menu.options[0], GroupCandidate)


class SpeedCheck:
    """The dense model's measured time, its layers' times inside it, and corrections of the menus'
    predicted latencies from timing plans inside the model.

    ``rest`` is the part of the model's time outside the covered layers (norms, activations,
    pooling, residual adds), which no factorisation changes.

    A transformer block's menu (block methods merged) is timed as the whole block: its dense option
    takes the block's time inside the model, every other option the block's time outside its Linear
    layers (attention scores, softmax, norms, activation: the "core") plus its layers' predicted
    latencies, and ``drop`` nothing at all (removing a block removes its core too).
    """

    def __init__(self, model: nn.Module, menus, sample, *, threads: int = 2, repeats: int = 20,
                 timer: Timer | None = None):
        self.model, self.sample, self.threads, self.repeats = model, sample, threads, repeats
        self.timer = timer if timer is not None else Timer()  # every timing of the check goes through it
        names = [m.name for m in menus]
        parts = {p.name for m in menus if _is_block(m) for p in m.options[0].parts}
        self.dense_total, per = self.timer.layer_times(model, None, [*names, *sorted(parts)], sample,
                                                       threads=threads, repeats=repeats)
        self.rest = max(self.dense_total - sum(per[name] for name in names), 0.0)
        # the last check's paired figure: measured (median ratio), q1/q3 (its quartiles), pairs, noisy
        self.last: dict = {}
        self._corrected: set[tuple] = set()  # (layer shape, input shape, method) whose latencies were corrected
        # the dense candidates take their in-model times; factored ones keep the isolated prediction
        # until a check measures their kind inside the model
        for m in menus:
            m.options[0] = replace(m.options[0], latency=per[m.name])
            if _is_block(m):
                core = max(per[m.name] - sum(per[p.name] for p in m.options[0].parts), 0.0)
                m.options[1:] = [c if c.latency is None else replace(
                    c, latency=0.0 if c.method == "drop" else c.latency + core) for c in m.options[1:]]

    def cap(self, menus, speedup: float) -> float:
        """The covered layers' latency fraction of dense that gives ``speedup`` of the whole model."""
        dense = sum(m.dense.latency for m in menus)
        return (self.dense_total / speedup - self.rest) / dense

    def predicted(self, menus, picks: Sequence[int]) -> float | None:
        """The whole-model speedup the menus' latencies predict NOW (after the checks' corrections) for
        option ``picks[i]`` of each menu, on the same terms as :meth:`cap` (None if one is unknown).
        Compared with what a check measured for the same options, it says how far the predictions the
        next allocation uses still are from the measurement."""
        latencies = [m.options[i].latency for m, i in zip(menus, picks)]
        if any(t is None for t in latencies):
            return None
        return self.dense_total / (self.rest + sum(latencies))

    def check(self, menus, plan: Plan, choices=None, *, pairs: int = CHECK_PAIRS, warmup: int = CHECK_WARMUP,
              correct: bool = True) -> float:
        """Measured whole-model speedup of ``plan``'s structure: ``pairs`` single forwards of the dense model
        and the plan's skeleton, alternating (after ``warmup`` pairs not counted), summed up by
        :func:`~tensorfold.compression.evaluate.paired_ratios`: the median of the per-pair ratios, its
        quartiles in :attr:`last`. Why paired: the best of three medians of each side, timed one side after
        the other, spread 5-10% per check on MiniLM (as much as a 0.45 and a 0.50 plan differ; a plan
        measured 1.83x while planning ran 1.72x end to end), since a load that comes and goes hits one side's
        median and not the other's; a pair's two forwards share it. Each layer's in-model time is the
        median of its hooked times over the pairs. Corrects the predicted latency of every menu option of the
        same layer shape and method as a factored layer of the plan by the ratio measured for it, and
        the options of kinds never measured yet by the median ratio of this check (isolated timings
        are optimistic for every kind; correcting only the chosen ones made the next round switch to
        the uncorrected kinds, round after round). ``choices`` (the allocation's choice per menu) lets
        a block menu be corrected as a whole: its options by the ratio measured for its chosen one.
        ``correct=False`` only measures (a second check of the same plan, whose latencies are corrected
        already: correcting them again by the ratio to the plan's first predictions would count it twice)."""
        blocks = {m.name: c for m, c in zip(menus, choices or ()) if _is_block(m)}
        inside = {p.name for m in menus if m.name in blocks for p in m.options[0].parts}
        # hooked alike when only measuring: a second check must time what the first one timed
        names = [lp.name for lp in plan.layers if lp.name not in inside] + list(blocks)
        dense_times: list[float] = []
        small_times: list[float] = []
        in_model: dict[str, list[float]] = {}
        timer, sample, threads = self.timer, self.sample, self.threads
        for i in range(warmup + pairs):  # one forward per call: the pair's two sides back to back
            t_dense, _ = timer.layer_times(self.model, None, [], sample, threads=threads, repeats=1, warmup=0)
            t_small, per = timer.layer_times(self.model, plan, names, sample, threads=threads, repeats=1, warmup=0)
            if i >= warmup:
                dense_times.append(t_dense)
                small_times.append(t_small)
                for name, t in per.items():
                    in_model.setdefault(name, []).append(t)
        summary = paired_ratios(dense_times, small_times)
        self.last = {"measured": summary["ratio"], "q1": summary["ratio_q1"], "q3": summary["ratio_q3"],
                     "pairs": pairs, "noisy": summary["noisy"]}
        if not correct:
            return summary["ratio"]
        ratios: dict[tuple, list[float]] = {}
        by_name = {m.name: m for m in menus}
        for lp in plan.layers:
            if lp.factored and lp.latency and lp.name in by_name:
                key = (*_shape_key(by_name[lp.name]), lp.method)
                ratios.setdefault(key, []).append(statistics.median(in_model[lp.name]) / lp.latency)
        for name, choice in blocks.items():
            if choice.method != "dense" and choice.latency:
                ratios.setdefault((name, "block"), []).append(statistics.median(in_model[name]) / choice.latency)
        factors = {key: statistics.median(v) for key, v in ratios.items()}
        default = statistics.median([r for v in ratios.values() for r in v]) if ratios else None
        for m in menus:
            for i, c in enumerate(m.options):
                key = (m.name, "block") if _is_block(m) else (*_shape_key(m), c.method)
                factor = factors.get(key, default if key not in self._corrected else None)
                if i > 0 and factor is not None and c.latency is not None:
                    m.options[i] = replace(c, latency=c.latency * factor)
        if ratios:
            self._corrected |= {(m.name, "block") if _is_block(m) else (*_shape_key(m), c.method)
                                for m in menus for c in m.options[1:]}
        return summary["ratio"]
