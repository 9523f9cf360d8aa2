"""``qk-select`` and ``vo-svd``: smaller attention heads fitted to calibration inputs.

Both work per head on the pairs whose product is all the model uses (grouped-query aware: a key/value
head is shared by the ``heads // kv_heads`` query heads of its group):

- ``qk-select`` keeps ``r`` of the ``head_dim`` query/key dimensions of each head. The scores of a
  head are ``Q K^T = sum_j q_j k_j^T``, a sum over dimensions (a CR decomposition of the pair). With
  ``Cq``, ``Ck`` the Gram matrices of a head's query and key outputs on the calibration tokens
  (biases included), keeping dimensions ``S`` and refitting the keys to the kept queries,
  ``K' = K R^T`` with ``R = Cq_SS^-1 Cq_S:``, leaves the score error ``tr((I - E_S R) Ck (I - E_S R)^T Cq)``;
  dimensions are chosen greedily to minimise it, the same count in every head (one tensor shape).
- ``vo-svd`` keeps rank ``r`` of each head's value-output product ``O_h V_h`` (``(d, d)``, rank
  ``head_dim``): the truncated SVD of the product whitened by the Gram matrix of the attention's input
  (the fit that minimises ``||X (O V - O' V')^T||``). The value bias passes through attention
  unchanged (attention rows sum to one), so it is folded into the output bias.

The rebuilt attention is a :class:`tensorfold.nn.transformer.HeadAttention` (query/key heads of ``r``
dimensions with the model's original scaling, value heads of rank ``r_v``) and a smaller output
projection.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> X = torch.randn(400, 8, generator=g, dtype=torch.float64)
>>> Wq, Wk = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
>>> fit = qk_select(input_gram(X), Projection(Wq), Projection(Wk), HeadLayout(heads=2, kv_heads=2, head_dim=4))
>>> [round(float(e), 6) for e in fit.errors[[0, 4]]]
[1.0, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tensorfold.errors import RankError


@dataclass(frozen=True)
class HeadLayout:
    """The heads of an attention: ``heads`` query heads, ``kv_heads`` key/value heads (grouped-query
    attention when fewer; each shared by ``heads // kv_heads`` query heads), ``head_dim`` dimensions each."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def rep(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


class Projection(NamedTuple):
    """A projection's ``weight (out, in)`` and ``bias`` (or None)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def input_gram(X: torch.Tensor) -> torch.Tensor:
    """``[X 1]^T [X 1]`` in float64 (the last index is the constant)."""
    X = X.reshape(-1, X.shape[-1]).double()
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    return Xa.T @ Xa


def centered(gram: torch.Tensor) -> torch.Tensor:
    """The ``[X 1]`` Gram of the centred rows ``X - mean`` (the constant's row and column become zero)."""
    n = float(gram[-1, -1])
    if n <= 0:
        return gram
    s = gram[:, -1]
    return gram - torch.outer(s, s) / n


def _aug(W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    W = W.detach().double()
    b = b.detach().double() if b is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    return torch.cat([W, b[:, None]], dim=1)


@dataclass(frozen=True)
class QKFit:
    """Per key/value group the kept dimensions in greedy order; ``errors[r]`` the relative score error
    keeping ``r`` dimensions per head (r = 0..head_dim)."""

    orders: list[list[int]]
    errors: torch.Tensor


def _greedy_dims(Cq: torch.Tensor, Ck: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Greedy order of the query/key dimensions and the score error energy at every size.

    The scores of the query rows ``Q`` (Gram ``Cq``, the group's query heads stacked) with the keys
    (Gram ``Ck``) are ``Q K^T``; keeping dimensions ``S`` and refitting the keys leaves
    ``||(I - P_S) Q M||^2`` with ``M M^T = Ck`` and ``P_S`` the projection on the kept query columns:
    a pivoted Cholesky of ``Cq`` steered by the target ``Cq M`` (as :func:`~.mlp.select_neurons`).
    Returns the order and ``residual[r]`` for r = 0..head_dim.
    """
    dh = Cq.shape[0]
    evals, vecs = torch.linalg.eigh((Ck + Ck.T) / 2)
    M = vecs * evals.clamp_min(0.0).sqrt()
    B = Cq @ M
    total = float(torch.trace(Cq @ Ck))
    diag = Cq.diagonal().clone()
    floor = 1e-12 * max(float(diag.max()), 1e-300)
    L = torch.zeros(dh, dh, dtype=torch.float64)
    taken = torch.zeros(dh, dtype=torch.bool)
    order, residual = [], [total]
    for t in range(dh):
        score = (B * B).sum(dim=1) / diag.clamp_min(floor)
        score[taken | (diag <= floor)] = -1.0
        p = int(score.argmax())
        if float(score[p]) < 0:  # the rest are combinations of the kept dimensions: nothing left to explain
            rest = [j for j in range(dh) if not bool(taken[j])]
            order += rest
            residual += [residual[-1]] * len(rest)
            break
        dp = float(diag[p])
        col = (Cq[:, p] - L[:, :t] @ L[p, :t]) / math.sqrt(dp)
        L[:, t] = col
        z = B[p] / math.sqrt(dp)
        B = B - col[:, None] * z[None, :]
        diag = diag - col * col
        diag[p] = 0.0
        taken[p] = True
        order.append(p)
        residual.append(residual[-1] - float(z @ z))
    return order, torch.tensor(residual, dtype=torch.float64).clamp_min(0.0)


def _key_refit(Cq: torch.Tensor, S: list[int], ridge: float) -> torch.Tensor:
    idx = torch.tensor(S)
    Css = Cq[idx][:, idx]
    lam = ridge * float(Css.diagonal().mean().clamp_min(1e-300))
    return torch.linalg.solve(Css + lam * torch.eye(len(S), dtype=torch.float64), Cq[idx])  # (|S|, dh)


def _group_grams(Qa, Ka, G, Gc, g: int, rep: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked query Gram of group ``g``'s query heads and its key Gram (keys centred)."""
    Kg = Ka[g * head_dim:(g + 1) * head_dim]
    # the keys' mean adds a constant to each query's scores, which the softmax ignores: errors and
    # energies count the keys' variation only
    Ck = Kg @ Gc @ Kg.T
    Cq = sum(Qa[h * head_dim:(h + 1) * head_dim] @ G @ Qa[h * head_dim:(h + 1) * head_dim].T
             for h in range(g * rep, (g + 1) * rep))
    return Cq, Ck


def qk_select(gram: torch.Tensor, query: Projection, key: Projection, layout: HeadLayout) -> QKFit:
    """Greedy per-group dimension order and the relative score error at every size (see module docs).

    ``gram``: ``[X 1]^T [X 1]`` of the attention input; ``query`` (weight ``(heads*head_dim, d)``) and
    ``key`` (weight ``(kv_heads*head_dim, d)``) with their biases (or None).
    """
    Qa, Ka = _aug(*query), _aug(*key)
    G = gram.double()
    Gc = centered(G)
    kv_heads, head_dim, rep = layout.kv_heads, layout.head_dim, layout.rep
    orders, residual = [], torch.zeros(head_dim + 1, dtype=torch.float64)
    for g in range(kv_heads):
        order, res = _greedy_dims(*_group_grams(Qa, Ka, G, Gc, g, rep, head_dim))
        orders.append(order)
        residual += res
    residual[-1] = 0.0
    total = float(residual[0])
    errors = (residual / total).clamp_min(0.0).sqrt() if total > 0 else torch.zeros_like(residual)
    return QKFit(orders, errors)


def qk_weights(fit: QKFit, gram: torch.Tensor, query: Projection, key: Projection, layout: HeadLayout, *,
               keep: int, ridge: float = 1e-8):
    """``(Wq', bq', Wk', bk')`` keeping ``keep`` dimensions per head (float64; ``bq'`` is None when the
    query had no bias)."""
    kv_heads, head_dim, rep = layout.kv_heads, layout.head_dim, layout.rep
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= head_dim:
        raise RankError(f"qk-select keeps 1 to {head_dim} dimensions per head, got {keep!r}")
    Qa, Ka = _aug(*query), _aug(*key)
    G = gram.double()
    Gc = centered(G)
    q_rows, k_rows = [], []
    for g in range(kv_heads):
        S = sorted(fit.orders[g][:keep])
        Kg = Ka[g * head_dim:(g + 1) * head_dim]
        Cq, _ = _group_grams(Qa, Ka, G, Gc, g, rep, head_dim)
        q_rows += [Qa[h * head_dim:(h + 1) * head_dim][S] for h in range(g * rep, (g + 1) * rep)]
        k_rows.append(_key_refit(Cq, S, ridge) @ Kg if keep < head_dim else Kg)
    Q, K = torch.cat(q_rows), torch.cat(k_rows)
    return Q[:, :-1], (Q[:, -1] if query.bias is not None else None), K[:, :-1], K[:, -1]


@dataclass(frozen=True)
class VOFit:
    """Per key/value group the whitened SVD factors of the stacked value-output product;
    ``errors[r]`` the relative output error keeping rank ``r`` per group."""

    lefts: list[torch.Tensor]  # (rep*d_out, dh) whitened left singular vectors * singular values
    rights: list[torch.Tensor]  # (dh, d) first factors (already un-whitened)
    errors: torch.Tensor


def vo_svd(gram: torch.Tensor, Wv, Wo, layout: HeadLayout, ridge: float = 1e-6) -> VOFit:
    """Whitened SVD of every group's value-output product (see the module docs).

    ``gram``: ``X^T X`` (or the ``[X 1]`` Gram; the constant is dropped) of the attention input;
    ``Wv (kv_heads*head_dim, d)``, ``Wo (d_out, heads*head_dim)``.
    """
    from tensorfold.compression.calibration import whitening_factor

    d = Wv.shape[1]
    G = gram.double()[:d, :d]
    factors = whitening_factor(G, ridge)
    if factors is None:
        eye = torch.eye(d, dtype=torch.float64)
        L, L_inv = eye, eye
    else:
        L, L_inv = factors
    V, O = Wv.detach().double(), Wo.detach().double()
    kv_heads, head_dim, rep = layout.kv_heads, layout.head_dim, layout.rep
    lefts, rights, tails, total = [], [], torch.zeros(head_dim + 1, dtype=torch.float64), 0.0
    for g in range(kv_heads):
        Vg = V[g * head_dim:(g + 1) * head_dim]  # (dh, d)
        # the output columns of the group's query heads, stacked: (rep*d_out, dh)
        Og = torch.cat([O[:, h * head_dim:(h + 1) * head_dim] for h in range(g * rep, (g + 1) * rep)])
        Qo, Ro = torch.linalg.qr(Og)  # Og = Qo Ro, the product's row space is Ro Vg L
        U, s, Vt = torch.linalg.svd(Ro @ (Vg @ L), full_matrices=False)  # (dh, dh), (dh,), (dh, d)
        lefts.append((Qo @ U) * s)  # (rep*d_out, dh)
        rights.append(Vt @ L_inv)  # (dh, d)
        sq = s**2
        total += float(sq.sum())
        tails += torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), sq.new_zeros(1)])
    errors = (tails / total).sqrt() if total > 0 else torch.zeros_like(tails)
    return VOFit(lefts, rights, errors)


def vo_weights(fit: VOFit, Wo, bo, bv, layout: HeadLayout, *, keep: int):
    """``(Wv' (kv_heads*keep, d), Wo' (d_out, heads*keep), bo')`` at rank ``keep`` per group (float64);
    the value bias (or None) is folded into the output bias."""
    kv_heads, head_dim, rep = layout.kv_heads, layout.head_dim, layout.rep
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= head_dim:
        raise RankError(f"vo-svd keeps rank 1 to {head_dim} per head, got {keep!r}")
    O = Wo.detach().double()
    d_out = O.shape[0]
    bias = bo.detach().double().clone() if bo is not None else torch.zeros(d_out, dtype=torch.float64)
    if bv is not None:
        per_head = bv.detach().double().reshape(kv_heads, head_dim).repeat_interleave(rep, dim=0).reshape(-1)
        bias += O @ per_head
    v_rows, o_cols = [], [None] * layout.heads
    for g in range(kv_heads):
        v_rows.append(fit.rights[g][:keep])
        left = fit.lefts[g][:, :keep]  # (rep*d_out, keep)
        for i, h in enumerate(range(g * rep, (g + 1) * rep)):
            o_cols[h] = left[i * d_out:(i + 1) * d_out]
    return torch.cat(v_rows), torch.cat(o_cols, dim=1), bias


__all__ = ["HeadLayout", "Projection", "QKFit", "VOFit", "input_gram", "qk_select", "qk_weights", "vo_svd",
           "vo_weights"]
