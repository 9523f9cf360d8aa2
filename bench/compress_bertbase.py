"""Compression time of a BERT-base-size encoder (110M parameters) with the default menus.

A randomly initialised ``transformers.BertModel(BertConfig())`` (12 layers, 768 wide, 12 heads, 3072
intermediate, 30,522-token vocabulary: 109.5M parameters) is planned and fitted at 50% of its encoder
Linear parameters with ``--calib`` calibration sentences of real English (MiniLM's calibration text,
tokenized with its BERT-uncased tokenizer: the vocabulary is BERT-base's). Printed: the time of every
stage (calibration, menus, sensitivities, block menus, fitting), the methods chosen, the peak memory,
and the output fidelity on held-out sentences (mean cosine of mean-pooled last hidden states; a random
model, so this only shows the fitting works).

Run: .venv/bin/python bench/compress_bertbase.py [--calib 512] [--layers 12] [--budget 0.5]

Peak memory of other shapes: ``--hidden 1024 --layers 24 --heads 16`` is BERT-large (335M; the feed-forward
width is 4x the hidden size); ``--plan-only`` stops after planning; ``--one-pass`` plans from every layer's
statistics collected at once (the planner's path before sequential onloading) instead of block by block;
``--methods`` the planner's methods (default: the default menus); ``--arch llama`` a decoder (``LlamaModel``,
no LM head: ``--hidden 896 --heads 14 --kv-heads 2 --ffn 4864 --vocab 151936 --layers 24`` is
Qwen2.5-0.5B's shape, 494M parameters); ``--trace`` a line per block planned and fitted with the resident
and peak resident memory (VmRSS, VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections import Counter

# idle OpenMP threads sleep instead of spinning (as the tensorfold command sets): read when torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def pooled(model, batches) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def _memory() -> str:
    """Resident and peak resident memory of this process (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return ", ".join(f"{k} {int(v.split()[0]) / 1024:.0f} MB" for k, v in fields.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--methods", default=None, help="the planner's methods (default: the default menus)")
    ap.add_argument("--plan-only", action="store_true", help="stop after planning")
    ap.add_argument("--one-pass", action="store_true",
                    help="every layer's statistics at once (the planner before sequential onloading)")
    ap.add_argument("--arch", choices=("bert", "llama"), default="bert",
                    help="llama: a LlamaModel decoder (no LM head) from --hidden/--heads/--kv-heads/--ffn/--vocab")
    ap.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads (default: --heads)")
    ap.add_argument("--ffn", type=int, default=None, help="feed-forward width (default: 4x --hidden)")
    ap.add_argument("--vocab", type=int, default=30522, help="vocabulary size (the token ids are BERT's)")
    ap.add_argument("--trace", action="store_true",
                    help="a line per block planned and per block fitted: time, resident and peak memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    import tensorfold as tf
    from tensorfold.compression.api import Planner
    from tensorfold.zoo import minilm

    torch.manual_seed(0)
    ffn = args.ffn or 4 * args.hidden
    if args.arch == "llama":  # Qwen2.5-0.5B's shape: --hidden 896 --heads 14 --kv-heads 2 --ffn 4864 --vocab 151936
        model = LlamaModel(LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=ffn,
                                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                                       vocab_size=args.vocab)).eval()
    else:
        model = BertModel(BertConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, vocab_size=args.vocab,
                                     num_attention_heads=args.heads, intermediate_size=ffn)).eval()
    Planner.sequential = not args.one_pass
    params = sum(p.numel() for p in model.parameters())
    calib = minilm.calibration(args.calib, seed=0)
    held_out = [minilm.tokenize(list(minilm.eval_sentences()[i:i + 32])) for i in range(0, 128, 32)]
    if args.arch == "llama":  # a decoder takes no segment ids
        calib, held_out = ([{k: v for k, v in b.items() if k != "token_type_ids"} for b in bs]
                           for bs in (calib, held_out))
    load = os.getloadavg()[0]
    peak_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    seen: set[str] = set()

    def progress(stage: str, done: int, total: int) -> None:  # a line per stage, as it starts
        if stage not in seen:
            seen.add(stage)
            print(f"  {time.perf_counter() - t0:7.1f} s: {stage} ({total} steps)", flush=True)
        elif args.trace and stage in ("calibration", "fitting") and (stage == "calibration" or done % 6 == 0):
            print(f"  {time.perf_counter() - t0:7.1f} s: {stage} {done}/{total}, {_memory()}, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)

    settings = {"methods": args.methods} if args.methods else {}
    planner = Planner(model, tf.CompressConfig(budget=args.budget, curve=False, **settings), calib=calib,
                      output_fn=lambda o: o.last_hidden_state, progress=progress)
    plan = planner.plan()
    t1 = time.perf_counter()
    peak_plan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"planned in {t1 - t0:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in planner.seconds.items())
          + f"); peak memory {peak_plan:.0f} MB (at the start {peak_start:.0f} MB); {params / 1e6:.1f}M parameters, "
          f"{'one pass' if args.one_pass else 'block by block'}", flush=True)
    if args.plan_only:
        result = {"arch": args.arch, "params": params, "hidden": args.hidden, "layers": args.layers,
                  "calib": args.calib,
                  "methods": args.methods or "default", "one_pass": args.one_pass, "plan_s": t1 - t0,
                  "stages": planner.seconds, "peak_rss_mb_start": peak_start, "peak_rss_mb_plan": peak_plan,
                  "fraction": plan.fraction, "load_start": load, "load_end": os.getloadavg()[0]}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    small = tf.apply(model, plan, calib, progress=progress)
    t2 = time.perf_counter()
    a, b = pooled(model, held_out), pooled(small, held_out)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double()).mean()
    result = {
        "arch": args.arch, "params": params, "hidden": args.hidden, "layers": args.layers, "calib": args.calib,
        "budget": args.budget,
        "one_pass": args.one_pass, "peak_rss_mb_start": peak_start,
        "fraction": plan.fraction, "compression_s": t2 - t0, "plan_s": t1 - t0,
        "stages": {**planner.seconds, "fitting": t2 - t1},
        "methods": dict(Counter(lp.method for lp in plan.layers)), "mean_cos_held_out": float(cos),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_mb_plan": peak_plan,
        "load_start": load, "load_end": os.getloadavg()[0],
    }
    print(f"{params / 1e6:.1f}M parameters, {args.layers} layers, {args.calib} calibration sentences, "
          f"budget {args.budget}: compression {result['compression_s']:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in result["stages"].items()) + ")")
    print(f"kept {plan.fraction:.3f} of the encoder Linear parameters; methods {result['methods']}; "
          f"held-out mean cos {cos:.3f}; peak memory {result['peak_rss_mb']:.0f} MB "
          f"({peak_plan:.0f} MB by the end of planning); "
          f"load {load:.1f} -> {result['load_end']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
