"""Tensors visited block by block: in memory, memory-mapped, or out of core on Dask.

Every out-of-core algorithm in tensorfold (the streaming sketches, chunked CP-ALS, the streaming error)
is written as a *map-reduce over blocks*: a function ``fn(slices, block) -> list of arrays`` whose
results are summed over all blocks. Blocks may be visited in any order and on any worker, because the
contributions are linear. :func:`map_reduce` runs such a function over

* a torch tensor or numpy array (including a ``.npy`` file opened with ``mmap_mode="r"``): serially in
  this process, one block at a time;
* a ``dask.array.Array``, a Zarr array or an HDF5 dataset: as a Dask graph (one task per chunk, partial
  results summed in a tree), on the local threaded scheduler or a ``dask.distributed`` cluster.

Dask, Zarr and h5py are optional (``pip install tensorfold[dask]``) and imported only here, only when
such an input is given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensorfold.errors import FileFormatError, InvalidArgumentError, InvalidTensorError

# Default block size (bytes) for inputs that do not bring their own chunking.
_DEFAULT_BLOCK_BYTES = 64 * 2**20
# Partial results summed per reduction task.
_TREE_WIDTH = 8

BlockFn = Callable[[tuple[slice, ...], torch.Tensor], list[torch.Tensor]]


@dataclass
class BlockedTensor:
    """A tensor to be read block by block.

    ``data`` is the underlying array (torch, numpy/memmap, or a dask array); ``chunks`` the block
    shape for serial inputs (``None`` for dask inputs, which carry their own chunks); ``scheduler`` is
    ``None`` (Dask's threaded scheduler), ``"synchronous"``, or a ``dask.distributed.Client``.
    """

    data: Any
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[int, ...] | None
    is_dask: bool
    scheduler: Any = None
    name: str = "X"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_blocked_input(X) -> bool:
    """True for inputs that :func:`as_blocked` reads block by block rather than as one in-memory tensor."""
    if isinstance(X, (BlockedTensor, np.memmap, str, Path)):
        return True
    module = type(X).__module__
    return module.startswith(("dask.", "zarr", "h5py"))


def open_tensor(path: str | os.PathLike, key: str | None = None):
    """Open a tensor on disk without reading it: ``.npy`` as a read-only memory map, a Zarr store
    (a directory or ``.zarr``), or an HDF5 dataset (``.h5``/``.hdf5``; ``key`` names the dataset)."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise FileFormatError(f"{path}: cannot open as .npy ({type(exc).__name__}: {exc})") from None
    if suffix in (".h5", ".hdf5"):
        h5py = _require("h5py")
        f = h5py.File(path, "r")
        names = [k for k in f if isinstance(f[k], h5py.Dataset)]
        if key is None and len(names) != 1:
            raise FileFormatError(f"{path}: holds datasets {names}; choose one with key= (--key)")
        name = key if key is not None else names[0]
        if name not in f:
            raise FileFormatError(f"{path}: no dataset {name!r}; it holds {names}")
        return f[name]
    if suffix == ".zarr" or path.is_dir():
        zarr = _require("zarr")
        try:
            store = zarr.open(str(path), mode="r")
        except Exception as exc:
            raise FileFormatError(f"{path}: cannot open as a Zarr store ({type(exc).__name__}: {exc})") from None
        if not hasattr(store, "shape"):  # a group
            names = list(store.array_keys())
            if key is None and len(names) != 1:
                raise FileFormatError(f"{path}: a Zarr group with arrays {names}; choose one with key= (--key)")
            store = store[key if key is not None else names[0]]
        return store
    raise FileFormatError(f"{path}: expected a .npy file, a Zarr store or an .h5/.hdf5 file")


def as_blocked(
    X,
    *,
    chunks: int | Sequence[int] | None = None,
    scheduler: Any = None,
    name: str = "X",
    key: str | None = None,
) -> BlockedTensor:
    """Wrap ``X`` (tensor, array, memmap, dask array, Zarr array, HDF5 dataset or a path) for block-wise
    reading. ``chunks`` sets the block shape (an int applies to every mode; for Zarr/HDF5 the store's own
    chunking is the default). Integer, complex or half-precision data is refused with a clear message."""
    if isinstance(X, BlockedTensor):
        return X
    if isinstance(X, (str, Path)):
        X = open_tensor(X, key)
    module = type(X).__module__
    if isinstance(X, torch.Tensor):
        dtype = _check_dtype(X.dtype, name)
        shape = tuple(X.shape)
        return BlockedTensor(X, shape, dtype, _block_shape(shape, chunks, X.element_size()), False, None, name)
    if isinstance(X, np.ndarray):
        dtype = _check_dtype(X.dtype, name)
        shape = tuple(X.shape)
        return BlockedTensor(X, shape, dtype, _block_shape(shape, chunks, X.itemsize), False, None, name)
    if module.startswith(("dask.", "zarr", "h5py")):
        da = _require("dask.array")
        dtype = _check_dtype(np.dtype(X.dtype), name)
        if module.startswith("dask."):
            arr = X if chunks is None else X.rechunk(_norm_chunks(chunks, X.ndim))
        else:
            native = getattr(X, "chunks", None)
            want = _norm_chunks(chunks, len(X.shape)) if chunks is not None else native
            if not want:  # contiguous HDF5 dataset: blocks of rows
                want = _block_shape(tuple(X.shape), None, np.dtype(X.dtype).itemsize)
            arr = da.from_array(X, chunks=want, lock=module.startswith("h5py"), asarray=True)
        _check_order(arr.shape, name)
        return BlockedTensor(arr, tuple(int(s) for s in arr.shape), dtype, None, True, scheduler, name)
    raise InvalidTensorError(
        f"{name} must be a torch tensor, numpy array, dask array, Zarr array, HDF5 dataset or a path, "
        f"got {type(X).__name__}"
    )


def map_reduce(
    X: BlockedTensor, fn: BlockFn, *, progress: Callable[[int, int], None] | None = None, allow_nan: bool = False
) -> list:
    """Sum ``fn(slices, block)`` over every block of ``X``; returns the list of summed torch tensors.

    ``fn`` receives the block as a torch tensor of ``X``'s dtype and the slices it covers; it must
    return a list of tensors (same shapes for every block). NaN/Inf entries raise
    :class:`InvalidTensorError` naming the block. ``progress(done, total)`` is called after each block
    of a serial input. ``allow_nan=True`` lets NaN through (missing entries, for masked fits).
    """
    if not X.is_dask:
        total = None
        grid = list(_block_grid(X.shape, X.chunks))
        for i, slices in enumerate(grid):
            block = X.data[slices]
            part = _run_block(fn, slices, block, X.name, allow_nan)
            total = part if total is None else [a + b for a, b in zip(total, part)]
            if progress is not None:
                progress(i + 1, len(grid))
        return total
    return _dask_map_reduce(X, fn, allow_nan)


def _dask_map_reduce(X: BlockedTensor, fn: BlockFn, allow_nan: bool = False) -> list:
    import dask
    from dask import delayed

    arr = X.data
    offsets = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in arr.chunks]
    blocks = arr.to_delayed()
    parts = []
    for idx in np.ndindex(*blocks.shape):
        slices = tuple(slice(int(o[i]), int(o[i + 1])) for o, i in zip(offsets, idx))
        parts.append(delayed(_run_block_np, pure=True)(fn, slices, blocks[idx], X.name, allow_nan))
    while len(parts) > 1:
        parts = [delayed(_sum_parts, pure=True)(parts[i : i + _TREE_WIDTH]) for i in range(0, len(parts), _TREE_WIDTH)]
    scheduler = X.scheduler
    if scheduler is None or isinstance(scheduler, str):
        (out,) = dask.compute(parts[0], scheduler=scheduler or "threads")
    else:  # a dask.distributed Client
        out = scheduler.compute(parts[0]).result()
    return [torch.from_numpy(np.asarray(a)) for a in out]


def _run_block(fn: BlockFn, slices, block, name: str, allow_nan: bool = False) -> list[torch.Tensor]:
    if isinstance(block, torch.Tensor):
        T = block
    else:
        arr = np.ascontiguousarray(block)
        if not arr.flags.writeable:  # memmap slices are read-only views: torch wants its own copy
            arr = arr.copy()
        T = torch.from_numpy(arr)
    if T.dtype not in (torch.float32, torch.float64):
        raise InvalidTensorError(f"{name}: block {_fmt(slices)} has dtype {T.dtype}; float32/float64 needed")
    if not bool(torch.isfinite(T.sum())) and not bool((torch.isfinite(T) | (allow_nan & torch.isnan(T))).all()):
        n_bad = int((~torch.isfinite(T)).sum())
        raise InvalidTensorError(f"{name}: block {_fmt(slices)} contains {n_bad} NaN or Inf entries")
    return fn(slices, T.contiguous())


def _run_block_np(fn: BlockFn, slices, block, name: str, allow_nan: bool = False) -> list[np.ndarray]:
    # Dask tasks exchange numpy arrays: they serialise without torch on the scheduler side.
    return [t.numpy() for t in _run_block(fn, slices, block, name, allow_nan)]


def _sum_parts(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    out = [a.copy() for a in parts[0]]
    for p in parts[1:]:
        for a, b in zip(out, p):
            a += b
    return out


def _fmt(slices) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in slices) + "]"


def _block_grid(shape, chunks):
    ranges = [range(0, n, c) for n, c in zip(shape, chunks)]
    for starts in np.ndindex(*[len(r) for r in ranges]):
        yield tuple(slice(r[i], min(r[i] + c, n)) for r, i, c, n in zip(ranges, starts, chunks, shape))


def _block_shape(shape: tuple[int, ...], chunks, itemsize: int) -> tuple[int, ...]:
    _check_order(shape, "X")
    if chunks is not None:
        return _norm_chunks(chunks, len(shape))
    # Whole slabs of the leading mode, about _DEFAULT_BLOCK_BYTES each.
    row = math.prod(shape[1:]) * itemsize
    rows = max(1, min(shape[0], _DEFAULT_BLOCK_BYTES // max(row, 1)))
    return (rows, *shape[1:])


def _norm_chunks(chunks, ndim: int) -> tuple[int, ...]:
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        chunks = (int(chunks),) * ndim
    try:
        out = tuple(int(c) for c in chunks)
    except TypeError:
        raise InvalidArgumentError(f"chunks must be an int or {ndim} ints, got {chunks!r}") from None
    if len(out) != ndim or any(c <= 0 for c in out):
        raise InvalidArgumentError(f"chunks must be {ndim} positive ints, got {chunks!r}")
    return out


def _check_order(shape, name: str) -> None:
    if len(shape) < 2:
        raise InvalidTensorError(f"{name} has {len(shape)} modes (shape {tuple(shape)}); at least 2 needed")
    if math.prod(shape) == 0:
        raise InvalidTensorError(f"{name} is empty (shape {tuple(shape)})")


def _check_dtype(dtype, name: str) -> torch.dtype:
    mapping = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64,
               torch.float32: torch.float32, torch.float64: torch.float64}
    if dtype in mapping:
        return mapping[dtype]
    raise InvalidTensorError(
        f"{name} has dtype {str(dtype).replace('torch.', '')}; out-of-core decompositions read float32 or "
        "float64 stores (convert the store, e.g. dask_array.astype('float32'))"
    )


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidArgumentError(
            f"this input needs the optional package {module.split('.')[0]!r}: pip install 'tensorfold[dask]'"
        ) from None
