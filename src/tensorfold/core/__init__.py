"""Tensor operations every decomposition and layer stands on."""

from tensorfold.core.mttkrp import mttkrp
from tensorfold.core.norms import (
    cp_gram,
    cp_inner,
    cp_norm,
    tr_inner,
    tr_norm,
    tt_inner,
    tt_norm,
    tucker_norm,
)
from tensorfold.core.svd import Truncation, choose_rank, truncated_svd
from tensorfold.core.tenalg import fold, khatri_rao, kronecker, mode_dot, multi_mode_dot, unfold

__all__ = [
    "Truncation", "choose_rank", "cp_gram", "cp_inner", "cp_norm", "fold", "khatri_rao",
    "kronecker", "mode_dot", "mttkrp", "multi_mode_dot", "tr_inner", "tr_norm", "truncated_svd",
    "tt_inner", "tt_norm", "tucker_norm", "unfold",
]
