"""Block method names and the capture of layer-input statistics they are fitted from."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tensorfold.compression.blocks.mlp import ActivationStats
from tensorfold.compression.calibration import call_model, token_mask

BLOCK_METHODS = ("mlp-select", "qk-select", "vo-svd", "drop")


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(device=x.device).bool()]
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def stats_hooks(modules: dict[str, nn.Module], mask_ref: dict, *, stop_after: str | None = None):
    """Hooks adding each call's input rows of ``modules`` to their ``[X 1]`` statistics (yielded, by name);
    ``mask_ref["mask"]`` (set by the caller per batch) selects the real tokens. With ``stop_after`` (one
    of the names) the forward pass ends once that module has been reached."""
    from tensorfold.compression.calibration import _StopForward

    stats = {name: ActivationStats() for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, _name=name):
            if args and isinstance(args[0], torch.Tensor):
                stats[_name].add(_rows(args[0], mask_ref.get("mask")))
            if _name == stop_after:
                raise _StopForward

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def capture_stats(model: nn.Module, modules: dict[str, nn.Module], batches: list, *, stop_after: str | None = None
                  ) -> dict[str, ActivationStats]:
    """``[X 1]`` Gram matrices of the inputs of ``modules`` over ``batches`` (padding tokens left out).

    With ``stop_after`` (one of the names), each forward pass ends once that module has been reached.
    """
    from tensorfold.compression.calibration import _StopForward

    mask_ref: dict = {}
    with torch.no_grad(), stats_hooks(modules, mask_ref, stop_after=stop_after) as stats:
        for batch in batches:
            mask_ref["mask"] = token_mask(batch)
            with contextlib.suppress(_StopForward):
                call_model(model, batch)
    return stats


__all__ = ["BLOCK_METHODS", "capture_stats", "stats_hooks"]
