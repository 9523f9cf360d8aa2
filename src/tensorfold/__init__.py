"""tensorfold: tensor decompositions and neural-network compression on PyTorch.

Public names are imported lazily, so ``import tensorfold`` stays fast and the CLI starts quickly.

>>> import tensorfold as tf
>>> X = tf.testing.random_cp((6, 7, 8), rank=2, seed=0).to_tensor()
>>> result = tf.cp(X, rank=2, seed=0)
>>> tf.relative_error(X, result) < 1e-8
True
"""

from __future__ import annotations

import importlib

from tensorfold.errors import (
    FileFormatError,
    InvalidArgumentError,
    InvalidTensorError,
    NotCompressibleError,
    RankError,
    ShapeError,
    TensorfoldError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    # core operations
    "unfold": "tensorfold.core.tenalg",
    "fold": "tensorfold.core.tenalg",
    "mode_dot": "tensorfold.core.tenalg",
    "multi_mode_dot": "tensorfold.core.tenalg",
    "khatri_rao": "tensorfold.core.tenalg",
    "kronecker": "tensorfold.core.tenalg",
    "mttkrp": "tensorfold.core.mttkrp",
    "truncated_svd": "tensorfold.core.svd",
    # result types
    "CPTensor": "tensorfold.decomp.results",
    "TuckerTensor": "tensorfold.decomp.results",
    "TTTensor": "tensorfold.decomp.results",
    "TRTensor": "tensorfold.decomp.results",
    "LowRankMatrix": "tensorfold.decomp.results",
    "FitInfo": "tensorfold.decomp.results",
    "load": "tensorfold.decomp.results",
    # decompositions
    "relative_error": "tensorfold.decomp.error",
    "svd_lowrank": "tensorfold.decomp.svd",
    "cp": "tensorfold.decomp.cp",
    "tucker": "tensorfold.decomp.tucker",
    "tensor_train": "tensorfold.decomp.tt",
    "tucker_sketch": "tensorfold.decomp.sketch",
    "tt_sketch": "tensorfold.decomp.sketch",
    "open_tensor": "tensorfold.decomp.blocks",
    "cp_chunked": "tensorfold.decomp.chunked",
    "gcp": "tensorfold.decomp.gcp",
    "factor_match_score": "tensorfold.decomp.gcp",
    "relative_error_chunked": "tensorfold.decomp.chunked",
    "tt_round": "tensorfold.decomp.tt",
    "tensor_ring": "tensorfold.decomp.tr",
    "complete": "tensorfold.decomp.completion",
    "nonnegative_cp": "tensorfold.decomp.nonnegative",
    "nonnegative_tucker": "tensorfold.decomp.nonnegative",
    "symmetric_cp": "tensorfold.decomp.symmetric",
    "select_rank": "tensorfold.decomp.rank_selection",
    "tucker_core_shape": "tensorfold.decomp.rank_selection",
    "core_consistency": "tensorfold.decomp.rank_selection",
    # compression of networks
    "plan": "tensorfold.compression.api",
    "apply": "tensorfold.compression.api",
    "compress": "tensorfold.compression.api",
    "Plan": "tensorfold.compression.plan",
    "CompressConfig": "tensorfold.compression.config",
    "FinetuneConfig": "tensorfold.compression.config",
    "save_compressed": "tensorfold.compression.storage",
    "load_compressed": "tensorfold.compression.storage",
    "finetune": "tensorfold.compression.finetune",
    # tensorized adapters
    "adapt": "tensorfold.adapters.model",
    "AdapterConfig": "tensorfold.adapters.config",
    # your own Hugging Face / sentence-transformers directory
    "load_model": "tensorfold.zoo.hf",
}
_SUBMODULES = {"core", "decomp", "nn", "compression", "adapters", "testing", "io", "report"}

__all__ = sorted(
    [*_LAZY, "FileFormatError", "InvalidArgumentError", "InvalidTensorError", "NotCompressibleError",
     "RankError", "ShapeError", "TensorfoldError", "__version__"]
)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"tensorfold.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tensorfold' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
