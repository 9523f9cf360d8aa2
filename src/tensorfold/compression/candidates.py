"""Candidate menus: for every layer and method, the ranks worth considering with their predicted
error, parameters, FLOPs and latency.

Errors are relative: ``||W - W_r|| / ||W||`` for the weight (weight-only planning) or
``||X (W - W_r)^T|| / ||X W^T||`` for the outputs on the calibration inputs ``X`` (calibrated
planning, through the input Gram matrix). For the SVD methods they come exactly from the tail of
the (whitened) spectrum; for Tucker, CP and TT the layer is built at each rank of a coarser grid
and its error is measured, never guessed.

Latency comes from the shipped :class:`tensorfold.nn.LatencyTable` when it holds the layer's
shape, otherwise it is measured on the spot (skeleton layers at a few ranks, interpolated in FLOPs).

>>> import torch
>>> from tensorfold.compression.candidates import layer_menu
>>> menu = layer_menu("fc", torch.nn.Linear(32, 16), ("svd",), input_shape=(4, 32))
>>> [(c.method, c.rank) for c in menu.options][:3]
[('dense', None), ('svd', 1), ('svd', 2)]
>>> errors = [c.error for c in menu.options[1:]]
>>> errors == sorted(errors, reverse=True)  # error falls as the rank grows
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from tensorfold.compression.calibration import GramStats, relative_tail_errors, whitened_spectrum
from tensorfold.compression.plan import LayerPlan
from tensorfold.errors import ConvergenceWarning, TensorfoldError
from tensorfold.nn import METHODS, LowRankLayer, dense_flops, dense_params, layer_class_for
from tensorfold.nn.base import DenseSpec

# Ranks tried per method: every rank for SVD-type methods up to this many, then an even grid.
SVD_GRID = 64
MEASURED_FRACTIONS = {
    "tucker": (0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "tt": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "cp": (0.05, 0.1, 0.2, 0.35, 0.5, 0.7),
}
# CP-ALS sweeps when sizing CP candidates (apply() refits the chosen rank with the layer's default).
CP_CANDIDATE_SWEEPS = 50


@dataclass(frozen=True)
class Candidate:
    """One way to hold a layer: ``method`` ("dense" keeps it) at ``rank``, with its predicted cost/error."""

    method: str
    rank: int | tuple | None
    params: int
    flops: int | None
    latency: float | None
    error: float

    def cost(self, target: str) -> float | None:
        return {"params": self.params, "flops": self.flops, "latency": self.latency}[target]


@dataclass
class LayerMenu:
    """Every candidate for one layer; ``options[0]`` is the dense layer itself."""

    name: str
    module: nn.Module
    description: str
    input_shape: tuple[int, ...] | None
    options: list[Candidate]
    spectrum: list[float] | None = None  # (whitened) singular values of the SVD matricisation
    calibrated: bool = False
    sensitivity: float = 1.0
    opts: dict = field(default_factory=dict)  # method -> layer options

    @property
    def dense(self) -> Candidate:
        return self.options[0]

    def decision(self, choice: Candidate) -> LayerPlan:
        """The plan's record of choosing ``choice`` for this layer."""
        return LayerPlan(
            name=self.name, layer=self.description, method=choice.method, rank=choice.rank,
            options=dict(self.opts.get(choice.method, {})), params=choice.params, dense_params=self.dense.params,
            flops=choice.flops, dense_flops=self.dense.flops, latency=choice.latency,
            dense_latency=self.dense.latency, error=choice.error, sensitivity=self.sensitivity,
            input_shape=self.input_shape,
        )


def _svd_errors(cls, layer: nn.Module, spec: DenseSpec, opts: dict, gram: GramStats | None):
    """Relative error at every rank 0..R (tensor) and the spectrum used; calibrated when possible."""
    weight = layer.weight.detach()
    if gram is not None and gram.gram is not None:
        G = cls.matrix_gram(spec, gram.gram, **opts)
        if G is not None:
            s = whitened_spectrum(cls.matrices(weight, spec, **opts)[0], G)
            if s is not None:
                return relative_tail_errors(s), s, True
    mats = cls.matrices(weight.double(), spec, **opts)
    spectra = [torch.linalg.svdvals(M) for M in mats]
    n = min(len(s) for s in spectra)
    tails = sum(relative_tail_errors(s)[: n + 1] ** 2 * float((s**2).sum()) for s in spectra)
    total = sum(float((s**2).sum()) for s in spectra)
    err = (tails / total).sqrt() if total > 0 else torch.zeros(n + 1, dtype=torch.float64)
    return err, spectra[0], False


def _svd_ranks(cls, layer, opts, dense_p: int) -> list[int]:
    max_r = cls.max_rank(layer, **opts)
    ranks = [r for r in range(1, max_r + 1)]
    # keep the ranks that save parameters (params grow linearly with rank)
    lo, hi = 0, len(ranks)
    while lo < hi:
        mid = (lo + hi) // 2
        if cls.cost(layer, ranks[mid], _shape_for_params(layer), **opts).params < dense_p:
            lo = mid + 1
        else:
            hi = mid
    useful = ranks[:lo]
    if len(useful) <= SVD_GRID:
        return useful
    step = len(useful) / SVD_GRID
    picked = sorted({useful[min(int(round(i * step)), len(useful) - 1)] for i in range(SVD_GRID)} | {useful[-1]})
    return picked


def _shape_for_params(layer: nn.Module) -> tuple[int, ...]:
    from tensorfold.compression.walk import _probe_shape

    return _probe_shape(layer)


def _output_energy(layer: nn.Module, gram: GramStats | None) -> float | None:
    """``||X W^T||^2`` from the Gram (the denominator of every output error of the layer), None without it."""
    Wm = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    if gram is None or gram.gram is None or gram.gram.shape[0] != Wm.shape[1]:
        return None
    return float(((Wm @ gram.gram) * Wm).sum())


def _output_error(layer: nn.Module, approx: torch.Tensor, gram: GramStats | None,
                  energy: float | None = None) -> tuple[float, bool]:
    """Relative error of ``approx`` (a dense weight) in the outputs when the Gram is known, else in the weight
    (``energy``: the layer's :func:`_output_energy`, when already known)."""
    W = layer.weight.detach().double()
    D = (W - approx.double()).reshape(W.shape[0], -1)
    Wm = W.reshape(W.shape[0], -1)
    if gram is not None and gram.gram is not None and gram.gram.shape[0] == Wm.shape[1]:
        G = gram.gram
        num = float(((D @ G) * D).sum())
        den = _output_energy(layer, gram) if energy is None else energy
        if den > 0:
            return math.sqrt(max(num, 0.0) / den), True
    den = float((Wm**2).sum())
    return (math.sqrt(float((D**2).sum()) / den) if den > 0 else 0.0), False


def _measured_candidates(method, cls, layer, opts, gram, fractions=None, seen=None):
    """(rank, error, calibrated) for Tucker/CP/TT layers built at a grid of parameter fractions
    (``fractions``, default the method's grid; ranks in ``seen`` are skipped, and added to it)."""
    seen = set() if seen is None else seen
    out = []
    energy = None  # the same for every size: computed once (it cost as much as each size's own error)
    for frac in fractions or MEASURED_FRACTIONS.get(method, (0.1, 0.25, 0.5, 0.75)):
        try:
            rank = cls.resolve_rank(layer, frac, **opts)
        except TensorfoldError:
            continue
        key = tuple(rank) if isinstance(rank, (list, tuple)) else rank
        if key in seen:
            continue
        seen.add(key)
        build_opts = dict(opts, n_iter_max=CP_CANDIDATE_SWEEPS) if method == "cp" else opts
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # a candidate's error is measured anyway
                built = cls.from_dense(layer, rank, **build_opts)
                if energy is None:
                    energy = _output_energy(layer, gram)
                err, calibrated = _output_error(layer, built.dense_weight(), gram, energy)
        except TensorfoldError:
            continue
        out.append((rank, err, calibrated))
    return out


# Measuring a candidate costs about ``warmup + repeats`` calls of it. While that stays under this many
# seconds per layer shape and method, every candidate rank is measured; beyond it six ranks are and
# the rest are interpolated in FLOPs. Small convs are far from linear in FLOPs (ResNet-20's 16-channel
# 3x3 conv at batch 32: Tucker-2 at ranks (9, 9) ran 2.0x slower than dense, at (12, 12) 1.1x), and
# interpolating between six probes hid that.
PROBE_SECONDS = 1.5

# A probe is the median of ``repeats`` calls, yet one scheduler hiccup on a loaded machine can slow a whole probe,
# and the figure is cached per layer shape, so it reaches every layer of that shape (MiniLM --speedup 1.8: dense
# Linear(384, 384) probed at 16 ms instead of < 1 ms kept two blocks dense). A probe this many times slower than
# its plausible bound (:func:`plausible_bound`) is timed again, at most RETIMES more times, and the lowest figure
# is kept (a disturbance only adds time); at most RETIME_BUDGET re-timings per LatencyModel bound the cost where
# the bound itself is off (a layer type far slower per FLOP than its references costs a re-timing, no error).
RETIME_FACTOR = 4.0
RETIMES = 2
RETIME_BUDGET = 24
# a dense probe's second sample (see LatencyModel._confirm_dense) is recorded when it is this much faster
SECOND_SAMPLE_GAIN = 1.25


def plausible_bound(refs: Iterable[tuple[float, float]], flops: float) -> float | None:
    """The slowest plausible seconds of a probe of ``flops`` given reference probes ``(flops, seconds)``:
    ``RETIME_FACTOR`` x the tightest reference, each scaled up linearly in FLOPs and never down (a smaller layer
    is rarely faster than its FLOPs share, as fixed costs weigh more, but not slower than a bigger one either).
    None without references."""
    bounds = [s * max(flops / f, 1.0) for f, s in refs if f and f > 0]
    return RETIME_FACTOR * min(bounds) if bounds else None


class LatencyModel:
    """Predicted seconds of a dense or factored layer: the shipped table, else measured on the spot.

    Measurements are cached by layer shape, input shape, method and rank, so the repeated blocks of a
    network (ResNet-20 has 19 convs of 5 shapes) are measured once.
    """

    def __init__(self, threads: int = 2, repeats: int = 10, probe_seconds: float = PROBE_SECONDS, *,
                 scaled: bool = False, timer=None):
        from tensorfold.nn import LatencyTable

        self.threads, self.repeats, self.probe_seconds = threads, repeats, probe_seconds
        # timer: where layers are timed (a compression.speed.Timer; None: here). The tensorfold command passes
        # a FreshTimer: its own OMP_WAIT_POLICY=PASSIVE slows small factored layers more than dense ones
        self.timer = timer
        # scaled: a smaller dense Linear asked under the name of a measured one takes its time scaled by
        # the FLOPs (a tie-break needs the order, not every size timed: MiniLM's block menus ask ~250 sizes)
        self.scaled = scaled
        self._named: dict[str, tuple[int, nn.Module, tuple]] = {}
        try:
            self.table = LatencyTable.load()
        except TensorfoldError:
            self.table = None
        self._cache: dict = {}
        # the dense probes measured so far (layer type, FLOPs, cache key): the next one's neighbours
        self._dense_seen: list[tuple[str, float, tuple]] = []
        self._confirmed: set[tuple] = set()  # dense probes already checked against their factored probes
        self._retime_budget = RETIME_BUDGET
        # every probe timed again as implausible: layer, method, rank, first and kept seconds, bound, re-timings
        self.retimed: list[dict] = []

    def _measure(self, module: nn.Module, input_shape) -> float:
        if self.timer is not None:
            return self.timer.latency(module, input_shape, threads=self.threads, repeats=self.repeats, warmup=2)
        from tensorfold.nn import measure_latency

        return measure_latency(module, input_shape, threads=self.threads, repeats=self.repeats, warmup=2)

    def _timed(self, module: nn.Module, input_shape, flops: float | None, refs: list[tuple[float, float]],
               what: dict) -> float:
        """One probe, timed again while it is slower than its plausible bound from ``refs`` (see RETIME_FACTOR)."""
        t = self._measure(module, input_shape)
        bound = plausible_bound(refs, flops) if flops else None
        return t if bound is None else self._retime(module, input_shape, t, bound, what)

    def _retime(self, module: nn.Module, input_shape, t: float, bound: float, what: dict) -> float:
        first, n = t, 0
        while t > bound and n < RETIMES and self._retime_budget > 0:
            t = min(t, self._measure(module, input_shape))
            n += 1
            self._retime_budget -= 1
        if n:
            self.retimed.append({**what, "first": first, "kept": t, "bound": bound, "retimes": n,
                                 "why": "over its plausible bound"})
        return t

    @staticmethod
    def _key(layer: nn.Module, input_shape, method: str, rank) -> tuple:
        from tensorfold.nn.latency import layer_key

        rank = tuple(rank) if isinstance(rank, (list, tuple)) else rank
        return (repr(sorted(layer_key(layer).items())), tuple(input_shape), str(layer.weight.dtype), method, rank)

    def dense(self, name: str, layer: nn.Module, input_shape) -> float:
        if self.scaled and isinstance(layer, nn.Linear) and name in self._named:
            size, named, shape = self._named[name]
            # read again, not remembered: a probe re-timed since (see _confirm_dense) scales its new figure
            return self._dense(named, shape) * layer.in_features * layer.out_features / size
        t = self._dense(layer, input_shape)
        if isinstance(layer, nn.Linear) and name not in self._named:
            self._named[name] = (layer.in_features * layer.out_features, layer, tuple(input_shape))
        return t

    def _dense(self, layer: nn.Module, input_shape) -> float:
        if self.table is not None:
            t = self.table.predict("dense", layer, None, input_shape, threads=self.threads)
            if t is not None:
                return t
        key = self._key(layer, input_shape, "dense", None)
        if key not in self._cache:
            # judged by the dense probes of the same layer type measured before it (the first has none: its
            # factored probes judge it afterwards, _confirm_dense)
            flops = dense_flops(layer, input_shape)
            kind = type(layer).__name__
            refs = [(f, self._cache[k]) for k_kind, f, k in self._dense_seen if k_kind == kind]
            self._cache[key] = self._timed(layer, input_shape, flops, refs,
                                           {"layer": DenseSpec.of(layer).describe(), "method": "dense", "rank": None})
            self._dense_seen.append((kind, flops, key))
        return self._cache[key]

    def _confirm_dense(self, layer: nn.Module, input_shape, probes: list[tuple[float, float]]) -> None:
        """Time the layer's dense probe again after its factored probes (``(flops, seconds)``, just measured):
        while they make it implausible (a dense probe slowed by a hiccup would pass every factored probe judged
        against it, and stand for every layer of its shape), else once, as a second sample seconds after the
        first (past a short hiccup that the 4x bound lets through: a MiniLM run probed Linear(384, 1536) at
        6.7 ms, another at 3.4 ms). The lower figure is kept; one more probe per dense shape."""
        key = self._key(layer, input_shape, "dense", None)
        if not probes or key not in self._cache or key in self._confirmed:  # nothing new, from the table, or checked
            return
        self._confirmed.add(key)
        first = self._cache[key]
        what = {"layer": DenseSpec.of(layer).describe(), "method": "dense", "rank": None}
        bound = plausible_bound(probes, dense_flops(layer, input_shape))
        if bound is not None and first > bound:
            self._cache[key] = self._retime(layer, input_shape, first, bound, what)
            return
        t = self._cache[key] = min(first, self._measure(layer, input_shape))
        if t * SECOND_SAMPLE_GAIN < first:  # recorded only where it changed the figure
            self.retimed.append({**what, "first": first, "kept": t, "bound": bound, "retimes": 1,
                                 "why": "second sample"})

    def factored(self, name: str, method: str, cls, layer, opts, ranks: Sequence, input_shape) -> list[float]:
        """Seconds for each rank: table entries where present, else measured (every rank while that
        takes under ``probe_seconds``, else six ranks, the others interpolated linearly in FLOPs). A
        ``scaled`` model (a tie-break) times only SVD-type pairs and prices Tucker/TT/CP layers at the
        dense layer's time: never chosen for speed, and their many small cores are slow to time."""
        if self.scaled and not issubclass(cls, LowRankLayer):
            return [self.dense(name, layer, input_shape)] * len(ranks)
        out: list[float | None] = []
        for r in ranks:
            t = self.table.predict(method, layer, r, input_shape, threads=self.threads) if self.table else None
            if t is None:
                t = self._cache.get(self._key(layer, input_shape, method, r))
            out.append(t)
        missing = [i for i, t in enumerate(out) if t is None]
        if not missing:
            return out  # type: ignore[return-value]
        flops = [cls.cost(layer, ranks[i], input_shape, **opts).flops for i in range(len(ranks))]
        per_probe = self.dense(name, layer, input_shape) * (self.repeats + 2)
        n_probe = min(len(missing), max(6, int(self.probe_seconds / max(per_probe, 1e-9))))
        probe_idx = sorted({missing[round(j * (len(missing) - 1) / max(n_probe - 1, 1))] for j in range(n_probe)})
        # each probe is judged by the dense layer and the probes of this method before it; the dense one by them
        refs = [(float(dense_flops(layer, input_shape)), self._dense(layer, input_shape))]
        measured: list[tuple[float, float]] = []
        for i in probe_idx:
            skeleton = cls.empty(DenseSpec.of(layer), ranks[i], dtype=layer.weight.dtype, **opts)
            t = self._timed(skeleton, input_shape, flops[i], refs + measured,
                            {"layer": DenseSpec.of(layer).describe(), "method": method, "rank": ranks[i]})
            out[i] = self._cache[self._key(layer, input_shape, method, ranks[i])] = t
            measured.append((flops[i], t))
        self._confirm_dense(layer, input_shape, measured)
        probes = sorted((flops[i], out[i]) for i in range(len(ranks)) if out[i] is not None)
        for i in missing:
            if out[i] is not None:
                continue
            f = flops[i]
            below = [p for p in probes if p[0] <= f]
            above = [p for p in probes if p[0] > f]
            if below and above:
                (fa, ta), (fb, tb) = below[-1], above[0]
                out[i] = ta + (f - fa) / max(fb - fa, 1) * (tb - ta)
            else:
                fa, ta = below[-1] if below else above[0]
                out[i] = ta * f / max(fa, 1)
            # kept as well: the next layer of this shape (the next transformer block's) reads every rank
            # from the cache; uncached, each block timed six more ranks (BERT-large: ~25 s a block)
            self._cache[self._key(layer, input_shape, method, ranks[i])] = out[i]
        return out  # type: ignore[return-value]


def _dominated(cost, error: float, options: Sequence[Candidate], with_flops: bool) -> bool:
    """Whether an option already in the menu is at most as costly (params, and FLOPs when known) and at
    most as wrong: then no budget in those costs would choose the new one."""
    return any(c.method != "dense" and c.params <= cost.params and c.error <= error
               and (not with_flops or (c.flops is not None and c.flops <= cost.flops)) for c in options)


def _unless_dominated(method, cls, layer, opts, gram, options, shape):
    """The measured candidates of ``method``, pruned: two sizes of its grid (at a third and two thirds) are
    built first, and when the menu's other options (the SVD's) dominate both, the method is left out:
    building Tucker/TT/CP layers at every size was most of the menus' time (a TT of a 384x1536 Linear:
    12 sizes, 24 SVDs of its unfoldings) for options that, on trained Linear layers, no plan chose."""
    grid = MEASURED_FRACTIONS.get(method, (0.1, 0.25, 0.5, 0.75))
    probes = (grid[len(grid) // 3], grid[(2 * len(grid)) // 3])
    seen: set = set()
    rows = _measured_candidates(method, cls, layer, opts, gram, fractions=probes, seen=seen)
    where = shape if shape is not None else _shape_for_params(layer)
    if rows and all(_dominated(cls.cost(layer, r, where, **opts), e, options, shape is not None) for r, e, _ in rows):
        return []
    return rows + _measured_candidates(method, cls, layer, opts, gram, seen=seen)


def layer_menu(
    name: str,
    layer: nn.Module,
    methods: Sequence[str],
    *,
    input_shape: Sequence[int] | None = None,
    gram: GramStats | None = None,
    latency: LatencyModel | None = None,
    prune: bool | None = None,
) -> LayerMenu:
    """Every candidate (dense first) of ``layer`` for ``methods``; see the module docs. ``prune`` (default:
    without a latency model) leaves out Tucker/TT/CP when two probe sizes are dominated by the SVD options."""
    prune = latency is None if prune is None else prune
    spec = DenseSpec.of(layer)
    shape = tuple(input_shape) if input_shape is not None else None
    dense_p = dense_params(layer)
    dense_f = dense_flops(layer, shape) if shape is not None else None
    dense_t = latency.dense(name, layer, shape) if (latency is not None and shape is not None) else None
    options = [Candidate("dense", None, dense_p, dense_f, dense_t, 0.0)]
    menu = LayerMenu(name, layer, spec.describe(), shape, options)
    for method in methods:
        if method not in METHODS:  # a method with its own candidates (tensorfold.compression.methods)
            continue
        found = layer_class_for(method, layer)
        if found is None:
            continue
        cls, opts = found
        opts = cls.pinned_options(layer, **opts)
        menu.opts[method] = opts
        if issubclass(cls, LowRankLayer):
            errors, spectrum, calibrated = _svd_errors(cls, layer, spec, opts, gram)
            ranks = _svd_ranks(cls, layer, opts, dense_p)
            rows = [(r, float(errors[min(r, len(errors) - 1)]), calibrated) for r in ranks]
            if method == "svd" and menu.spectrum is None:
                menu.spectrum = [float(s) for s in spectrum]
                menu.calibrated = calibrated
        elif prune and len(options) > 1:
            rows = _unless_dominated(method, cls, layer, opts, gram, options, shape)
        else:
            rows = _measured_candidates(method, cls, layer, opts, gram)
        if not rows:
            continue
        ranks = [r for r, _, _ in rows]
        times = (latency.factored(name, method, cls, layer, opts, ranks, shape)
                 if latency is not None and shape is not None else [None] * len(rows))
        for (rank, err, calibrated), t in zip(rows, times):
            cost = cls.cost(layer, rank, shape if shape is not None else _shape_for_params(layer), **opts)
            if cost.params >= dense_p:
                continue
            menu.calibrated = menu.calibrated or calibrated
            options.append(Candidate(method, rank, cost.params, cost.flops if shape is not None else None, t, err))
    if dense_t is not None:  # read again: the factored probes may have shown the dense probe implausible
        options[0] = replace(options[0], latency=latency.dense(name, layer, shape))
    return menu
