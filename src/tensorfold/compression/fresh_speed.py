"""The end-to-end speedup measured in a fresh Python process, as a deployed model runs.

A process's OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when it starts, and the ``tensorfold`` command
sets it to ``PASSIVE`` (idle threads sleep: kind to a shared CPU during minutes of compression). That setting
also slows every forward pass timed in that process, and a compressed model, with more and smaller kernels,
more than the dense one: the MiniLM 50% plan measured 1.5-1.8x inside the command and 1.75-2.05x in
processes with the default policy (the way a user's own inference process runs; docs/performance.md).
So the command times in a child process started with the wait policy the user had (the runtime's default
unless they set one): its speed line, ``tensorfold sweep``'s speedups and the timings behind a speed or
latency budget (the planner's layer probes and whole-plan checks), all through one :class:`FreshTimer`.

The child rebuilds the models from data only: the model the user named (a built-in, a model directory, or
the ``module:factory`` the parent already ran), the original's state dict, and per request a compressed
model's plan and state, a plan (its skeleton) or a layer's structure, written by the parent into a private
temporary directory (safetensors, JSON). Before its timings are believed, the child's output on each timed
batch must match the parent's (norm; for a compressed model, the output error between the two), else the
rebuilt models are not the ones compressed and the timer measures in its own process instead, saying why.

Run as ``python -m tensorfold.compression.fresh_speed DIR --model SPEC`` (requests on stdin, one JSON line
each; answers on stdout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from tensorfold.compression.calibration import call_model, output_tensor
from tensorfold.compression.evaluate import output_fidelity
from tensorfold.compression.plan import Plan
from tensorfold.compression.speed import Timer
from tensorfold.core.modules import batch_input, eval_mode
from tensorfold.errors import TensorfoldError

ORIGINAL_FILE = "original.safetensors"
INPUT_FILE = "input.safetensors"
LOG_FILE = "child.log"
# the child's output error between the two models must match the parent's to this (float32 reruns of the
# same weights agree far closer; a different model or weights would not)
CHECK_TOLERANCE = 1e-4
# loading a large model and 12 paired runs of it take minutes at most; a request still unanswered after this hangs
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


def _output_norm(model: nn.Module, sample) -> float:
    """The norm of ``model``'s output on ``sample``: the child must reproduce it (same model, same weights)."""
    with eval_mode(model), torch.inference_mode():
        return float(output_tensor(call_model(model, sample)).double().norm())


def _recipe(module: nn.Module) -> dict:
    """A layer timed alone, as data the child rebuilds it from (random weights: timing only)."""
    from tensorfold.nn.base import DenseSpec, FactorizedLayer

    param = next(iter(module.parameters()), None)
    dtype = str(param.dtype if param is not None else torch.float32).removeprefix("torch.")
    if isinstance(module, FactorizedLayer):
        kind, spec, rank, opts = type(module).__name__, module.spec, module.rank, module.options()
    elif type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        kind, spec, rank, opts = "dense", DenseSpec.of(module), None, {}
    else:
        raise FreshProcessError(f"a {type(module).__name__} cannot be described to the speed process")
    return {"kind": kind, "spec": dataclasses.asdict(spec), "rank": rank, "opts": opts, "dtype": dtype}


def _rebuild_layer(recipe: dict) -> nn.Module:
    from tensorfold.nn import layer_kind
    from tensorfold.nn.base import DenseSpec

    spec = DenseSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe["spec"].items()})
    dtype = getattr(torch, recipe["dtype"])
    if recipe["kind"] == "dense":
        return spec.build(dtype=dtype)
    return layer_kind(recipe["kind"]).empty(spec, recipe["rank"], dtype=dtype, **recipe["opts"])


class FreshTimer(Timer):
    """A :class:`~tensorfold.compression.speed.Timer` that times in one fresh Python process, started on the
    first request with ``OMP_WAIT_POLICY=wait_policy`` (None: the runtime's default) and kept for the
    timer's life (``with FreshTimer(...) as timer:``). The child rebuilds ``original`` once from ``spec``
    (a built-in name, a model directory or ``module:factory``) and its state dict; requests name the
    input (checked: the child's output norm on it must equal ours), a compressed model (written as
    safetensors), a plan (its skeleton, random weights) or one layer (its structure).

    One process for all requests, not one per request: the planner's speed goal asks for hundreds of
    single-layer timings and several whole-plan checks, and a process start costs seconds (Python,
    torch, the model). Correcting in-process timings by a ratio measured once would be cheaper but not
    right: the ``PASSIVE`` penalty is a wake-up per parallel region, so it grows with a model's number of
    kernels, not its time (MiniLM: dense ~3% slower in a ``PASSIVE`` process, its 50% plan ~30%).

    ``fallback`` (the default): when the child fails (cannot rebuild the model, dies, disagrees on an
    output), this and every later request is timed in this process instead, ``error`` says why and
    :meth:`record` reports it; never silently. Without it the failure raises :class:`FreshProcessError`.
    """

    def __init__(self, spec: str, original: nn.Module, *, wait_policy: str | None = None, fallback: bool = True,
                 log: Callable[[str], None] | None = None):
        self.spec, self.original, self.wait_policy, self.fallback = spec, original, wait_policy, fallback
        self.log = log or (lambda msg: None)
        self.error: str | None = None
        self.requests = 0  # answered by the child
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._names: dict[int, tuple[object, str]] = {}  # id(input or plan) -> (it, its file in the directory)
        self._saved = False

    # ---- the Timer questions: asked of the child, else of this process ----------------------------

    def pair(self, original, compressed, plan, sample, *, threads=2, repeats=10, warmup=2) -> dict:
        return self._either(lambda: self._pair(original, compressed, plan, sample, threads, repeats, warmup),
                            lambda: {**super(FreshTimer, self).pair(original, compressed, plan, sample, threads=threads,
                                                                    repeats=repeats, warmup=warmup),
                                     "fresh_error": self.error})

    def layer_times(self, model, plan, names, sample, *, threads=2, repeats=20, warmup=3):
        def fresh():
            self._mine(model)
            got = self._ask("layer_times", input=self._input(sample), plan=self._plan(plan), names=list(names),
                            threads=threads, repeats=repeats, warmup=warmup)
            return got["total"], got["per"]

        return self._either(fresh, lambda: super(FreshTimer, self).layer_times(
            model, plan, names, sample, threads=threads, repeats=repeats, warmup=warmup))

    def latency(self, module, input_shape, *, threads=2, repeats=10, warmup=2) -> float:
        return self._either(
            lambda: self._ask("latency", layer=_recipe(module), input_shape=[int(s) for s in input_shape],
                              threads=threads, repeats=repeats, warmup=warmup)["seconds"],
            lambda: super(FreshTimer, self).latency(module, input_shape, threads=threads, repeats=repeats,
                                                    warmup=warmup))

    def record(self) -> dict:
        if self.error is not None:
            return {**super().record(), "fresh_error": self.error}
        return {"process": "fresh", "omp_wait_policy": (self.wait_policy or "").strip().upper() or "default"}

    # ---- plumbing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """End the child (it exits when its input closes) and remove the temporary directory."""
        super().close()
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._names.clear()
        self._saved = False

    def _either(self, fresh: Callable, here: Callable):
        if self.error is None:
            try:
                return fresh()
            except TensorfoldError as exc:  # FreshProcessError, or models whose outputs cannot be compared
                if not self.fallback:
                    self.close()
                    raise
                self.error = str(exc)
                self.close()
                self.log(f"speed: {exc}; timed in this process instead"
                         + (f" (after {self.requests} timings in the fresh process)" if self.requests else ""))
        return here()

    def _mine(self, model: nn.Module) -> None:
        if model is not self.original:
            raise FreshProcessError("asked to time a model the speed process did not rebuild")

    @property
    def _dir(self) -> Path:
        if self._tmp is None:  # private (0700): the child trusts what it finds there
            self._tmp = tempfile.TemporaryDirectory(prefix="tensorfold-speed-")
        return Path(self._tmp.name)

    def snapshot(self) -> FreshTimer:
        """Write the original's state now (else on the first request): planning measures on the user's model
        and puts each change back, so the state to rebuild is the one before planning starts."""
        from safetensors.torch import save_file

        from tensorfold.compression.storage import _state_tensors

        if not self._saved:
            save_file(_state_tensors(self.original), str(self._dir / ORIGINAL_FILE))
            self._saved = True
        return self

    def _start(self) -> subprocess.Popen:
        self.snapshot()
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if self.wait_policy:
            env["OMP_WAIT_POLICY"] = self.wait_policy
        # the child imports what this process imports (the same tensorfold, the user's factory module)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        command = [sys.executable, "-m", "tensorfold.compression.fresh_speed", str(self._dir), "--model", self.spec]
        with open(self._dir / LOG_FILE, "w") as err:  # a file, not a pipe nobody reads while the child works
            return subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True)

    def _ask(self, op: str, **args) -> dict:
        """One request answered by the child (started on the first), or FreshProcessError."""
        if self._proc is None:
            self._proc = self._start()
        proc = self._proc
        try:
            proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
            line = proc.stdout.readline() if ready else None
        except OSError:  # the child is gone (a broken pipe)
            line = ""
        if line is None:
            raise FreshProcessError(f"the speed process did not answer within {TIMEOUT:.0f} s")
        if not line:
            code = proc.poll()
            tail = (self._dir / LOG_FILE).read_text().strip().splitlines()[-1:] or ["no output"]
            raise FreshProcessError(f"the speed process failed (exit {code}): {tail[0]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise FreshProcessError(f"the speed process failed: {answer['error']}")
        self.requests += 1
        return answer["result"]

    def _input(self, sample) -> str:
        """The file ``sample`` was written to (checked against the child's model the first time)."""
        if id(sample) in self._names:
            return self._names[id(sample)][1]
        name = f"input-{len(self._names)}.safetensors"
        _save_input(sample, self._dir / name)
        self._names[id(sample)] = (sample, name)  # kept: its id stays its own
        theirs, mine = self._ask("check", input=name)["norm"], _output_norm(self.original, sample)
        if abs(theirs - mine) > CHECK_TOLERANCE * max(1.0, mine):
            raise FreshProcessError(f"the speed process rebuilt different models (output norm {theirs:.6g}, "
                                    f"here {mine:.6g})")
        return name

    def _plan(self, plan: Plan | None) -> str | None:
        if plan is None:
            return None
        if id(plan) not in self._names:
            name = f"plan-{len(self._names)}.json"
            plan.save(self._dir / name)
            self._names[id(plan)] = (plan, name)
        return self._names[id(plan)][1]

    def _pair(self, original, compressed, plan, sample, threads, repeats, warmup) -> dict:
        from tensorfold.compression.storage import write_compressed

        self._mine(original)
        if plan is None and compressed is not original:
            raise FreshProcessError("a compressed model without its plan cannot be rebuilt")
        mine = output_fidelity(original, compressed, [sample])["rel_error"]  # what the child must reproduce
        name = None
        if plan is not None:
            name = f"compressed-{self.requests}"
            (self._dir / name).mkdir()
            write_compressed(compressed, plan, self._dir / name)
        try:
            record = self._ask("pair", input=self._input(sample), compressed=name, threads=threads, repeats=repeats,
                               warmup=warmup)
        finally:
            if name is not None:
                shutil.rmtree(self._dir / name, ignore_errors=True)
        if abs(record["check_rel_error"] - mine) > CHECK_TOLERANCE * max(1.0, mine):
            raise FreshProcessError(f"the speed process rebuilt different models (output error "
                                    f"{record['check_rel_error']:.6g}, here {mine:.6g})")
        return record


def measure_in_fresh_process(spec: str, original: nn.Module, compressed: nn.Module, plan: Plan, example, *,
                             threads: int = 2, repeats: int = 10, wait_policy: str | None = None) -> dict:
    """:func:`~tensorfold.compression.evaluate.measure_speedup` of ``original`` and ``compressed`` on
    ``example``, run in a fresh Python process whose ``OMP_WAIT_POLICY`` is ``wait_policy`` (None: the
    OpenMP runtime's default). ``spec`` names the model as ``tensorfold compress --model`` does. The record
    gains ``process: "fresh"`` and ``check_rel_error``; raises :class:`FreshProcessError` with the reason
    when the child fails or rebuilds different models."""
    with FreshTimer(spec, original, wait_policy=wait_policy, fallback=False) as timer:
        return timer.pair(original, compressed, plan, example, threads=threads, repeats=repeats)


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


def _child(directory: Path, spec: str, requests: TextIO, answers: TextIO) -> None:
    """Rebuild the original, then answer one JSON line per request line until the input closes."""
    import copy

    from safetensors.torch import load_file

    from tensorfold.compression.storage import PLAN_FILE, WEIGHTS_FILE, load_state, restructure

    original = rebuild_original(spec)
    load_state(original, load_file(str(directory / ORIGINAL_FILE)), ORIGINAL_FILE)
    original.eval()
    timer, inputs, plans = Timer(), {}, {}

    def sample(name: str):
        if name not in inputs:
            inputs[name] = _load_input(directory / name)
        return inputs[name]

    def answer(request: dict):
        op, common = request["op"], {k: request[k] for k in ("threads", "repeats", "warmup") if k in request}
        if op == "check":
            return {"norm": _output_norm(original, sample(request["input"]))}
        if op == "pair":
            x, compressed = sample(request["input"]), original
            if request["compressed"] is not None:
                where = directory / request["compressed"]
                compressed = restructure(copy.deepcopy(original), Plan.load(where / PLAN_FILE))
                load_state(compressed, load_file(str(where / WEIGHTS_FILE)), WEIGHTS_FILE)
                compressed.eval()
            record = timer.pair(original, compressed, None, x, **common)
            return {**record, "process": "fresh",
                    "check_rel_error": output_fidelity(original, compressed, [x])["rel_error"]}
        if op == "layer_times":
            plan = None
            if request["plan"] is not None:
                plan = plans.get(request["plan"]) or plans.setdefault(request["plan"],
                                                                      Plan.load(directory / request["plan"]))
            total, per = timer.layer_times(original, plan, request["names"], sample(request["input"]), **common)
            return {"total": total, "per": per}
        if op == "latency":
            return {"seconds": timer.latency(_rebuild_layer(request["layer"]), request["input_shape"], **common)}
        raise ValueError(f"unknown request {op!r}")

    for line in requests:
        try:
            reply = {"ok": True, "result": answer(json.loads(line))}
        except Exception as exc:  # noqa: BLE001 (any failure is the parent's to report; the child goes on)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--model", required=True)
    args = ap.parse_args(argv)
    # answers go to the real stdout; anything a library prints goes to the log (stderr) instead
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _child(args.directory, args.model, sys.stdin, answers)


if __name__ == "__main__":
    main()


__all__ = ["FreshProcessError", "FreshTimer", "measure_in_fresh_process", "rebuild_original"]
