"""Peak memory of ``tensorfold compress`` on randomly initialised BERT encoders of growing size, and the
memory model that says how large a model fits on this machine.

Each size is a transformers encoder directory (``BertModel`` from a config, MiniLM's tokenizer files beside
it) compressed from the CLI, exactly as a user would: ``tensorfold compress --model DIR --calib-data
FILE --calib N --budget 0.5 --no-speed``; the job records in metrics.json the peak resident memory after
each stage (load, plan, apply, evaluate) and the tensor bytes of the original and compressed model.

Memory model of the one-pass planner (models without recognised transformer blocks; before session 6
every model): it holds, at its peak, the original model, one float64 input Gram matrix per compressed
Linear layer (all layers at once: ``in_features**2 * 8`` bytes each), and working copies of both
(candidate fits, sensitivity runs, block statistics) that grow with them. (Where blocks are recognised the
planner now holds one block's Gram matrices at a time: compression/onload.py; bench/compress_bertbase.py
measures both paths. There the peak is ``0.4 GB + 4 bytes x params x (2 copies while fitting) + one
block's working set`` (1.2-1.5 GB at BERT-large width; a finished 335M run peaked at 4.33 GB,
docs/export.md "Memory"): about 2B parameters fit in 22 GB; this model's ceiling is the one-pass planner's.) So

    peak - start  ~=  c * (model_mb + grams_mb)

with ``c`` fitted on one size (``--fit-on``) and checked on the others (the relative error is printed).
``--ceiling`` then solves it for the largest BERT-shaped encoder (hidden H, 4H feed-forward, H/64 heads,
L = H/64 layers like BERT-base/large) and Llama-shaped decoder whose predicted peak fits in ``--ram-gb``.

    flock /tmp/tf-cpu.lock .venv/bin/python bench/memory.py --sizes 256x4
    flock /tmp/tf-cpu.lock .venv/bin/python bench/memory.py --sizes 512x2
    flock /tmp/tf-cpu.lock .venv/bin/python bench/memory.py --sizes 768x2
    .venv/bin/python bench/memory.py --fit --ram-gb 22
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VOCAB = 30522


def bert_dir(root: Path, hidden: int, layers: int) -> Path:
    """A random BERT encoder (seed 0) with ``hidden`` width and ``layers`` blocks saved under ``root``."""
    import torch
    from transformers import BertConfig, BertModel

    from tensorfold.zoo import minilm

    path = root / f"bert-{hidden}x{layers}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        architectures=["BertModel"])
    BertModel(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(minilm.model_path()) / name, path / name)
    return path


def grams_mb(hidden: int, layers: int, ffn: int | None = None, decoder: bool = False) -> float:
    """MB of the float64 input Gram matrices the planner holds at once (one per compressed Linear layer):
    an encoder block's q, k, v, o and up projections read width ``hidden``, its down projection ``ffn``;
    a Llama block's q, k, v, o, gate and up read ``hidden``, down ``ffn``."""
    ffn = ffn or 4 * hidden
    per_block = (6 if decoder else 5) * hidden**2 + ffn**2
    return layers * per_block * 8 / 2**20


def params(hidden: int, layers: int, ffn: int | None = None, decoder: bool = False, vocab: int = VOCAB) -> int:
    ffn = ffn or 4 * hidden
    block = 4 * hidden**2 + (3 if decoder else 2) * hidden * ffn
    if decoder:  # untied embedding and LM head
        return layers * block + 2 * vocab * hidden
    # biases and layer norms, 512 positions, 2 token types and the embedding norm, the pooler
    return layers * (block + 9 * hidden + ffn) + (vocab + 516) * hidden + hidden**2 + hidden


def run(args, hidden: int, layers: int) -> dict:
    from tensorfold.zoo import minilm

    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    path = bert_dir(root, hidden, layers)
    text = root / "text.txt"
    if not text.is_file():
        train, _ = minilm.finetune_text(0, max_train=2 * args.calib + 64)
        text.write_text("\n".join(train) + "\n")
    out = root / f"out-{hidden}x{layers}"
    load = os.getloadavg()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "tensorfold", "compress", "--model", str(path), "--calib-data", str(text),
           "--calib", str(args.calib), "--budget", "0.5", "--no-speed", "--overwrite", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    metrics = json.loads((out / "metrics.json").read_text())
    row = {"hidden": hidden, "layers": layers, "params": metrics["params_original"], "calib": args.calib,
           "seconds": time.perf_counter() - t0, "grams_mb": grams_mb(hidden, layers), **metrics["memory"],
           "load_before": load[0], "load_after": os.getloadavg()[0],
           "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(row, indent=1))
    return row


def fit(results: dict[str, dict], ram_gb: float, fit_on: str) -> None:
    base = results[fit_on]
    c = (base["peak_rss_mb"] - base["peak_rss_mb_at_start"]) / (base["model_mb"] + base["grams_mb"])
    print(f"peak - start = c * (model MB + grams MB), c = {c:.2f} (fitted on {fit_on})")
    print("| encoder | params | model MB | grams MB | start MB | peak MB | predicted MB | error | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results.values(), key=lambda r: r["params"]):
        pred = r["peak_rss_mb_at_start"] + c * (r["model_mb"] + r["grams_mb"])
        print(f"| {r['hidden']}x{r['layers']} | {r['params'] / 1e6:.1f}M | {r['model_mb']:.0f} | {r['grams_mb']:.0f} | "
              f"{r['peak_rss_mb_at_start']:.0f} | {r['peak_rss_mb']:.0f} | {pred:.0f} | "
              f"{(pred - r['peak_rss_mb']) / r['peak_rss_mb']:+.1%} | {r['seconds']:.0f} |")
    start = max(r["peak_rss_mb_at_start"] for r in results.values())
    budget = ram_gb * 1024

    def peak(h, layers, ffn=None, decoder=False, vocab=VOCAB):
        model_mb = params(h, layers, ffn, decoder, vocab) * 4 / 2**20
        return start + c * (model_mb + grams_mb(h, layers, ffn, decoder))

    h = 64
    while peak(h + 64, (h + 64) // 64) <= budget:
        h += 64
    print(f"largest BERT-shaped encoder (H/64 layers, 4H FFN) within {ram_gb} GB: hidden {h}, {h // 64} layers, "
          f"{params(h, h // 64) / 1e6:.0f}M parameters (predicted peak {peak(h, h // 64) / 1024:.1f} GB)")
    shapes = {"BERT-base": (768, 12, 3072, False), "BERT-large": (1024, 24, 4096, False),
              "Qwen2.5-0.5B shape": (896, 24, 4864, True), "TinyLlama-1.1B shape": (2048, 22, 5632, True),
              "Llama-2-7B shape": (4096, 32, 11008, True)}
    for name, (hid, layers, ffn, dec) in shapes.items():
        vocab = 32000 if dec else VOCAB
        full = peak(hid, layers, ffn, dec, vocab)
        one_block = full - c * grams_mb(hid, layers - 1, ffn, dec)
        print(f"{name}: {params(hid, layers, ffn, dec, vocab) / 1e6:.0f}M parameters, grams "
              f"{grams_mb(hid, layers, ffn, dec) / 1024:.1f} GB, predicted peak {full / 1024:.1f} GB; with one "
              f"block's grams at a time {one_block / 1024:.1f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="", help="HIDDENxLAYERS,... to compress")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--work", default="/tmp/tf-memory-bench")
    ap.add_argument("--json", default="bench/results/memory.json")
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--fit-on", default="512x2", help="the size the memory model's constant is fitted on")
    ap.add_argument("--ram-gb", type=float, default=22.0)
    args = ap.parse_args()
    results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    for size in (s for s in args.sizes.split(",") if s):
        hidden, layers = (int(x) for x in size.split("x"))
        results[size] = run(args, hidden, layers)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.fit:
        fit(results, args.ram_gb, args.fit_on)


if __name__ == "__main__":
    main()
