"""File helpers: safe loading of arrays, atomic writes, and the one rule for output paths.

Nothing here unpickles arbitrary objects: ``.pt`` files load with ``weights_only=True`` and ``.npy``/
``.npz`` with ``allow_pickle=False``. Importing this module does not import torch or numpy, so the
command line can check its output paths before it loads anything heavy.

Every output goes through :func:`atomic_path` (a file) or :func:`atomic_directory` (a directory): the
result is written under a hidden temporary name beside its destination, ``.NAME.tmp.PID.XXXXXXXX``,
and renamed into place when complete. A run killed half-way (``kill -9``, power loss) leaves only such
a temporary; the next write to the same destination removes the temporaries whose process is gone
(:func:`clean_stale_temporaries`), and nothing else.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> write_text_atomic(d / "a.txt", "hello")
>>> sorted(p.name for p in d.iterdir())
['a.txt']
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tensorfold.errors import FileFormatError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")

# Files tensorfold writes into an output directory (compress, sweep, export). ``--overwrite`` replaces
# a directory only when it is empty or holds nothing else, so it never deletes a user's own files.
RESULT_FILES = {
    "plan.json", "weights.safetensors", "metrics.json", "report.html",  # compress
    "sweep.json", "accuracy_vs_size.png", "accuracy_vs_latency.png", "index.html",  # sweep
    "adapter.safetensors", "adapter_config.json",  # tensorfold.adapters.save_adapter
    "hf.json", "base", "model.onnx", "model-int8.onnx",  # compress/export of a Hugging Face directory
}
# ... and at least one of these marks the directory as a tensorfold result.
RESULT_MARKERS = ("plan.json", "sweep.json", "adapter_config.json")


def register_result_files(names: Iterable[str], *, marker: bool = False) -> None:
    """Declare more file names that a tensorfold command writes into an output directory."""
    global RESULT_MARKERS
    names = tuple(names)
    RESULT_FILES.update(names)
    if marker:
        RESULT_MARKERS = tuple(dict.fromkeys(RESULT_MARKERS + names))


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp.{os.getpid()}."


_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that an earlier, killed write to ``path`` left beside it; return them.

    Only names of the exact form this module creates for ``path`` (``.NAME.tmp.PID.XXXXXXXX`` or
    ``.NAME.old.PID.XXXXXXXX``) whose process no longer runs are removed; a temporary of a run still in
    progress, and every other file, is left alone.
    """
    path = Path(path)
    parent = path.parent
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.fullmatch(entry.name)
        if m is None or m.group("name") != path.name or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def is_tensorfold_result(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds only files a tensorfold command writes, including a marker file."""
    directory = Path(directory)
    names = {p.name for p in directory.iterdir()}
    return bool(names) and names <= RESULT_FILES and any(m in names for m in RESULT_MARKERS)


def check_output(path: str | os.PathLike, *, overwrite: bool, kind: str = "file", option: str = "--out",
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output path that cannot or must not be written; return it as a Path.

    Refused: an input file (even with ``overwrite``); an existing path without ``overwrite``; a path of
    the wrong kind (``kind`` is ``"file"`` or ``"dir"``); the working directory or one of its parents;
    with ``overwrite``, a directory holding files tensorfold did not write; and a location where no file
    can be created (read-only directory, a file in the way of its parent).
    """
    path = Path(path)
    if kind not in ("file", "dir"):
        raise InvalidArgumentError(f"kind must be 'file' or 'dir', got {kind!r}")
    resolved = path.resolve()
    for source in inputs:
        if Path(source).resolve() == resolved:
            raise InvalidArgumentError(f"{option} {path} is the input file; choose another output path")
    if path.name in ("", ".", "..") or resolved == Path(resolved.anchor) or Path.cwd().resolve().is_relative_to(
            resolved):
        raise InvalidArgumentError(f"{option} {path} is the working directory or one of its parents; "
                                   "give a new name, e.g. runs/out")
    if path.exists() or path.is_symlink():
        if kind == "file" and path.is_dir():
            raise InvalidArgumentError(f"{option} {path} is a directory; give a file path")
        if kind == "dir" and not path.is_dir():
            raise InvalidArgumentError(f"{option} {path} is a file; give a directory path")
        if not overwrite:
            raise InvalidArgumentError(f"{option} {path} already exists; pass --overwrite to replace it")
        if kind == "dir" and any(path.iterdir()) and not is_tensorfold_result(path):
            foreign = sorted(p.name for p in path.iterdir() if p.name not in RESULT_FILES)[:5]
            raise InvalidArgumentError(
                f"{option} {path} holds files tensorfold did not write ({', '.join(foreign) or 'no result marker'})"
                "; --overwrite only replaces an earlier tensorfold result or an empty directory")
    check_writable(path.parent, option=option, target=path)
    return path


def check_writable(directory: str | os.PathLike, *, option: str = "--out", target: str | os.PathLike | None = None
                   ) -> None:
    """Refuse a ``directory`` (or its nearest existing ancestor, to be created) where no file can be created.

    It is tried for real (a temporary file created and removed), so read-only mounts and ACLs are seen too.
    """
    target = Path(target) if target is not None else Path(directory)
    probe = Path(directory)
    while not probe.exists():
        if probe.is_symlink():  # a dangling link in the way
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidArgumentError(f"{option} {target}: {probe} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tensorfold-probe.", dir=probe)
    except OSError as exc:
        raise InvalidArgumentError(f"{option} {target}: cannot write in {probe} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash or an exception leaves any existing file untouched and no partial file behind (a killed
    process leaves a hidden temporary that the next write to ``path`` removes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix="", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(OUTPUT_MODE & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


OUTPUT_MODE = 0o666  # every output file: rw for all, less the umask (0644 under the usual umask 022)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it becomes ``path`` in one rename.

    An existing ``path`` is refused unless ``overwrite``, and then only if it is empty or an earlier
    tensorfold result (:func:`check_output`); it is replaced only once the new one is complete. On an
    exception nothing is left behind and an existing ``path`` is untouched. Every file written into the
    directory gets one mode (:data:`OUTPUT_MODE` less the umask).
    """
    path = Path(path)
    check_output(path, overwrite=overwrite, kind="dir", option="output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        file_mode = OUTPUT_MODE & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(file_mode)  # writers differ (safetensors creates 0600 files): one mode for all
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.{os.getpid()}.", dir=path.parent))
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
    import numpy as np
    import torch

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
