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
>>> fit = qk_select(input_gram(X), Wq, None, Wk, None, heads=2, kv_heads=2, head_dim=4)
>>> [round(float(e), 6) for e in fit.errors[[0, 4]]]
[1.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorfold.errors import RankError


def input_gram(X: torch.Tensor) -> torch.Tensor:
    """``[X 1]^T [X 1]`` in float64 (the last index is the constant)."""
    X = X.reshape(-1, X.shape[-1]).double()
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    return Xa.T @ Xa


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


def _score_error(Cqs: list[torch.Tensor], Ck: torch.Tensor, S: list[int], ridge: float) -> float:
    """Score error of the heads sharing ``Ck`` keeping dimensions ``S`` with the shared key refit."""
    dh = Ck.shape[0]
    eye = torch.eye(dh, dtype=torch.float64)
    if not S:
        return sum(float(torch.trace(Cq @ Ck)) for Cq in Cqs)
    Cq = sum(Cqs)
    idx = torch.tensor(S)
    Css = Cq[idx][:, idx]
    lam = ridge * float(Css.diagonal().mean().clamp_min(1e-300))
    R = torch.linalg.solve(Css + lam * torch.eye(len(S), dtype=torch.float64), Cq[idx])
    A = eye.clone()
    A[idx] -= R  # I - E_S R
    return sum(float(torch.trace(A @ Ck @ A.T @ Cq_h)) for Cq_h in Cqs)


def _key_refit(Cqs: list[torch.Tensor], S: list[int], ridge: float) -> torch.Tensor:
    Cq = sum(Cqs)
    idx = torch.tensor(S)
    Css = Cq[idx][:, idx]
    lam = ridge * float(Css.diagonal().mean().clamp_min(1e-300))
    return torch.linalg.solve(Css + lam * torch.eye(len(S), dtype=torch.float64), Cq[idx])  # (|S|, dh)


def qk_select(gram: torch.Tensor, Wq, bq, Wk, bk, *, heads: int, kv_heads: int, head_dim: int,
              ridge: float = 1e-8) -> QKFit:
    """Greedy per-group dimension order and the relative score error at every size (see module docs).

    ``gram``: ``[X 1]^T [X 1]`` of the attention input; ``Wq (heads*head_dim, d)``, ``Wk
    (kv_heads*head_dim, d)`` and their biases (or None).
    """
    Qa, Ka = _aug(Wq, bq), _aug(Wk, bk)
    G = gram.double()
    rep = heads // kv_heads
    orders, err_sq = [], torch.zeros(head_dim + 1, dtype=torch.float64)
    total = 0.0
    for g in range(kv_heads):
        Kg = Ka[g * head_dim:(g + 1) * head_dim]
        Ck = Kg @ G @ Kg.T
        Cqs = []
        for h in range(g * rep, (g + 1) * rep):
            Qh = Qa[h * head_dim:(h + 1) * head_dim]
            Cqs.append(Qh @ G @ Qh.T)
        full = _score_error(Cqs, Ck, [], ridge)
        total += full
        S: list[int] = []
        err_sq[0] += full
        for r in range(1, head_dim + 1):
            best = min((j for j in range(head_dim) if j not in S),
                       key=lambda j: _score_error(Cqs, Ck, [*S, j], ridge))
            S.append(best)
            err_sq[r] += 0.0 if r == head_dim else max(_score_error(Cqs, Ck, S, ridge), 0.0)
        orders.append(S)
    errors = (err_sq / total).clamp_min(0.0).sqrt() if total > 0 else torch.zeros_like(err_sq)
    return QKFit(orders, errors)


def qk_weights(fit: QKFit, gram: torch.Tensor, Wq, bq, Wk, bk, *, heads: int, kv_heads: int, head_dim: int,
               keep: int, ridge: float = 1e-8):
    """``(Wq', bq', Wk', bk')`` keeping ``keep`` dimensions per head (float64; biases may be None)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= head_dim:
        raise RankError(f"qk-select keeps 1 to {head_dim} dimensions per head, got {keep!r}")
    Qa, Ka = _aug(Wq, bq), _aug(Wk, bk)
    G = gram.double()
    rep = heads // kv_heads
    q_rows, k_rows = [], []
    for g in range(kv_heads):
        S = sorted(fit.orders[g][:keep])
        Kg = Ka[g * head_dim:(g + 1) * head_dim]
        Cqs = []
        for h in range(g * rep, (g + 1) * rep):
            Qh = Qa[h * head_dim:(h + 1) * head_dim]
            Cqs.append(Qh @ G @ Qh.T)
            q_rows.append(Qh[S])
        k_rows.append(_key_refit(Cqs, S, ridge) @ Kg if keep < head_dim else Kg)
    Q, K = torch.cat(q_rows), torch.cat(k_rows)
    return Q[:, :-1], (Q[:, -1] if bq is not None else None), K[:, :-1], K[:, -1]


@dataclass(frozen=True)
class VOFit:
    """Per key/value group the whitened SVD factors of the stacked value-output product;
    ``errors[r]`` the relative output error keeping rank ``r`` per group."""

    lefts: list[torch.Tensor]  # (rep*d_out, dh) whitened left singular vectors * singular values
    rights: list[torch.Tensor]  # (dh, d) first factors (already un-whitened)
    errors: torch.Tensor


def vo_svd(gram: torch.Tensor, Wv, Wo, *, heads: int, kv_heads: int, head_dim: int,
           ridge: float = 1e-6) -> VOFit:
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
    rep = heads // kv_heads
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


def vo_weights(fit: VOFit, Wo, bo, bv, *, heads: int, kv_heads: int, head_dim: int, keep: int):
    """``(Wv' (kv_heads*keep, d), Wo' (d_out, heads*keep), bo')`` at rank ``keep`` per group (float64);
    the value bias (or None) is folded into the output bias."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= head_dim:
        raise RankError(f"vo-svd keeps rank 1 to {head_dim} per head, got {keep!r}")
    O = Wo.detach().double()
    d_out = O.shape[0]
    rep = heads // kv_heads
    bias = bo.detach().double().clone() if bo is not None else torch.zeros(d_out, dtype=torch.float64)
    if bv is not None:
        per_head = bv.detach().double().reshape(kv_heads, head_dim).repeat_interleave(rep, dim=0).reshape(-1)
        bias += O @ per_head
    v_rows, o_cols = [], [None] * heads
    for g in range(kv_heads):
        v_rows.append(fit.rights[g][:keep])
        left = fit.lefts[g][:, :keep]  # (rep*d_out, keep)
        for i, h in enumerate(range(g * rep, (g + 1) * rep)):
            o_cols[h] = left[i * d_out:(i + 1) * d_out]
    return torch.cat(v_rows), torch.cat(o_cols, dim=1), bias


def attention_params(d: int, d_out: int, heads: int, kv_heads: int, qk: int, v: int, *, q_bias: bool = True,
                     k_bias: bool = True, o_bias: bool = True) -> tuple[int, int]:
    """``(query+key params, value+output params)`` with ``qk`` query/key and ``v`` value dims per head
    (the value bias is folded into the output bias)."""
    qk_p = heads * qk * (d + int(q_bias)) + kv_heads * qk * (d + int(k_bias))
    vo_p = kv_heads * v * d + d_out * heads * v + int(o_bias) * d_out
    return qk_p, vo_p


__all__ = ["QKFit", "VOFit", "attention_params", "input_gram", "qk_select", "qk_weights", "vo_svd", "vo_weights"]
