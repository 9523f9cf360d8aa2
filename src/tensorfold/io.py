"""File helpers: safe loading of arrays and atomic writes.

Nothing here unpickles arbitrary objects: ``.pt`` files load with ``weights_only=True`` and ``.npy``/
``.npz`` with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tensorfold.errors import FileFormatError

ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash or an exception leaves any existing file untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it becomes ``path`` in one rename.

    An existing ``path`` is refused unless ``overwrite`` (then it is replaced only once the new one is
    complete). On an exception nothing is left behind and an existing ``path`` is untouched.
    """
    from tensorfold.errors import InvalidArgumentError

    path = Path(path)
    if path.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_array(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """Load one tensor from ``.npy``, ``.npz``, ``.pt``/``.pth`` or ``.safetensors``.

    Files holding several arrays need ``key`` unless they hold exactly one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise FileFormatError(f"{path}: unknown format {suffix!r}; expected one of {', '.join(ARRAY_SUFFIXES)}")
    try:
        if suffix == ".npy":
            _check_npy_magic(path)
            if key is not None:
                raise FileFormatError(f"{path}: a .npy file holds one array; --key {key!r} does not apply")
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return torch.from_numpy(_pick(dict(npz.items()), key, path))
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _pick(load_file(str(path)), key, path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileFormatError:
        raise
    except Exception as exc:  # numpy, safetensors and torch raise many types for corrupt files
        raise FileFormatError(f"{path}: cannot read as {suffix} ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise FileFormatError(f"{path}: holds a single tensor; --key {key!r} does not apply")
        return obj
    if isinstance(obj, dict):
        return _pick({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, key, path)
    raise FileFormatError(f"{path}: holds a {type(obj).__name__}, not a tensor or a dict of tensors")


def _pick(arrays: dict, key: str | None, path: Path):
    if key is None:
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        names = ", ".join(sorted(arrays))
        raise FileFormatError(f"{path}: holds {len(arrays)} arrays ({names}); choose one with --key")
    if key not in arrays:
        raise FileFormatError(f"{path}: no array named {key!r}; available: {', '.join(sorted(arrays)) or 'none'}")
    return arrays[key]


_NPY_MAGIC = b"\x93NUMPY"


def _check_npy_magic(path: Path) -> None:
    # numpy reports a file without the .npy header as "pickled data", which misleads for a corrupt file.
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise FileFormatError(f"{path}: cannot read as .npy (the NumPy header is missing: not a .npy file)")
