"""Measuring what a compression cost: output fidelity on batches and end-to-end CPU speed.

>>> import torch, tensorfold as tf
>>> from tensorfold.compression.evaluate import output_fidelity
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> x = [torch.randn(16, 32)]
>>> output_fidelity(model, model, x)["rel_error"]
0.0
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tensorfold.compression.calibration import call_model, materialize, output_tensor
from tensorfold.core.modules import eval_mode


@torch.no_grad()
def output_fidelity(original: nn.Module, compressed: nn.Module, batches, output_fn: Callable | None = None) -> dict:
    """Relative output error and cosine similarity (per sample, flattened) between two models."""
    num = den = 0.0
    cosines = []
    with eval_mode(original, compressed):
        for b in materialize(batches, "batches"):
            y0 = output_tensor(call_model(original, b), output_fn).double()
            y1 = output_tensor(call_model(compressed, b), output_fn).double()
            num += float(((y1 - y0) ** 2).sum())
            den += float((y0**2).sum())
            a, c = y0.reshape(y0.shape[0], -1), y1.reshape(y1.shape[0], -1)
            cosines.append(torch.nn.functional.cosine_similarity(a, c, dim=1, eps=1e-12))
    cos = torch.cat(cosines)
    return {
        "rel_error": (num / den) ** 0.5 if den > 0 else 0.0,
        "mean_cos": float(cos.mean()),
        "min_cos": float(cos.min()),
    }


# Paired timings whose ratios spread more than this (interquartile range / median) were taken while
# something else competed for the CPU: the figures are kept but flagged as noisy.
NOISY_SPREAD = 0.15


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def machine_load() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def paired_timing(first: nn.Module, second: nn.Module, inputs, *, threads: int | None = 2, repeats: int = 10,
                  warmup: int = 2) -> dict:
    """Seconds of one forward pass of each model on ``inputs``, timed in alternating pairs.

    Each pair times ``first`` then ``second`` back to back, so load that comes and goes hits both alike;
    the ratio reported is the median of the per-pair ratios ``first / second`` with its interquartile
    range (``ratio_q1``, ``ratio_q3``). ``noisy`` flags a run whose ratios or times spread more than
    :data:`NOISY_SPREAD` (the machine was busy: read the figures as rough). ``threads`` sets torch's
    intra-op threads for the measurement only (restored afterwards).
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    a_times: list[float] = []
    b_times: list[float] = []
    load_before = machine_load()
    try:
        with eval_mode(first, second), torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                call_model(first, inputs)
                t1 = time.perf_counter()
                call_model(second, inputs)
                t2 = time.perf_counter()
                if i >= warmup:
                    a_times.append(t1 - t0)
                    b_times.append(t2 - t1)
    finally:
        torch.set_num_threads(old)
    return {**paired_ratios(a_times, b_times), "load": load_before, "repeats": repeats, "threads": threads}


def paired_ratios(a_times: Sequence[float], b_times: Sequence[float]) -> dict:
    """The summary of paired timings (``a_times[i]`` and ``b_times[i]`` taken back to back): the median of
    the per-pair ratios ``a / b`` with its quartiles, each side's median and best, the spread and ``noisy``.

    Shared by :func:`paired_timing` and the planner's whole-model check
    (:meth:`tensorfold.compression.speed.SpeedCheck.check`), whose pairs come from a timer one forward at a
    time: a load that comes and goes hits both sides of a pair alike, so the ratios' median stays the
    true ratio where the ratio of two separately timed medians moves with the load."""
    ratios = [a / b for a, b in zip(a_times, b_times) if b > 0]
    r1, r2, r3 = _quartiles(ratios)
    a1, a2, a3 = _quartiles(list(a_times))
    b1, b2, b3 = _quartiles(list(b_times))
    spread = max((r3 - r1) / r2 if r2 else 0.0, (a3 - a1) / a2 if a2 else 0.0, (b3 - b1) / b2 if b2 else 0.0)
    return {"first_median": a2, "second_median": b2, "first_best": min(a_times), "second_best": min(b_times),
            "ratio": r2, "ratio_q1": r1, "ratio_q3": r3, "spread": spread, "noisy": spread > NOISY_SPREAD}


def measure_speedup(original: nn.Module, compressed: nn.Module, example_inputs, *, threads: int | None = 2,
                    repeats: int = 10, warmup: int = 2) -> dict:
    """End-to-end speedup ``original / compressed`` on ``example_inputs`` (see :func:`paired_timing`).

    ``speedup`` is the median of paired ratios and ``seconds_original``/``seconds_compressed`` the
    median times, so the three agree with each other; ``speedup_q1``/``speedup_q3`` give the spread,
    ``speedup_best`` the ratio of the fastest runs, and ``noisy`` says the machine was busy.
    """
    t = paired_timing(original, compressed, example_inputs, threads=threads, repeats=repeats, warmup=warmup)
    return {"seconds_original": t["first_median"], "seconds_compressed": t["second_median"],
            "speedup": t["ratio"], "speedup_q1": t["ratio_q1"], "speedup_q3": t["ratio_q3"],
            "speedup_median": t["ratio"],  # the same figure, kept for readers of older metrics.json
            "speedup_best": t["first_best"] / t["second_best"], "spread": t["spread"], "noisy": t["noisy"],
            "load": t["load"], "threads": threads, "repeats": repeats,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "").strip().upper() or "default"}


def describe_speed(speed: dict) -> str:
    """One line for a measured speed: medians, the paired-ratio median and its spread, a load warning."""
    line = (f"speed (batch 32, {speed['threads']} threads, {speed['repeats']} paired runs): "
            f"{speed['seconds_original'] * 1e3:.1f} ms -> {speed['seconds_compressed'] * 1e3:.1f} ms (medians), "
            f"{speed['speedup']:.2f}x")
    if "speedup_q1" in speed:
        line += f" (middle half {speed['speedup_q1']:.2f}-{speed['speedup_q3']:.2f}x)"
    if speed.get("process") == "fresh":
        policy = speed.get("omp_wait_policy", "default")
        line += (f" - timed in a fresh process with the {'default' if policy == 'default' else policy} OpenMP "
                 "wait policy, as a deployed model runs")
    elif speed.get("omp_wait_policy") == "PASSIVE":
        # measured on MiniLM at 50%: 1.5-1.8x here, 1.75-2.05x in a process with the default policy
        line += (" - OpenMP threads sleep while waiting here (OMP_WAIT_POLICY=PASSIVE, the tensorfold command's "
                 "setting for shared CPUs), which slows models of many small kernels more; a default process "
                 "runs them faster (docs/performance.md)")
    if speed.get("noisy"):
        load = speed.get("load")
        line += (" - warning: timings spread widely, the CPU was busy"
                 + (f" (load average {load:.1f})" if load is not None else "") + "; rerun on a quiet machine")
    return line


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
