"""Compress all-MiniLM-L6-v2 several ways at 70%, 50% and 30% of its encoder Linear parameters.

Quality is measured on evaluation text never used for any choice (see ``tensorfold.zoo.minilm``): 282
shipped sentences in paraphrase groups and ~1,200 sentences of the Python language reference (another
kind of text than the calibration text: Wikipedia, shipped modern sentences and King James scripture).
Reported: mean and minimum cosine between original and compressed embeddings, nearest-neighbour
agreement over all ~1,470 evaluation sentences, the two kinds' mean cosine, the end-to-end speedup of
the encoder (batch 32, 2 threads, best of ``--repeats`` interleaved runs), the compression time
(planning + fitting) and the load average when the row was measured.

Methods (all fitted to the same calibration sentences, knapsack allocation under one budget):

- ``svd``: per-matrix activation-whitened SVD only (the planner before block methods);
- ``drop``: whole blocks removed, the best subset of that many blocks by the output change measured on
  the calibration sentences (exhaustive), the rest dense;
- ``mlp-select``: feed-forward neuron selection with a refitted down projection only (attention dense);
- ``modular``: the full default menu (per-matrix SVD and every block method in one knapsack);
- block plans (``mlp-select``, ``modular``) refit the layer ending each compressed sub-block toward the
  original model's output (error correction, ``tensorfold.compression.blocks.fit``);
- each with ``--finetune S``: at most S seconds of distillation (0 = none), enforced by the library
  (``max_seconds``), with MiniLM's recipe (``tensorfold.FinetuneConfig.for_transformers``: every block's
  token outputs and the sentence embeddings' cosine, warmup and cosine decay over the time; training text
  Wikipedia + scripture, validation every 50 steps on shipped modern sentences that calibration never
  uses, another kind of text, keeping the best weights; no dropout, embeddings fixed).

Run: .venv/bin/python bench/compress_minilm.py [--calib 512] [--budgets 0.7,0.5,0.3]
     [--methods svd,drop,mlp-select,modular] [--finetune 300] [--finetune-methods modular]
     [--json out.json] [--table a.json,b.json] [--plans DIR [--plan-only]]
Compression runs with ``--threads`` threads (default 2); speed is measured with 2 threads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

import tensorfold as tf
from tensorfold import zoo
from tensorfold.compression.api import Planner
from tensorfold.compression.calibration import call_model, output_tensor
from tensorfold.compression.config import FinetuneConfig
from tensorfold.compression.evaluate import measure_speedup
from tensorfold.compression.finetune import FinetuneHistory, model_finetune_config
from tensorfold.compression.plan import Plan
from tensorfold.errors import NotCompressibleError
from tensorfold.zoo import minilm

FOREVER = 10_000  # epochs: the time budget ends the fine-tune
METHODS = {
    "svd": ("svd",),
    "mlp-select": ("mlp-select",),
    "modular": ("svd", "mlp-select", "qk-select", "vo-svd", "drop"),
}


def best_drop(model, calib, budget, entry):
    """The model with the best subset of blocks removed so that the kept blocks' Linear parameters are at
    most ``budget`` of the encoder's (measured on the calibration batches only), and the fraction kept."""
    from tensorfold.compression.blocks import find_blocks
    from tensorfold.compression.replace import set_submodule
    from tensorfold.nn.transformer import SkipBlock

    blocks = find_blocks(model)
    keep = int(budget * len(blocks) + 1e-9)
    with torch.no_grad():
        ref = [output_tensor(call_model(model, b), entry.output_fn).double() for b in calib]
    best = None
    for dropped in itertools.combinations(range(len(blocks)), len(blocks) - keep):
        work = minilm.load()
        for i in dropped:
            set_submodule(work, blocks[i].name, SkipBlock())
        with torch.no_grad():
            err = sum(float(((output_tensor(call_model(work, b), entry.output_fn).double() - y) ** 2).sum())
                      for b, y in zip(calib, ref))
        if best is None or err < best[0]:
            best = (err, dropped, work)
    return best[2], keep / len(blocks), best[1]


def finetune(small, model, entry, seconds: float, seed: int = 0, train=None):
    """Distil ``model`` into ``small`` for at most ``seconds`` (the library's wall-clock budget, validations
    included) with MiniLM's recipe (``model_finetune_config`` of its ``extra``: the transformer recipe,
    layer-wise distillation of the blocks' token outputs plus the cosine of the sentence embeddings, warmup
    and cosine decay over the time, validation every 50 steps on the shipped modern sentences calibration
    never uses, no dropout, embeddings fixed; training text Wikipedia + scripture, all of it), keeping the
    best weights on the validation text. ``train``: the tokenized ``(train, val)`` batches, made once."""
    config = model_finetune_config(entry.extra, FinetuneConfig(epochs=FOREVER, max_seconds=seconds, seed=seed,
                                                                progress=False), embeddings=True)
    train, val = train if train is not None else minilm.finetune_data(batch_size=32, seed=seed, max_train=None)
    history = FinetuneHistory()
    tuned = tf.finetune(small, train, config, teacher=model, val_data=val, output_fn=entry.output_fn,
                        history=history)
    return tuned, history


def _best_step(history) -> int:
    """The step whose weights were kept (0: the compressed model as it was)."""
    if not history.best_epoch:
        return 0
    best = [c["steps"] for c in history.checks if c["val_loss"] == history.best_val_loss]
    return best[0] if best else history.steps


def planned(name: str, budget: float, planner, plans: str | None, model, calib, entry):
    """``(plan, planning seconds, planner)`` for ``name`` at ``budget``: one Planner per method (its menus
    built once, the time counted with the first budget); with ``plans`` a directory, plans are read from
    it when there (with the planning time recorded beside them) and written to it otherwise, so a long
    table splits into locked runs that plan once and fit later."""
    path = os.path.join(plans, f"{name}-{budget}") if plans else None
    if path and os.path.exists(path + ".json"):
        with open(path + ".seconds") as fh:
            return Plan.load(path + ".json"), float(fh.read()), planner
    if path and os.path.exists(path + ".seconds"):
        raise NotCompressibleError("an earlier planning run found this budget out of reach")
    t = time.perf_counter()
    if planner is None:
        planner = Planner(model, tf.CompressConfig(budget, methods=METHODS[name], exclude=entry.exclude),
                          calib=calib, output_fn=entry.output_fn)
    p = planner.plan(budget, curve=False)
    seconds = time.perf_counter() - t
    if path:
        os.makedirs(plans, exist_ok=True)
        p.save(path + ".json")
        with open(path + ".seconds", "w") as fh:
            fh.write(f"{seconds:.1f}")
    return p, seconds, planner


def print_table(rows: list[dict]) -> None:
    """The markdown table of ``rows`` (budget, then method, then without/with fine-tuning)."""
    print("| budget | method | fine-tune s | kept | mean cos | min cos | NN agreement | paraphrase cos | technical cos "
          "| speedup (b32, 2 thr) | compress s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (-r["budget"], r["method"], r["finetune"])):
        print(f"| {r['budget']:.0%} | {r['method']} | {r['finetune']:.0f} | {r['fraction']:.3f} | "
              f"{r['mean_cos']:.3f} | {r['min_cos']:.3f} | {r['nn_agreement']:.3f} | {r['para_mean_cos']:.3f} | "
              f"{r['tech_mean_cos']:.3f} | "
              f"{r['speedup']:.2f}x | {r['seconds']:.0f} | {r['load']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--budgets", default="0.7,0.5,0.3")
    ap.add_argument("--methods", default="svd,drop,mlp-select,modular")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--finetune", type=float, default=0.0, help="seconds of distillation per model (0: none)")
    ap.add_argument("--finetune-methods", default="svd,drop,mlp-select,modular")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plans", default=None, help="directory of saved plans: read when there, written otherwise")
    ap.add_argument("--plan-only", action="store_true", help="plan (and save with --plans), no fitting")
    ap.add_argument("--table", default=None, help="comma-separated --json files of earlier runs: print their rows "
                    "as one table and exit (runs split per method/budget under the CPU lock)")
    args = ap.parse_args()
    if args.table:
        rows = []
        for path in args.table.split(","):
            with open(path) as fh:
                rows += json.load(fh)
        print_table(rows)
        return
    torch.set_num_threads(args.threads)
    entry = zoo.get("minilm")
    model = entry.load()
    example = entry.example_inputs(32)
    t0 = time.perf_counter()
    calib = entry.calibration(args.calib, seed=0)
    t_tok = time.perf_counter() - t0
    print(f"MiniLM: calibration {args.calib} sentences (tokenized in {t_tok:.1f}s); evaluation "
          f"{len(minilm.eval_sentences())} paraphrase-group + {len(minilm.technical_sentences())} technical "
          f"sentences; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    cache: dict = {}  # the original's evaluation embeddings, computed once
    ft_data = None  # fine-tuning batches, tokenized once
    budgets = [float(b) for b in args.budgets.split(",")]
    for name in args.methods.split(","):
        planner = None
        for budget in budgets:
            t = time.perf_counter()
            note = ""
            if name == "drop" and args.plan_only:
                continue
            if name == "drop":
                small, fraction, dropped = best_drop(model, calib, budget, entry)
                note = f"dropped blocks {list(dropped)}"
            else:
                try:
                    p, t_plan, planner = planned(name, budget, planner, args.plans, model, calib, entry)
                except NotCompressibleError as exc:  # e.g. mlp-select alone cannot reach 30% (attention is 1/3)
                    print(f"{name} at {budget:.0%}: {exc}", flush=True)
                    if args.plans:
                        with open(os.path.join(args.plans, f"{name}-{budget}.seconds"), "w") as fh:
                            fh.write("0")  # no plan beside it: out of reach
                    continue
                if args.plan_only:
                    continue
                t = time.perf_counter()
                small = tf.apply(model, p, calib)
                fraction = p.fraction
                used: dict[str, float] = {}
                for lp in p.layers:
                    used[lp.method] = used.get(lp.method, 0) + lp.params / p.dense_params
                note = ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items()))
            seconds = time.perf_counter() - t + (t_plan if name != "drop" else 0.0)
            q = entry.evaluate(model, small, cache=cache)
            speed = measure_speedup(model, small, example, threads=2, repeats=args.repeats)
            row = dict(method=name, budget=budget, fraction=fraction, finetune=0.0, seconds=seconds,
                       speedup=speed["speedup"], note=note, load=os.getloadavg()[0], **q)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.finetune > 0 and name in args.finetune_methods.split(","):
                if ft_data is None:
                    ft_data = minilm.finetune_data(batch_size=32, seed=0, max_train=None)
                t = time.perf_counter()
                tuned, history = finetune(small, model, entry, args.finetune, train=ft_data)
                t_ft = time.perf_counter() - t
                qt = entry.evaluate(model, tuned, cache=cache)
                row = dict(row, finetune=t_ft, steps=history.steps, best_step=_best_step(history),
                           load=os.getloadavg()[0], **qt)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
