"""Latency of tensorfold's factorized layers vs the dense layer and TensorLy-Torch's factorized layers.

CPU, 2 threads, batch 1 and 32. For each shape the dense layer, every tensorfold layer at several
ranks and TensorLy-Torch's FactorizedLinear/FactorizedConv at the same parameter fractions are timed
*interleaved* in this one process (one call of each in turn, repeated; medians), so load from other
processes hits all of them alike; ratios are what to read. Convs are timed twice: with a default
(NCHW-contiguous) input and with a channels-last input, each fed identically to every layer.

Writes src/tensorfold/data/latency_table.json (read by tensorfold.nn.LatencyTable).

    .venv/bin/python bench/layers.py              # full run (a few minutes on 2 idle cores)
    .venv/bin/python bench/layers.py --quick      # fewer repeats
    .venv/bin/python bench/layers.py --only Linear   # one shape (no table written)
    .venv/bin/python bench/layers.py --memory     # peak extra memory of converting big kernels
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from tensorfold.io import write_text_atomic
from tensorfold.nn import CPConv, LowRankLinear, SVDConv, TTLinear, TuckerConv, dense_flops, steady_allocator
from tensorfold.nn.latency import TABLE_VERSION, layer_key, rank_key

THREADS = 2
BATCHES = (1, 32)
FRACTIONS = (0.5, 0.25, 0.1)  # of the dense layer's parameters
TABLE = Path(__file__).resolve().parents[1] / "src" / "tensorfold" / "data" / "latency_table.json"

# ours: planner method name -> (class, options); tltorch: the same-named factorization
OURS_LINEAR = {"svd": (LowRankLinear, {}), "tt": (TTLinear, {})}
OURS_CONV = {"svd": (SVDConv, {"scheme": "channel"}), "svd-input": (SVDConv, {"scheme": "input"}),
             "spatial": (SVDConv, {"scheme": "spatial"}),
             "tucker": (TuckerConv, {}), "cp": (CPConv, {"n_iter_max": 10})}
# blocktt is their TT-matrix (MPO). Their CP Linear is left out: at these fractions its CP rank is in the
# thousands over a 6-way tensorized weight and ALS ran out of 22 GB (0.5) or past 5 minutes (0.1).
TL_LINEAR = ("tucker", "blocktt")
TL_CONV = ("cp", "tucker")


def shapes():
    torch.manual_seed(0)
    return [
        ("Linear 768x3072", torch.nn.Linear(768, 3072), lambda b: (b, 768)),
        ("Conv 64->64 3x3 @56", torch.nn.Conv2d(64, 64, 3, padding=1), lambda b: (b, 64, 56, 56)),
        ("Conv 256->256 3x3 @14", torch.nn.Conv2d(256, 256, 3, padding=1), lambda b: (b, 256, 14, 14)),
    ]


def tltorch_layer(dense, fraction: float, factorization: str):
    import tltorch

    # TensorLy's default SVD initialisation of CP takes a full SVD of each unfolding (full_matrices),
    # which for the tensorized 768x3072 weight needs a (294912 x 294912) matrix and gets the process
    # killed; a random initialisation keeps the peer runnable.
    kwargs = {"decomposition_kwargs": {"n_iter_max": 10, "init": "random"}} if factorization == "cp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(dense, torch.nn.Linear):
            return tltorch.FactorizedLinear.from_linear(dense, rank=fraction, factorization=factorization,
                                                        implementation="factorized", **kwargs)
        return tltorch.FactorizedConv.from_conv(dense, rank=fraction, factorization=factorization,
                                                implementation="factorized", **kwargs)


def build_candidates(dense):
    """name -> (module, kind, rank, parameter fraction) for ours and TensorLy-Torch's."""
    ours = OURS_LINEAR if isinstance(dense, torch.nn.Linear) else OURS_CONV
    theirs = TL_LINEAR if isinstance(dense, torch.nn.Linear) else TL_CONV
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for frac in FRACTIONS:
            peers = {}
            for fact in theirs:
                try:
                    peers[fact] = tltorch_layer(dense, frac, fact).eval()
                except Exception as exc:  # report, don't hide: a peer layer that cannot be built is a finding
                    print(f"  (tltorch {fact} at {frac}: {type(exc).__name__}: {exc})")
            for kind, (cls, opts) in ours.items():
                target = frac
                if kind == "tt" and "blocktt" in peers:
                    # tltorch's blocktt rounds rank=frac to far fewer parameters (807k vs our 1.18M at 0.5):
                    # compare TT at exactly its parameter count instead.
                    target = _n_params(peers["blocktt"]) / _n_params(dense)
                layer = cls.from_dense(dense, target, **opts).eval()
                out[f"{kind}@{frac}"] = (layer, kind, layer.rank, frac)
            for fact, layer in peers.items():
                out[f"tltorch-{fact}@{frac}"] = (layer, f"tltorch-{fact}", frac, frac)
    return out


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def time_interleaved(modules: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict:
    times = {name: [] for name in modules}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, module in modules.items():
                t0 = time.perf_counter()
                module(x)
                elapsed = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def run_latency(quick: bool, only: str | None = None) -> list[dict]:
    torch.set_num_threads(THREADS)
    entries = []
    for label, dense, input_shape in shapes():
        if only and only not in label:
            continue
        dense.eval()
        candidates = build_candidates(dense)
        formats = ["contiguous"] if isinstance(dense, torch.nn.Linear) else ["contiguous", "channels_last"]
        for batch in BATCHES:
            shape = input_shape(batch)
            dense_macs = dense_flops(dense, shape)
            for fmt in formats:
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                heavy = dense_macs > 5e8
                repeats = (4 if quick else 10) if heavy else (10 if quick else 40)
                modules = {"dense": dense} | {name: c[0] for name, c in candidates.items()}
                seconds = time_interleaved(modules, x, repeats, warmup=2)
                t_dense = seconds["dense"]
                print(f"\n{label}  batch {batch}  input {fmt}  dense {t_dense * 1e3:.2f} ms  "
                      f"({dense_macs / 1e6:.0f} MMAC)")
                print(f"  {'layer':22s} {'rank':>12s} {'FLOP ratio':>10s} {'time ratio':>10s} {'speedup':>8s}")
                for name, (module, kind, rank, frac) in candidates.items():
                    macs = module.flops(shape) if hasattr(module, "flops") and callable(module.flops) else None
                    flop_ratio = f"{macs / dense_macs:10.3f}" if macs is not None else f"{'?':>10s}"
                    ratio = seconds[name] / t_dense
                    print(f"  {name:22s} {str(rank):>12s} {flop_ratio} {ratio:10.3f} {1 / ratio:7.2f}x")
                    entries.append({
                        "kind": kind, "layer": layer_key(dense), "label": label, "input_shape": list(shape),
                        "memory_format": fmt, "rank": rank_key(rank), "fraction": frac, "batch": batch,
                        "threads": THREADS,
                        "seconds": seconds[name], "dense_seconds": t_dense, "flops": macs, "dense_flops": dense_macs,
                        "n_params": sum(p.numel() for p in module.parameters()),
                    })
    return entries


def summarize(entries: list[dict]) -> None:
    """The targets: at <= 50% of the dense FLOPs, <= 0.7x dense latency at batch 32; never slower than tltorch."""
    print("\nTargets (batch 32):")
    for e in entries:
        if e["batch"] != 32 or e["kind"].startswith("tltorch") or e["flops"] is None:
            continue
        if e["flops"] <= 0.5 * e["dense_flops"]:
            ratio = e["seconds"] / e["dense_seconds"]
            flag = "ok " if ratio <= 0.7 else "MISS"
            print(f"  {flag} {e['label']:24s} {e['memory_format']:13s} {e['kind']:8s} rank {str(e['rank']):10s} "
                  f"FLOPs {e['flops'] / e['dense_flops']:.2f}  time {ratio:.2f}")
    print("\nvs TensorLy-Torch at the same parameter fraction (time ratio ours / theirs):")
    groups = {}
    for e in entries:
        groups.setdefault((e["label"], e["batch"], e["memory_format"], e["fraction"]), []).append(e)
    for (label, batch, fmt, frac), rows in groups.items():
        theirs = {e["kind"].removeprefix("tltorch-").replace("blocktt", "tt"): e
                  for e in rows if e["kind"].startswith("tltorch")}
        ours = [e for e in rows if not e["kind"].startswith("tltorch")]
        if not theirs:
            continue
        best_ours = min(ours, key=lambda e: e["seconds"])
        best_theirs = min(theirs.values(), key=lambda e: e["seconds"])
        pairs = [f"{o['kind']} {o['seconds'] / theirs[o['kind']]['seconds']:.2f}" for o in ours if o["kind"] in theirs]
        print(f"  {label:22s} b={batch:<3d} {fmt:13s} {frac:<4}: best ours ({best_ours['kind']}) / best tltorch "
              f"({best_theirs['kind']}) = {best_ours['seconds'] / best_theirs['seconds']:.2f}; "
              f"same method: {', '.join(pairs) or '-'}")
        if "tt" in theirs:  # TT vs blocktt at equal parameter counts: both counts and times
            tt, bt = next(o for o in ours if o["kind"] == "tt"), theirs["tt"]
            flag = "ok " if tt["seconds"] <= bt["seconds"] else "MISS"
            print(f"    {flag} tt {tt['n_params']} params {tt['seconds'] * 1e3:.3f} ms vs tltorch-blocktt "
                  f"{bt['n_params']} params {bt['seconds'] * 1e3:.3f} ms: {tt['seconds'] / bt['seconds']:.2f}x")


# ---- memory: converting big kernels -----------------------------------------------------------------

_MEMORY_SNIPPET = """
import resource, sys, time, warnings, torch
from tensorfold.nn import SVDConv, TuckerConv, CPConv
warnings.simplefilter("ignore")
torch.set_num_threads(2)
shape = tuple(int(v) for v in sys.argv[1].split(","))
method = sys.argv[2]
conv = (torch.nn.Conv2d if len(shape) == 4 else torch.nn.Conv3d)(shape[1], shape[0], shape[2:], bias=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if method == "svd":
    layer = SVDConv.from_dense(conv, 0.25)
elif method == "tucker":
    layer = TuckerConv.from_dense(conv, 0.25, n_iter=1)
else:
    layer = CPConv.from_dense(conv, 128, n_iter_max=5)
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{(after - before) / 1024:.0f} {seconds:.1f} {layer.rank}")
"""


def run_memory() -> None:
    print("Peak extra resident memory of from_dense (fresh process each; ru_maxrss after - before building):")
    for shape in ("1024,512,3,3", "1024,512,3,3,3"):
        for method in ("svd", "tucker", "cp"):
            proc = subprocess.run([sys.executable, "-c", _MEMORY_SNIPPET, shape, method], capture_output=True,
                                  text=True, timeout=1800)
            if proc.returncode:
                print(f"  {shape:16s} {method:7s} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            mb, seconds, rank = proc.stdout.split(maxsplit=2)
            print(f"  kernel ({shape}) {method:7s} rank {rank.strip():12s} extra {mb:>6s} MiB  {seconds} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--memory", action="store_true", help="measure conversion memory instead of latency")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite the shipped latency table")
    parser.add_argument("--only", metavar="TEXT", help="only the shapes whose label contains TEXT (implies --no-write)")
    args = parser.parse_args()
    if args.memory:
        run_memory()
        return
    steady = steady_allocator()
    print(f"torch {torch.__version__}, {THREADS} threads, {platform.processor() or platform.machine()}, "
          f"steady allocator: {steady}")
    entries = run_latency(args.quick, args.only)
    summarize(entries)
    if not args.no_write and not args.only:
        table = {"version": TABLE_VERSION, "threads": THREADS, "torch": torch.__version__,
                 "machine": platform.machine(), "written_by": "bench/layers.py",
                 "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                 "entries": [e for e in entries if not e["kind"].startswith("tltorch")]}
        write_text_atomic(TABLE, json.dumps(table, indent=1) + "\n")
        print(f"\nwrote {TABLE}")


if __name__ == "__main__":
    main()
