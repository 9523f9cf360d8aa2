"""The end-to-end speedup measured in a fresh Python process, as a deployed model runs.

A process's OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when it starts, and the ``tensorfold`` command
sets it to ``PASSIVE`` (idle threads sleep: kind to a shared CPU during minutes of compression). That setting
also slows every forward pass timed in that process, and a compressed model, with more and smaller kernels,
more than the dense one: the MiniLM 50% plan measured 1.5-1.8x inside the command and 1.75-2.05x in
processes with the default policy (the way a user's own inference process runs; docs/performance.md).
So the command times both models in a child process started with the wait policy the user had (the
runtime's default unless they set one).

The child rebuilds both models from data only: the model the user named (a built-in, a model directory, or
the ``module:factory`` the parent already ran), the original's state dict and the compressed model's plan
and state, written by the parent into a private temporary directory as safetensors. Before its speed is
believed, the child's output error between the two models on the timed batch must equal the parent's
(else the rebuilt models are not the ones compressed, and the caller measures in its own process instead).

Run as ``python -m tensorfold.compression.fresh_speed DIR --model SPEC --threads N --repeats R``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tensorfold.compression.evaluate import measure_speedup, output_fidelity
from tensorfold.compression.plan import Plan
from tensorfold.core.modules import batch_input
from tensorfold.errors import TensorfoldError

ORIGINAL_FILE = "original.safetensors"
INPUT_FILE = "input.safetensors"
RESULT_FILE = "speed.json"
# the child's output error between the two models must match the parent's to this (float32 reruns of the
# same weights agree far closer; a different model or weights would not)
CHECK_TOLERANCE = 1e-4
# loading a large model and 12 paired runs of it take minutes at most; a child still running after this hangs
TIMEOUT = 1800.0


class FreshProcessError(TensorfoldError):
    """The speed could not be measured in a fresh process (the reason is the message)."""


def _save_input(example, path: Path) -> None:
    """The model input of ``example`` as safetensors: one tensor as ``input``; a dict's tensors as
    ``input.KEY`` and its other values (sentence-transformers adds ``modality: "text"``) as JSON metadata."""
    from safetensors.torch import save_file

    inputs = batch_input(example)
    if isinstance(inputs, torch.Tensor):
        save_file({"input": inputs.detach().cpu().contiguous()}, str(path))
        return
    if not isinstance(inputs, Mapping):
        raise FreshProcessError(f"the timed batch is a {type(inputs).__name__}, not a tensor or a dict")
    tensors = {f"input.{k}": v.detach().cpu().contiguous() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
    try:
        metadata = {"others": json.dumps(others)}
    except TypeError:
        raise FreshProcessError(f"the timed batch holds values that are neither tensors nor JSON: "
                                f"{', '.join(sorted(others))}") from None
    save_file(tensors, str(path), metadata=metadata)


def _load_input(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        others = json.loads((f.metadata() or {}).get("others", "{}"))
    if set(tensors) == {"input"}:
        return tensors["input"]
    return {**{k.removeprefix("input."): v for k, v in tensors.items()}, **others}


def measure_in_fresh_process(spec: str, original: nn.Module, compressed: nn.Module, plan: Plan, example, *,
                             threads: int = 2, repeats: int = 10, wait_policy: str | None = None) -> dict:
    """:func:`~tensorfold.compression.evaluate.measure_speedup` of ``original`` and ``compressed`` on
    ``example``, run in a fresh Python process whose ``OMP_WAIT_POLICY`` is ``wait_policy`` (None: the
    OpenMP runtime's default). ``spec`` names the model as ``tensorfold compress --model`` does. The record
    gains ``process: "fresh"`` and ``check_rel_error``; raises :class:`FreshProcessError` with the reason
    when the child fails or rebuilds different models."""
    from safetensors.torch import save_file

    from tensorfold.compression.storage import _state_tensors, write_compressed

    mine = output_fidelity(original, compressed, [example])["rel_error"]  # what the child must reproduce
    with tempfile.TemporaryDirectory(prefix="tensorfold-speed-") as tmp:  # private (0700): the child trusts it
        directory = Path(tmp)
        write_compressed(compressed, plan, directory)
        save_file(_state_tensors(original), str(directory / ORIGINAL_FILE))
        _save_input(example, directory / INPUT_FILE)
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        # the child imports what this process imports (the same tensorfold, the user's factory module)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        command = [sys.executable, "-m", "tensorfold.compression.fresh_speed", str(directory), "--model", spec,
                   "--threads", str(threads), "--repeats", str(repeats)]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FreshProcessError(f"the speed process ran over {TIMEOUT:.0f} s") from None
        result = directory / RESULT_FILE
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FreshProcessError(f"the speed process failed (exit {proc.returncode}): {tail[0]}")
        record = json.loads(result.read_text())
    if abs(record["check_rel_error"] - mine) > CHECK_TOLERANCE * max(1.0, mine):
        raise FreshProcessError(f"the speed process rebuilt different models (output error "
                                f"{record['check_rel_error']:.6g}, here {mine:.6g})")
    return record


def rebuild_original(spec: str) -> nn.Module:
    """The uncompressed model ``spec`` names: a built-in name, a local model directory or ``module:factory``
    (weights as built; the caller loads the original's state)."""
    from tensorfold import zoo
    from tensorfold.compression.storage import call_factory, load_factory

    if spec in zoo.names():
        return zoo.get(spec).load()
    if Path(spec).is_dir():
        from tensorfold.zoo import hf

        return hf.load_model(spec)
    # the factory the parent process already imported and ran for the same command
    return call_factory(load_factory(spec), spec)


def _child(directory: Path, spec: str, threads: int, repeats: int) -> None:
    import copy

    from safetensors.torch import load_file

    from tensorfold.compression.storage import PLAN_FILE, WEIGHTS_FILE, load_state, restructure

    original = rebuild_original(spec)
    load_state(original, load_file(str(directory / ORIGINAL_FILE)), ORIGINAL_FILE)
    compressed = restructure(copy.deepcopy(original), Plan.load(directory / PLAN_FILE))
    load_state(compressed, load_file(str(directory / WEIGHTS_FILE)), WEIGHTS_FILE)
    original.eval()
    compressed.eval()
    example = _load_input(directory / INPUT_FILE)
    record = measure_speedup(original, compressed, example, threads=threads, repeats=repeats)
    record.update(process="fresh", check_rel_error=output_fidelity(original, compressed, [example])["rel_error"])
    tmp = directory / (RESULT_FILE + ".part")
    tmp.write_text(json.dumps(record))
    tmp.replace(directory / RESULT_FILE)  # the parent reads a whole record or none


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    _child(args.directory, args.model, args.threads, args.repeats)


if __name__ == "__main__":
    main()


__all__ = ["FreshProcessError", "measure_in_fresh_process", "rebuild_original"]
