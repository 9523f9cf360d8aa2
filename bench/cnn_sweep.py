"""CNN compression side by side: accuracy drop before/after a short fine-tune, and measured CPU speedup.

For the digits CNN and ResNet-20 on the procedural shapes task, at parameter budgets 50%, 30%, 20%
and a FLOP budget of 50%, compares five ways of choosing the factorization of every layer, all fed
the same calibration batches (so the differences come from the allocation and the method menu):

  uniform   same SVD rank fraction in every layer
  energy    SVD with an energy (spectrum) threshold
  alds      ALDS-style error balancing (minimise the largest normalised layer error), SVD
  mixed-td  Mixed-TD-style per-layer choice between SVD and CP under one budget (knapsack)
  ours      knapsack allocator over the full menu: SVD channel, SVD input, SVD spatial, Tucker-2, CP
  ours-fast the same, also asked for a 1.2x measured whole-model speedup (plan(..., speedup=1.2)):
            the plan is timed inside the model while planning and tightened until it is reached
  ours-no-slower  the same with no_slower=True (no factorisation predicted slower than its dense layer)
  ours-1.3x the full menu plus svd-input (1x1 then kxk), asked for a 1.3x measured whole-model speedup

The drop before fine-tuning is deterministic; the drop after fine-tuning is the mean over
``--seeds`` fine-tuning seeds (distillation from the original, Adam). Speedup = dense latency /
compressed latency, batch 32, 2 threads, measured alternately in this process.

    .venv/bin/python bench/cnn_sweep.py --quick           # digits only, 1 seed, a few minutes
    .venv/bin/python bench/cnn_sweep.py                   # both models, 3 seeds
    .venv/bin/python bench/cnn_sweep.py --models resnet20-shapes --seeds 3 --json bench/cnn_sweep.json
    .venv/bin/python bench/cnn_sweep.py --speed-only --json bench/cnn_sweep.json   # re-time saved rows

Results are appended to the JSON file as they come, and rows already there are reused (delete the
file to start over), so a long run can be interrupted and resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from tensorfold.compression.api import apply, plan
from tensorfold.compression.finetune import finetune
from tensorfold.compression.sweep import paired_latency
from tensorfold.nn import steady_allocator
from tensorfold.zoo.vision import VisionTask

BASELINES = {  # name: (allocator, methods, extra plan() arguments)
    "uniform": ("uniform", ("svd",), {}),
    "energy": ("energy", ("svd",), {}),
    "alds": ("balanced", ("svd",), {}),
    "mixed-td": ("knapsack", ("svd", "cp"), {}),
    "ours": ("knapsack", ("svd", "svd-input", "spatial", "tucker", "cp"), {}),
    "ours-fast": ("knapsack", ("svd", "spatial", "tucker", "cp"), {"speedup": 1.2}),
    "ours-no-slower": ("knapsack", ("svd", "spatial", "tucker", "cp"), {"no_slower": True}),
    "ours-1.3x": ("knapsack", ("svd", "svd-input", "spatial", "tucker", "cp"), {"speedup": 1.3}),
}
DEFAULT_METHODS = ("uniform", "energy", "alds", "mixed-td", "ours")
CONFIGS = (("params", 0.5), ("params", 0.3), ("params", 0.2), ("flops", 0.5))
# a short fine-tune: Adam steps of the given batch size (about one epoch of each training split)
FINETUNE = {"digits-cnn": dict(batch_size=64, steps=19, lr=3e-3), "resnet20-shapes": dict(batch_size=128, steps=47,
                                                                                          lr=1e-4)}


def key(model: str, target: str, budget: float, method: str) -> str:
    return f"{model}|{target}|{budget:g}|{method}"


def make(original, calib, inputs, target, budget, method):
    allocator, methods, extra = BASELINES[method]
    p = plan(original, budget, target=target, methods=methods, allocator=allocator, calib=calib,
             example_inputs=inputs, curve=False, **extra)
    return p, apply(original, p, calib)


def timing(original, small, inputs) -> dict:
    dense_s, small_s = paired_latency(original, small, inputs, threads=2, rounds=5, repeats=20)
    return dict(dense_ms=dense_s * 1e3, compressed_ms=small_s * 1e3, speedup=dense_s / small_s,
                timed_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load=os.getloadavg()[0])


def run_one(task: VisionTask, original, calib, inputs, target, budget, method, seeds, latency) -> dict:
    start = time.perf_counter()
    p, small = make(original, calib, inputs, target, budget, method)
    plan_seconds = time.perf_counter() - start
    before = task.evaluate(original, small)
    ft = FINETUNE[task.name]
    drops, tune_seconds = [], 0.0
    for seed in range(seeds):
        train, val = task.finetune_data(ft["batch_size"], seed)
        t0 = time.perf_counter()
        tuned = finetune(small, train, teacher=original, epochs=1, lr=ft["lr"], max_steps=ft["steps"],
                         val_data=val, seed=seed, progress=False)
        tune_seconds += time.perf_counter() - t0
        drops.append(task.evaluate(original, tuned)["accuracy_drop"])
    row = {
        "model": task.name, "target": target, "budget": budget, "method": method,
        "fraction": p.fraction, "flops_fraction": (p.flops / p.dense_flops) if p.dense_flops else None,
        "accuracy_original": before["accuracy_original"], "drop_before": before["accuracy_drop"],
        "drop_after": statistics.fmean(drops), "drop_after_seeds": drops,
        "methods_used": {m: sum(1 for lp in p.layers if lp.method == m) for m in {lp.method for lp in p.layers}},
        "plan_seconds": round(plan_seconds, 1), "finetune_seconds": round(tune_seconds, 1),
        "predicted_speedup": p.predicted_speedup, "measured_speedup_planning": p.measured_speedup,
    }
    if latency:
        row.update(timing(original, small, inputs))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | budget | method | kept | drop before FT | drop after FT (seeds) | speedup | layers by method |",
             "|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(BASELINES)}
    rows = [r for r in rows if r["method"] in order]
    configs = {(t, b): i for i, (t, b) in enumerate(CONFIGS)}
    for r in sorted(rows, key=lambda r: (r["model"], configs.get((r["target"], r["budget"]), 99), order[r["method"]])):
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        used = " ".join(f"{m}:{n}" for m, n in sorted(r["methods_used"].items()))
        seeds = len(r["drop_after_seeds"])
        lines.append(f"| {r['model']} | {r['budget']:.0%} {r['target']} | {r['method']} | {r['fraction']:.3f} | "
                     f"{r['drop_before'] * 100:+.1f} pt | {r['drop_after'] * 100:+.1f} pt ({seeds}) | "
                     f"{speed} | {used} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits-cnn only, one seed")
    parser.add_argument("--models", default="digits-cnn,resnet20-shapes")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from {', '.join(BASELINES)}")
    parser.add_argument("--configs", default=None, help="e.g. params:0.5,flops:0.5 (default: all four)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="threads for planning and fine-tuning")
    parser.add_argument("--json", default="bench/cnn_sweep.json", help="results file (rows are reused)")
    parser.add_argument("--speed-only", action="store_true",
                        help="re-plan the saved rows of --models/--configs/--methods and re-time them, keeping their "
                             "accuracy (plans without a speed goal are deterministic)")
    args = parser.parse_args()
    steady_allocator()  # glibc keeps freed blocks: time compute, not page faults
    # planning and fine-tuning on one thread (a shared 2-core machine thrashes with two); the latency
    # measurement sets 2 threads itself
    torch.set_num_threads(args.threads)
    models = ["digits-cnn"] if args.quick else args.models.split(",")
    seeds = 1 if args.quick else args.seeds
    configs = CONFIGS
    if args.configs:
        configs = tuple((c.split(":")[0], float(c.split(":")[1])) for c in args.configs.split(","))
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in models:
        task = VisionTask(name)
        original = task.load()
        calib = task.calibration(args.calib, 0)
        inputs = task.example_inputs(32)
        for target, budget in configs:
            for method in args.methods.split(","):
                k = key(name, target, budget, method)
                if args.speed_only:
                    if k in results and not BASELINES[method][2]:
                        _, small = make(original, calib, inputs, target, budget, method)
                        results[k].update(timing(original, small, inputs))
                        path.write_text(json.dumps(results, indent=1))
                        print(f"{k}: speedup {results[k]['speedup']:.2f}x", file=sys.stderr, flush=True)
                    continue
                if k in results and len(results[k]["drop_after_seeds"]) >= seeds:
                    continue
                try:
                    row = run_one(task, original, calib, inputs, target, budget, method, seeds,
                                  not args.no_latency)
                except Exception as exc:  # a baseline that cannot reach a budget is reported, not fatal
                    print(f"{k}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                results[k] = row
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=1))
                speed = f" speedup {row['speedup']:.2f}x" if row.get("speedup") else ""
                print(f"{k}: kept {row['fraction']:.3f} drop {row['drop_before']:+.4f} -> {row['drop_after']:+.4f}"
                      f"{speed} (plan {row['plan_seconds']} s, fine-tune {row['finetune_seconds']} s)",
                      file=sys.stderr, flush=True)
    rows = [r for r in results.values() if r["model"] in models]
    print(table(rows))


def print_table(*paths: str) -> None:
    """Print the table of one or more results files: ``python bench/cnn_sweep.py --table a.json b.json``."""
    rows = [r for p in paths for r in json.loads(Path(p).read_text()).values()]
    print(table(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print_table(*sys.argv[2:])
    else:
        main()
