"""Per-layer sensitivity from calibration data: how much the model's output moves per unit of a
layer's own (predicted) error.

For each layer we compress that layer alone, at the candidate whose cost is closest to the
budget, and measure the squared relative change of the model output on a few calibration batches:
``s = ||f_compressed(x) - f(x)||^2 / ||f(x)||^2 / e^2`` with ``e`` the layer's predicted relative
error. The allocators then minimise ``sum_i s_i e_i^2``, a first-order estimate of the output
error when several layers are compressed. It measures the real, structured truncation error
(not isotropic noise) and costs one forward pass per layer on a small batch; inside a transformer
block, the block alone on its recorded inputs, scaled by the block's measured gain (see
:meth:`~tensorfold.compression.probe.OutputProbe.effect`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tensorfold.compression.calibration import GramStats
from tensorfold.compression.candidates import Candidate, LayerMenu
from tensorfold.compression.probe import OutputProbe
from tensorfold.compression.replace import replace_layers, set_submodule

SENSITIVITY_FLOOR = 1e-6


def reference_candidate(menu: LayerMenu, budget: float, methods: Sequence[str]) -> Candidate | None:
    """The candidate of the first method whose parameter count is closest to ``budget`` of the dense layer."""
    for method in methods:
        opts = [c for c in menu.options[1:] if c.method == method]
        if opts:
            target = budget * menu.dense.params
            return min(opts, key=lambda c: abs(c.params - target))
    return None


@torch.no_grad()
def measure_sensitivities(
    probe: OutputProbe,
    menus: Sequence[LayerMenu],
    *,
    budget: float,
    methods: Sequence[str],
    grams: dict[str, GramStats] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Sensitivity of each menu's layer (see the module docs), measured on ``probe`` (its model is left
    as it was)."""
    work = probe.work
    out = []
    for i, menu in enumerate(menus):
        cand = reference_candidate(menu, max(min(budget, 0.9), 0.1), methods)
        if cand is None or cand.error <= 1e-9:
            out.append(1.0)
            continue
        original = work.get_submodule(menu.name)
        try:  # (the probe's model may be the user's own: restored whatever happens)
            # this layer alone in the dense model: its input statistics are the planner's
            replace_layers(work, [menu.decision(cand)], "fitted", stats=grams or {}, inplace=True)
            change = probe.effect(menu.name)
        finally:
            set_submodule(work, menu.name, original)
        out.append(max(change / cand.error**2, SENSITIVITY_FLOOR))
        if progress is not None:
            progress(i + 1, len(menus))
    return out
