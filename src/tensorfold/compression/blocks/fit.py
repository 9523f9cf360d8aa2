"""Applying a plan with block methods: layer-wise sequential fitting, and rebuilding saved structures.

:func:`apply_block_plan` walks the planned layers in forward order. Every unit is fitted on the
inputs it sees in the *partly compressed* model: a dropped block becomes a
:class:`~tensorfold.nn.transformer.SkipBlock`; an attention with ``qk-select``/``vo-svd`` is rebuilt
as a :class:`~tensorfold.nn.transformer.HeadAttention` from the statistics of its input (its
per-matrix projections, if any, fitted by whitened SVD on the same input); an ``mlp-select`` pair is
selected and refitted on the activations of its intermediate layer; any other layer is fitted as
:func:`tensorfold.apply` fits it.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tensorfold.compression.blocks.attention import (
    HeadLayout,
    Projection,
    qk_select,
    qk_weights,
    vo_svd,
    vo_weights,
)
from tensorfold.compression.blocks.discover import Block, find_blocks, linear_weight, projection_shape
from tensorfold.compression.blocks.mlp import ActivationStats, mlp_select
from tensorfold.compression.blocks.stats import BLOCK_METHODS, _rows, capture_stats
from tensorfold.compression.calibration import (
    GramStats,
    call_model,
    forward_order_and_shared_inputs,
    last_reads,
    layer_input_grams,
    token_mask,
)
from tensorfold.compression.plan import LayerPlan, Plan
from tensorfold.compression.probe import OutputProbe, without_cache, without_cache_args
from tensorfold.errors import InvalidArgumentError, ShapeError
from tensorfold.nn.transformer import HeadAttention, SkipBlock

ATTENTION_METHODS = ("qk-select", "vo-svd")


def _decisions(plan: Plan | Sequence[LayerPlan]) -> list[LayerPlan]:
    return list(plan.layers if isinstance(plan, Plan) else plan)


def uses_blocks(plan: Plan | Sequence[LayerPlan]) -> bool:
    """True when any layer of ``plan`` (a Plan or its layer decisions) uses a block method."""
    return any(lp.method in BLOCK_METHODS for lp in _decisions(plan))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        lin.weight.copy_(weight.to(like.dtype))
        if bias is not None:
            lin.bias.copy_(bias.to(like.dtype))
    return lin


def _block_index(model: nn.Module, plan) -> tuple[dict[str, Block], dict[str, LayerPlan]]:
    blocks = find_blocks(model)
    block_of = {name: b for b in blocks for name in b.layers}
    by_name = {lp.name: lp for lp in _decisions(plan) if lp.factored}
    for lp in by_name.values():
        if lp.method in BLOCK_METHODS and lp.name not in block_of:
            raise ShapeError(f"the plan's layer {lp.name!r} uses {lp.method!r} but is in no recognised block")
    return block_of, by_name


def _gram_stats(stats, d: int) -> GramStats:
    return GramStats(gram=stats.gram[:d, :d].clone(), rows=stats.rows)


def _matrix(layer: nn.Module, lp: LayerPlan | None, stats: GramStats | None, ridge: float) -> nn.Module:
    from tensorfold.compression.fitting import build_factored

    if lp is None or not lp.factored:
        return layer
    return build_factored(layer, lp.method, lp.rank, stats, correct_upstream=False, ridge=ridge, options=lp.options)


class Inputs:
    """Statistics of layer inputs in the partly compressed model ``new``.

    Inside a block, the block's own inputs (the positional and keyword arguments it is called with, per
    calibration batch) are captured once from the model as it is when the block's first unit is
    fitted; every later capture inside the block then runs that block alone, not the model up to it.
    Outside blocks, the model runs up to the layer.

    ``blocks`` (names in forward order): the outputs of the blocks before the one whose inputs are
    captured are recorded on the way (they are fitted already, so they no longer change) and replayed
    in later captures, so reaching block k runs one block, not k.
    """

    def __init__(self, new: nn.Module, batches: list, blocks: Sequence[str] = ()):
        self.new, self.batches = new, batches
        self.blocks = list(blocks)
        self._block: str | None = None
        self._inputs: list = []
        self._outputs: dict[str, list] = {}

    def block_inputs(self, block: str) -> list:
        from tensorfold.compression.calibration import _StopForward
        from tensorfold.compression.probe import Replay
        from tensorfold.core.modules import set_submodule

        if self._block != block:
            module, inputs = self.new.get_submodule(block), []

            def hook(mod, args, kwargs):
                inputs.append((without_cache_args(args), without_cache(kwargs)))
                raise _StopForward

            before = self.blocks[: self.blocks.index(block)] if block in self.blocks else []
            recording = {name: [] for name in before if name not in self._outputs}
            position = {"batch": 0}
            replayed = {name: self.new.get_submodule(name) for name in before if name in self._outputs}
            handles = [module.register_forward_pre_hook(hook, with_kwargs=True)]
            for name, outs in recording.items():
                handles.append(self.new.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, _outs=outs: _outs.append(out)))
            for name in replayed:
                set_submodule(self.new, name, Replay(self._outputs[name], position))
            try:
                for i, batch in enumerate(self.batches):
                    position["batch"] = i
                    with contextlib.suppress(_StopForward):
                        call_model(self.new, batch)
            finally:
                for h in handles:
                    h.remove()
                for name, original in replayed.items():
                    set_submodule(self.new, name, original)
            for name, outs in recording.items():
                if len(outs) == len(self.batches):
                    self.keep_outputs(name, outs)
            if len(inputs) != len(self.batches):
                raise ShapeError(f"block {block!r} is not called once per forward pass")
            self._block, self._inputs = block, [(a, k, token_mask(b)) for (a, k), b in zip(inputs, self.batches)]
        return self._inputs

    def keep_outputs(self, block: str, outputs: list) -> None:
        """Record ``block``'s outputs (one per batch) for later captures to replay. Only the latest
        block's are held: the blocks before it replay the same ones (a replayed block ignores its input,
        so only the last replay's output reaches the next block), not a copy of every block's outputs."""
        self._outputs[block] = outputs
        if block in self.blocks:
            for name in self.blocks[: self.blocks.index(block)]:
                if name in self._outputs:
                    self._outputs[name] = outputs

    def stats(self, block: str | None, name: str) -> ActivationStats:
        """``[X 1]`` Gram of the input of the layer ``name`` (inside ``block`` when given)."""
        from tensorfold.compression.calibration import _StopForward

        layer = self.new.get_submodule(name)
        if block is None:
            return capture_stats(self.new, {name: layer}, self.batches, stop_after=name)[name]
        st = ActivationStats()
        module = self.new.get_submodule(block)
        for args, kwargs, mask in self.block_inputs(block):

            def hook(mod, a, _mask=mask):
                st.add(_rows(a[0], _mask))
                raise _StopForward

            handle = layer.register_forward_pre_hook(hook)
            try:
                with contextlib.suppress(_StopForward):
                    module(*args, **kwargs)
            finally:
                handle.remove()
        return st

    def forget(self) -> None:
        self._block, self._inputs = None, []


class FixedInputs:
    """Input statistics given in advance (by layer name), for building one option in an otherwise
    unchanged model."""

    def __init__(self, stats: dict[str, ActivationStats]):
        self._stats = stats

    def stats(self, block: str | None, name: str) -> ActivationStats:
        return self._stats[name]


@torch.no_grad()
def option_effect(probe: OutputProbe, block: Block, decisions: Sequence[LayerPlan],
                  stats: dict[str, ActivationStats], ridge: float = 1e-6) -> float:
    """``||f'(x) - f(x)||^2 / ||f(x)||^2`` on the probe's batches with one block option (``decisions``: its
    layers' block-method decisions, fitted with ``stats`` from the original model) and the rest of the
    probe's model as it is (which is left unchanged)."""
    from tensorfold.core.modules import set_submodule

    work = probe.work
    # the fitting puts new modules in place of the block's layers (and attention): put the originals back.
    # (The block is the model itself where a plain fc1/fc2 network is recognised as one block; the probe's
    # model is the user's own, so nothing may be left changed.)
    names = ([block.attention.module] if block.attention is not None else []) + list(block.layers)
    originals = {name: work.get_submodule(name) for name in names}
    try:
        by_name = {lp.name: lp for lp in decisions}
        fixed = FixedInputs(stats)
        methods = {lp.method for lp in decisions}
        if methods & set(ATTENTION_METHODS):
            _fit_attention(work, block, by_name, fixed, ridge)
        if "mlp-select" in methods:
            _fit_mlp(work, block, int(by_name[block.ffn.down].rank), fixed, ridge)
        return probe.effect(block.name)
    finally:
        for name, module in originals.items():
            set_submodule(work, name, module)


def _fit_attention(new: nn.Module, block: Block, by_name: dict[str, LayerPlan], inputs: Inputs,
                   ridge: float) -> None:
    from tensorfold.core.modules import set_submodule

    a = block.attention
    if not a.rebuildable:
        raise ShapeError(f"the attention {a.module!r} ({a.style}) cannot be rebuilt with smaller heads")
    q, k, v, o = (new.get_submodule(n) for n in a.layers)
    stats = inputs.stats(block.name, a.q)
    (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = (linear_weight(x) for x in (q, k, v, o))
    d = Wq.shape[1]
    lq, lk, lv, lo = (by_name.get(n) for n in a.layers)
    layout = HeadLayout(a.heads, a.kv_heads, a.head_dim)
    if lq is not None and lq.method == "qk-select":
        query, key = Projection(Wq, bq), Projection(Wk, bk)
        fit = qk_select(stats.gram, query, key, layout)
        nq, nbq, nk, nbk = qk_weights(fit, stats.gram, query, key, layout, keep=int(lq.rank))
        q_new, k_new, qk_dim = _linear(nq, nbq, Wq), _linear(nk, nbk if bk is not None else None, Wq), int(lq.rank)
    else:
        gs = _gram_stats(stats, d)
        q_new, k_new, qk_dim = _matrix(q, lq, gs, ridge), _matrix(k, lk, gs, ridge), a.head_dim
    o_new = None
    if lv is not None and lv.method == "vo-svd":
        fit = vo_svd(stats.gram, Wv, Wo, layout)
        nv, no, nbo = vo_weights(fit, Wo, bo, bv, layout, keep=int(lv.rank))
        v_new, o_new, v_dim = _linear(nv, None, Wv), _linear(no, nbo, Wo), int(lv.rank)
    else:
        v_new, v_dim = _matrix(v, lv, _gram_stats(stats, d), ridge), a.head_dim
    set_submodule(new, a.module, HeadAttention(q_new, k_new, v_new, heads=a.heads, kv_heads=a.kv_heads,
                                               qk_dim=qk_dim, v_dim=v_dim, scaling=a.scaling))
    if o_new is not None:
        set_submodule(new, a.o, o_new)
    elif lo is not None and lo.factored:
        o_layer = new.get_submodule(a.o)
        st = inputs.stats(block.name, a.o)
        set_submodule(new, a.o, _matrix(o_layer, lo, _gram_stats(st, st.features), ridge))


def _fit_mlp(new: nn.Module, block: Block, keep: int, inputs: Inputs, ridge: float,
             reference: tuple[nn.Module, Inputs] | None = None) -> None:
    """mlp-select on the feed-forward pair of ``block`` in ``new``. With ``reference`` (the original
    model and its :class:`Inputs`), the refitted down projection is also corrected toward the original
    (as :func:`correct_toward_original` does) from the same pass: the kept neurons' activations are
    columns of the ones the selection reads, so their Gram is a part of the selection's and the
    products with the target come from one run of each block, not a second run of both."""
    from tensorfold.core.modules import set_submodule

    f = block.ffn
    down = new.get_submodule(f.down)
    cross = held = None
    if reference is None:
        stats = inputs.stats(block.name, f.down)
    else:
        stats, cross, held = _ffn_stats_and_target(new, reference[0], block, inputs, reference[1])
    ups = [new.get_submodule(u) for u in f.ups]
    new_ups, new_down, kept = mlp_select(ups, down, stats, int(keep), ridge=ridge)
    for name, layer in zip(f.ups, new_ups):
        set_submodule(new, name, layer)
    set_submodule(new, f.down, new_down)
    if cross is not None:
        S = kept if new_down.bias is None else torch.cat([kept, torch.tensor([stats.features])])
        S = S.to(stats.gram.device)
        _refit_toward(new_down, stats.gram[S][:, S], cross[S], held=held.part(S))


@torch.no_grad()
def _ffn_stats_and_target(new: nn.Module, original: nn.Module, block: Block, inputs: Inputs, reference: Inputs
                          ) -> tuple[ActivationStats, torch.Tensor, _Held]:
    """``[H 1]`` statistics of the down projection's input ``H`` in ``new`` and ``[H 1]^T T``, with ``T``
    the target :func:`correct_toward_original` fits the down projection to (the original's output, plus
    the residual stream's difference in post-norm blocks), and the held-out batches' share of both."""
    f = block.ffn
    post_norm = CORRECT_RESIDUAL and block.attention is not None and block.attention.style in POST_NORM_STYLES
    stats, cross, held = ActivationStats(), None, _Held()
    for i, ((a_n, k_n, mask), old) in enumerate(zip(inputs.block_inputs(block.name),
                                                     _reference_taps(original, block, reference))):
        taps_new = [("h", new.get_submodule(f.down), "in")] + (
            [("x_new", new.get_submodule(f.ups[0]), "in")] if post_norm else [])
        seen = _tap(new.get_submodule(block.name), a_n, k_n, taps_new, mask, stop="h")
        target = old["y:" + f.down] + (old["x:" + f.ups[0]] - seen["x_new"] if post_norm else 0.0)
        H = seen["h"]
        stats.add(H)
        # as the statistics: the batch's product in the activations' precision, summed in float64
        c = torch.cat([(H.T @ target).double(), target.sum(dim=0, dtype=torch.float64)[None, :]])
        cross = c if cross is None else cross + c
        if _held_out(i):
            held.add(ActivationStats.of(H).gram, c)
    return stats, cross, held


# Attention styles whose blocks add the residual stream AFTER each sub-block and normalise the sum
# (post-norm: BERT, DistilBERT, MPNet): the stream a sub-block adds to is the input of its first layer.
POST_NORM_STYLES = ("bert", "distilbert", "mpnet")
CORRECTION_RIDGE = 1e-4  # relative to the mean diagonal of the refitted layer's input Gram
CORRECT_RESIDUAL = True  # in post-norm blocks, also aim at the residual stream's difference
FUSED_FFN_CORRECTION = True  # correct an mlp-select down projection in the pass that selects its neurons


def _last_linear(layer: nn.Module) -> nn.Linear | None:
    """The Linear that produces ``layer``'s output: the layer itself, or a low-rank layer's second factor."""
    if isinstance(layer, nn.Linear):
        return layer
    sides = getattr(layer, "lowrank_sides", None)
    if callable(sides):
        second = sides()[1]
        if isinstance(second, nn.Linear):
            return second
    return None


def _sub_block_input(block: Block, name: str) -> str | None:
    """The first layer of the sub-block (attention or feed-forward) that ``name`` ends."""
    if block.attention is not None and name == block.attention.o:
        return block.attention.q
    if block.ffn is not None and name == block.ffn.down:
        return block.ffn.ups[0]
    return None


def _tap(module: nn.Module, args, kwargs, taps, mask, stop: str | None, outputs: list | None = None
         ) -> dict[str, torch.Tensor]:
    """Run ``module(*args, **kwargs)`` and return the rows (padding left out, in the activations'
    precision) of the values ``taps`` name: ``(key, submodule, "in" or "out")``; the run ends once
    ``stop`` is captured (with ``stop=None`` it runs to the end and ``module``'s output is appended to
    ``outputs``)."""
    from tensorfold.compression.calibration import _StopForward

    seen: dict[str, torch.Tensor] = {}

    def saver(key: str, when: str):
        def hook(mod, a, out=None):
            rows = _rows(a[0] if when == "in" else out, mask).detach()
            seen[key] = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
            if key == stop:
                raise _StopForward
        return hook

    handles = [m.register_forward_pre_hook(saver(k, w)) if w == "in" else m.register_forward_hook(saver(k, w))
               for k, m, w in taps]
    try:
        with contextlib.suppress(_StopForward):
            out = module(*args, **kwargs)
            if outputs is not None:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return seen


def _sub_block_layers(block: Block, end: str) -> tuple[str, ...]:
    if block.attention is not None and end == block.attention.o:
        return tuple(block.attention.layers)
    return tuple(block.ffn.layers)


def _reference_taps(original: nn.Module, block: Block, reference: Inputs) -> list[dict[str, torch.Tensor]]:
    """Per calibration batch, the rows (padding left out) of what the corrections of ``block``'s
    sub-block ends aim at in the ORIGINAL model: each end's output (``"y:" + end``) and each sub-block's
    input (``"x:" + first layer``).

    One run of the original block per batch serves every end of the block (kept while the block is
    fitted; a later block's call drops it). In post-norm encoders (whose blocks return no key/value
    cache) the block's outputs are also kept as the reference's next capture would record them, so
    that capture does not run the block again."""
    cache: dict = reference.__dict__.setdefault("_taps", {})
    if block.name in cache:
        return cache[block.name]
    cache.clear()
    taps = []
    for end in ((block.attention.o,) if block.attention is not None else ()) + (
            (block.ffn.down,) if block.ffn is not None else ()):
        first = _sub_block_input(block, end)
        taps.append(("y:" + end, original.get_submodule(end), "out"))
        if first is not None:
            taps.append(("x:" + first, original.get_submodule(first), "in"))
    post_norm = block.attention is not None and block.attention.style in POST_NORM_STYLES
    record = [] if post_norm and block.name in reference.blocks and block.name not in reference._outputs else None
    module = original.get_submodule(block.name)
    out = [_tap(module, args, kwargs, taps, mask, stop=None, outputs=record)
           for args, kwargs, mask in reference.block_inputs(block.name)]
    if record is not None and len(record) == len(reference.batches):
        reference.keep_outputs(block.name, record)
    cache[block.name] = out
    return out


@torch.no_grad()
def correct_toward_original(new: nn.Module, original: nn.Module, block: Block, name: str, inputs: Inputs,
                            reference: Inputs, ridge: float | None = None) -> bool:
    """Refit the last linear piece of the layer ``name`` (which ends a sub-block of ``block``) so that,
    on the partly compressed model's inputs, it reproduces the ORIGINAL model's output (ridge least
    squares, float64): errors of the earlier blocks and of this sub-block are corrected, not copied.

    In a post-norm block the residual stream is added to the layer's output before the norm, so the
    target is ``y + x - x'`` (``y`` the original layer's output, ``x``/``x'`` the sub-block's input in the
    original/compressed model): the sum the norm sees is then the original's. Returns False when the
    layer has no linear output piece (nothing refitted).
    """
    last = _last_linear(new.get_submodule(name))
    if last is None:
        return False
    first = _sub_block_input(block, name)
    post_norm = (CORRECT_RESIDUAL and block.attention is not None and block.attention.style in POST_NORM_STYLES
                 and first is not None)
    bias = last.bias is not None
    G = C = None
    held = _Held()
    for i, ((a_n, k_n, mask), old) in enumerate(zip(inputs.block_inputs(block.name),
                                                     _reference_taps(original, block, reference))):
        taps_new = [("z", last, "in")] + ([("x_new", new.get_submodule(first), "in")] if post_norm else [])
        seen = _tap(new.get_submodule(block.name), a_n, k_n, taps_new, mask, stop="z")
        target = old["y:" + name] + (old["x:" + first] - seen["x_new"] if post_norm else 0.0)
        Z = seen["z"]
        if bias:
            Z = torch.cat([Z, torch.ones(Z.shape[0], 1, dtype=Z.dtype, device=Z.device)], dim=1)
        # one batch's products in the activations' precision (as the calibration Grams: float32 GEMMs
        # are several times faster on CPU), accumulated over batches in float64
        g, c = (Z.T @ Z).double(), (Z.T @ target).double()
        G = g if G is None else G + g
        C = c if C is None else C + c
        if _held_out(i):
            held.add(g, c)
    _refit_toward(last, G, C, ridge, held=held)
    return True


# Cross-validated corrections: every HELD_OUT_EVERY-th calibration batch is held out, each ridge of
# CV_RIDGES (and no correction at all) is fitted on the others and scored on those; the best is refitted on
# every batch (a correction that does not generalise within the calibration text is not applied)
HELD_OUT_EVERY = 4
CV_RIDGES = (1e-4, 1e-2, 1.0)
CROSS_VALIDATE = True


def _held_out(i: int) -> bool:
    return CROSS_VALIDATE and i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


class _Held:
    """The held-out batches' share of a correction's Gram ``G`` and cross products ``C``."""

    def __init__(self, G: torch.Tensor | None = None, C: torch.Tensor | None = None):
        self.G, self.C = G, C

    def add(self, g: torch.Tensor, c: torch.Tensor) -> None:
        self.G = g.clone() if self.G is None else self.G + g
        self.C = c.clone() if self.C is None else self.C + c

    def part(self, S: torch.Tensor) -> _Held:
        """The share of the rows/columns ``S`` (the kept neurons and the constant)."""
        return _Held() if self.G is None else _Held(self.G[S][:, S], self.C[S])


def _ridge_solve(G: torch.Tensor, C: torch.Tensor, X0: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * float(G.diagonal().mean().clamp_min(1e-300))
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    Lc, info = torch.linalg.cholesky_ex(A)
    rhs = C + lam * X0
    return torch.cholesky_solve(rhs, Lc) if int(info) == 0 else torch.linalg.lstsq(A, rhs).solution


@torch.no_grad()
def _refit_toward(last: nn.Linear, G: torch.Tensor, C: torch.Tensor, ridge: float | None = None,
                  held: _Held | None = None) -> None:
    """Refit ``last`` (in place) by ridge least squares from the Gram ``G`` of its inputs (with the constant
    column last when it has a bias) and their products ``C`` with the target (float64). With ``held`` (the
    held-out batches' share of ``G`` and ``C``) and no ``ridge`` given, the ridge, or no refit at all, is
    chosen by the held-out batches' error (see :data:`CV_RIDGES`)."""
    bias = last.bias is not None
    # the ridge pulls toward the weights as fitted (not toward zero): where they already reproduce the
    # original (a sub-block at full size after exact earlier blocks) the refit leaves them as they are
    w = last.weight
    X0 = w.detach().double().T
    if bias:
        X0 = torch.cat([X0, last.bias.detach().double()[None, :]])
    X0 = X0.to(C.device)
    chosen = CORRECTION_RIDGE if ridge is None else ridge
    if ridge is None and held is not None and held.G is not None:
        G_fit, C_fit = G - held.G, C - held.C

        def held_error(X):  # ||Z X - T||^2 on the held-out rows, less the constant ||T||^2
            return float((X * (held.G @ X)).sum() - 2 * (X * held.C).sum())

        scores = {None: held_error(X0)}
        scores.update({r: held_error(_ridge_solve(G_fit, C_fit, X0, r)) for r in CV_RIDGES})
        chosen = min(scores, key=scores.get)
        if chosen is None:
            return
    X = _ridge_solve(G, C, X0, chosen)
    w.copy_(X[: w.shape[1]].T.to(w.dtype))
    if bias:
        last.bias.copy_(X[-1].to(w.dtype))


def _all_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module``, once per place it is held (tied ones repeat)."""
    return [t for _, t in (*module.named_parameters(remove_duplicate=False),
                           *module.named_buffers(remove_duplicate=False)) if t is not None]


class _BlockwiseCopy:
    """The fitting's new model, copied block by block: ``new`` starts as a copy of ``model`` whose recognised
    blocks hold the original's tensors (their modules are new objects, so replacing a layer in ``new`` never
    touches ``model``); :meth:`own` gives a block its own copy before anything in it is fitted or changed, and
    :meth:`done` copies the blocks never owned. The fitting then holds the original, the blocks fitted so far
    and one block, not two whole models at once (BERT-large: 1.34 GB less at the fitting's peak); the result
    shares no tensor with ``model``. Tensors also used outside their block (tied weights) are copied at once."""

    def __init__(self, model: nn.Module, blocks: Sequence[Block]):
        self.model = model
        names = [b.name for b in blocks if b.name]
        names = [n for n in names if not any(o != n and (n.startswith(o + ".") or o.startswith(n + "."))
                                             for o in names)]
        uses: dict[int, int] = {}
        for t in _all_tensors(model):
            uses[id(t)] = uses.get(id(t), 0) + 1
        memo: dict[int, object] = {}
        self.pending: set[str] = set()
        for name in names:
            module = model.get_submodule(name)
            tensors = _all_tensors(module)
            inside: dict[int, int] = {}
            for t in tensors:
                inside[id(t)] = inside.get(id(t), 0) + 1
            if all(uses[i] == k for i, k in inside.items()):  # none of them also used elsewhere
                memo.update({id(t): t for t in tensors})
                self.pending.add(name)
        self.new = copy.deepcopy(model, memo)
        # train/eval flags as they are now: a block copied while the fitting holds the model in eval mode
        # gets its modules' own flags back in done()
        self.flags = {name: m.training for name, m in model.named_modules()}
        self.copied: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # (ids of replaced modules get reused)

    def own(self, name: str) -> None:
        """Give the block ``name`` its own copy of the original's, unless it has one."""
        from tensorfold.core.modules import set_submodule

        if name in self.pending:
            self.pending.discard(name)
            block = copy.deepcopy(self.model.get_submodule(name))
            self.copied.update(block.modules())
            set_submodule(self.new, name, block)

    def own_holder(self, layer: str) -> None:
        """Give the block holding the module ``layer`` its own copy (a layer the block discovery left out of
        the block's own layers, e.g. GPT-2's fused ``c_attn``, is still inside the block's module)."""
        for name in [n for n in self.pending if layer == n or layer.startswith(n + ".")]:
            self.own(name)

    def replaced(self, name: str) -> None:
        """The block ``name`` was replaced whole in ``new`` (dropped): nothing of the original's to copy."""
        self.pending.discard(name)

    def done(self) -> nn.Module:
        """``new`` with every block its own (call it once the model's flags are restored)."""
        for name, m in self.new.named_modules():
            if m in self.copied and name in self.flags:
                m.training = self.flags[name]
        for name in sorted(self.pending):
            self.own(name)
        return self.new


def apply_block_plan(model: nn.Module, plan: Plan | Sequence[LayerPlan], batches: list, *, ridge: float = 1e-6,
                     progress: Callable[[str, int, int], None] | None = None, correct: bool = True) -> nn.Module:
    """A new model with ``plan`` applied, block methods included (``model`` is not modified).

    ``correct``: refit the layer ending each compressed sub-block toward the original model's output
    (:func:`correct_toward_original`); False fits every unit to its own input alone."""
    from tensorfold.core.modules import eval_mode, set_submodule

    needs_data = [lp.name for lp in _decisions(plan) if lp.method in ("mlp-select", *ATTENTION_METHODS)]
    if needs_data and not batches:
        raise InvalidArgumentError(
            f"the plan's block methods (e.g. {needs_data[0]!r}) are fitted to calibration data: pass calib")
    report = progress or (lambda stage, done, total: None)
    block_of, by_name = _block_index(model, plan)
    blockwise = _BlockwiseCopy(model, find_blocks(model))
    new = blockwise.new
    todo = list(by_name.values())
    with eval_mode(model, new), torch.no_grad():
        leader: dict[str, str] = {}
        if batches:
            modules = {lp.name: model.get_submodule(lp.name) for lp in todo}
            order, leader = forward_order_and_shared_inputs(model, modules, batches[0])
            rank_of = {name: i for i, name in enumerate(order)}
            todo.sort(key=lambda lp: rank_of.get(lp.name, len(order)))
        done: set[str] = set()
        shared: dict[str, GramStats] = {}
        last = last_reads([lp.name for lp in todo], leader)
        # the blocks in forward order: captures replay the finished ones (see Inputs)
        names = [blk.name for blk in sorted(set(block_of.values()), key=lambda blk: blk.index)]
        inputs, reference = Inputs(new, batches, names), Inputs(model, batches, names)

        # the layers that end a sub-block (attention output, feed-forward down projection), in forward order
        ends = [(b, n) for b in find_blocks(model) for n in (
            (b.attention.o,) if b.attention is not None else ()) + ((b.ffn.down,) if b.ffn is not None else ())]
        position = {n: j for j, (b, end) in enumerate(ends) for n in _sub_block_layers(b, end)}
        corrected = [0]  # ends handled so far
        fused: set[str] = set()  # ends corrected while they were fitted

        def finish(upto: int) -> None:
            """Correct the sub-block ends before position ``upto`` that are still to do."""
            while corrected[0] < min(upto, len(ends)):
                b, end = ends[corrected[0]]
                corrected[0] += 1
                if not (correct and batches) or isinstance(new.get_submodule(b.name), SkipBlock):
                    continue
                if end in by_name and end not in fused:  # refitting dense ends was measured worse
                    blockwise.own(b.name)
                    correct_toward_original(new, model, b, end, inputs, reference)

        for i, lp in enumerate(todo):
            if lp.name in done:
                continue
            finish(position.get(lp.name, 0))
            block = block_of.get(lp.name)
            attn = block.attention if block is not None else None
            if lp.method != "drop":
                blockwise.own_holder(lp.name)  # before anything in its block is fitted
            if lp.method == "drop":
                blockwise.replaced(block.name)
                set_submodule(new, block.name, SkipBlock.like(new.get_submodule(block.name)))
                done.update(block.layers)
                shared.clear()
                inputs.forget()
            elif attn is not None and lp.name in attn.layers and any(
                    by_name[n].method in ATTENTION_METHODS for n in attn.layers if n in by_name):
                _fit_attention(new, block, by_name, inputs, ridge)
                done.update(attn.layers)
                shared.clear()
            elif lp.method == "mlp-select":
                # the down projection ends its sub-block: corrected in the selection's own pass
                ffn_end = correct and FUSED_FFN_CORRECTION and bool(batches)
                _fit_mlp(new, block, lp.rank, inputs, ridge, reference=(model, reference) if ffn_end else None)
                if ffn_end:
                    fused.add(block.ffn.down)
                done.update(block.ffn.layers)
                shared.clear()
            else:
                layer = new.get_submodule(lp.name)
                stats = None
                if batches:
                    key = leader.get(lp.name, lp.name)
                    if key not in shared:
                        if block is not None and isinstance(layer, nn.Linear):
                            st = inputs.stats(block.name, lp.name)
                            shared[key] = _gram_stats(st, st.features)
                        else:
                            shared[key] = layer_input_grams(new, layer, batches)
                    stats = shared[key]
                    if last[key] == i:
                        del shared[key]
                set_submodule(new, lp.name, _matrix(layer, lp, stats, ridge))
                done.add(lp.name)
            report("fitting", i + 1, len(todo))
        finish(len(ends))
    return blockwise.done()


def restructure_blocks(model: nn.Module, plan: Plan | Sequence[LayerPlan], *,
                       generator: torch.Generator | None = None) -> set[str]:
    """Give ``model`` (in place) the structure of ``plan``'s block methods, with uninitialised weights
    (random ones with ``generator``, for timing). Returns the layer names handled; the caller builds
    the other planned layers as usual."""
    from tensorfold.core.modules import set_submodule

    if not uses_blocks(plan):
        return set()
    block_of, by_name = _block_index(model, plan)
    handled: set[str] = set()

    def put(name: str, module: nn.Module) -> None:
        if generator is not None:
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * 0.1)
        set_submodule(model, name, module)

    def empty_linear(d_in: int, d_out: int, bias: bool, like: nn.Module) -> nn.Linear:
        w = like.weight
        return nn.Linear(d_in, d_out, bias=bias, dtype=w.dtype, device=w.device)

    seen_blocks: set[str] = set()
    for lp in list(by_name.values()):
        block = block_of.get(lp.name)
        if block is None or block.name in seen_blocks:
            continue
        methods = {by_name[n].method for n in block.layers if n in by_name}
        if not methods & set(BLOCK_METHODS):
            continue
        seen_blocks.add(block.name)
        if "drop" in methods:
            set_submodule(model, block.name, SkipBlock.like(model.get_submodule(block.name)))
            handled.update(block.layers)
            continue
        f = block.ffn
        if f is not None and by_name.get(f.down) is not None and by_name[f.down].method == "mlp-select":
            k = int(by_name[f.down].rank)
            for u in f.ups:
                layer = model.get_submodule(u)
                d_in, _ = projection_shape(layer)
                put(u, empty_linear(d_in, k, getattr(layer, "bias", None) is not None, layer))
            down = model.get_submodule(f.down)
            put(f.down, empty_linear(k, projection_shape(down)[1], True, down))
            handled.update(f.layers)
        a = block.attention
        if a is not None and methods & set(ATTENTION_METHODS) and any(
                n in by_name and by_name[n].method in ATTENTION_METHODS for n in a.layers):
            q, k, v, o = (model.get_submodule(n) for n in a.layers)
            d = projection_shape(q)[0]
            lq, lv = by_name.get(a.q), by_name.get(a.v)
            qk_dim = int(lq.rank) if lq is not None and lq.method == "qk-select" else a.head_dim
            v_dim = int(lv.rank) if lv is not None and lv.method == "vo-svd" else a.head_dim
            q_new = empty_linear(d, a.heads * qk_dim, q.bias is not None, q) if qk_dim != a.head_dim else q
            k_new = empty_linear(d, a.kv_heads * qk_dim, k.bias is not None, k) if qk_dim != a.head_dim else k
            v_new = empty_linear(d, a.kv_heads * v_dim, False, v) if v_dim != a.head_dim else v
            set_submodule(model, a.module, HeadAttention(q_new, k_new, v_new, heads=a.heads, kv_heads=a.kv_heads,
                                                         qk_dim=qk_dim, v_dim=v_dim, scaling=a.scaling))
            for name, new_layer, changed in ((a.q, q_new, qk_dim != a.head_dim), (a.k, k_new, qk_dim != a.head_dim),
                                             (a.v, v_new, v_dim != a.head_dim)):
                if changed:
                    put(name, new_layer)
                    handled.add(name)
            if v_dim != a.head_dim:
                put(a.o, empty_linear(a.heads * v_dim, projection_shape(o)[1], True, o))
                handled.add(a.o)
    return handled


__all__ = ["apply_block_plan", "restructure_blocks", "uses_blocks"]
