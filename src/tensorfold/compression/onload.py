"""The planner's calibration statistics one transformer block at a time (sequential onloading).

The planner's statistics are float64 input Gram matrices, one per compressed layer (a 3072-wide
feed-forward input alone is 75 MB), and what is built from them (whitening factors, block statistics).
Held for every layer at once they set the memory ceiling: BERT-base with 512 calibration sentences
peaked at 6.6-6.8 GB while planning. :class:`BlockOnload` hands them out one block at a time, in
forward order, so the planner builds a block's menus and frees its statistics before the next:

- block ``b``'s inputs (the arguments it is called with, per calibration batch) come from the model
  with blocks ``0..b-1`` replayed from recorded outputs (the fitting's
  :class:`~tensorfold.compression.blocks.fit.Inputs`: reaching block ``b`` runs no block);
- block ``b`` runs once on them with the Gram hooks; its outputs are kept for block ``b+1``; so one
  block's inputs and outputs are held, never every block's activations;
- the layers outside the blocks (a pooler, a classifier or LM head) get theirs from one pass of the
  model with every block replayed.

The blocks run the same operations on the same tensors as inside the model, so the statistics are the
ones one pass over the whole model gives. That holds when the blocks form a chain (each block's output
is what the next one and the rest of the model see); :meth:`BlockOnload.of` checks it on the first
batch (the output through the replayed chain must equal the model's own) and returns None otherwise,
and for models without recognised blocks: the planner then collects every statistic in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from tensorfold.compression.blocks.discover import Block, find_blocks
from tensorfold.compression.blocks.fit import Inputs
from tensorfold.compression.blocks.mlp import ActivationStats
from tensorfold.compression.blocks.stats import stats_hooks
from tensorfold.compression.calibration import GramStats, call_model, capture_inputs, run_checked, token_mask
from tensorfold.compression.probe import Replay
from tensorfold.core.modules import set_submodule
from tensorfold.errors import ShapeError

# failures of running a block on its recorded arguments (a block called twice per pass, arguments the
# replay cannot reproduce): the planner then takes the one-pass path, which reports real batch errors
_REPLAY_ERRORS = (ShapeError, RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)


class BlockOnload:
    """Input statistics of ``layers`` (name -> module) over ``batches``, one block of ``blocks`` at a time
    (:meth:`by_block`), then those of the layers outside every block (:meth:`outside`)."""

    def __init__(self, model: nn.Module, blocks: list[Block], batches: list, layers: Mapping[str, nn.Module]):
        self.model, self.blocks, self.batches = model, list(blocks), list(batches)
        self.block_of = {name: b.name for name in layers for b in self.blocks if name.startswith(b.name + ".")}
        self.layers = dict(layers)
        self._last: list | None = None  # the last block's outputs, per batch

    @classmethod
    def of(cls, model: nn.Module, layers: Mapping[str, nn.Module], batches: list) -> BlockOnload | None:
        """The onloader of ``model``'s recognised blocks; None without blocks, or when they do not chain."""
        blocks = find_blocks(model)
        # the model itself recognised as the one block (e.g. a plain fc1/fc2 network): nothing to sequence
        if not blocks or not batches or any(not b.name for b in blocks):
            return None
        onload = cls(model, blocks, batches, layers)
        return onload if onload.chains() else None

    def inside(self, block: Block) -> dict[str, nn.Module]:
        """The layers (of ``layers``) inside ``block``."""
        return {n: m for n, m in self.layers.items() if self.block_of.get(n) == block.name}

    def chains(self) -> bool:
        """Whether the first batch's output through the blocks run one at a time, each on the previous
        one's recorded output, equals the model's own output (so the statistics equal one pass's)."""
        trial = BlockOnload(self.model, self.blocks, self.batches[:1], {})
        try:
            with torch.no_grad():
                for _ in trial.by_block():
                    pass
                _, replayed = trial.outside(keep_first=True)
                reference = call_model(self.model, self.batches[0])
        except _REPLAY_ERRORS:
            return False
        return _same(replayed, reference)

    def by_block(self, extra: Callable[[Block], Mapping[str, nn.Module]] | None = None
               ) -> Iterator[tuple[Block, dict[str, GramStats], dict[str, ActivationStats]]]:
        """``(block, Gram statistics of its layers, [X 1] statistics of extra(block)'s modules)`` for each
        block in forward order; a block's statistics are dropped here once the caller asks for the next."""
        inputs = Inputs(self.model, self.batches, [b.name for b in self.blocks])
        for b in self.blocks:
            module = self.model.get_submodule(b.name)
            recorded = inputs.block_inputs(b.name)
            inputs.forget()  # held here until the block has run: one block's inputs at a time
            layers = self.inside(b)
            others = {n: m for n, m in (extra(b) if extra is not None else {}).items()
                      if n not in layers or not isinstance(m, nn.Linear)}
            mask_ref: dict = {}
            outputs = []
            with torch.no_grad(), capture_inputs(layers, mask_ref=mask_ref) as grams, \
                    stats_hooks(others, mask_ref) as acts:
                for args, kwargs, mask in recorded:
                    mask_ref["mask"] = mask
                    mask_ref["shared"].clear()
                    outputs.append(module(*args, **kwargs))
            del recorded
            inputs.keep_outputs(b.name, outputs)
            self._last = outputs
            del outputs
            yield b, grams, acts
            del grams, acts  # before the next block's are gathered

    def outside(self, *, keep_first: bool = False):
        """Gram statistics of the layers outside every block, from one pass with each block replayed from
        the last block's outputs (run :meth:`by_block` first); with ``keep_first``, also the model's output
        on the first batch."""
        layers = {n: m for n, m in self.layers.items() if n not in self.block_of}
        position = {"batch": 0}
        originals = {b.name: self.model.get_submodule(b.name) for b in self.blocks}
        first = None
        for name in originals:
            set_submodule(self.model, name, Replay(self._last, position))
        mask_ref: dict = {}
        try:
            with torch.no_grad(), capture_inputs(layers, mask_ref=mask_ref) as grams:
                # without layers outside, only the first batch's output (the chain check) is wanted
                for i, batch in enumerate(self.batches if layers else self.batches[:1] if keep_first else []):
                    position["batch"] = i
                    mask_ref["mask"] = token_mask(batch)
                    mask_ref["shared"].clear()
                    out = run_checked(self.model, batch, i)
                    if i == 0 and keep_first:
                        first = out
        finally:
            for name, module in originals.items():
                set_submodule(self.model, name, module)
        return grams, first


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _same(a, b) -> bool:
    """Equal outputs: the same tensors, equal to rounding (the same operations run in the same order,
    so in practice bit for bit)."""
    xs, ys = _tensors(a), _tensors(b)
    if len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            scale = float(y.abs().max()) if y.numel() else 0.0
            if not torch.allclose(x, y, rtol=1e-6, atol=1e-6 * max(scale, 1e-30)):
                return False
        elif not torch.equal(x, y):
            return False
    return True


__all__ = ["BlockOnload"]
