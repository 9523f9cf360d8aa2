"""``mlp-select``: keep ``k`` intermediate neurons of a feed-forward pair and refit its down projection.

A feed-forward pair computes ``y = W h + b`` with ``h = f(U x)`` elementwise (``f(G x) * (U x)`` when
gated). Keeping neurons ``S`` means keeping rows ``S`` of ``U`` (and ``G``) and refitting the down
projection on them by ridge least squares over the calibration activations ``H``::

    [W' b'] = argmin || H W^T + b - H_S W'^T - b' ||^2 + ridge,   i.e.   [W' b']^T = (C_SS + l I)^-1 C_S: [W b]^T

with ``C`` the Gram matrix of ``[H 1]`` (the constant column carries the bias and is always kept).
The neurons are chosen greedily, each time the one that explains most of the remaining output
energy (a pivoted Cholesky of ``C`` steered by the target ``C [W b]^T``: Nystrom column selection
on the activation correlation weighted by what the down projection reads from it), so one pass gives
the selection order and the output error at every ``k``. Gram matrices are accumulated in float64;
rank-deficient statistics (dead or duplicated neurons, few calibration tokens) stop being pivoted on
and the ridge keeps every solve well posed.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> H = torch.randn(500, 6, generator=g, dtype=torch.float64)
>>> W = torch.randn(3, 6, generator=g, dtype=torch.float64); W[:, 4:] = 0   # neurons 4, 5 unused
>>> stats = ActivationStats.of(H)
>>> sel = select_neurons(stats, W, None)
>>> sorted(sel.order[:4].tolist()), round(float(sel.errors[4]), 6)
([0, 1, 2, 3], 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tensorfold.errors import InvalidArgumentError, RankError

DEFAULT_RIDGE = 1e-6  # relative to the mean diagonal of the kept neurons' Gram matrix
PANEL = 128  # greedy steps per panel (matrix-matrix updates between panels)
COMPACT = 0.1  # taken rows (as a share of those left) that trigger dropping them from the residual matrices


@dataclass
class ActivationStats:
    """``C = [H 1]^T [H 1]`` (float64) of a layer's input rows ``H``; the last index is the constant."""

    gram: torch.Tensor | None = None
    rows: int = 0
    # greedy selections made on these statistics, as (weight, bias, greedy steps, selection): the planner's
    # menu and its measured option select on the same statistics, and a longer greedy serves a shorter one
    selections: list = field(default_factory=list, repr=False, compare=False)

    def add(self, H: torch.Tensor) -> None:
        H = H.detach().reshape(-1, H.shape[-1])
        if H.dtype not in (torch.float32, torch.float64):
            H = H.float()
        m = H.shape[1]
        if self.gram is None:
            self.gram = torch.zeros(m + 1, m + 1, dtype=torch.float64, device=H.device)
        # one batch's product in the activations' precision (a float32 GEMM is several times faster on
        # CPU, and a batch holds at most a few thousand rows), accumulated over batches in float64, in
        # place (a 3072-neuron Gram is 75 MB); the constant column's entries are the column sums
        self.gram[:m, :m].add_(H.T @ H)
        sums = H.sum(dim=0, dtype=torch.float64)
        self.gram[:m, m].add_(sums)
        self.gram[m, :m].add_(sums)
        self.gram[m, m] += H.shape[0]
        self.rows += H.shape[0]

    @classmethod
    def of(cls, H: torch.Tensor) -> ActivationStats:
        st = cls()
        st.add(H)
        return st

    @classmethod
    def of_gram(cls, stats) -> ActivationStats:
        """From a :class:`~tensorfold.compression.calibration.GramStats` that holds column sums."""
        G, s = stats.gram.double(), stats.sums.double()
        n = torch.tensor([float(stats.rows)], dtype=torch.float64, device=G.device)
        gram = torch.cat([torch.cat([G, s[:, None]], dim=1), torch.cat([s, n])[None, :]], dim=0)
        return cls(gram, int(stats.rows))

    @property
    def features(self) -> int:
        return 0 if self.gram is None else self.gram.shape[0] - 1


@dataclass(frozen=True)
class NeuronSelection:
    """Neurons in selection order and the relative output error ``errors[k]`` keeping the first ``k``."""

    order: torch.Tensor  # (m,) int64
    errors: torch.Tensor  # (m + 1,) float64, errors[k] relative error of the refitted output with k neurons


def _target(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[W b]`` as ``(out, m + 1)`` float64 (zeros for a missing bias)."""
    W = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64,
                                                                     device=W.device)
    return torch.cat([W, b[:, None]], dim=1)


def select_neurons(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None, *,
                   max_keep: int | None = None) -> NeuronSelection:
    """Greedy output-steered Nystrom selection of the down projection's input neurons (see module docs).

    ``weight``: the down projection ``(out, m)``; ``bias`` its bias or None. Returns the order of all
    ``m`` neurons (after ``max_keep`` greedy steps the rest follow by their last score) and the
    relative error of the refitted output at every ``k``.
    """
    if stats.gram is None or stats.rows == 0:
        raise InvalidArgumentError("mlp-select needs calibration activations (no rows were captured)")
    C = stats.gram
    m = C.shape[0] - 1
    if weight.ndim != 2 or weight.shape[1] != m:
        raise InvalidArgumentError(f"down projection of shape {tuple(weight.shape)} does not read {m} neurons")
    steps = m if max_keep is None else max(0, min(int(max_keep), m))
    for w, b, done_steps, done in stats.selections:
        if done_steps >= steps and torch.equal(w, weight) and ((b is None and bias is None) or (
                b is not None and bias is not None and torch.equal(b, bias))):
            return done
    selection = _select(stats, weight, bias, steps)
    stats.selections.append((weight.detach().clone(), None if bias is None else bias.detach().clone(), steps,
                             selection))
    return selection


def _select(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None, steps: int) -> NeuronSelection:
    C = stats.gram
    m = C.shape[0] - 1
    Wa = _target(weight, bias).to(device=C.device, dtype=C.dtype)
    B = C @ Wa.T  # (m+1, out): cross Gram of every column with the target
    total = float((Wa * B.T).sum())  # energy of the output, bias included
    # errors are relative to the output without its bias (kept exactly by the refit), as the per-matrix
    # methods' errors are: a large bias would otherwise make every selection look accurate.
    # W C W^T from B = C [W b]^T: its first m rows are C W^T + C[:m, m] b^T
    W, b = Wa[:, :m], Wa[:, m]
    energy = float((W * B[:m].T).sum()) - float(b @ (W @ C[:m, m]))
    order, explained, score, residual = _greedy(C, B, steps)
    taken = torch.zeros(m + 1, dtype=torch.bool)
    taken[order] = True
    taken[m] = True
    rest = (~taken).nonzero().squeeze(1)
    if len(rest):
        tail = score.cpu()[rest] if len(order) else torch.zeros(len(rest), dtype=torch.float64)
        rest = rest[torch.argsort(tail, descending=True)]
    full_order = torch.cat([torch.tensor(order, dtype=torch.int64), rest])
    known = explained + _tail_explained(residual, rest, explained[-1], float(C.diagonal().mean()))
    errs = relative_errors(C, Wa, full_order, energy, known=known, total=total)
    return NeuronSelection(full_order, errs)


def _tail_explained(residual, rest: torch.Tensor, start: float, mean_diag: float) -> list[float]:
    """Explained energy after each neuron of ``rest`` (the neurons the greedy did not pivot on, in that
    order), continuing from ``start``: a Cholesky factorisation of the greedy's residual Gram restricted
    to them (ridge-stabilised as :func:`relative_errors`), instead of one of the whole Gram in the full
    order. Empty when the factorisation fails (then :func:`relative_errors` computes them)."""
    A, R, active = residual
    if not len(rest):
        return []
    where = torch.full((int(active.max()) + 1,), -1, dtype=torch.int64, device=active.device)
    where[active] = torch.arange(len(active), device=active.device)
    local = where[rest.to(active.device)]
    Ar = A[local[:, None], local]
    Ar.diagonal().add_(1e-10 * max(mean_diag, 1e-300))
    Lc, info = torch.linalg.cholesky_ex(Ar)
    if int(info) != 0:
        return []
    Z = torch.linalg.solve_triangular(Lc, R[local], upper=False)
    return (start + torch.cumsum((Z * Z).sum(dim=1), 0)).cpu().tolist()


def _greedy(C: torch.Tensor, B: torch.Tensor, steps: int) -> tuple[list[int], list[float], torch.Tensor, tuple]:
    """The steered pivoted Cholesky of ``C`` (constant column first, then ``steps`` neurons): the order,
    the explained energy after each pivot, the scores of the last step (-1 where taken) and the residual
    ``(A, R, rows)``: Gram and cross Gram left after the pivots, on the rows ``rows`` (original indices).

    Blocked in panels of PANEL pivots, so that the quadratic work is matrix-matrix products: within a
    panel a new Cholesky column is the residual Gram's row at the pivot corrected by the panel's earlier
    columns only, and the residual Gram ``A`` and cross Gram ``R = B - L Z`` (whose squared row norms
    steer the choice) are brought up to date once per panel; rows already taken are dropped from them as
    they accumulate. Only matrix-vector products of the panel's width and one of ``R`` run per step.
    Same pivots as the unblocked recurrence (the sums are only regrouped).
    """
    n, dev = C.shape[0], C.device
    m = n - 1
    diag = C.diagonal().clone()
    floor = 1e-12 * max(float(diag[:m].max()) if m else 1.0, 1e-300)
    A, R = C.clone(), B.clone()
    norms = (R * R).sum(dim=1)
    active = torch.arange(n, device=dev)  # original index of each row of A, R, diag, norms
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    explained, order = [0.0], []
    score, scored = torch.zeros(0, dtype=C.dtype, device=dev), active  # the last step's scores, and their rows' indices
    t = pending = 0
    while t <= steps:
        width = min(PANEL, steps + 1 - t)
        Lt = torch.empty(width, A.shape[0], dtype=C.dtype, device=dev)  # the panel's Cholesky columns, stored as rows
        Zt = torch.empty(width, R.shape[1], dtype=C.dtype, device=dev)
        j = 0
        while j < width and t <= steps:
            if t == 0:
                p = m  # the constant column (the bias) is always kept
            else:
                score, scored = norms.clamp_min(0.0) / diag.clamp_min(floor), active
                score[taken | (diag <= floor)] = -1.0
                p = int(score.argmax())
                if float(score[p]) < 0:
                    break  # every remaining neuron is (numerically) a combination of the kept ones
            dp = float(diag[p])
            taken[p] = True
            if dp <= floor:
                if t > 0:
                    order.append(int(active[p]))
                    explained.append(explained[-1])
                t += 1
                continue
            root = math.sqrt(dp)
            lp = Lt[:j, p]
            col = (A[p] - lp @ Lt[:j]) / root  # A is symmetric: its row p is its column p
            z = (R[p] - lp @ Zt[:j]) / root
            residual_z = R @ z - (Zt[:j] @ z) @ Lt[:j]  # (R - Lt^T Zt) z, R as of the panel's start
            gain = float(z @ z)
            norms.addcmul_(col, residual_z, value=-2.0).addcmul_(col, col, value=gain)
            Lt[j], Zt[j] = col, z
            diag.addcmul_(col, col, value=-1.0)
            diag[p] = 0.0
            if t == 0:
                explained[0] = gain
            else:
                order.append(int(active[p]))
                explained.append(explained[-1] + gain)
            j += 1
            t += 1
        Lt, Zt = Lt[:j], Zt[:j]
        A.addmm_(Lt.T, Lt, alpha=-1.0)
        R.addmm_(Lt.T, Zt, alpha=-1.0)
        norms = (R * R).sum(dim=1)  # exact again (the per-step updates drift)
        pending += j
        if pending >= COMPACT * A.shape[0]:
            keep = (~taken).nonzero().squeeze(1)
            A, R = A[keep[:, None], keep], R[keep]
            diag, norms, active, taken = diag[keep], norms[keep], active[keep], taken[keep]
            pending = 0
        if j < width and t <= steps:
            break  # stopped early
    last = torch.full((n,), -1.0, dtype=C.dtype, device=dev)
    last[scored] = score
    return order, explained, last, (A, R, active)


def relative_errors(C: torch.Tensor, Wa: torch.Tensor, order: torch.Tensor, energy: float,
                    known: list[float] | None = None, total: float | None = None) -> torch.Tensor:
    """Relative output error keeping the first ``k`` neurons of ``order`` (plus the constant), k = 0..m:
    ``sqrt((total - explained_k) / energy)``, ``total`` the output energy with the bias (default
    ``energy``), ``energy`` the one the error is relative to.

    ``known[k]`` (explained energy from the greedy pass) is used where given; the rest comes from
    one Cholesky factorisation of ``C`` in that order (ridge-stabilised).
    """
    total = energy if total is None else total
    m = C.shape[0] - 1
    explained = torch.zeros(m + 1, dtype=torch.float64)
    n_known = len(known) if known else 0
    if n_known:
        explained[:n_known] = torch.tensor(known, dtype=torch.float64)
    if n_known < m + 1:
        perm = torch.cat([torch.tensor([m]), order.to(torch.int64)])
        Cp = C[perm][:, perm]
        Bp = (C @ Wa.T)[perm]
        ridge = 1e-10 * float(Cp.diagonal().mean().clamp_min(1e-300))
        Lc, info = torch.linalg.cholesky_ex(Cp + ridge * torch.eye(m + 1, dtype=Cp.dtype, device=Cp.device))
        if int(info) == 0:
            Z = torch.linalg.solve_triangular(Lc, Bp, upper=False)
            cum = torch.cumsum((Z * Z).sum(dim=1), 0).cpu()
            explained[n_known:] = cum[n_known:]
        else:  # numerically singular even with the ridge: later neurons add nothing measurable
            explained[n_known:] = explained[max(n_known - 1, 0)]
    if energy <= 0:
        return torch.zeros(m + 1, dtype=torch.float64)
    # the greedy's explained energy is monotone; clamp round-off
    err = ((total - torch.cummax(explained, 0).values) / energy).clamp_min(0.0).sqrt()
    err[-1] = min(float(err[-1]), 1e-12) if m else 0.0
    return err


def refit_down(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, *,
               ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The down projection ``(out, k)`` and bias ``(out,)`` refitted on neurons ``keep`` (float64).

    Ridge least squares on the calibration activations: ``(C_SS + l I) X = C_S: [W b]^T`` with ``S`` the
    kept neurons plus the constant; ``l = ridge * mean(diag C_SS)``. A failed Cholesky (statistics
    singular beyond the ridge) falls back to a least-squares solve.
    """
    C = stats.gram
    m = C.shape[0] - 1
    keep = torch.as_tensor(keep, dtype=torch.int64)
    S = torch.cat([keep, torch.tensor([m])]).to(C.device)
    Wa = _target(weight, bias).to(C.device)
    Css = C[S][:, S]
    rhs = C[S] @ Wa.T
    lam = ridge * float(Css.diagonal().mean().clamp_min(1e-300))
    A = Css + lam * torch.eye(len(S), dtype=C.dtype, device=C.device)
    Lc, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        X = torch.cholesky_solve(rhs, Lc)
    else:
        X = torch.linalg.lstsq(A, rhs).solution
    return X[:-1].T.contiguous(), X[-1].contiguous()


def _rows_of(module: nn.Module, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    from tensorfold.compression.blocks.discover import linear_weight

    w, b = linear_weight(module)
    return w[keep].clone(), (b[keep].clone() if b is not None else None)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        lin.weight.copy_(weight.to(like.dtype))
        if bias is not None:
            lin.bias.copy_(bias.to(like.dtype))
    return lin


def mlp_select(ups: list[nn.Module], down: nn.Module, stats: ActivationStats, keep: int, *,
               ridge: float = DEFAULT_RIDGE, refit: bool = True) -> tuple[list[nn.Linear], nn.Linear, torch.Tensor]:
    """The pair with ``keep`` intermediate neurons: new up projections (each ``nn.Linear(d, keep)``), the
    refitted down projection ``nn.Linear(keep, out)`` and the kept neuron indices (sorted).

    ``refit=False`` keeps the selected columns of the down projection as they are (for comparison).
    """
    from tensorfold.compression.blocks.discover import linear_weight

    W, b = linear_weight(down)
    m = W.shape[1]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= m:
        raise RankError(f"mlp-select keeps 1 to {m} neurons, got {keep!r}")
    sel = select_neurons(stats, W, b, max_keep=keep)
    kept = torch.sort(sel.order[:keep]).values
    if keep == m:  # nothing removed: the pair as it is (a refit would only add the ridge's bias)
        Wn, bn = W.double(), (b.double() if b is not None else None)
    elif refit:
        Wn, bn = refit_down(stats, W, b, kept, ridge=ridge)
    else:
        Wn, bn = W[:, kept].double(), (b.double() if b is not None else None)
    new_ups = [_linear(*_rows_of(u, kept), like=W) for u in ups]
    new_down = _linear(Wn, bn, like=W)
    return new_ups, new_down, kept


def mlp_params(d_in: int, d_out: int, keep: int, n_ups: int, up_bias: bool = True, down_bias: bool = True) -> int:
    """Parameters of the pair with ``keep`` neurons."""
    return n_ups * keep * (d_in + int(up_bias)) + keep * d_out + int(down_bias) * d_out


__all__ = ["ActivationStats", "NeuronSelection", "mlp_params", "mlp_select", "refit_down", "relative_errors",
           "select_neurons"]
