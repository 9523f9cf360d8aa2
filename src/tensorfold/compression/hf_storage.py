"""Saving and loading compressed Hugging Face / sentence-transformers models.

Beside ``plan.json`` the directory holds ``hf.json`` (the model's kind, where its base directory is and a
fingerprint of that directory) and ``weights.safetensors`` with only the tensors that differ from the
base model (the factor weights, and every tensor fine-tuning changed). Loading rebuilds the model from
the base directory's data files alone (``config.json`` / ``modules.json`` and its weights, through
:func:`tensorfold.zoo.hf.load_model`; no code is ever run from it), swaps in the planned factored
layers and loads the stored tensors: the result is the same kind of object as the input (a
``SentenceTransformer`` whose ``encode`` works, a transformers model whose ``forward``/``generate`` works).

By default the base directory is read where it was at compression time (its absolute path is
recorded); ``standalone=True`` copies it into ``DIR/base`` so that ``DIR`` can be moved or shipped alone.
A base directory that has moved or changed, or a ``DIR`` with missing files, is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from tensorfold.compression.plan import Plan
from tensorfold.errors import FileFormatError

HF_FILE = "hf.json"
BASE_DIR = "base"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "tensorfold-hf-compressed/1"


def fingerprint(directory: Path) -> dict:
    """SHA-256 of the base directory's config files and the sizes of its weight files (cheap to check)."""
    out = {}
    for name in ("config.json", "modules.json"):
        if (directory / name).is_file():
            out[name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".bin"):
            out[str(path.relative_to(directory))] = path.stat().st_size
    return out


def changed_tensors(model: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model``'s state dict that ``base`` lacks or holds with other values."""
    base_state = base.state_dict()
    out = {}
    for key, value in model.state_dict().items():
        ref = base_state.get(key)
        if ref is None or ref.shape != value.shape or ref.dtype != value.dtype or not torch.equal(ref, value):
            # safetensors refuses tensors sharing storage (tied weights): independent contiguous copies
            out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def write_hf_compressed(model: nn.Module, original: nn.Module, plan: Plan, directory: Path, *, kind: str,
                        base_path: str | os.PathLike, standalone: bool = False,
                        split: dict | None = None) -> dict:
    """Write ``plan.json``, ``hf.json`` and the changed tensors into the existing ``directory`` (and copy the
    base directory into ``directory/base`` when ``standalone``); returns what ``hf.json`` holds. ``split``:
    the text split of the run (:func:`tensorfold.zoo.hf.split_record`), recorded so that ``tensorfold
    export`` measures on the same held-out part."""
    from safetensors.torch import save_file

    base = Path(base_path).resolve()
    tensors = changed_tensors(model, original)
    (directory / "plan.json").write_text(plan.to_json())
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    if standalone:
        shutil.copytree(base, directory / BASE_DIR, symlinks=False)
    info = {"format": FORMAT, "kind": kind, "base": BASE_DIR if standalone else str(base),
            "standalone": bool(standalone), "fingerprint": fingerprint(base), "stored_tensors": len(tensors)}
    if split is not None:
        info["split"] = split
    (directory / HF_FILE).write_text(json.dumps(info, indent=1))
    return info


def read_info(directory: Path) -> dict:
    path = directory / HF_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("base"), str):
        raise FileFormatError(f"{path}: not a tensorfold Hugging Face record ({FORMAT})")
    return info


def base_directory(directory: Path, info: dict) -> Path:
    """Where the base model is, checked against the recorded fingerprint."""
    base = directory / info["base"] if info.get("standalone") else Path(info["base"])
    if not base.is_dir():
        if info.get("standalone"):
            raise FileFormatError(f"{directory} is incomplete: its copy of the base model ({base}) is missing")
        raise FileFormatError(
            f"the base model directory {base} recorded in {directory / HF_FILE} is gone (moved or deleted); "
            f"put it back, or compress again with --standalone to keep a copy inside the output"
        )
    if fingerprint(base) != info.get("fingerprint"):
        raise FileFormatError(
            f"the base model directory {base} has changed since compression (its config or weight files differ); "
            f"the stored factors belong to the model that was there"
        )
    return base


def load_hf_compressed(directory: str | os.PathLike, plan: Plan | None = None) -> nn.Module:
    """Rebuild a model written by :func:`write_hf_compressed` (see the module docs)."""
    from safetensors.torch import load_file

    from tensorfold.compression.replace import replace_layers
    from tensorfold.errors import ShapeError
    from tensorfold.zoo import hf

    directory = Path(directory)
    info = read_info(directory)
    plan = plan if plan is not None else Plan.load(directory / "plan.json")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileFormatError(f"{directory} is incomplete: {WEIGHTS_FILE} is missing")
    base = base_directory(directory, info)
    model = hf.load_model(base)
    # the base tensors, kept alive through the restructuring: a rebuilt module may hold placeholders under
    # the same names (e.g. a refitted bias), so every tensor not stored is copied back from here
    base_state = dict(model.state_dict())
    try:
        model = replace_layers(model, plan, "empty", inplace=True)
    except ShapeError as exc:
        raise FileFormatError(f"the saved plan does not fit the base model in {base}: {exc}") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise FileFormatError(f"{weights}: cannot read ({type(exc).__name__}: {exc})") from None
    target = model.state_dict()
    full, lost = {}, []
    for key, value in target.items():
        if key in state:
            full[key] = state[key]
        elif key in base_state and base_state[key].shape == value.shape:
            full[key] = base_state[key]
        else:
            lost.append(key)
    unexpected = sorted(set(state) - set(target))
    if unexpected or lost:
        names = ", ".join((unexpected or lost)[:3])
        raise FileFormatError(f"{weights} does not fit the rebuilt model ({'unexpected' if unexpected else 'missing'} "
                              f"tensors: {names})")
    model.load_state_dict(full, strict=True)
    model.eval()
    return model


__all__ = ["load_hf_compressed", "write_hf_compressed"]
