"""Measured layer latency: a timing helper and the shipped table the planner uses to predict speed.

The table ``tensorfold/data/latency_table.json`` is written by ``bench/layers.py`` (CPU, 2 threads,
batch 1 and 32): for each layer shape and factorization method it holds the median seconds of the
factored layer at several ranks and of the dense layer, measured interleaved in one process.

>>> import torch
>>> from tensorfold.nn import LatencyTable
>>> table = LatencyTable.load()
>>> dense = torch.nn.Linear(768, 3072)
>>> t = table.predict("svd", dense, 192, (32, 768))
>>> t is None or t > 0
True
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from tensorfold.errors import FileFormatError, InvalidArgumentError
from tensorfold.nn.base import DenseSpec

TABLE_VERSION = 1

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def steady_allocator() -> bool:
    """Make glibc keep freed memory in the process, so that timings measure compute, not page faults.

    By default glibc hands blocks of tens of MB back to the OS after every free and the next
    allocation of the same size faults every page in again. A 64->64 3x3 conv on a (32, 64, 56, 56)
    batch measured 38 ms that way and 18 ms with this setting, and every layer whose activations are
    that large pays a similar, allocation-dependent tax, which would make speed ratios measure the
    allocator. Process-wide, so only benchmarks and the CLI call it, never a library function.
    Returns False (and changes nothing) where the C library has no ``mallopt``.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # serve blocks up to 1 GB from the heap, not from fresh mmaps
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GB of freed heap before trimming
    ok &= mallopt(_M_TOP_PAD, 64 << 20)
    return bool(ok)


def measure_latency(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    threads: int | None = 2,
    repeats: int = 20,
    warmup: int = 3,
    inputs: torch.Tensor | None = None,
) -> float:
    """Median wall-clock seconds of ``module(x)`` for a random ``x`` of ``input_shape`` (no autograd).

    ``threads`` sets torch's intra-op thread count for the measurement only (restored afterwards);
    ``None`` leaves it alone. The input takes the module's dtype and device; CUDA is synchronised.
    """
    if repeats < 1 or warmup < 0:
        raise InvalidArgumentError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    x = inputs if inputs is not None else torch.randn(*input_shape, generator=torch.Generator().manual_seed(0),
                                                      dtype=dtype).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                sync()
                t0 = time.perf_counter()
                module(x)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
    return statistics.median(times)


def layer_key(layer) -> dict:
    """The JSON description of a dense layer's shape used to look entries up."""
    spec = DenseSpec.of(layer)
    key = {"in": spec.in_features, "out": spec.out_features}
    if spec.is_conv:
        key.update(kernel=list(spec.kernel_size), stride=list(spec.stride), dilation=list(spec.dilation),
                   groups=spec.groups, padding=spec.padding if isinstance(spec.padding, str) else list(spec.padding))
    return key


def rank_key(rank):
    return list(rank) if isinstance(rank, (tuple, list)) else rank


@dataclass
class LatencyTable:
    """Measured latencies; ``predict`` answers for a layer, method, rank and input shape.

    Each entry: ``kind`` (a planner method name: "svd", "spatial", "tucker", "cp", "tt"), ``layer``
    (see :func:`layer_key`), ``input_shape`` (batch first), ``rank``, ``batch``, ``threads``,
    ``memory_format``, ``seconds`` (median), ``dense_seconds`` (the dense layer, measured interleaved),
    ``flops``.
    """

    entries: list[dict]
    meta: dict

    @classmethod
    def load(cls, path: str | Path | None = None) -> LatencyTable:
        """Read a table (the shipped one by default)."""
        try:
            if path is None:
                text = resources.files("tensorfold").joinpath("data/latency_table.json").read_text()
            else:
                text = Path(path).read_text()
            data = json.loads(text)
        except (OSError, json.JSONDecodeError) as exc:
            raise FileFormatError(f"cannot read the latency table: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != TABLE_VERSION or "entries" not in data:
            raise FileFormatError(f"latency table has an unknown format (expected version {TABLE_VERSION})")
        meta = {k: v for k, v in data.items() if k != "entries"}
        return cls(list(data["entries"]), meta)

    def _matching(self, kind: str | None, dense_layer, input_shape: Sequence[int], threads: int,
                  memory_format: str) -> list[dict]:
        key, spatial = layer_key(dense_layer), list(input_shape)[1:]
        return [e for e in self.entries
                if (kind is None or e["kind"] == kind) and e["layer"] == key and e["threads"] == threads
                and list(e["input_shape"])[1:] == spatial
                and e.get("memory_format", "contiguous") == memory_format]

    def predict(self, kind: str, dense_layer, rank, input_shape: Sequence[int], *, threads: int = 2,
                memory_format: str = "contiguous") -> float | None:
        """Predicted seconds for the layer ``dense_layer`` factored by ``kind`` at ``rank`` (or "dense").

        Uses the entries of the same layer shape and input size: the nearest measured batch (scaled
        linearly to the asked batch) and linear interpolation in FLOPs between the measured ranks
        (the nearest rank's seconds per FLOP outside the measured range). ``None`` when the table
        has no entry for this layer shape. ``memory_format`` is "contiguous" (NCHW) or "channels_last".
        """
        batch = int(input_shape[0])
        candidates = self._matching(None if kind == "dense" else kind, dense_layer, input_shape, threads,
                                    memory_format)
        if not candidates:
            return None
        best_batch = min({e["batch"] for e in candidates}, key=lambda b: (abs(b - batch), -b))
        rows = [e for e in candidates if e["batch"] == best_batch]
        scale = batch / best_batch
        if kind == "dense":
            return statistics.median(e["dense_seconds"] for e in rows) * scale
        for e in rows:
            if e["rank"] == rank_key(rank):
                return e["seconds"] * scale
        from tensorfold.nn import layer_class_for

        found = layer_class_for(kind, dense_layer)
        if found is None:
            return None
        cls, opts = found
        flops = cls.cost(dense_layer, rank, (best_batch, *list(input_shape)[1:]), **opts).flops
        rows = sorted(rows, key=lambda e: e["flops"])
        below = [e for e in rows if e["flops"] <= flops]
        above = [e for e in rows if e["flops"] > flops]
        if below and above:
            a, b = below[-1], above[0]
            w = (flops - a["flops"]) / max(b["flops"] - a["flops"], 1)
            return (a["seconds"] + w * (b["seconds"] - a["seconds"])) * scale
        nearest = below[-1] if below else above[0]
        return nearest["seconds"] * flops / max(nearest["flops"], 1) * scale
