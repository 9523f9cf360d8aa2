"""Calibration data: running a model on user batches, capturing layer inputs, output-aware fitting.

``calib`` is an iterable of input batches, each a tensor, a tuple/list whose first item is the input,
or a dict of keyword inputs (Hugging Face style; a model whose ``forward`` takes the dict itself, as
``SentenceTransformer`` does, gets it as one argument).

The fitting here is *activation-whitened truncated SVD*: with ``X`` the inputs a Linear layer sees
and ``G = X^T X = L L^T`` (accumulated in float64), the rank-``r`` weight minimising the output
error ``||X W^T - X A^T||_F`` is ``A = trunc_r(W L) L^{-1}``. When ``G`` is rank-deficient (fewer
samples than features, dead inputs) a small ridge is added before the Cholesky factorisation, and
when even that fails the eigen-decomposition with clipped eigenvalues is used; a zero ``G`` falls back
to the plain weight SVD. Nothing here crashes on a singular Gram matrix.

>>> import torch
>>> from tensorfold.compression.calibration import whitened_lowrank
>>> W = torch.randn(8, 6, dtype=torch.float64)
>>> X = torch.randn(100, 6, dtype=torch.float64)
>>> fit = whitened_lowrank(W, X.T @ X, 6)      # full rank: exact
>>> bool(torch.allclose(fit.second @ fit.first, W))
True
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tensorfold.core.modules import batch_input, call_model, takes_dict  # noqa: F401  (re-exported)
from tensorfold.core.svd import full_svd, truncate, truncated_svd
from tensorfold.errors import InvalidArgumentError, ShapeError, TensorfoldError
from tensorfold.nn.conv import channel_gram  # noqa: F401  (re-exported: it lived here)

# Patch Gram matrices above this dimension (in_channels * kernel volume) are not accumulated.
MAX_GRAM_DIM = 4096


# ---- batches and model calls ----------------------------------------------------------------------


def materialize(calib, name: str = "calib") -> list:
    """The calibration batches as a list (an iterable is consumed once); validates the batch types."""
    if calib is None:
        return []
    if isinstance(calib, (torch.Tensor, Mapping)):
        calib = [calib]
    try:
        batches = list(calib)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an iterable of input batches, got {type(calib).__name__}") from None
    if not batches:
        raise InvalidArgumentError(f"{name} holds no batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
            raise InvalidArgumentError(
                f"{name} batch {i} is a {type(batch).__name__}; give tensors, tuples (input first) or dicts"
            )
        if isinstance(batch, (tuple, list)) and (not batch or not isinstance(batch[0], (torch.Tensor, Mapping))):
            raise InvalidArgumentError(f"{name} batch {i}: a tuple batch needs the input tensor as its first item")
        _check_finite(batch, f"{name} batch {i}")
    return batches


def _check_finite(batch, what: str) -> None:
    # a NaN/Inf batch poisons every Gram matrix and sensitivity silently: refuse it by name
    if isinstance(batch, torch.Tensor):
        if (batch.is_floating_point() or batch.is_complex()) and not bool(torch.isfinite(batch).all()):
            raise InvalidArgumentError(f"{what} holds NaN or Inf values; calibration data must be finite")
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            _check_finite(value, f"{what} [{key!r}]")
    elif isinstance(batch, (tuple, list)):
        for j, value in enumerate(batch):
            _check_finite(value, f"{what} item {j}")


def output_tensor(output, output_fn: Callable | None = None) -> torch.Tensor:
    """The tensor to compare in a model's output (``output_fn`` decides when given).

    Dicts: ``sentence_embedding``, ``logits``, ``last_hidden_state`` or else the first tensor value;
    tuples: the first item; objects with a ``logits``/``last_hidden_state`` attribute: that.
    """
    if output_fn is not None:
        output = output_fn(output)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("sentence_embedding", "logits", "last_hidden_state"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for attr in ("logits", "last_hidden_state"):
        if isinstance(getattr(output, attr, None), torch.Tensor):
            return getattr(output, attr)
    raise InvalidArgumentError(
        f"cannot find the output tensor in a {type(output).__name__}; pass output_fn to pick it"
    )


def run_checked(model: nn.Module, batch, index: int, name: str = "calib"):
    """``call_model`` that turns a shape/type failure of the user's batch into a clear ShapeError."""
    try:
        return call_model(model, batch)
    except TensorfoldError:
        raise
    except _StopForward:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as exc:
        x = batch_input(batch)
        desc = (
            f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
            else f"keys {sorted(x)}" if isinstance(x, Mapping) else type(x).__name__
        )
        raise ShapeError(
            f"{name} batch {index} ({desc}) does not fit {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


# ---- capturing layer inputs -------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer input has been seen."""


def token_mask(batch) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict batch (Hugging Face style), used to drop padding positions."""
    x = batch_input(batch)
    if isinstance(x, Mapping):
        mask = x.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            return mask
    return None


def layer_rows(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The layer input as rows of the matrix its weight multiplies: ``(N, in)`` for Linear, the
    unfolded patches ``(N*positions, in*kh*kw)`` for an ungrouped Conv2d; None when not supported.

    ``mask`` (batch, tokens): for a ``(batch, tokens, in)`` input only the rows of real tokens are
    kept, so padding does not pollute the statistics.
    """
    if isinstance(layer, nn.Linear):
        if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(device=x.device).bool()]
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and isinstance(layer.padding, tuple):
        if layer.padding_mode != "zeros":
            return None
        dim = layer.in_channels * math.prod(layer.kernel_size)
        if dim > MAX_GRAM_DIM:
            return None
        if x.ndim == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, dim)
    return None


@dataclass
class GramStats:
    """Accumulated ``X^T X`` (float64) of a layer's input rows, and the number of rows."""

    gram: torch.Tensor | None = None
    rows: int = 0
    input_shape: tuple[int, ...] | None = None
    cross: torch.Tensor | None = None  # X_compressed^T X_original when both are captured
    sums: torch.Tensor | None = None  # column sums of X (float64): with ``gram`` the Gram of ``[X 1]``

    def add(self, X: torch.Tensor) -> None:
        self.add_product(*batch_gram(X))

    def add_product(self, gram: torch.Tensor, sums: torch.Tensor, rows: int) -> None:
        """Add one batch's ``X^T X``, column sums and row count (from :func:`batch_gram`); the sums
        over batches accumulate in float64, in place."""
        if self.gram is None:
            self.gram = gram.to(torch.float64, copy=True)
        else:
            self.gram.add_(gram)
        self.sums = sums.clone() if self.sums is None else self.sums + sums
        self.rows += rows


def batch_gram(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(X^T X, column sums, rows)`` of one batch of rows: the product in the activations' precision
    (float32 or float64), the sums in float64.

    float32 GEMMs are several times faster on CPU than float64 ones, and one batch holds at most a few
    thousand rows: ~1e-7 relative error, far below the fitting's ridge. :class:`GramStats` accumulates
    the products over batches in float64.
    """
    X = X.detach()
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    return X.T @ X, X.sum(dim=0, dtype=torch.float64), int(X.shape[0])


@contextlib.contextmanager
def capture_inputs(layers: Mapping[str, nn.Module], *, grams: bool = True,
                   mask_ref: dict | None = None) -> Iterator[dict[str, GramStats]]:
    """Hooks that record each layer's input shape and (optionally) accumulate its input Gram matrix.

    ``mask_ref["mask"]``, when set by the caller for the current batch, selects the real tokens.
    """
    stats = {name: GramStats() for name in layers}
    mask_ref = mask_ref if mask_ref is not None else {}
    # layers fed the very same tensor (attention's query, key and value) share one product per batch;
    # the tensor is kept in the entry so its storage cannot be reused by another while it is cached
    shared: dict[tuple, tuple] = mask_ref.setdefault("shared", {})
    handles = []
    for name, layer in layers.items():

        def hook(module, args, _name=name):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            st = stats[_name]
            if st.input_shape is None:
                st.input_shape = tuple(x.shape)
            if grams:
                # (a convolution's rows depend on its kernel and stride: only Linear layers share)
                key = (_name,) if not isinstance(module, nn.Linear) else (x.data_ptr(), tuple(x.shape), x.stride())
                if key not in shared or shared[key][0] is not x:
                    rows = layer_rows(module, x, mask_ref.get("mask"))
                    shared[key] = (x, batch_gram(rows) if rows is not None else None)
                product = shared[key][1]
                if product is not None:
                    st.add_product(*product)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def collect_grams(model: nn.Module, layers: Mapping[str, nn.Module], batches: list, *, grams: bool = True,
                  progress: Callable[[int], None] | None = None) -> dict[str, GramStats]:
    """One pass of ``model`` over ``batches`` recording every layer's input shape and Gram matrix."""
    mask_ref: dict = {}
    with torch.no_grad(), capture_inputs(layers, grams=grams, mask_ref=mask_ref) as stats:
        for i, batch in enumerate(batches):
            mask_ref["mask"] = token_mask(batch)
            mask_ref["shared"].clear()
            run_checked(model, batch, i)
            if progress is not None:
                progress(i + 1)
    return stats


def forward_order_and_shared_inputs(model: nn.Module, layers: Mapping[str, nn.Module], batch
                                    ) -> tuple[list[str], dict[str, str]]:
    """The order in which ``layers`` are first called on ``batch``, and for each layer the first layer
    that receives the very same input tensor (e.g. attention's query, key and value projections).

    Earlier inputs are compared while they are alive (weak references: so equal storage means the same
    tensor), not kept alive: holding every layer's input of the batch cost a whole pass of activations
    (BERT-large, 32 sentences: ~1.3 GB, the fitting's peak).
    """
    order: list[str] = []
    seen: list[tuple[weakref.ref, str]] = []
    leader: dict[str, str] = {}
    handles = []
    for name, layer in layers.items():

        def hook(module, args, _name=name):
            if _name in leader or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            order.append(_name)
            seen[:] = [(ref, n) for ref, n in seen if ref() is not None]
            for ref, other_name in seen:
                other = ref()
                if other is x or (other is not None and other.data_ptr() == x.data_ptr()
                                  and other.shape == x.shape and other.stride() == x.stride()):
                    leader[_name] = other_name
                    return
            seen.append((weakref.ref(x), _name))
            leader[_name] = _name

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order, leader


def last_reads(names: Sequence[str], leader: Mapping[str, str]) -> dict[str, int]:
    """For each shared capture (a layer's leader in ``leader``, else the layer itself), the position in
    ``names`` (the fitting order) of the last layer that reads it: its statistics (the Gram, and the
    whitening factors cached on it) are freed once that layer is fitted, not held to the end of the fitting
    (BERT-large: ~450 MB a block)."""
    return {leader.get(n, n): i for i, n in enumerate(names)}


def layer_input_grams(current: nn.Module, current_layer: nn.Module, batches: list, *,
                      original: nn.Module | None = None, original_layer: nn.Module | None = None) -> GramStats:
    """Gram of ``current_layer``'s inputs in the (partly compressed) ``current`` model and, when
    ``original`` is given, the cross Gram ``X_current^T X_original`` with the inputs the same layer
    sees in the original model.

    Each forward stops as soon as the layer has been reached, so the cost is a partial pass.
    """
    st = GramStats()
    runs = [("cur", current, current_layer)]
    if original is not None:
        runs.append(("orig", original, original_layer))
    for batch in batches:
        xs = {}
        mask = token_mask(batch)
        for key, model, layer in runs:

            def hook(module, args, _key=key, _xs=xs, _mask=mask):
                _xs[_key] = layer_rows(module, args[0], _mask)
                if st.input_shape is None:
                    st.input_shape = tuple(args[0].shape)
                raise _StopForward

            handle = layer.register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    call_model(model, batch)
            except _StopForward:
                pass
            finally:
                handle.remove()
        if xs.get("cur") is None:
            continue
        st.add(xs["cur"])
        if xs.get("orig") is not None:
            c = xs["cur"].detach().double().T @ xs["orig"].detach().double()
            st.cross = c if st.cross is None else st.cross + c
    return st


# ---- whitened low-rank fitting ---------------------------------------------------------------------


@dataclass(frozen=True)
class WhitenedFit:
    """``W ~ second @ first`` (second ``(out, r)``, first ``(r, in)``) and the whitened spectrum."""

    first: torch.Tensor
    second: torch.Tensor
    spectrum: torch.Tensor
    rel_error: float  # predicted relative output error ||X (W - A)^T|| / ||X W^T||


# The planner whitens the same Gram matrix for the layer's menu, for its sensitivity fit and for every
# candidate built from it: a 3072-input Gram takes ~2 s each time on 2 cores. Factors are remembered per
# Gram tensor (and its in-place version) for as long as that tensor lives.
_WHITENING: dict[int, tuple] = {}  # id(gram) -> (weak reference, (version, ridge), factors)


def whitening_factor(gram: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, L_inv)`` with ``L L^T ~ gram + ridge * mean(diag) * I`` (float64); None when gram is zero.

    The ridge is raised tenfold until the Cholesky factorisation succeeds (a singular gram from few
    samples or dead inputs); a ridge also keeps the fit from trusting directions the calibration
    data barely visits. The factors are shared with earlier calls on the same tensor: do not modify them.
    """
    key = (gram._version, float(ridge))
    known = _WHITENING.get(id(gram))
    if known is not None and known[0]() is gram and known[1] == key:
        return known[2]
    factors = _whitening_factor(gram, ridge)
    # the entry goes when the tensor does (before its id can be reused)
    ref = weakref.ref(gram, lambda _, k=id(gram): _WHITENING.pop(k, None))
    _WHITENING[id(gram)] = (ref, key, factors)
    return factors


def _whitening_factor(gram: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    G = gram.double()
    n = G.shape[0]
    scale = float(torch.diagonal(G).mean())
    if not math.isfinite(scale) or scale <= 0:
        return None
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    for jitter in (ridge * 10.0**k for k in range(5)):
        L, info = torch.linalg.cholesky_ex(G + jitter * scale * eye)
        if int(info) == 0:
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            if bool(torch.isfinite(L_inv).all()):
                return L, L_inv
    # Last resort: symmetric square root with eigenvalues clipped from below.
    evals, Q = torch.linalg.eigh((G + G.T) / 2)
    evals = evals.clamp_min(1e-6 * max(float(evals.max()), 1e-300))
    root = evals.sqrt()
    return Q * root, (Q / root).T


# The planner's menu takes a layer's whitened spectrum, then its sensitivity probe fits the same layer at one
# rank from the same whitened weight: one SVD of ``W L`` serves both (the menu's spectrum comes from the
# full decomposition the fit needs, not from a separate ``svdvals``). Kept per Gram tensor, checked against
# the weight's values, handed out once, and only the latest few (a block's layers) are held.
_WHITENED_SVD: OrderedDict[int, tuple] = OrderedDict()  # id(gram) -> (weak ref, (version, ridge), weight, svd)
_WHITENED_SVD_KEPT = 8


def _keep_svd(gram: torch.Tensor, ridge: float, weight_matrix: torch.Tensor, svd: tuple) -> None:
    ref = weakref.ref(gram, lambda _, k=id(gram): _WHITENED_SVD.pop(k, None))
    _WHITENED_SVD.pop(id(gram), None)
    _WHITENED_SVD[id(gram)] = (ref, (gram._version, float(ridge)), weight_matrix.detach().clone(), svd)
    while len(_WHITENED_SVD) > _WHITENED_SVD_KEPT:
        _WHITENED_SVD.popitem(last=False)


def _kept_svd(gram: torch.Tensor, ridge: float, weight_matrix: torch.Tensor) -> tuple | None:
    known = _WHITENED_SVD.get(id(gram))
    if (known is None or known[0]() is not gram or known[1] != (gram._version, float(ridge))
            or known[2].shape != weight_matrix.shape or known[2].dtype != weight_matrix.dtype
            or not torch.equal(known[2], weight_matrix.detach())):
        return None
    del _WHITENED_SVD[id(gram)]
    return known[3]


def whitened_spectrum(weight_matrix: torch.Tensor, gram: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor | None:
    """Singular values of ``W L`` (float64): the output-error spectrum of rank truncation. The decomposition
    is kept for one :func:`whitened_lowrank` of the same weight and Gram (without ``cross``)."""
    factors = whitening_factor(gram, ridge)
    if factors is None:
        return None
    L, _ = factors
    svd = full_svd(weight_matrix.double() @ L)
    _keep_svd(gram, ridge, weight_matrix, svd)
    return svd[1]


def whitened_lowrank(weight_matrix: torch.Tensor, gram: torch.Tensor, rank: int,
                     cross: torch.Tensor | None = None, ridge: float = 1e-6) -> WhitenedFit:
    """Rank-``rank`` ``A = second @ first`` minimising ``||X W^T - X A^T||`` for ``X^T X = gram``.

    With ``cross = X^T X_o`` (inputs ``X_o`` the layer sees in the uncompressed model) the target
    becomes ``X_o W^T``: the layer also corrects the error of the compressed layers before it.
    Falls back to the plain truncated SVD of ``W`` when ``gram`` is zero.
    """
    W = weight_matrix.double()
    factors = whitening_factor(gram, ridge)
    if factors is None:
        t = truncated_svd(W, rank)
        total = float((t.full_spectrum.double() ** 2).sum())
        err = math.sqrt(t.tail_sq / total) if total > 0 else 0.0
        return WhitenedFit(t.V.T.contiguous(), (t.U * t.S), t.full_spectrum.double(), err)
    L, L_inv = factors
    target = W
    if cross is not None:
        # Unconstrained least squares: A* = W cross^T gram^{-1}, solved through the Cholesky factor.
        target = (W @ cross.double().T) @ L_inv.T @ L_inv
    kept = _kept_svd(gram, ridge, weight_matrix) if cross is None else None
    t = truncate(kept, rank) if kept is not None else truncated_svd(target @ L, rank)
    total = float((t.full_spectrum.double() ** 2).sum())
    err = math.sqrt(t.tail_sq / total) if total > 0 else 0.0
    first = t.V.T @ L_inv  # (r, in)
    second = t.U * t.S  # (out, r)
    return WhitenedFit(first.contiguous(), second.contiguous(), t.full_spectrum.double(), err)


def relative_tail_errors(spectrum: torch.Tensor) -> torch.Tensor:
    """``err[r] = sqrt(sum_{k>=r} s_k^2 / sum s_k^2)`` for r = 0..n (err[n] = 0)."""
    sq = spectrum.double() ** 2
    total = float(sq.sum())
    tails = torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), sq.new_zeros(1)])
    return (tails / total).sqrt() if total > 0 else torch.zeros_like(tails)


__all__ = [
    "GramStats",
    "WhitenedFit",
    "call_model",
    "capture_inputs",
    "collect_grams",
    "materialize",
    "output_tensor",
    "layer_input_grams",
    "forward_order_and_shared_inputs",
    "last_reads",
    "relative_tail_errors",
    "run_checked",
    "whitened_lowrank",
    "whitened_spectrum",
    "whitening_factor",
]
