"""Sparse tensors in coordinate (COO) form and the few kernels completion needs on them.

A :class:`COOTensor` holds only the observed cells: ``indices`` (nnz, d) and ``values`` (nnz,). Every
kernel here costs ``O(nnz * R)`` or ``O(nnz * R^2)`` memory and time, never anything of the size of the
full tensor, so a 10^4 x 10^4 x 10^3 tensor with 10^5 observations stays a few megabytes.

>>> import torch
>>> from tensorfold.decomp.sparse import COOTensor
>>> coo = COOTensor.from_dense(torch.arange(8.0).reshape(2, 2, 2), torch.arange(8).reshape(2, 2, 2) % 3 == 0)
>>> coo.nnz, coo.shape
(3, (2, 2, 2))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tensorfold.core.validate import FLOAT_DTYPES, as_tensor, check_tensor, make_generator
from tensorfold.errors import InvalidTensorError, ShapeError

# Rows of an (nnz, R, R) temporary processed at once: bounds the working memory of the Gram
# accumulation to about this many scalars whatever nnz is.
_CHUNK_SCALARS = 1 << 22


@dataclass(frozen=True, eq=False)
class COOTensor:
    """Observed entries ``values[k]`` at ``indices[k]`` of a tensor of ``shape``; the rest is unknown."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def density(self) -> float:
        return self.nnz / math.prod(self.shape)

    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.values.double()))

    @classmethod
    def from_dense(cls, X: torch.Tensor, mask: torch.Tensor) -> COOTensor:
        """The entries of ``X`` where ``mask`` is true (``mask`` boolean, or 0/1, of X's shape)."""
        idx = mask.nonzero()
        return cls(idx, X[mask], tuple(X.shape))

    def to_dense(self, fill: float = 0.0) -> torch.Tensor:
        """Dense copy with ``fill`` in unobserved cells (small tensors only)."""
        out = torch.full(self.shape, fill, dtype=self.dtype, device=self.device)
        out[tuple(self.indices.T)] = self.values
        return out


def as_coo(coo, name: str = "coo") -> COOTensor:
    """Validate a COO input: a :class:`COOTensor`, a torch sparse COO tensor, or ``(indices, values, shape)``.

    ``indices`` is ``(nnz, d)`` (a ``(d, nnz)`` array as torch.sparse uses is accepted too when d < nnz).
    """
    if isinstance(coo, torch.Tensor) and coo.layout == torch.sparse_coo:
        coo = coo.coalesce()
        return as_coo((coo.indices().T, coo.values(), tuple(coo.shape)), name)
    if isinstance(coo, COOTensor):
        indices, values, shape = coo.indices, coo.values, coo.shape
    else:
        try:
            indices, values, shape = coo
        except (TypeError, ValueError):
            raise InvalidTensorError(
                f"{name} must be a COOTensor, a torch sparse COO tensor or a tuple (indices, values, shape)"
            ) from None
    indices = as_tensor(indices, f"{name} indices")
    if as_tensor(values, f"{name} values").numel() == 0:
        raise InvalidTensorError(f"{name} has no observed entries")
    values = check_tensor(values, f"{name} values", min_order=1, max_order=1)
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ShapeError(f"{name} shape must be a sequence of ints, got {shape!r}") from None
    d = len(shape)
    if d < 2 or any(n <= 0 for n in shape):
        raise ShapeError(f"{name} shape must have at least 2 positive sizes, got {shape}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise InvalidTensorError(f"{name} indices must be integers, got {indices.dtype}")
    if indices.ndim == 2 and indices.shape[1] != d and indices.shape[0] == d:
        indices = indices.T
    if indices.ndim != 2 or indices.shape[1] != d:
        raise ShapeError(f"{name} indices must have shape (nnz, {d}) for a {d}-way shape, got {tuple(indices.shape)}")
    if indices.shape[0] != values.shape[0]:
        raise ShapeError(f"{name} has {indices.shape[0]} index rows but {values.shape[0]} values")
    indices = indices.to(device=values.device, dtype=torch.long)
    lo = indices.min(0).values
    hi = indices.max(0).values
    limits = torch.tensor(shape, device=indices.device)
    if bool((lo < 0).any()) or bool((hi >= limits).any()):
        raise ShapeError(f"{name} indices fall outside shape {shape} (min {lo.tolist()}, max {hi.tolist()})")
    return COOTensor(indices.contiguous(), values, shape)


def observed(X, mask, name: str = "X") -> COOTensor:
    """Observed entries of a dense ``X`` under a boolean (or 0/1) ``mask``, checked."""
    X = check_tensor(X, name, min_order=2, check_finite=False)
    mask = as_tensor(mask, "mask")
    if tuple(mask.shape) != tuple(X.shape):
        raise ShapeError(f"mask has shape {tuple(mask.shape)} but {name} has shape {tuple(X.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or (mask.dtype in FLOAT_DTYPES and not bool(((mask == 0) | (mask == 1)).all())):
            raise InvalidTensorError("mask must be boolean or hold only 0 and 1")
        mask = mask != 0
    mask = mask.to(X.device)
    coo = COOTensor.from_dense(X, mask)
    if coo.nnz == 0:
        raise InvalidTensorError("mask has no observed entries")
    if not bool(torch.isfinite(coo.values).all()):
        raise InvalidTensorError(f"{name} has NaN or Inf entries where mask marks them observed")
    return coo


def row_products(factors: Sequence[torch.Tensor], indices: torch.Tensor, skip: int | None = None,
                 rows: slice | None = None) -> torch.Tensor:
    """``prod_{m != skip} factors[m][indices[:, m]]``: the Khatri-Rao rows of the observed cells, (nnz, R)."""
    sel = indices if rows is None else indices[rows]
    out = None
    for m, F in enumerate(factors):
        if m == skip:
            continue
        g = F.index_select(0, sel[:, m])
        out = g if out is None else out * g
    return out


def cp_values(weights: torch.Tensor, factors: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Entries of the CP tensor ``[[weights; factors]]`` at ``indices`` (nnz, d)."""
    return row_products(factors, indices) @ weights


def sparse_mttkrp(coo: COOTensor, factors: Sequence[torch.Tensor], mode: int,
                  values: torch.Tensor | None = None) -> torch.Tensor:
    """``unfold(Y, mode) @ khatri_rao(factors, skip=mode)`` for the sparse ``Y`` (``values`` replace coo.values)."""
    vals = coo.values if values is None else values
    K = row_products(factors, coo.indices, skip=mode)
    out = torch.zeros(coo.shape[mode], K.shape[1], dtype=K.dtype, device=K.device)
    return out.index_add_(0, coo.indices[:, mode], K * vals[:, None])


class RowBlocks:
    """The observations of every row of one mode, laid out for batched per-row Gram matrices.

    Row ``i``'s least-squares problem needs ``G_i = sum_k f_k f_k^T`` over its observations ``k``.
    Forming all ``f_k f_k^T`` (nnz x R^2) is memory-bound and slow; instead the rows are grouped in
    buckets of similar observation counts (counts in ``(2^(b-1), 2^b]``), each bucket's observations are
    gathered into a zero-padded ``(rows, cap, R)`` block and ``G`` comes from one batched GEMM per
    bucket. Padding at most doubles the gathered size, whatever the count distribution.
    Built once per mode from the row index of every observation.
    """

    def __init__(self, rows: torch.Tensor, n_rows: int):
        nnz = rows.shape[0]
        self.n_rows, self.nnz = n_rows, nnz
        counts = torch.bincount(rows, minlength=n_rows)
        order = torch.argsort(rows, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        observed_rows = counts > 0
        level = torch.ceil(torch.log2(counts.clamp_min(1).double())).long()
        self.buckets: list[tuple[torch.Tensor, torch.Tensor]] = []
        for b in torch.unique(level[observed_rows]).tolist():
            sel = (observed_rows & (level == b)).nonzero().squeeze(1)
            cap = int(counts[sel].max())
            offsets = torch.arange(cap, device=rows.device)
            positions = (starts[sel][:, None] + offsets[None, :]).clamp_max(nnz - 1)
            valid = offsets[None, :] < counts[sel][:, None]
            # index nnz points at the zero row appended to the features: padding adds nothing
            self.buckets.append((sel, torch.where(valid, order[positions], nnz)))

    def gram_and_rhs(self, features: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``G_i = sum f_k f_k^T`` (n_rows, R, R) and ``b_i = sum y_k f_k`` (n_rows, R)."""
        R = features.shape[1]
        buffer = self.workspace(R, values)
        buffer[:-1, :R] = features
        return self.gram_and_rhs_of(buffer)

    def workspace(self, width: int, values: torch.Tensor) -> torch.Tensor:
        """A reusable ``(nnz + 1, width + 1)`` buffer: features go in ``[:-1, :width]``; the last column holds
        the values and the last row stays zero (the padding target)."""
        buf = getattr(self, "_buffer", None)
        if buf is None or buf.shape[1] != width + 1 or buf.dtype != values.dtype or buf.device != values.device:
            buf = values.new_zeros(self.nnz + 1, width + 1)
            buf[:-1, width] = values
            self._buffer = buf
        return buf

    def gram_and_rhs_of(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R = buffer.shape[1] - 1
        G = buffer.new_zeros(self.n_rows, R, R)
        rhs = buffer.new_zeros(self.n_rows, R)
        for sel, gather in self.buckets:
            block = buffer[gather]  # (rows, cap, R + 1)
            prod = block[..., :R].transpose(1, 2) @ block  # (rows, R, R + 1): [G_i | b_i]
            G[sel] = prod[..., :R]
            rhs[sel] = prod[..., R]
        return G, rhs


def split_holdout(coo: COOTensor, fraction: float, *, seed: int = 0) -> tuple[COOTensor, COOTensor]:
    """Split the observed entries at random into (train, test) with ``fraction`` of them in test."""
    perm = torch.randperm(coo.nnz, generator=make_generator(seed)).to(coo.device)
    n_test = int(round(fraction * coo.nnz))
    test, train = perm[:n_test], perm[n_test:]
    return (COOTensor(coo.indices[train], coo.values[train], coo.shape),
            COOTensor(coo.indices[test], coo.values[test], coo.shape))
