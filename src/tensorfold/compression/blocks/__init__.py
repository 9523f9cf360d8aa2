"""Transformer-aware compression: block discovery and the block methods of the planner.

- :mod:`.discover`: recognise transformer blocks (feed-forward pairs, attention projections) by the
  module tree; models with none keep the per-matrix methods.
- :mod:`.mlp`: ``mlp-select``, keep intermediate neurons and refit the down projection.
- :mod:`.attention`: ``qk-select`` and ``vo-svd``, smaller attention heads.
- :mod:`.menus`: block menus in the knapsack (with ``drop``, removing a whole block).
- :mod:`.fit`: sequential fitting of a plan with block methods, and rebuilding saved structures.
"""

from tensorfold.compression.blocks.discover import AttentionGroup, Block, FFNPair, find_blocks
from tensorfold.compression.blocks.stats import BLOCK_METHODS

__all__ = ["BLOCK_METHODS", "AttentionGroup", "Block", "FFNPair", "find_blocks"]
