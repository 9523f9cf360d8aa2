"""Measuring what a compression cost: output fidelity on batches and end-to-end CPU speed.

>>> import torch, tensorfold as tf
>>> from tensorfold.compression.evaluate import output_fidelity
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> x = [torch.randn(16, 32)]
>>> output_fidelity(model, model, x)["rel_error"]
0.0
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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


def measure_speedup(original: nn.Module, compressed: nn.Module, example_inputs, *, threads: int | None = 2,
                    repeats: int = 10, warmup: int = 2) -> dict:
    """Seconds of a forward pass of each model on ``example_inputs``, measured interleaved (so
    background load hits both alike), and the speedup ``original / compressed``.

    ``speedup`` compares the fastest runs (best of ``repeats``, as ``timeit`` does: on a shared
    machine the slower runs measure the neighbours, not the code); ``speedup_median`` compares
    medians. ``threads`` sets torch's intra-op threads for the measurement only (restored afterwards).
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    times = {"original": [], "compressed": []}
    try:
        with eval_mode(original, compressed), torch.inference_mode():
            for i in range(warmup + repeats):
                for key, model in (("original", original), ("compressed", compressed)):
                    t0 = time.perf_counter()
                    call_model(model, example_inputs)
                    if i >= warmup:
                        times[key].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    t_orig, t_comp = min(times["original"]), min(times["compressed"])
    m_orig, m_comp = statistics.median(times["original"]), statistics.median(times["compressed"])
    return {"seconds_original": t_orig, "seconds_compressed": t_comp, "speedup": t_orig / t_comp,
            "speedup_median": m_orig / m_comp, "threads": threads, "repeats": repeats}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
