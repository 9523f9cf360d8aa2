"""Argument checks shared by every algorithm, raising tensorfold's own exception types."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tensorfold.errors import InvalidArgumentError, InvalidTensorError, RankError

FLOAT_DTYPES = (torch.float32, torch.float64)


def as_tensor(X, name: str = "X") -> torch.Tensor:
    """Return ``X`` as a torch tensor (numpy arrays are wrapped without copying when possible).

    A dask array, Zarr array or HDF5 dataset is read into memory when it takes at most a quarter of the
    memory available now; a larger one is refused with a pointer to the block-wise algorithms."""
    if isinstance(X, torch.Tensor):
        return X
    if isinstance(X, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(X))
    if type(X).__module__.startswith(("dask.", "zarr", "h5py")):
        return _read_lazy_array(X, name)
    raise InvalidTensorError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(X).__name__}")


def _read_lazy_array(X, name: str) -> torch.Tensor:
    nbytes = int(np.prod(X.shape)) * np.dtype(X.dtype).itemsize
    available = _available_memory()
    if available is not None and nbytes > available // 4:
        raise InvalidTensorError(
            f"{name} is a {type(X).__name__} of {nbytes / 2**30:.1f} GiB, more than a quarter of the memory "
            f"available ({available / 2**30:.1f} GiB); decompose it block by block with tf.tucker_sketch, "
            "tf.tt_sketch, tf.cp_chunked or tf.gcp"
        )
    arr = X.compute() if hasattr(X, "compute") else X[...]
    return torch.from_numpy(np.ascontiguousarray(arr))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_tensor(
    X,
    name: str = "X",
    *,
    min_order: int = 1,
    max_order: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Validate a dense data tensor and return it as a float32/float64 torch tensor.

    Raises :class:`InvalidTensorError` for integer, boolean, complex or half-precision dtypes,
    empty tensors, a mode count outside ``[min_order, max_order]`` and NaN/Inf entries.
    """
    X = as_tensor(X, name)
    if X.is_complex():
        raise InvalidTensorError(f"{name} is complex ({X.dtype}); only real float32/float64 is supported")
    if X.dtype not in FLOAT_DTYPES:
        raise InvalidTensorError(
            f"{name} has dtype {X.dtype}; tensorfold works in float32 or float64 "
            f"(convert with X.double() or X.float())"
        )
    if X.ndim < min_order or (max_order is not None and X.ndim > max_order):
        allowed = f"at least {min_order}" if max_order is None else (
            f"exactly {min_order}" if min_order == max_order else f"{min_order} to {max_order}"
        )
        raise InvalidTensorError(f"{name} has {X.ndim} modes (shape {tuple(X.shape)}); {allowed} needed")
    if X.numel() == 0:
        raise InvalidTensorError(f"{name} is empty (shape {tuple(X.shape)})")
    if check_finite and not _all_finite(X):
        n_bad = int((~torch.isfinite(X)).sum())
        raise InvalidTensorError(f"{name} contains {n_bad} NaN or Inf entries")
    return X


def _all_finite(X: torch.Tensor) -> bool:
    """True when X has no NaN/Inf. One reduction instead of ``torch.isfinite(X)``, which allocates
    ``|X|`` and two masks (about 1.3x the input); NaN and Inf propagate through a sum, and only a sum
    that overflows on finite data needs the elementwise check."""
    if bool(torch.isfinite(X.sum())):
        return True
    return bool(torch.isfinite(X).all())


def check_rank(rank, name: str = "rank", *, max_rank: int | None = None, what: str = "") -> int:
    """Validate an integer rank in ``[1, max_rank]``."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise RankError(f"{name} must be a positive integer, got {rank!r}")
    rank = int(rank)
    if rank <= 0:
        raise RankError(f"{name} must be a positive integer, got {rank}")
    if max_rank is not None and rank > max_rank:
        suffix = f" for {what}" if what else ""
        raise RankError(f"{name}={rank} is larger than the data allows{suffix} (at most {max_rank})")
    return rank


def check_ranks(ranks, shape: Sequence[int], name: str = "ranks") -> tuple[int, ...]:
    """Validate per-mode ranks (an int applies to every mode) against ``shape``."""
    if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
        ranks = [int(ranks)] * len(shape)
    try:
        ranks = list(ranks)
    except TypeError:
        raise RankError(f"{name} must be an int or a sequence of ints, got {ranks!r}") from None
    if len(ranks) != len(shape):
        raise RankError(f"{name} has {len(ranks)} entries but the tensor has {len(shape)} modes")
    return tuple(
        check_rank(r, f"{name}[{i}]", max_rank=n, what=f"mode {i} of size {n}")
        for i, (r, n) in enumerate(zip(ranks, shape))
    )


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_count(value, name: str, *, minimum: int = 0) -> int:
    """Validate an integer count (iterations, oversampling...) that must be at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_strings(value, name: str, what: str = "names") -> tuple[str, ...]:
    """One string or a sequence of non-empty strings (names, patterns) as a tuple."""
    if isinstance(value, str):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a string or a sequence of {what}, got {value!r}") from None
    if any(not isinstance(v, str) or not v for v in items):
        raise InvalidArgumentError(f"{name} {what} must be non-empty strings, got {items!r}")
    return items


def check_callback(callback, usage: str):
    """``None`` or a callable; ``usage`` shows how it is called, for the error message."""
    if callback is not None and not callable(callback):
        raise InvalidArgumentError(f"callback must be None or callable as {usage}, got {type(callback).__name__}")
    return callback


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A private CPU generator: tensorfold never touches torch's global RNG.

    Random numbers are drawn on the CPU and then moved, so a seed gives the same numbers on
    every device.
    """
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def randn(
    *shape: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal samples drawn on the CPU from ``generator``, then moved to ``device``."""
    out = torch.randn(*shape, generator=generator, dtype=dtype)
    return out if device is None else out.to(device)
