"""Tensorized adapters against PEFT's LoRA: accuracy vs trainable parameters, and training step time.

Three shipped tasks, each a pretrained model adapted to a shifted task with everything but the
adapters frozen (batch-norm statistics too: the models stay in eval mode, so only the adapters move):

  digits   the digits CNN (scikit-learn digits) on a transformed digit set: moved one pixel right,
           blurred (3x3 binomial) and brightened (1.5 sqrt(x)) (train 1,197 / test 300 transformed images)
  shapes   ResNet-20 of the procedural shapes task on a shifted procedural domain: a fixed colour mix
           of the channels and a saturating contrast curve (train 1,024 / test 1,000 shifted images)
  minilm   all-MiniLM-L6-v2 on a sentence-pair task written here (:func:`sentence_pairs`): does the
           second sentence state the same fact as the first (passive voice, synonym, cleft) or not
           (negation, swapped roles)? Logit = a * cos(u, v) + b with a, b trained in every run.

Per task: LoRA at rank 8 (PEFT's and ours), PEFT LoRA at a quarter of those parameters, and the
tensor adapters (ours: tt, tucker, cp, tr, and LoTR = Tucker-2 with factors shared across layers of one
shape) at the largest rank within a quarter of LoRA-8's parameters; ``--seeds`` seeds each (adapter
init and batch order), Adam with one learning rate per task for every method. Step time: ``--timing``
measures every method's median seconds per training step, interleaved round by round in one process.

    .venv/bin/python bench/adapters.py --task digits --json bench/results/adapters.json
    .venv/bin/python bench/adapters.py --task shapes --methods peft-lora-8,tt --json ...
    .venv/bin/python bench/adapters.py --report bench/results/adapters.json     # the markdown table

Rows already in the JSON file are reused, so a run can be split (each part under the CPU lock).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tensorfold as tf
from tensorfold.adapters import describe, trainable_parameters

RANK_REF = 8
TENSOR_METHODS = ("tt", "tucker", "cp", "tr")
ALL_METHODS = ("peft-lora-8", "lora-8", "peft-lora-small", "tt", "tucker", "cp", "tr", "lotr", "head-only")
N_CORES = {"tt": 3, "tr": 3, "tucker": 2, "cp": 3}


# ---- tasks ------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    model: nn.Module
    targets: list[str]
    train: list  # batches
    test: list
    steps: int
    lr: float
    saved: tuple[str, ...] = ()  # modules trained in full in every run (the pair head)

    def loss(self, model, batch) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        correct = total = 0
        for inputs, labels in self.test:
            correct += int((model(inputs).argmax(-1) == labels).sum())
            total += len(labels)
        return correct / total


def _image_batches(images, labels, batch, seed=None):
    order = torch.arange(len(labels)) if seed is None else torch.randperm(
        len(labels), generator=torch.Generator().manual_seed(seed))
    return [(images[order[i:i + batch]], labels[order[i:i + batch]]) for i in range(0, len(labels), batch)]


def _layer_names(model, types=(nn.Linear, nn.Conv2d)) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, types)]


_BLUR = torch.tensor([[[[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]]]) / 16


def digits_task() -> Task:
    from tensorfold.zoo.vision import load_model
    from tensorfold.zoo.vision_data import load_split

    splits = load_split("digits", 0)

    def shift(x):
        moved = torch.roll(x, 1, dims=3)
        blurred = F.conv2d(moved, _BLUR.to(x.dtype), padding=1)
        return (blurred.clamp(0.0, 1.0) ** 0.5 * 1.5).contiguous()

    model = load_model("digits-cnn").eval()
    train = _image_batches(shift(splits.train.images), splits.train.labels, 64, seed=0)
    test = _image_batches(shift(splits.test.images), splits.test.labels, 300)
    return Task("digits", model, _layer_names(model), train, test, steps=150, lr=2e-2)


_MIX = torch.tensor([[0.2, 0.9, -0.3], [-0.5, 0.3, 0.8], [0.7, -0.4, 0.4]])


def shapes_task() -> Task:
    from tensorfold.zoo.vision import load_model
    from tensorfold.zoo.vision_data import load_split

    splits = load_split("shapes", 0)

    def shift(x):
        return (torch.tanh(torch.einsum("oc,nchw->nohw", _MIX, x)) * 2.0).contiguous()

    model = load_model("resnet20-shapes").eval()
    train = _image_batches(shift(splits.train.images[:1024]), splits.train.labels[:1024], 64, seed=0)
    test = _image_batches(shift(splits.test.images), splits.test.labels, 500)
    return Task("shapes", model, _layer_names(model), train, test, steps=48, lr=5e-3)


# The sentence-pair task: a fact and a restatement of it (label 1) or of something else (label 0).
_PEOPLE = ("the doctor", "the teacher", "my neighbour", "the pilot", "a farmer", "the lawyer", "our manager",
           "the child", "the singer", "a tourist", "the nurse", "the mayor")
# (past, base form, past participle, synonym phrase in the past)
_VERBS = (("visited", "visit", "visited", "went to see"), ("helped", "help", "helped", "assisted"),
          ("called", "call", "called", "phoned"), ("praised", "praise", "praised", "complimented"),
          ("followed", "follow", "followed", "went after"), ("warned", "warn", "warned", "cautioned"),
          ("thanked", "thank", "thanked", "expressed gratitude to"), ("hired", "hire", "hired", "employed"),
          ("blamed", "blame", "blamed", "held responsible"), ("invited", "invite", "invited", "asked over"))
_WHEN = ("", " yesterday", " last week", " on monday", " this morning")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence_pairs(split: str) -> list[tuple[str, str, int]]:
    """The pair task: ``(first, second, label)``; train and test use disjoint (subject, verb, object) facts.

    Same fact (1): passive voice, synonym verb, cleft sentence. Different fact (0): negation, swapped
    roles (active or passive). Balanced; a pure function of ``split``.
    """
    facts = [(s, v, o) for s, o in itertools.permutations(range(len(_PEOPLE)), 2) for v in range(len(_VERBS))]
    gen = torch.Generator().manual_seed(20261130)
    order = torch.randperm(len(facts), generator=gen).tolist()
    chosen = order[:400] if split == "train" else order[400:700]
    pairs = []
    for k, index in enumerate(chosen):
        s, v, o = facts[index]
        subj, obj = _PEOPLE[s], _PEOPLE[o]
        past, base, pp, syn = _VERBS[v]
        when = _WHEN[k % len(_WHEN)]
        first = _cap(f"{subj} {past} {obj}{when}.")
        same = (_cap(f"{obj} was {pp} by {subj}{when}."), _cap(f"{subj} {syn} {obj}{when}."),
                _cap(f"it was {subj} who {past} {obj}{when}."))
        other = (_cap(f"{subj} did not {base} {obj}{when}."), _cap(f"{obj} {past} {subj}{when}."),
                 _cap(f"{subj} was {pp} by {obj}{when}."))
        pairs.append((first, same[k % 3], 1))
        pairs.append((first, other[(k // 3) % 3], 0))
    return pairs


class PairHead(nn.Module):
    """Logit of 'same fact' from the cosine of the two sentence embeddings."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.shift = nn.Parameter(torch.tensor(-8.0))

    def forward(self, u, v):
        return self.scale * F.cosine_similarity(u, v, dim=-1) + self.shift


class PairModel(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = PairHead()

    def forward(self, first: dict, second: dict) -> torch.Tensor:
        u = self.encoder(dict(first))["sentence_embedding"]
        v = self.encoder(dict(second))["sentence_embedding"]
        return self.head(u, v)


def minilm_task() -> Task:
    from tensorfold.zoo import minilm

    encoder = minilm.load()
    model = PairModel(encoder).eval()

    def batches(pairs, batch, seed):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        out = []
        for i in range(0, len(pairs), batch):
            chunk = [pairs[j] for j in order[i:i + batch]]
            first = minilm.tokenize([p[0] for p in chunk], encoder)
            second = minilm.tokenize([p[1] for p in chunk], encoder)
            out.append(((first, second), torch.tensor([float(p[2]) for p in chunk])))
        return out

    task = Task("minilm", model, ["query", "value"], batches(sentence_pairs("train"), 32, 0),
                batches(sentence_pairs("test"), 100, 0), steps=60, lr=5e-3, saved=("head",))
    return task


class _PairTask(Task):
    def loss(self, model, batch):
        (first, second), labels = batch
        return F.binary_cross_entropy_with_logits(model(first, second), labels)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        correct = total = 0
        for (first, second), labels in self.test:
            correct += int(((model(first, second) > 0).float() == labels).sum())
            total += len(labels)
        return correct / total


TASKS = {"digits": digits_task, "shapes": shapes_task, "minilm": minilm_task}


def load_task(name: str) -> Task:
    task = TASKS[name]()
    if name == "minilm":
        task.__class__ = _PairTask
    return task


# ---- methods ----------------------------------------------------------------------------------------


def _adapter_count(model, config) -> int:
    summary = describe(model, config)
    saved = sum(p.numel() for n in summary.saved_modules for p in model.get_submodule(n).parameters())
    return summary.trainable - saved


def lora_count(task: Task, rank: int) -> int:
    return _adapter_count(task.model, _config(task, "lora", rank))


def _config(task: Task, method: str, rank: int, seed: int = 0) -> tf.AdapterConfig:
    if method == "lotr":  # LoTR: Tucker-2 per layer, factor matrices shared by layers of one shape
        return tf.AdapterConfig(method="tucker", rank=rank, target_modules=task.targets, share_factors=True,
                                modules_to_save=task.saved, n_cores=1, seed=seed)
    return tf.AdapterConfig(method=method, rank=rank, target_modules=task.targets, modules_to_save=task.saved,
                            n_cores=N_CORES.get(method, 1), seed=seed)


def best_rank(task: Task, method: str, budget: int) -> int:
    """The largest rank whose adapter parameters fit ``budget`` (1 if none does)."""
    best = 1
    for rank in range(1, 65):
        if _adapter_count(task.model, _config(task, method, rank)) <= budget:
            best = rank
    return best


def build(task: Task, label: str, seed: int) -> tuple[nn.Module, int, str]:
    """``(model, rank, description)`` for a method label, adapters initialised from ``seed``."""
    budget = lora_count(task, RANK_REF) // 4
    if label.startswith("peft-lora"):
        import peft

        rank = RANK_REF if label == "peft-lora-8" else max(1, RANK_REF // 4)
        torch.manual_seed(seed)  # PEFT draws its init from torch's global generator
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=task.targets,
                                 modules_to_save=list(task.saved) or None, lora_dropout=0.0)
        import copy

        return peft.get_peft_model(copy.deepcopy(task.model), config), rank, f"PEFT LoRA r={rank}"
    if label == "head-only":  # the pair head alone: what the frozen encoder gives
        import copy

        model = copy.deepcopy(task.model)
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(f"{s}.") for s in task.saved))
        return model, 0, "no adapter, head trained"
    if label == "lora-8":
        return tf.adapt(task.model, _config(task, "lora", RANK_REF, seed)), RANK_REF, f"ours LoRA r={RANK_REF}"
    rank = best_rank(task, label, budget)
    cores = N_CORES.get(label, 1)
    text = f"ours LoTR (shared tucker) r={rank}" if label == "lotr" else f"ours {label} r={rank} n_cores={cores}"
    return tf.adapt(task.model, _config(task, label, rank, seed)), rank, text


def adapter_params(model: nn.Module, task: Task) -> int:
    saved = 0
    for name in task.saved:
        for n, p in model.named_parameters():
            if p.requires_grad and (f".{name}." in f".{n}"):
                saved += p.numel()
    return trainable_parameters(model)[0] - saved


def train(task: Task, model: nn.Module, seed: int) -> float:
    """Adam on the trainable parameters for ``task.steps`` steps; returns the median step time (s)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=task.lr)
    model.eval()  # batch-norm statistics frozen, no dropout: only the adapters change
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed)).tolist()
    times = []
    for step in range(task.steps):
        batch = task.train[order[step % len(order)]]
        if step % len(order) == len(order) - 1:
            order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed + step)).tolist()
        start = time.perf_counter()
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def time_steps(task: Task, methods, rounds: int = 5, steps: int = 6) -> dict[str, float]:
    """Median seconds per training step of each method, the methods interleaved round by round so that a
    change of machine load hits them all alike."""
    models = {label: build(task, label, 0)[0] for label in methods}
    optimizers = {label: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for label, m in models.items()}
    samples: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(rounds):
        for label, model in models.items():
            model.eval()
            for step in range(steps):
                batch = task.train[step % len(task.train)]
                start = time.perf_counter()
                loss = task.loss(model, batch)
                optimizers[label].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[label].step()
                if step > 0:  # the first step of a round warms caches after the other methods ran
                    samples[label].append(time.perf_counter() - start)
    return {label: statistics.median(v) for label, v in samples.items()}


# ---- driver -----------------------------------------------------------------------------------------


def run(task_name: str, methods, seeds: int, path: Path | None, lr: float | None = None,
        steps: int | None = None) -> list[dict]:
    rows = json.loads(path.read_text()) if path and path.exists() else []
    task = load_task(task_name)
    if lr is not None:
        task.lr = lr
    if steps is not None:  # a different training budget is a different table
        task.steps = steps
        task_name = f"{task_name}@{steps}steps"
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    base_key = (task_name, "none", 0)
    if base_key not in done:
        rows.append({"task": task_name, "method": "none", "seed": 0, "accuracy": task.accuracy(task.model),
                     "params": 0, "rank": 0, "describe": "frozen model, no adapter", "step_s": None})
        _save(rows, path)
    for label, seed in itertools.product(methods, range(seeds)):
        if (task_name, label, seed) in done:
            continue
        model, rank, text = build(task, label, seed)
        step = train(task, model, seed)
        row = {"task": task_name, "method": label, "seed": seed, "accuracy": task.accuracy(model),
               "params": adapter_params(model, task), "rank": rank, "describe": text, "step_s": step}
        print(json.dumps(row), flush=True)
        rows.append(row)
        _save(rows, path)
    return rows


def _save(rows, path):
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))


def report(rows: list[dict]) -> str:
    """A markdown table per task: mean +- std accuracy over seeds, adapter parameters, step time vs LoRA."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task and r["method"] != "timing"]
        base = task.split("@")[0]  # a run with other --steps shares its task's step timing
        timing = next((r["step_s"] for r in rows if r["task"] == base and r["method"] == "timing"), {})
        groups: dict[str, list[dict]] = {}
        for r in mine:
            groups.setdefault(r["method"], []).append(r)

        # the interleaved timing when measured, else the training runs' median
        steps = {label: timing.get(label, _mean([r["step_s"] for r in rs])) for label, rs in groups.items()}
        ref_step, small_step = steps.get("peft-lora-8"), steps.get("peft-lora-small")
        ref_params = groups["peft-lora-8"][0]["params"] if "peft-lora-8" in groups else None
        source = "interleaved --timing run" if timing else "median of the training runs"
        out.append(f"\n**{task}** (step time: {source})\n")
        out.append("| method | adapter params | / LoRA-8 | accuracy (mean ± std, n) | step ms | step / PEFT LoRA-8 | "
                   "step / PEFT LoRA equal-params |")
        out.append("|---|---:|---:|---|---:|---:|---:|")
        for label, rs in groups.items():
            accs = [r["accuracy"] for r in rs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            step = steps[label]
            ratio = f"{step / ref_step:.2f}" if step and ref_step else ""
            ratio_small = f"{step / small_step:.2f}" if step and small_step else ""
            ms = f"{1000 * step:.1f}" if step else ""
            share = f"{rs[0]['params'] / ref_params:.2f}" if ref_params and rs[0]["params"] else ""
            out.append(f"| {rs[0]['describe']} | {rs[0]['params']:,} | {share} | {statistics.mean(accs):.3f} ± "
                       f"{spread:.3f} ({len(accs)}) | {ms} | {ratio} | {ratio_small} |")
    return "\n".join(out)


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS))
    parser.add_argument("--methods", default=",".join(m for m in ALL_METHODS if m != "head-only"),
                        help="comma-separated; head-only (minilm: the pair head alone) is not in the default")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the task's training steps")
    parser.add_argument("--timing", action="store_true", help="interleaved step-time measurement only")
    parser.add_argument("--lr", type=float, default=None, help="override the task's learning rate")
    parser.add_argument("--report", type=Path, default=None, help="print the markdown table of a results file")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    if not args.task:
        parser.error("--task is required unless --report is given")
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    if args.timing:
        task = load_task(args.task)
        times = time_steps(task, methods)
        rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
        old = [r for r in rows if r["task"] == args.task and r["method"] == "timing"]
        merged = {**(old[0]["step_s"] if old else {}), **times}  # methods timed again replace their entry
        rows = [r for r in rows if r not in old]
        rows.append({"task": args.task, "method": "timing", "seed": 0, "step_s": merged})
        _save(rows, args.json)
        print(json.dumps(times))
        return 0
    rows = run(args.task, methods, args.seeds, args.json, lr=args.lr, steps=args.steps)
    print(report([r for r in rows if r["task"].split("@")[0] == args.task]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
