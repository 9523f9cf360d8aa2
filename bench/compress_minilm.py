"""Compress all-MiniLM-L6-v2 at 50% and 30% of its encoder Linear-layer parameters, several ways.

For each budget, prints cosine fidelity (mean, min) between original and compressed sentence
embeddings on the shipped evaluation sentences, nearest-neighbour agreement, paraphrase-group
retrieval, and the measured end-to-end speedup of the encoder (batch 32, 2 threads, interleaved
median of 10 runs). Methods compared, all SVD-based (LowRankLinear) so only allocation and fitting differ:

- uniform SVD (same parameter fraction per layer, weight SVD) -- the usual baseline;
- energy-threshold SVD (same spectral energy kept per layer, weight SVD);
- ours, weight-only: knapsack and balanced allocation on weight spectra (no data);
- uniform, calibrated: activation-whitened SVD with a uniform rank fraction (SVD-LLM-like);
- ours, calibrated: knapsack / balanced allocation on whitened spectra with measured sensitivities,
  layers fitted in forward order on the inputs they see in the partly compressed model.

Run: .venv/bin/python bench/compress_minilm.py [--calib 128] [--budgets 0.5,0.3] [--markdown]
Fitting runs with 1 thread (on a shared, oversubscribed machine multi-threaded LAPACK calls stall);
speed is measured with 2 threads.
"""

from __future__ import annotations

import argparse
import time

import torch

import tensorfold as tf
from tensorfold import zoo
from tensorfold.compression.api import Planner
from tensorfold.compression.config import CompressConfig
from tensorfold.compression.evaluate import measure_speedup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--budgets", default="0.5,0.3")
    ap.add_argument("--fit-threads", type=int, default=1)
    ap.add_argument("--speed-only", action="store_true",
                    help="only the end-to-end speed of the planned structures (best of --repeats, interleaved)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--speed-threads", default="2", help="comma-separated thread counts for --speed-only")
    args = ap.parse_args()
    if args.speed_only:
        speed_only(args)
        return
    torch.set_num_threads(args.fit_threads)
    entry = zoo.get("minilm")
    model = entry.load()
    calib = entry.calibration(args.calib, seed=0)
    example = entry.example_inputs(32)
    rows = []
    weight_planner = Planner(model, CompressConfig(0.5, methods=("svd",), exclude=entry.exclude),
                             output_fn=entry.output_fn)
    print(f"MiniLM: {sum(p.numel() for p in model.parameters()):,} params; calibration {args.calib} sentences; "
          f"evaluation {len(entry.evaluate.__globals__['eval_sentences']())} sentences", flush=True)
    for budget in [float(b) for b in args.budgets.split(",")]:
        t0 = time.perf_counter()
        cal_planner = Planner(model, CompressConfig(budget, methods=("svd",), exclude=entry.exclude), calib=calib,
                              output_fn=entry.output_fn)
        t_planner = time.perf_counter() - t0
        configs = [
            ("uniform SVD (weights)", weight_planner, "uniform", False),
            ("energy-threshold SVD (weights)", weight_planner, "energy", False),
            ("ours balanced, weight-only", weight_planner, "balanced", False),
            ("ours knapsack, weight-only", weight_planner, "knapsack", False),
            ("uniform, calibrated (whitened SVD)", cal_planner, "uniform", True),
            ("ours balanced, calibrated", cal_planner, "balanced", True),
            ("ours knapsack, calibrated", cal_planner, "knapsack", True),
        ]
        for name, planner, allocator, calibrated in configs:
            t = time.perf_counter()
            p = planner.plan(budget, allocator, curve=False)
            small = tf.apply(model, p, calib if calibrated else None)
            seconds = time.perf_counter() - t + (t_planner if calibrated else 0.0)
            q = entry.evaluate(model, small)
            speed = measure_speedup(model, small, example, threads=2, repeats=10)
            row = dict(budget=budget, name=name, fraction=p.fraction, model_fraction=p.model_fraction,
                       seconds=seconds, speedup=speed["speedup"], **q)
            rows.append(row)
            print(f"{budget:>4.2f} {name:<36} kept {p.fraction:.3f} cos {q['mean_cos']:.3f}/{q['min_cos']:.3f} "
                  f"nn {q['nn_agreement']:.3f} group {q['group_recall']:.3f} speedup {speed['speedup']:.2f}x "
                  f"({seconds:.0f}s)", flush=True)
    print()
    print("| budget (Linear params) | method | mean cos | min cos | NN agreement | group retrieval "
          "| speedup (b32, 2 thr) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']:.0%} ({r['fraction']:.3f}) | {r['name']} | {r['mean_cos']:.3f} | {r['min_cos']:.3f} | "
              f"{r['nn_agreement']:.3f} | {r['group_recall']:.3f} | {r['speedup']:.2f}x |")


def speed_only(args) -> None:
    """Speed depends only on the layer structure (ranks), not on the fitted values: build each plan's
    structure with weight-space fitting and time it against the dense encoder."""
    torch.set_num_threads(args.fit_threads)
    entry = zoo.get("minilm")
    model = entry.load()
    calib = entry.calibration(args.calib, seed=0)
    example = entry.example_inputs(32)
    weight_planner = Planner(model, CompressConfig(0.5, methods=("svd",), exclude=entry.exclude),
                             output_fn=entry.output_fn, example_inputs=example)
    threads = [int(t) for t in args.speed_threads.split(",")]
    print("| budget | plan | Linear FLOPs kept | " + " | ".join(
        f"speedup {t} thr best-of | median" for t in threads) + " |")
    print("|---|---|---|" + "---|---|" * len(threads))
    for budget in [float(b) for b in args.budgets.split(",")]:
        cal_planner = Planner(model, CompressConfig(budget, methods=("svd",), exclude=entry.exclude), calib=calib,
                              output_fn=entry.output_fn, example_inputs=example)
        for name, planner, allocator in (("uniform SVD", weight_planner, "uniform"),
                                         ("ours knapsack, calibrated", cal_planner, "knapsack")):
            p = planner.plan(budget, allocator, curve=False)
            small = tf.apply(model, p)
            cells = []
            for t in threads:
                s = measure_speedup(model, small, example, threads=t, repeats=args.repeats)
                cells.append(f"{s['speedup']:.2f}x | {s['speedup_median']:.2f}x")
            flops = f"{p.flops / p.dense_flops:.3f}" if p.flops is not None else "-"
            print(f"| {budget:.0%} | {name} | {flops} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
