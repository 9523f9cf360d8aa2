"""Plan, fit, re-measure, re-plan: the knapsack's block prices corrected by what the fitted model shows.

The planner prices every block option by its effect measured alone (one change in the dense model, on
calibration batches the fits also see) and adds the effects up, while ``apply`` fits the blocks one
after another, each on the already-compressed model's inputs, and corrects the end of every compressed
sub-block toward the original model. The two differ most where a fit generalises worst: on MiniLM at
50% the last feed-forward pair's error on held-out calibration sentences is eleven times its error on
the sentences it was fitted to.

:func:`remeasured_menus` fits a plan on most of the calibration batches, measures on the held-out rest
what each sub-block (attention, feed-forward) really adds to the output error, and scales that
sub-block's option values by real / predicted, so the knapsack can allocate once more. The real
contribution of unit ``k`` (in forward order) is ``E_k - E_{k-1}``, with ``E_k`` the relative output
error of the model whose units ``0..k`` are the fitted ones and the rest the original's: that model is
the sequential fit's state after unit ``k``, so the contributions add up to the real error, interactions
included. Calibration data only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tensorfold.compression.blocks.discover import Block
from tensorfold.compression.blocks.menus import BlockHalves, GroupCandidate
from tensorfold.compression.calibration import call_model, output_tensor
from tensorfold.compression.candidates import Candidate, LayerMenu
from tensorfold.compression.probe import OutputProbe
from tensorfold.core.modules import set_submodule

HELD_OUT_EVERY = 4  # every 4th calibration batch measures the first fit; the fit learns from the rest
SCALE_RANGE = (0.1, 10.0)  # a measured correction is clamped to this range (one noisy unit moves little)
PREDICTED_FLOOR = 1e-9  # a half predicted below this (dense, or nearly) gives no ratio to scale by


@dataclass(frozen=True)
class Unit:
    """Modules of ``block`` swapped together between the fitted and the original model: its attention
    (``half="attention"``), its feed-forward pair (``"ffn"``) or, where one child module holds both, the
    whole block (``"block"``)."""

    block: str
    half: str
    modules: tuple[str, ...]


def held_out_split(batches: Sequence, every: int = HELD_OUT_EVERY) -> tuple[list, list]:
    """``(fit, held)``: every ``every``-th batch held out (batches sorted by length: the held-out ones
    spread over all lengths); a single batch cannot be split and is returned as both."""
    if len(batches) < 2:
        return list(batches), list(batches)
    held_idx = set(range(every - 1, len(batches), every)) or {len(batches) - 1}
    return ([b for i, b in enumerate(batches) if i not in held_idx],
            [b for i, b in enumerate(batches) if i in held_idx])


def block_units(fitted: nn.Module, block: Block) -> list[Unit]:
    """The units of ``block`` in forward (child) order: the block's children that hold its attention
    layers, then those that hold its feed-forward layers; the whole block where a child holds both, the
    block was dropped, or the block is the model itself (nothing to swap: no unit)."""
    if not block.name:
        return []
    module = fitted.get_submodule(block.name)
    children = [n for n, _ in module.named_children()]

    def holders(layers: Sequence[str]) -> list[str]:
        prefix = block.name + "."
        heads = {name[len(prefix):].split(".")[0] for name in layers if name.startswith(prefix)}
        return [c for c in children if c in heads]

    attn = holders(block.attention.layers) if block.attention is not None else []
    ffn = holders(block.ffn.layers) if block.ffn is not None else []
    if set(attn) & set(ffn) or not (attn or ffn) or (block.attention is not None and not attn) or (
            block.ffn is not None and not ffn):
        return [Unit(block.name, "block", (block.name,))]
    units = [Unit(block.name, half, tuple(f"{block.name}.{c}" for c in held))
             for half, held in (("attention", attn), ("ffn", ffn)) if held]
    return sorted(units, key=lambda u: children.index(u.modules[0].rsplit(".", 1)[1]))


@torch.no_grad()
def marginal_errors(original: nn.Module, fitted: nn.Module, units: Sequence[Unit], batches: Sequence,
                    output_fn: Callable | None = None) -> list[float]:
    """For each unit (forward order) ``E_k - E_{k-1}``: ``E_k`` is ``||f_k(x) - f(x)||^2 / ||f(x)||^2`` on
    ``batches``, ``f_k`` the fitted model with the units after ``k`` put back to the original's modules
    (``E_{-1}``: all of them). ``fitted`` is left as it was.

    The blocks before unit ``k``'s are all fitted ones in ``f_k``: their outputs, recorded once, are replayed
    (:class:`~tensorfold.compression.probe.OutputProbe`), so the measurements cost about half the forward
    passes of running every ``f_k`` whole."""
    reference = [output_tensor(call_model(original, b), output_fn) for b in batches]
    stages = list(dict.fromkeys(u.block for u in units))
    probe = OutputProbe(fitted, list(batches), output_fn, stages=stages, private_copy=False, reference=reference)
    names = [n for u in units for n in u.modules]
    own = {n: fitted.get_submodule(n) for n in names}
    theirs = {n: original.get_submodule(n) for n in names}
    errors = []
    try:
        for k in range(-1, len(units)):
            for j, u in enumerate(units):
                for n in u.modules:
                    set_submodule(fitted, n, own[n] if j <= k else theirs[n])
            errors.append(probe.change(start=units[k].block if k >= 0 else None))
    finally:
        for n in names:
            set_submodule(fitted, n, own[n])
    return [errors[k + 1] - errors[k] for k in range(len(units))]


def _ratio(real: float, predicted: float) -> float:
    if predicted <= PREDICTED_FLOOR:
        return 1.0
    lo, hi = SCALE_RANGE
    return min(max(real / predicted, lo), hi)


def half_scales(halves: BlockHalves, choice: GroupCandidate, real: Mapping[str, float]) -> dict[str, float]:
    """The factors for ``halves.options``: each half's real contribution (``real``, by unit half) over its
    predicted value in ``choice``, clamped to :data:`SCALE_RANGE`; 1 where the half was left dense."""
    split = halves.split(choice)
    if split is None:  # the block was dropped: its drop price is what was measured
        return {"drop": _ratio(sum(real.values()), choice.error**2)}
    pa, pf = split
    if "block" in real:
        r = _ratio(real["block"], pa + pf)
        return {"attention": r, "ffn": r}
    return {"attention": _ratio(real.get("attention", 0.0), pa), "ffn": _ratio(real.get("ffn", 0.0), pf)}


def measure_halves(original: nn.Module, fitted: nn.Module, blocks: Sequence[Block], batches: Sequence,
                   output_fn: Callable | None = None) -> dict[str, dict[str, float]]:
    """Per block name, each unit's real contribution (:func:`marginal_errors`) by half ("attention", "ffn",
    or "block" where the halves cannot be swapped apart) in ``fitted`` on ``batches``."""
    units = [u for b in sorted(blocks, key=lambda b: b.index) for u in block_units(fitted, b)]
    real = marginal_errors(original, fitted, units, batches, output_fn)
    out: dict[str, dict[str, float]] = {}
    for u, r in zip(units, real):
        out.setdefault(u.block, {})[u.half] = r
    return out


def remeasured_menus(menus: Sequence[LayerMenu], choices: Sequence[Candidate], halves: Mapping[str, BlockHalves],
                     real: Mapping[str, Mapping[str, float]], target: str = "params") -> tuple[list[LayerMenu], dict]:
    """``menus`` with every block menu's halves re-priced by ``real`` (:func:`measure_halves` of the plan of
    ``choices``, fitted without the batches it was measured on); the other menus as they are. Returns the
    menus and, per block, the measured and predicted values and the factors (for reports and tests)."""
    out, report = [], {}
    for menu, choice in zip(menus, choices):
        h = halves.get(menu.name)
        if h is None or menu.name not in real or not isinstance(choice, GroupCandidate):
            out.append(menu)
            continue
        scales = half_scales(h, choice, real[menu.name])
        options = h.options(target, **scales)
        report[menu.name] = {"real": dict(real[menu.name]), "predicted": h.split(choice), "scales": scales}
        out.append(dataclasses.replace(menu, options=options) if options is not None else menu)
    return out, report


__all__ = ["HELD_OUT_EVERY", "SCALE_RANGE", "Unit", "block_units", "half_scales", "held_out_split",
           "marginal_errors", "measure_halves", "remeasured_menus"]
