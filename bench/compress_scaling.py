"""How the compression time grows with the number of transformer blocks and of calibration tokens.

Randomly initialised BERT-style encoders (transformers ``BertConfig``: MiniLM's width, 384 wide, 12 heads,
1536 intermediate; 2, 4 or 8 layers) are compressed to 50% of their encoder Linear parameters with the
default menus (per-matrix methods and every block method in one knapsack) on random token sequences of
``--seq`` tokens, ``--sentences`` of them: calibration tokens = sentences x seq. Each run records the
planner's stage times (calibration, menus, sensitivities, block menus) and the fitting time; the
table prints them, seconds per block and per thousand tokens, and the plot (log-log, with slope-1
guides) shows total compression time against blocks and against tokens.

Runs are cached by configuration in ``--json`` so the grid can be run in pieces (each piece under the
CPU lock); ``--plot`` draws every cached run.

Run: .venv/bin/python bench/compress_scaling.py [--layers 2,4,8] [--sentences 128,256,512] [--seq 32]
     [--json bench/results/compress_scaling.json] [--plot docs/figures/compress_scaling.png]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# idle OpenMP threads sleep instead of spinning (as the tensorfold command sets): read when torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

WIDTH = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}


def build(layers: int, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=layers, vocab_size=30522, max_position_embeddings=512, **WIDTH)
    return BertModel(config).eval()


def calibration(sentences: int, seq: int, seed: int = 0, batch: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, sentences, batch):
        n = min(batch, sentences - i)
        ids = torch.randint(1000, 30000, (n, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(n, seq, dtype=torch.long)})
    return out


def run(layers: int, sentences: int, seq: int) -> dict:
    import tensorfold as tf
    from tensorfold.compression.api import Planner

    model = build(layers)
    calib = calibration(sentences, seq)
    config = tf.CompressConfig(budget=0.5, curve=False)
    t0 = time.perf_counter()
    planner = Planner(model, config, calib=calib, output_fn=lambda o: o.last_hidden_state)
    plan = planner.plan()
    t1 = time.perf_counter()
    tf.apply(model, plan, calib)
    t2 = time.perf_counter()
    stages = {**planner.seconds, "fitting": t2 - t1}
    methods = sorted({lp.method for lp in plan.layers if lp.factored})
    return {"layers": layers, "sentences": sentences, "seq": seq, "tokens": sentences * seq,
            "seconds": t2 - t0, "stages": stages, "fraction": plan.fraction, "methods": methods,
            "load": os.getloadavg()[0]}


def key(r: dict) -> str:
    return f"{r['layers']}x{r['sentences']}x{r['seq']}"


def table(rows: list[dict]) -> str:
    stages = sorted({s for r in rows for s in r["stages"]}, key=lambda s: list(rows[0]["stages"]).index(s)
                    if s in rows[0]["stages"] else 99)
    head = ["blocks", "tokens", "total s", *stages, "s/block", "s/1k tokens", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["layers"], r["tokens"])):
        cells = [str(r["layers"]), f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                 *(f"{r['stages'].get(s, 0.0):.1f}" for s in stages),
                 f"{r['seconds'] / r['layers']:.2f}", f"{r['seconds'] / r['tokens'] * 1e3:.2f}", f"{r['load']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (x, group, xlabel) in zip(axes, (("layers", "tokens", "transformer blocks"),
                                             ("tokens", "layers", "calibration tokens"))):
        for g in sorted({r[group] for r in rows}):
            pts = sorted((r[x], r["seconds"]) for r in rows if r[group] == g)
            if len(pts) < 2:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", label=f"{g:,} {'tokens' if group == 'tokens' else 'blocks'}")
            ax.plot(xs, [ys[0] * v / xs[0] for v in xs], ":", color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({r[x] for r in rows}))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("compression seconds (plan + apply)")
        ax.legend(fontsize=8)
    axes[0].set_title("time vs blocks (dotted: linear)")
    axes[1].set_title("time vs tokens (dotted: linear)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4,8")
    ap.add_argument("--sentences", default="128,256,512")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="bench/results/compress_scaling.json")
    ap.add_argument("--plot", default=None, help="write the plot of every cached run here (and run nothing new "
                                                 "unless --layers/--sentences are given too)")
    ap.add_argument("--only-plot", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    cache = json.loads(path.read_text()) if path.exists() else {}
    if not args.only_plot:
        for layers in (int(v) for v in args.layers.split(",")):
            for sentences in (int(v) for v in args.sentences.split(",")):
                r = run(layers, sentences, args.seq)
                cache[key(r)] = r
                print(f"{layers} blocks, {r['tokens']:,} tokens: {r['seconds']:.1f} s "
                      f"({', '.join(f'{k} {v:.1f}' for k, v in r['stages'].items())}), load {r['load']:.1f}",
                      flush=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cache, indent=1))
    rows = list(cache.values())
    if rows:
        print(table(rows))
    if args.plot and rows:
        plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
