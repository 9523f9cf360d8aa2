"""Block methods in the planner's knapsack: one menu per transformer block.

The per-matrix menus of a recognised block (every candidate of every Linear layer, with its measured
sensitivity ``s_i`` and predicted output error ``e_i``) are merged into one menu for the block whose
options are the Pareto front (cost against ``sum_i s_i e_i^2``) of:

- per-matrix combinations (the cheapest error for each cost over the pair, then over the block);
- ``mlp-select`` at a grid of kept neurons (error of the down projection's output, weighted by its
  sensitivity), competing with the per-matrix options of the feed-forward pair;
- ``qk-select`` (score error, weighted by the mean sensitivity of the query and key projections) and
  ``vo-svd`` (output error, weighted by the output projection's sensitivity), competing with the
  per-matrix options of the query/key and value/output pairs, where the attention can be rebuilt;
- ``drop``: the block removed, its cost zero and its value the measured relative change of the
  model output on the sensitivity batches.

The knapsack then chooses one option per block (and per remaining layer) under the one budget.
A chosen group option expands back into one :class:`~tensorfold.compression.plan.LayerPlan` per
layer (method, rank, share of the cost, the group's error), so plans stay per layer, save and load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tensorfold.compression.blocks.attention import HeadLayout, Projection, qk_select, vo_svd
from tensorfold.compression.blocks.discover import Block, is_conv1d, linear_weight, projection_shape
from tensorfold.compression.blocks.mlp import ActivationStats, select_neurons
from tensorfold.compression.blocks.stats import BLOCK_METHODS, capture_stats
from tensorfold.compression.calibration import GramStats
from tensorfold.compression.candidates import Candidate, LayerMenu
from tensorfold.compression.probe import OutputProbe

MAX_GROUP_OPTIONS = 256  # options kept per merged menu (Pareto front thinned evenly in cost)
MLP_GRID = 64  # mlp-select sizes per block
MLP_GREEDY = 0.8  # fraction of the neurons the menu's greedy selection orders (the rest by their scores)
SENSITIVITY_FLOOR = 1e-4  # as tensorfold.compression.sensitivity's


@dataclass(frozen=True)
class Part:
    """One layer's share of a group option."""

    name: str
    method: str
    rank: int | tuple | None
    params: int
    flops: int | None
    latency: float | None
    error: float


@dataclass(frozen=True)
class GroupCandidate(Candidate):
    """A merged option: its costs are the sums of its parts'; ``error`` is ``sqrt(sum s_i e_i^2)``."""

    parts: tuple = ()


# ---- statistics ---------------------------------------------------------------------------------------


@torch.no_grad()
def drop_errors(probe: OutputProbe, blocks: Sequence[Block]) -> list[float | None]:
    """For each block, ``||f'(x) - f(x)||^2 / ||f(x)||^2`` on the probe's batches with the block removed
    (None for a block that is the model itself, e.g. a plain fc1/fc2 network: nothing to skip to)."""
    from tensorfold.core.modules import set_submodule
    from tensorfold.nn.transformer import SkipBlock

    work = probe.work
    out: list[float | None] = []
    for block in blocks:
        if not block.name:
            out.append(None)
            continue
        original = work.get_submodule(block.name)
        set_submodule(work, block.name, SkipBlock.like(original))
        try:
            out.append(probe.change(start=block.name))
        finally:
            set_submodule(work, block.name, original)
    return out


def block_stats(model: nn.Module, modules: dict[str, nn.Module], data: BlockData) -> dict[str, ActivationStats]:
    """``[X 1]`` statistics of the inputs of ``modules``: from the planner's calibration pass where it
    recorded them (one pass over the data serves both), else captured in one more pass."""
    out = {name: ActivationStats.of_gram(data.grams[name]) for name in modules
           if name in data.grams and data.grams[name].sums is not None}
    missing = {name: m for name, m in modules.items() if name not in out}
    if missing:
        out.update(capture_stats(model, missing, data.batches))
    return out


# ---- merging ------------------------------------------------------------------------------------------


def _sum(values):
    return None if any(v is None for v in values) else sum(values)


def _make(parts: tuple[Part, ...], value: float, method: str = "group") -> GroupCandidate:
    return GroupCandidate(method, None, sum(p.params for p in parts), _sum([p.flops for p in parts]),
                          _sum([p.latency for p in parts]), math.sqrt(max(value, 0.0)), parts)


def _value(c: GroupCandidate) -> float:
    return c.error**2


def _pareto(options: list[GroupCandidate], target: str) -> list[GroupCandidate]:
    """Options no other is both cheaper (in ``target``) and more accurate than; thinned evenly in cost."""
    def cost(c):
        v = c.cost(target)
        return float(c.params if v is None else v)

    options = sorted(options, key=lambda c: (cost(c), _value(c)))
    front, best = [], math.inf
    for c in options:
        if _value(c) < best - 1e-18:
            front.append(c)
            best = _value(c)
    if len(front) > MAX_GROUP_OPTIONS:
        lo, hi = cost(front[0]), cost(front[-1])
        keep, last = [front[0]], None
        step = (hi - lo) / (MAX_GROUP_OPTIONS - 1)
        for c in front[1:-1]:
            bucket = int((cost(c) - lo) / step) if step > 0 else 0
            if bucket != last:
                keep.append(c)
                last = bucket
        keep.append(front[-1])
        front = keep
    return front


def _combine(a: list[GroupCandidate], b: list[GroupCandidate], target: str) -> list[GroupCandidate]:
    """The Pareto front of every pair (one option from each)."""
    if not a:
        return b
    if not b:
        return a
    ca = np.array([float(x.cost(target) if x.cost(target) is not None else x.params) for x in a])
    cb = np.array([float(x.cost(target) if x.cost(target) is not None else x.params) for x in b])
    va = np.array([_value(x) for x in a])
    vb = np.array([_value(x) for x in b])
    cost = (ca[:, None] + cb[None, :]).ravel()
    val = (va[:, None] + vb[None, :]).ravel()
    order = np.lexsort((val, cost))
    picked, best = [], math.inf
    for idx in order:
        if val[idx] < best - 1e-18:
            picked.append(idx)
            best = val[idx]
    out = [_make(a[i // len(b)].parts + b[i % len(b)].parts, float(val[i])) for i in picked]
    return _pareto(out, target)


def _scaled(options: Sequence[GroupCandidate], scale: float) -> list[GroupCandidate]:
    return list(options) if scale == 1.0 else [_make(c.parts, scale * _value(c), c.method) for c in options]


@dataclass(frozen=True)
class BlockHalves:
    """A block's menu before merging: the Pareto fronts of its attention and of its feed-forward options
    (values ``sum s_i e_i^2``) and its drop option. Kept by the planner so that a measured correction can
    re-price each sub-block apart (:mod:`tensorfold.compression.remeasure`) without rebuilding any option."""

    attention: tuple[GroupCandidate, ...] = ()
    ffn: tuple[GroupCandidate, ...] = ()
    drop: GroupCandidate | None = None

    def options(self, target: str, attention: float = 1.0, ffn: float = 1.0,
                drop: float = 1.0) -> list[GroupCandidate] | None:
        """The block menu's options (all-dense first) with each half's values scaled; None without an
        all-dense option."""
        group = _combine(_scaled(self.attention, attention), _scaled(self.ffn, ffn), target)
        if self.drop is not None:
            group = _pareto([*group, *_scaled([self.drop], drop)], target)
        dense = [c for c in group if all(p.method == "dense" for p in c.parts)]
        if not dense:  # the all-dense option is always on the front (zero error); keep it first
            return None
        return [dense[0]] + [c for c in group if c is not dense[0]]

    def split(self, choice: GroupCandidate) -> tuple[float, float] | None:
        """The predicted values of ``choice``'s attention and feed-forward halves (None for the drop option
        or a choice not made of this block's fronts)."""
        if self.drop is not None and choice.parts == self.drop.parts:
            return None
        names = {p.name for p in self.attention[0].parts} if self.attention else set()
        attn = tuple(p for p in choice.parts if p.name in names)
        ffn = tuple(p for p in choice.parts if p.name not in names)
        values = []
        for half, parts in ((self.attention, attn), (self.ffn, ffn)):
            found = [_value(c) for c in half if c.parts == parts] if parts else [0.0]
            if not found:
                return None
            values.append(found[0])
        return values[0], values[1]


def _matrix_options(menu: LayerMenu, allowed: set[str] | None) -> list[GroupCandidate]:
    """A layer's own menu as single-part group options (value ``s e^2``)."""
    out = []
    for c in menu.options:
        if c.method != "dense" and allowed is not None and c.method not in allowed:
            continue
        part = Part(menu.name, c.method, c.rank, c.params, c.flops, c.latency, c.error)
        out.append(_make((part,), menu.sensitivity * c.error**2))
    return out


def _tokens(menu: LayerMenu) -> int | None:
    return None if menu.input_shape is None else int(np.prod(menu.input_shape[:-1]))


def _linear_cost(tokens: int | None, d_in: int, d_out: int, bias: bool, latency, name: str, shape, dtype):
    params = d_in * d_out + (d_out if bias else 0)
    flops = None if tokens is None else tokens * d_in * d_out
    t = None
    if latency is not None and shape is not None:
        # a scaled latency model reads only the shape: no weights to initialise (~250 sizes on MiniLM)
        probe = nn.Linear(d_in, d_out, bias=bias, dtype=dtype, device="meta" if getattr(latency, "scaled", False)
                          else None)
        t = latency.dense(name, probe, (*tuple(shape[:-1]), d_in))
    return params, flops, t


def _mlp_options(block: Block, model: nn.Module, menus: dict[str, LayerMenu], stats: ActivationStats,
                 latency) -> list[GroupCandidate]:
    ffn = block.ffn
    down = model.get_submodule(ffn.down)
    W, b = linear_weight(down)
    # greedy steps up to MLP_GREEDY of the neurons: the steps cost more as they go (a 3072-neuron FFN: 5.6 s
    # for 80%, 4.6 s for half, at load ~3); larger sizes take the rest in the order of their last scores
    # (their errors still exact for that order), and apply() runs the greedy to the size chosen
    sel = select_neurons(stats, W, b, max_keep=math.ceil(MLP_GREEDY * W.shape[1]))
    ups = [model.get_submodule(u) for u in ffn.ups]
    d_in, m = projection_shape(ups[0])
    d_out = W.shape[0]
    up_bias = [getattr(u, "bias", None) is not None for u in ups]
    s = 1.0  # scaled by the measured sensitivity of the option (block_menus)
    step = max(8, int(round(m / MLP_GRID / 8)) * 8)
    ks = sorted({k for k in range(step, m, step)} | {max(1, m // 64)})
    out = []
    for k in ks:
        parts = []
        err = float(sel.errors[k])
        for name, bias in zip(ffn.ups, up_bias):
            mu = menus[name]
            p, f, t = _linear_cost(_tokens(mu), d_in, k, bias, latency, name, mu.input_shape, W.dtype)
            parts.append(Part(name, "mlp-select", k, p, f, t, err))
        md = menus[ffn.down]
        p, f, t = _linear_cost(_tokens(md), k, d_out, True, latency, ffn.down, md.input_shape, W.dtype)
        parts.append(Part(ffn.down, "mlp-select", k, p, f, t, err))
        out.append(_make(tuple(parts), s * err**2, "mlp-select"))
    return out


def _attention_options(block: Block, model: nn.Module, menus: dict[str, LayerMenu], stats: ActivationStats,
                       latency, methods: set[str]) -> tuple[list[GroupCandidate], list[GroupCandidate]]:
    a = block.attention
    q, k, v, o = (model.get_submodule(n) for n in a.layers)
    (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = (linear_weight(x) for x in (q, k, v, o))
    d, d_out = Wq.shape[1], Wo.shape[0]
    layout = HeadLayout(a.heads, a.kv_heads, a.head_dim)
    qk_opts, vo_opts = [], []
    if "qk-select" in methods:
        fit = qk_select(stats.gram, Projection(Wq, bq), Projection(Wk, bk), layout)
        s = 1.0
        for r in range(1, a.head_dim):
            err = float(fit.errors[r])
            pq = _linear_cost(_tokens(menus[a.q]), d, a.heads * r, bq is not None, latency, a.q,
                              menus[a.q].input_shape, Wq.dtype)
            pk = _linear_cost(_tokens(menus[a.k]), d, a.kv_heads * r, bk is not None, latency, a.k,
                              menus[a.k].input_shape, Wq.dtype)
            parts = (Part(a.q, "qk-select", r, *pq, err), Part(a.k, "qk-select", r, *pk, err))
            qk_opts.append(_make(parts, s * err**2, "qk-select"))
    if "vo-svd" in methods:
        fit = vo_svd(stats.gram, Wv, Wo, layout)
        s = 1.0
        for r in range(1, a.head_dim):
            err = float(fit.errors[r])
            pv = _linear_cost(_tokens(menus[a.v]), d, a.kv_heads * r, False, latency, a.v, menus[a.v].input_shape,
                              Wq.dtype)
            po = _linear_cost(_tokens(menus[a.o]), a.heads * r, d_out, True, latency, a.o, menus[a.o].input_shape,
                              Wq.dtype)
            parts = (Part(a.v, "vo-svd", r, *pv, err), Part(a.o, "vo-svd", r, *po, err))
            vo_opts.append(_make(parts, s * err**2, "vo-svd"))
    return qk_opts, vo_opts


@dataclass(frozen=True)
class BlockMenuSettings:
    """What the block menus offer: ``methods``, the block methods wanted; ``matrix_methods``, the
    per-matrix methods whose options may be combined (None: every one in the menus, which may hold
    more, e.g. "svd" built only to measure sensitivities); ``target``, the cost the Pareto fronts are
    drawn in; ``budget``, the size whose option is fitted to measure an option family's effect."""

    methods: tuple[str, ...]
    target: str = "params"
    budget: float = 0.5
    matrix_methods: tuple[str, ...] | None = None


@dataclass
class BlockData:
    """What the block menus are measured from: ``batches`` (input statistics), ``probe`` (measured
    output changes on the sensitivity batches) and ``grams`` (the planner's calibration statistics,
    reused for the layers they cover); ``halves`` receives each merged block's menu before merging."""

    batches: list
    probe: OutputProbe
    grams: dict[str, GramStats] = field(default_factory=dict)
    halves: dict[str, BlockHalves] = field(default_factory=dict)


class BlockMenuBuilder:
    """:func:`block_menus` one block at a time: the block-sequential planner builds a block's menu while
    that block's statistics are held, then frees them (see :mod:`tensorfold.compression.onload`).

    Feed it the layer menus (:meth:`add`) and, per block in forward order, :meth:`prepare` (dense menus
    for GPT-2's Conv1D projections), then :meth:`build` with the block's input statistics (of the modules
    :meth:`capture` names) and its drop error; :meth:`menus` merges the result into the menu list. The
    same steps in the same order as :func:`block_menus` give the same menus.
    """

    def __init__(self, model: nn.Module, settings: BlockMenuSettings, data: BlockData, *, latency=None,
                 layer_menus: dict[str, LayerMenu] | None = None):
        self.model, self.settings, self.data, self.latency = model, settings, data, latency
        self.wanted = set(settings.methods) & set(BLOCK_METHODS)
        self.allowed = set(settings.matrix_methods) if settings.matrix_methods is not None else None
        self.layer_menus = layer_menus
        self.by_name: dict[str, LayerMenu] = {}
        self.extra: list[LayerMenu] = []
        self.new_menus: dict[str, LayerMenu] = {}
        self.merged_names: set[str] = set()
        self.halves = data.halves  # per block name: its menu before merging
        self.any_usable = False

    def add(self, menus: Sequence[LayerMenu]) -> None:
        self.by_name.update({m.name: m for m in menus})

    def prepare(self, b: Block) -> bool:
        """Dense-only menus for ``b``'s Conv1D projections (GPT-2's have no per-matrix methods, but the block
        methods and drop still cover their blocks); whether ``b`` can get a block menu."""
        for name in b.layers:
            module = self.model.get_submodule(name)
            if name not in self.by_name and is_conv1d(module):
                d_in, d_out = projection_shape(module)
                params = d_in * d_out + (d_out if getattr(module, "bias", None) is not None else 0)
                menu = LayerMenu(name, module, f"Conv1D({d_in}, {d_out})", None,
                                 [Candidate("dense", None, params, None, None, 0.0)])
                self.by_name[name] = menu
                self.extra.append(menu)
                if self.layer_menus is not None:
                    self.layer_menus[name] = menu
        usable = bool(b.layers) and all(n in self.by_name for n in b.layers)
        self.any_usable = self.any_usable or usable
        return usable

    def capture(self, blocks: Sequence[Block]) -> dict[str, nn.Module]:
        """The modules whose input statistics the block methods of ``blocks`` are built from."""
        capture: dict[str, nn.Module] = {}
        for b in blocks:
            if b.ffn is not None and "mlp-select" in self.wanted:
                capture[b.ffn.down] = self.model.get_submodule(b.ffn.down)
            if b.attention is not None and b.attention.rebuildable and self.wanted & {"qk-select", "vo-svd"}:
                capture[b.attention.q] = self.model.get_submodule(b.attention.q)
        return capture

    def _measured(self, b: Block, options: list[GroupCandidate], stats) -> list[GroupCandidate]:
        """The options with their predicted error scaled by the sensitivity measured for one of them
        (as the per-matrix sensitivities are): the size nearest the budget, fitted and run alone."""
        from tensorfold.compression.blocks.fit import option_effect

        if not options:
            return options
        dense = sum(self.by_name[p.name].dense.params for p in options[0].parts)
        target_params = max(min(self.settings.budget, 0.9), 0.1) * dense
        ref = min(options, key=lambda c: abs(c.params - target_params))
        if ref.error**2 <= 1e-12:
            return options
        effect = option_effect(self.data.probe, b, expand_choice(ref, self.by_name), stats)
        scale = max(effect / ref.error**2, SENSITIVITY_FLOOR)
        return [_make(c.parts, scale * c.error**2, c.method) for c in options]

    def build(self, b: Block, stats: dict[str, ActivationStats], drop_err: float | None) -> None:
        """The merged menu of the usable block ``b`` (``stats``: input statistics of :meth:`capture`'s
        modules, at least ``b``'s; ``drop_err``: the measured change with ``b`` removed, or None)."""
        model, by_name, allowed, target = self.model, self.by_name, self.allowed, self.settings.target
        group: list[GroupCandidate] = []
        if b.attention is not None:
            a = b.attention
            qk = _combine(_matrix_options(by_name[a.q], allowed), _matrix_options(by_name[a.k], allowed), target)
            vo = _combine(_matrix_options(by_name[a.v], allowed), _matrix_options(by_name[a.o], allowed), target)
            if a.q in stats:
                qk_sel, vo_sel = _attention_options(b, model, by_name, stats[a.q], self.latency, self.wanted)
                qk_sel, vo_sel = self._measured(b, qk_sel, stats), self._measured(b, vo_sel, stats)
                qk, vo = _pareto(qk + qk_sel, target), _pareto(vo + vo_sel, target)
            group = _combine(qk, vo, target)
        ffn: list[GroupCandidate] = []
        if b.ffn is not None:
            f = b.ffn
            for name in f.layers:
                ffn = _combine(ffn, _matrix_options(by_name[name], allowed), target)
            if f.down in stats:
                mlp = _mlp_options(b, model, by_name, stats[f.down], self.latency)
                ffn = _pareto(ffn + self._measured(b, mlp, stats), target)
        drop = None
        if drop_err is not None:
            parts = tuple(Part(n, "drop", None, 0, 0 if by_name[n].dense.flops is not None else None,
                               0.0 if by_name[n].dense.latency is not None else None, math.sqrt(drop_err))
                          for n in b.layers)
            drop = _make(parts, drop_err, "drop")
        halves = BlockHalves(tuple(group), tuple(ffn), drop)
        options = halves.options(target)
        if options is None:
            return
        self.halves[b.name] = halves
        first = by_name[b.layers[0]]
        menu = LayerMenu(b.name, model.get_submodule(b.name), f"block({len(b.layers)} layers)",
                         first.input_shape, options, calibrated=True, sensitivity=1.0)
        self.new_menus[b.layers[0]] = menu
        self.merged_names.update(b.layers)

    def menus(self, menus: list[LayerMenu]) -> list[LayerMenu]:
        """``menus`` (the layer menus, in layer order) with every built block menu in place of its layers'."""
        if not self.any_usable or not self.wanted or not self.data.batches:
            return menus
        out = []
        for m in [*menus, *(e for e in self.extra if e.name in self.new_menus)]:
            if m.name in self.new_menus:
                out.append(self.new_menus[m.name])
            elif m.name not in self.merged_names:
                if self.allowed is not None:
                    m.options = [c for c in m.options if c.method == "dense" or c.method in self.allowed]
                out.append(m)
        return out


def block_menus(
    model: nn.Module,
    blocks: Sequence[Block],
    menus: list[LayerMenu],
    settings: BlockMenuSettings,
    data: BlockData,
    *,
    latency=None,
    progress: Callable[[int, int], None] | None = None,
    layer_menus: dict[str, LayerMenu] | None = None,
) -> list[LayerMenu]:
    """``menus`` with the layers of every recognised block merged into one menu per block (see module docs;
    ``data.halves`` receives each merged block's :class:`BlockHalves`)."""
    builder = BlockMenuBuilder(model, settings, data, latency=latency, layer_menus=layer_menus)
    builder.add(menus)
    usable = [b for b in blocks if builder.prepare(b)]
    if not usable or not builder.wanted or not data.batches:
        return menus
    capture = builder.capture(usable)
    stats = block_stats(model, capture, data) if capture else {}
    drops = drop_errors(data.probe, usable) if "drop" in builder.wanted else [None] * len(usable)
    for i, (b, drop_err) in enumerate(zip(usable, drops)):
        if progress is not None:
            progress(i + 1, len(usable))
        builder.build(b, stats, drop_err)
    return builder.menus(menus)


def expand_choice(choice: GroupCandidate, layer_menus: dict[str, LayerMenu]) -> list:
    """One :class:`~tensorfold.compression.plan.LayerPlan` per part of a chosen group option."""
    from tensorfold.compression.plan import LayerPlan

    out = []
    for part in choice.parts:
        lm = layer_menus[part.name]
        out.append(LayerPlan(
            name=part.name, layer=lm.description, method=part.method, rank=part.rank,
            options=dict(lm.opts.get(part.method, {})), params=part.params, dense_params=lm.dense.params,
            flops=part.flops, dense_flops=lm.dense.flops, latency=part.latency, dense_latency=lm.dense.latency,
            error=part.error, sensitivity=lm.sensitivity, input_shape=lm.input_shape,
        ))
    return out


__all__ = ["BLOCK_METHODS", "BlockData", "BlockHalves", "BlockMenuBuilder", "BlockMenuSettings", "GroupCandidate",
           "Part", "block_menus", "block_stats", "capture_stats", "drop_errors", "expand_choice"]
