"""Result types of the decompositions: one type per format, the same whatever the options.

Each result knows its reconstruction (``to_tensor``), shape, rank, parameter count and norm, moves
with ``to(device/dtype)``, and saves to a safetensors file whose JSON header says what it holds.
Diagnostics of the algorithm that produced it (iterations, fit history, time) live in ``info``.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from tensorfold.core.norms import cp_norm, tr_norm, tt_norm, tucker_norm
from tensorfold.core.tenalg import multi_mode_dot
from tensorfold.errors import FileFormatError, ShapeError
from tensorfold.io import atomic_path

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FitInfo:
    """What the algorithm did: method, iterations, convergence, fit per iteration, seconds."""

    method: str
    n_iter: int = 0
    converged: bool = True
    fit_history: tuple[float, ...] = ()
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_iter": self.n_iter,
            "converged": self.converged,
            "fit_history": list(self.fit_history),
            "seconds": self.seconds,
            "details": self.details,
        }


class Decomposition(ABC):
    """Common behaviour of every decomposed-tensor result."""

    kind: ClassVar[str]
    _registry: ClassVar[dict[str, type[Decomposition]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Decomposition._registry[cls.kind] = cls

    # --- what each format defines ---------------------------------------------------------
    @abstractmethod
    def to_tensor(self) -> torch.Tensor:
        """The full tensor this decomposition represents."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def rank(self): ...

    @abstractmethod
    def norm(self) -> torch.Tensor:
        """Frobenius norm, computed without forming the full tensor."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors that make up the decomposition (the safetensors payload)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], info: FitInfo | None) -> Decomposition: ...

    # --- shared ---------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def compression_ratio(self) -> float:
        """Entries of the full tensor per stored parameter."""
        return math.prod(self.shape) / max(self.n_params, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def to(self, *args, **kwargs):
        """A copy with every tensor moved/cast like ``torch.Tensor.to``."""
        moved = {k: v.to(*args, **kwargs) for k, v in self.tensors().items()}
        return type(self).from_tensors(moved, getattr(self, "info", None))

    def __repr__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{type(self).__name__}(shape={self.shape}, rank={self.rank}, n_params={self.n_params}, dtype={dtype})"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (no tensor data)."""
        rank = self.rank
        return {
            "type": self.kind,
            "shape": list(self.shape),
            "rank": list(rank) if isinstance(rank, tuple) else rank,
            "n_params": self.n_params,
            "compression_ratio": self.compression_ratio,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
        }

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (safetensors, JSON header in the metadata), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {"format_version": FORMAT_VERSION, **self.summary()}
        info = getattr(self, "info", None)
        if info is not None:
            header["info"] = info.to_json()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"tensorfold": json.dumps(header)})
        return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a saved result, without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    if "tensorfold" not in meta:
        raise FileFormatError(f"{path}: a safetensors file, but not one written by tensorfold")
    try:
        return json.loads(meta["tensorfold"])
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: corrupt tensorfold header ({exc})") from None


def load(path: str | Path, device: str | torch.device | None = None) -> Decomposition:
    """Load a result saved with ``.save(path)``."""
    from safetensors.torch import load_file

    header = read_header(path)
    cls = Decomposition._registry.get(header.get("type"))
    if cls is None:
        raise FileFormatError(f"{path}: unknown result type {header.get('type')!r}")
    try:
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    except Exception as exc:
        raise FileFormatError(f"{path}: cannot read tensors ({exc})") from None
    info = None
    if "info" in header:
        i = header["info"]
        info = FitInfo(i["method"], i["n_iter"], i["converged"], tuple(i["fit_history"]), i["seconds"], i["details"])
    try:
        return cls.from_tensors(tensors, info)
    except (KeyError, ShapeError) as exc:
        raise FileFormatError(f"{path}: inconsistent {cls.kind} data ({exc})") from None


def _indexed(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    out, i = [], 0
    while f"{prefix}{i}" in tensors:
        out.append(tensors[f"{prefix}{i}"])
        i += 1
    if not out:
        raise KeyError(f"no tensors named {prefix}0, {prefix}1, ...")
    return out


@dataclass(frozen=True, eq=False, repr=False)
class CPTensor(Decomposition):
    """``sum_r weights[r] * factors[0][:, r] o factors[1][:, r] o ...``."""

    weights: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    info: FitInfo | None = None
    kind: ClassVar[str] = "cp"

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(self.factors))
        R = self.weights.shape[0]
        if self.weights.ndim != 1 or any(f.ndim != 2 or f.shape[1] != R for f in self.factors):
            raise ShapeError(
                f"CP weights {tuple(self.weights.shape)} and factors "
                f"{[tuple(f.shape) for f in self.factors]} do not share one rank"
            )

    @property
    def shape(self):
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    def to_tensor(self):
        from tensorfold.core.tenalg import khatri_rao

        first = self.factors[0] * self.weights
        if len(self.factors) == 1:
            return first.sum(1)
        return (first @ khatri_rao(self.factors[1:]).T).reshape(self.shape)

    def norm(self):
        return cp_norm(self.weights, self.factors)

    def normalize(self) -> CPTensor:
        """Unit-norm factor columns, norms moved into the weights."""
        weights = self.weights.clone()
        factors = []
        for f in self.factors:
            n = torch.linalg.vector_norm(f, dim=0)
            safe = torch.where(n > 0, n, torch.ones_like(n))
            factors.append(f / safe)
            weights = weights * n
        return replace(self, weights=weights, factors=tuple(factors))

    def tensors(self):
        return {"weights": self.weights, **{f"factor{i}": f for i, f in enumerate(self.factors)}}

    @classmethod
    def from_tensors(cls, tensors, info=None):
        return cls(tensors["weights"], tuple(_indexed(tensors, "factor")), info)


@dataclass(frozen=True, eq=False, repr=False)
class TuckerTensor(Decomposition):
    """``core x_1 factors[0] x_2 factors[1] ...`` with factors of shape ``(n_i, r_i)``."""

    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    info: FitInfo | None = None
    kind: ClassVar[str] = "tucker"

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(self.factors))
        if self.core.ndim != len(self.factors) or any(
            f.ndim != 2 or f.shape[1] != r for f, r in zip(self.factors, self.core.shape)
        ):
            raise ShapeError(
                f"Tucker core {tuple(self.core.shape)} does not match factors "
                f"{[tuple(f.shape) for f in self.factors]}"
            )

    @property
    def shape(self):
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def rank(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self.core.shape)

    def to_tensor(self):
        return multi_mode_dot(self.core, self.factors)

    def norm(self):
        return tucker_norm(self.core, self.factors)

    def tensors(self):
        return {"core": self.core, **{f"factor{i}": f for i, f in enumerate(self.factors)}}

    @classmethod
    def from_tensors(cls, tensors, info=None):
        return cls(tensors["core"], tuple(_indexed(tensors, "factor")), info)


def _check_chain(cores, ring: bool, what: str):
    if not cores or any(c.ndim != 3 for c in cores):
        raise ShapeError(f"{what} cores must be 3-way (r_prev, n, r_next), got {[tuple(c.shape) for c in cores]}")
    for a, b in zip(cores[:-1], cores[1:]):
        if a.shape[2] != b.shape[0]:
            raise ShapeError(f"{what} cores do not chain: {tuple(a.shape)} then {tuple(b.shape)}")
    if ring and cores[0].shape[0] != cores[-1].shape[2]:
        raise ShapeError(f"{what}: first core's left rank must equal last core's right rank")
    if not ring and (cores[0].shape[0] != 1 or cores[-1].shape[2] != 1):
        raise ShapeError(f"{what}: boundary ranks must be 1")


class _CoreChain(Decomposition):
    """What tensor trains and tensor rings share: a chain of 3-way cores ``(r_prev, n_k, r_next)``."""

    cores: tuple[torch.Tensor, ...]
    _is_ring: ClassVar[bool]

    def __post_init__(self):
        object.__setattr__(self, "cores", tuple(self.cores))
        _check_chain(self.cores, ring=self._is_ring, what=self.kind.upper())

    @property
    def shape(self):
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def rank(self) -> tuple[int, ...]:
        """All bond ranks ``(r_0, r_1, ..., r_d)``: boundary 1s for a train, ``r_0 = r_d`` for a ring."""
        return (int(self.cores[0].shape[0]),) + tuple(int(c.shape[2]) for c in self.cores)

    def tensors(self):
        return {f"core{i}": c for i, c in enumerate(self.cores)}

    @classmethod
    def from_tensors(cls, tensors, info=None):
        return cls(tuple(_indexed(tensors, "core")), info)


@dataclass(frozen=True, eq=False, repr=False)
class TTTensor(_CoreChain):
    """Tensor train: cores of shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``."""

    cores: tuple[torch.Tensor, ...]
    info: FitInfo | None = None
    kind: ClassVar[str] = "tt"
    _is_ring: ClassVar[bool] = False

    def to_tensor(self):
        out = self.cores[0].reshape(self.cores[0].shape[1], -1)
        for c in self.cores[1:]:
            out = out @ c.reshape(c.shape[0], -1)
            out = out.reshape(-1, c.shape[2])
        return out.reshape(self.shape)

    def norm(self):
        return tt_norm(self.cores)


@dataclass(frozen=True, eq=False, repr=False)
class TRTensor(_CoreChain):
    """Tensor ring: ``X[i_1..i_d] = trace(G_1[:, i_1, :] ... G_d[:, i_d, :])``."""

    cores: tuple[torch.Tensor, ...]
    info: FitInfo | None = None
    kind: ClassVar[str] = "tr"
    _is_ring: ClassVar[bool] = True

    def to_tensor(self):
        r0 = self.cores[0].shape[0]
        out = self.cores[0].reshape(r0 * self.cores[0].shape[1], -1)  # rows (a, i1)
        for c in self.cores[1:]:
            out = (out @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
        # rows (a, i1..id), cols b: take trace over a == b
        out = out.reshape(r0, -1, r0)
        return torch.einsum("aia->i", out).reshape(self.shape)

    def norm(self):
        return tr_norm(self.cores)


@dataclass(frozen=True, eq=False, repr=False)
class LowRankMatrix(Decomposition):
    """``U @ diag(S) @ V.T`` with ``U`` (m, r), ``S`` (r,), ``V`` (n, r)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    info: FitInfo | None = None
    kind: ClassVar[str] = "svd"

    def __post_init__(self):
        r = self.S.shape[0] if self.S.ndim == 1 else -1
        if self.U.ndim != 2 or self.V.ndim != 2 or self.U.shape[1] != r or self.V.shape[1] != r:
            raise ShapeError(
                f"LowRankMatrix needs U (m, r), S (r,), V (n, r); got {tuple(self.U.shape)}, "
                f"{tuple(self.S.shape)}, {tuple(self.V.shape)}"
            )

    @property
    def shape(self):
        return (int(self.U.shape[0]), int(self.V.shape[0]))

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def to_tensor(self):
        return (self.U * self.S) @ self.V.T

    def norm(self):
        # U and V need not be orthonormal (e.g. after training), so use the Gram form.
        G = (self.U.T @ self.U) * (self.V.T @ self.V)
        return (self.S @ G @ self.S).clamp_min(0).sqrt()

    def tensors(self):
        return {"U": self.U, "S": self.S, "V": self.V}

    @classmethod
    def from_tensors(cls, tensors, info=None):
        return cls(tensors["U"], tensors["S"], tensors["V"], info)
