"""The factorized updates: which factors each method trains, and how they contract into ``delta W``.

A layer's weight is read as a tensor with labelled modes: out modes ``o0, o1, ...`` and in modes
``i0, i1, ...``. A Linear ``(out, in)`` with ``n_cores = d`` has ``d`` out modes and ``d`` in modes (each
size split into near-equal factors, as TTLinear's balanced geometry); a ConvNd ``(out, in, k_1..k_n)``
has the out mode ``o0`` and the in modes ``i0`` (channels) and ``i1..in`` (kernel). Modes of size 1
are dropped. Each method is a list of :class:`Factor` (shape and mode/rank labels) whose einsum is the
update, so one code path builds ``delta W`` and applies it to an input without building it.

>>> modes = layer_modes((12, 20), n_cores=2)
>>> [(m.label, m.size) for m in modes]
[('o0', 3), ('o1', 4), ('i0', 4), ('i1', 5)]
>>> [f.shape for f in factor_layout("tt", modes, 2)]
[(3, 4, 2), (2, 4, 5)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tensorfold.errors import InvalidArgumentError, RankError
from tensorfold.nn.tt_linear import balanced_factors

MAX_CORES = 8


@dataclass(frozen=True)
class Mode:
    label: str  # "o<k>" (output side) or "i<k>" (input side)
    size: int

    @property
    def is_out(self) -> bool:
        return self.label.startswith("o")


@dataclass(frozen=True)
class Factor:
    """One trainable tensor of an update: its shape and the labels of its axes (modes and ranks ``r<k>``)."""

    name: str
    labels: tuple[str, ...]
    shape: tuple[int, ...]
    role: str = "core"  # "core" | "factor" (Tucker/CP per-mode matrices; what LoTR shares)


def layer_modes(weight_shape: Sequence[int], n_cores: int) -> list[Mode]:
    """The labelled modes of a weight: a Linear ``(out, in)`` split into ``n_cores`` factors per side, a conv
    kept as ``(out, in, *kernel)``; modes of size 1 dropped."""
    if not 1 <= n_cores <= MAX_CORES:
        raise InvalidArgumentError(f"n_cores must lie in [1, {MAX_CORES}], got {n_cores}")
    shape = tuple(int(s) for s in weight_shape)
    if len(shape) == 2:
        outs, ins = balanced_factors(shape[0], n_cores), balanced_factors(shape[1], n_cores)
    else:
        outs, ins = (shape[0],), shape[1:]
    modes = [Mode(f"o{k}", s) for k, s in enumerate(outs)] + [Mode(f"i{k}", s) for k, s in enumerate(ins)]
    kept = [m for m in modes if m.size > 1]
    return kept or modes[:1]


def n_cores_for(method: str, weight_shape: Sequence[int], n_cores: int) -> int:
    """Out/in splits of a weight: ``n_cores`` for a Linear under a tensor method; LoRA and convs keep 1."""
    return n_cores if len(weight_shape) == 2 and method != "lora" else 1


def sites(modes: Sequence[Mode], weight_ndim: int) -> list[list[Mode]]:
    """The cores of a chain (TT, TR): a Linear pairs ``(o_k, i_k)`` in one core (the MPO); a conv has one
    mode per core, in the order out, in, kernel."""
    if weight_ndim != 2:
        return [[m] for m in modes]
    by_index: dict[int, list[Mode]] = {}
    for m in modes:
        by_index.setdefault(int(m.label[1:]), []).append(m)
    return [sorted(by_index[k], key=lambda m: not m.is_out) for k in sorted(by_index)]


def _expand(rank, count: int, what: str) -> list[int]:
    if isinstance(rank, tuple):
        if len(rank) == 1:
            return [rank[0]] * count
        if len(rank) != count:
            raise RankError(f"rank {rank} has {len(rank)} entries but this layer's {what} has {count}")
        return list(rank)
    return [int(rank)] * count


def factor_layout(method: str, modes: Sequence[Mode], rank, weight_ndim: int = 2) -> list[Factor]:
    """The factors of ``method`` over ``modes`` at ``rank`` (ranks above a layer's full rank are clipped)."""
    sizes = [m.size for m in modes]
    total = math.prod(sizes)
    outs = [m for m in modes if m.is_out]
    ins = [m for m in modes if not m.is_out]
    if method == "lora":
        n_out, n_in = math.prod(m.size for m in outs), math.prod(m.size for m in ins)
        r = min(_expand(rank, 1, "rank")[0], n_out, n_in)
        return [
            Factor("A", ("r0", *(m.label for m in ins)), (r, *(m.size for m in ins))),
            Factor("B", (*(m.label for m in outs), "r0"), (*(m.size for m in outs), r)),
        ]
    if method in ("tt", "tr"):
        chain = sites(modes, weight_ndim)
        K = len(chain)
        ring = method == "tr"
        n_bonds = K if ring else K - 1
        ranks = _expand(rank, n_bonds, "chain of bonds") if n_bonds else []
        # Clip each bond to the full TT rank of the cut there (for a ring's closing bond: the first core
        # against the rest), which is always enough to hold the whole tensor.
        site_sizes = [math.prod(m.size for m in s) for s in chain]
        left = 1
        for k in range(K - 1):
            left *= site_sizes[k]
            ranks[k] = min(ranks[k], left, total // left)
        if ring:
            ranks[K - 1] = min(ranks[K - 1], site_sizes[0], total // site_sizes[0])
        factors = []
        for k, site in enumerate(chain):
            labels, shape = [], []
            if ring or k > 0:
                labels.append(f"r{(k - 1) % K if ring else k - 1}")
                shape.append(ranks[(k - 1) % K] if ring else ranks[k - 1])
            labels += [m.label for m in site]
            shape += [m.size for m in site]
            if ring or k < K - 1:
                labels.append(f"r{k}")
                shape.append(ranks[k])
            factors.append(Factor(f"core{k}", tuple(labels), tuple(shape)))
        return factors
    if method == "tucker":
        ranks = _expand(rank, len(modes), "modes")
        ranks = [min(r, m.size, total // m.size) for r, m in zip(ranks, modes)]
        factors = [Factor("core", tuple(f"r{k}" for k in range(len(modes))), tuple(ranks))]
        factors += [
            Factor(f"U_{m.label}", (m.label, f"r{k}"), (m.size, r), role="factor")
            for k, (m, r) in enumerate(zip(modes, ranks))
        ]
        return factors
    if method == "cp":
        R = _expand(rank, 1, "rank")[0]
        return [Factor(f"U_{m.label}", (m.label, "r0"), (m.size, R), role="factor") for m in modes]
    raise InvalidArgumentError(f"unknown adapter method {method!r}")


def zero_factor(method: str, layout: Sequence[Factor]) -> int:
    """Index of the factor set to zero by ``init="zero"`` (the update starts at exactly zero)."""
    if method == "lora":
        return 1  # B, as in LoRA and PEFT
    if method == "tucker":
        return 0  # the core: LoTR's shared factors stay random and each layer starts from a zero core
    if method == "cp":
        return 0  # an out-mode factor when the layer has one (modes list out modes first)
    return len(layout) - 1  # the last core of a chain


def equation(layout: Sequence[Factor], outputs: Sequence[str], inputs: Sequence[str] | None = None) -> str:
    """The einsum equation contracting ``layout`` into the ``outputs`` labels.

    With ``inputs``, an input operand ``z<inputs>`` comes first and the result is ``z<outputs>`` (``z``:
    the flattened batch): the update applied to an input without building ``delta W``.
    """
    letters: dict[str, str] = {}
    pool = iter("abcdefghijklmnopqrstuvwxyABCDEFGHIJKLMNOPQRSTUVWXY")

    def word(labels) -> str:
        out = ""
        for label in labels:
            if label not in letters:
                letters[label] = next(pool)
            out += letters[label]
        return out

    operands = [word(f.labels) for f in layout]
    if inputs is not None:
        return f"z{word(inputs)}," + ",".join(operands) + f"->z{word(outputs)}"
    return ",".join(operands) + "->" + word(outputs)
