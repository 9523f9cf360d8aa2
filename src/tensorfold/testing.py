"""Reproducible test problems with known answers (exact low-rank tensors, noise, missing data).

Used by the test suite and the benchmarks so both run on the same, honest inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tensorfold.core.validate import make_generator, randn
from tensorfold.decomp.results import CPTensor, TRTensor, TTTensor, TuckerTensor


def _orthonormal(n: int, r: int, gen, dtype) -> torch.Tensor:
    Q, _ = torch.linalg.qr(randn(n, r, generator=gen, dtype=dtype))
    return Q


def random_cp(
    shape: Sequence[int], rank: int, *, seed: int = 0, dtype=torch.float64, normalize: bool = True
) -> CPTensor:
    """A random CP tensor with Gaussian factors (well conditioned with high probability)."""
    gen = make_generator(seed)
    factors = [randn(n, rank, generator=gen, dtype=dtype) for n in shape]
    cp = CPTensor(torch.ones(rank, dtype=dtype), factors)
    return cp.normalize() if normalize else cp


def random_tucker(
    shape: Sequence[int], ranks: Sequence[int], *, seed: int = 0, dtype=torch.float64, orthogonal: bool = True
) -> TuckerTensor:
    gen = make_generator(seed)
    core = randn(*ranks, generator=gen, dtype=dtype)
    if orthogonal:
        factors = [_orthonormal(n, r, gen, dtype) for n, r in zip(shape, ranks)]
    else:
        factors = [randn(n, r, generator=gen, dtype=dtype) for n, r in zip(shape, ranks)]
    return TuckerTensor(core, factors)


def random_tt(shape: Sequence[int], ranks: Sequence[int], *, seed: int = 0, dtype=torch.float64) -> TTTensor:
    """``ranks`` are the inner bond ranks ``(r_1, ..., r_{d-1})``."""
    gen = make_generator(seed)
    full = (1, *ranks, 1)
    cores = [randn(full[k], n, full[k + 1], generator=gen, dtype=dtype) for k, n in enumerate(shape)]
    return TTTensor(cores)


def random_tr(shape: Sequence[int], ranks: Sequence[int], *, seed: int = 0, dtype=torch.float64) -> TRTensor:
    """``ranks`` are ``(r_0, ..., r_{d-1})``; the ring closes with ``r_d = r_0``."""
    gen = make_generator(seed)
    full = (*ranks, ranks[0])
    cores = [randn(full[k], n, full[k + 1], generator=gen, dtype=dtype) for k, n in enumerate(shape)]
    return TRTensor(cores)


def add_noise(X: torch.Tensor, level: float, *, seed: int = 1) -> torch.Tensor:
    """``X + N`` with Gaussian ``N`` scaled so that ``||N|| = level * ||X||``."""
    gen = make_generator(seed)
    N = randn(*X.shape, generator=gen, dtype=X.dtype, device=X.device)
    return X + N * (level * torch.linalg.vector_norm(X) / torch.linalg.vector_norm(N))


def random_mask(shape: Sequence[int], fraction: float, *, seed: int = 2) -> torch.Tensor:
    """Boolean mask with each entry observed independently with probability ``fraction``."""
    gen = make_generator(seed)
    return torch.rand(*shape, generator=gen) < fraction


def poisson_cp_problem(shape: Sequence[int] = (60, 70, 80), rank: int = 5, *, mean: float = 2.0, seed: int = 0):
    """Counts drawn from planted nonnegative CP factors (gamma(1,1) entries, half zeroed, +0.01) scaled to
    ``mean`` counts per cell: ``(counts as a float64 tensor, the planted CPTensor of the rates)``. With the
    defaults this is the problem of pyttb's ``gcp_opt`` reference in REFERENCE-FIGURES (about 2/3 zeros)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fs = []
    for n in shape:
        A = rng.gamma(1.0, 1.0, size=(n, rank))
        A[rng.random((n, rank)) < 0.5] = 0
        fs.append(A + 0.01)
    truth = CPTensor(torch.ones(rank, dtype=torch.float64), [torch.from_numpy(f) for f in fs])
    rates = truth.to_tensor()
    scale = mean / float(rates.mean())
    counts = rng.poisson((rates * scale).numpy()).astype(np.float64)
    return torch.from_numpy(counts), CPTensor(truth.weights * scale, truth.factors)


def bernoulli_cp_problem(shape: Sequence[int] = (60, 70, 80), rank: int = 5, *, scale: float = 4.0, seed: int = 1):
    """Binary data ``X ~ Bernoulli(sigmoid(M))`` with ``M`` a planted CP tensor of Gaussian factors (unit
    columns, weights ``scale``): ``(data as a float64 tensor, the planted CPTensor of the logits)``."""
    gen = make_generator(seed)
    fs = [randn(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    truth = CPTensor(torch.full((rank,), float(scale), dtype=torch.float64), fs).normalize()
    return torch.bernoulli(torch.sigmoid(truth.to_tensor()), generator=gen), truth
