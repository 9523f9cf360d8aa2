"""Norms and inner products of decomposed tensors, computed without reconstructing them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tensorfold.core.mttkrp import mttkrp


def cp_gram(factors: Sequence[torch.Tensor], skip: int | None = None) -> torch.Tensor:
    """Hadamard product of the factor Gram matrices ``A_m^T A_m`` (optionally skipping one mode)."""
    G = None
    for m, A in enumerate(factors):
        if m == skip:
            continue
        g = A.T @ A
        G = g if G is None else G * g
    return G


def cp_norm(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm of ``[[weights; factors]]`` from the Gram matrices: ``O(sum I_m R^2)``."""
    sq = weights @ cp_gram(factors) @ weights
    return sq.clamp_min(0).sqrt()


def cp_inner(X: torch.Tensor, weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner product ``<X, [[weights; factors]]>`` from one MTTKRP."""
    last = len(factors) - 1
    M = mttkrp(X, factors, last)
    return ((M * factors[last]).sum(0) * weights).sum()


def tucker_norm(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norm of ``core x_1 U_1 ... x_d U_d``: ``sqrt(<G, G x_n (U_n^T U_n)>)`` (exact for any factors)."""
    from tensorfold.core.tenalg import multi_mode_dot

    grams = [U.T @ U for U in factors]
    return (core * multi_mode_dot(core, grams)).sum().clamp_min(0).sqrt()


def tt_norm(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norm of a tensor train (cores ``(r_{k-1}, n_k, r_k)``) by a chain of small contractions."""
    M = None
    for G in cores:
        if M is None:
            M = torch.einsum("anb,anc->bc", G, G)
        else:
            M = torch.einsum("ab,anc,bnd->cd", M, G, G)
    return M.trace().clamp_min(0).sqrt()


def tr_norm(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norm of a tensor ring: trace of the product of transfer matrices ``sum_n G[:,n,:] (x) G[:,n,:]``."""
    M = None
    for G in cores:
        E = torch.einsum("anb,cnd->acbd", G, G).reshape(G.shape[0] ** 2, G.shape[2] ** 2)
        M = E if M is None else M @ E
    return M.trace().clamp_min(0).sqrt()


def tt_inner(X: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``<X, TT>`` by sweeping left to right; the first step is one GEMM over X."""
    shape = X.shape
    first = cores[0][0]  # (n_1, r_1)
    T = first.T @ X.reshape(shape[0], -1)  # (r_1, rest)
    for G in cores[1:]:
        r_prev, n, r_next = G.shape
        T = T.reshape(r_prev * n, -1)
        T = G.reshape(r_prev * n, r_next).T @ T  # (r_next, rest)
    return T.reshape(-1).sum() if T.numel() == 1 else T.trace()


def tr_inner(X: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``<X, TR>``: like :func:`tt_inner` but keeping the ring index open until the end."""
    shape = X.shape
    G0 = cores[0]  # (r0, n1, r1)
    r0, n1, r1 = G0.shape
    T = G0.permute(0, 2, 1).reshape(r0 * r1, n1) @ X.reshape(shape[0], -1)  # (r0*r1, rest)
    T = T.reshape(r0, r1, -1)
    for G in cores[1:]:
        r_prev, n, r_next = G.shape
        T = T.reshape(r0, r_prev * n, -1)
        T = torch.einsum("apq,pr->arq", T, G.reshape(r_prev * n, r_next))
    # T: (r0, r_d = r0, 1)
    return torch.einsum("aa->", T.reshape(r0, r0))
