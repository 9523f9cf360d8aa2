"""Your own model and your own text: Hugging Face directories and calibration text files.

:func:`load_model` opens a local directory offline, never downloading and never running code from it
(``trust_remote_code`` is always off): a sentence-transformers directory (``modules.json``) becomes a
``SentenceTransformer``; a transformers directory (``config.json``) the Auto class its ``architectures``
name: an encoder (``AutoModel``), a sequence classifier or a causal language model. A hub name is
accepted only when its snapshot is already in the local Hugging Face cache.

:func:`read_texts` reads calibration text from ``.txt`` (one sample a line), ``.jsonl`` (a ``text``
field, or another) or ``.csv`` (a column) and :func:`split_texts` splits it, seeded, into calibration,
fine-tuning and held-out evaluation parts. :func:`entry` bundles model, data and the quality metrics of
the model's kind into a :class:`~tensorfold.zoo.BuiltinModel`, the object ``tensorfold compress`` runs on.

>>> from tensorfold.zoo import hf
>>> parts = hf.split_texts([f"sentence {i}" for i in range(100)], seed=0)
>>> len(parts.calibration) + len(parts.finetune), len(parts.evaluation)
(80, 20)
>>> model = hf.load_model("path/to/all-MiniLM-L6-v2")     # a SentenceTransformer  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tensorfold.errors import FileFormatError, InvalidArgumentError, TensorfoldError
from tensorfold.zoo import BuiltinModel

KINDS = ("sentence-transformers", "encoder", "classifier", "causal-lm")
# layers a plan skips by default, per kind: heads whose size is set by the vocabulary or the labels
# (a tied LM head shares its weight with the embedding: factoring it adds parameters) and the BERT pooler,
# whose output a sentence embedding does not use
EXCLUDE = {
    "sentence-transformers": ("*pooler*",),
    "encoder": ("*pooler*",),
    "classifier": ("*classifier*", "*score*"),
    "causal-lm": ("*lm_head*",),
}
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
MIN_SAMPLES = 10  # calibration needs a few samples and the held-out part at least two
MAX_LENGTH = 128  # tokens per sample for calibration, fine-tuning and evaluation


# ---- opening a directory --------------------------------------------------------------------------


def resolve_path(path: str | os.PathLike) -> Path:
    """The local directory for ``path``: a directory, or a hub name found in the local cache only."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "modules.json").is_file() and not (p / "config.json").is_file():
            raise FileFormatError(
                f"{p} is not a model directory: it has neither modules.json (sentence-transformers) nor "
                f"config.json (transformers)"
            )
        return p.resolve()
    if p.exists():
        raise FileFormatError(f"{p} is a file; give the model's directory")
    name = str(path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        cached = _cached_snapshot(name)
        if cached is not None:
            return cached
        raise FileFormatError(
            f"{name!r} is not a local directory and not in the local Hugging Face cache; tensorfold never "
            f"downloads: fetch it first (huggingface-cli download {name}) or pass the model's directory"
        )
    raise FileFormatError(f"{p}: no such model directory")


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or an invalid name: both mean "not here"
        return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: expected a JSON object")
    return data


def detect_kind(path: str | os.PathLike) -> str:
    """``sentence-transformers``, ``encoder``, ``classifier`` or ``causal-lm``, from the directory's files."""
    p = resolve_path(path)
    if (p / "modules.json").is_file():
        return "sentence-transformers"
    config = _read_json(p / "config.json")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise FileFormatError(f"{p / 'config.json'}: 'architectures' must be a list of class names")
    for arch in archs:
        if not isinstance(arch, str):
            continue
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "classifier"
    return "encoder"


@contextlib.contextmanager
def _offline_and_quiet():
    """No network and no progress bars while loading (both restored afterwards)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _auto_class(kind: str):
    import transformers

    return {
        "encoder": transformers.AutoModel,
        "classifier": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[kind]


def linearize_conv1d(model: torch.nn.Module) -> torch.nn.Module:
    """Replace GPT-2 style ``Conv1D`` layers (weight stored in x out) by the equal ``nn.Linear`` (in place).

    The factorized layers and the planner work on ``nn.Linear``; the two compute the same function.
    """
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
            continue
        n_in, n_out = module.weight.shape
        linear = torch.nn.Linear(n_in, n_out, bias=module.bias is not None, dtype=module.weight.dtype,
                                 device=module.weight.device)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def load_model(path: str | os.PathLike):
    """The model in a local directory (see the module docs), on the CPU in float32, in eval mode.

    Returns a ``SentenceTransformer`` for a sentence-transformers directory, else a transformers model
    (``AutoModel``, ``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM`` as the config's
    ``architectures`` say). GPT-2's ``Conv1D`` layers are turned into the equal ``nn.Linear``.
    """
    p = resolve_path(path)
    kind = detect_kind(p)
    try:
        with _offline_and_quiet():
            if kind == "sentence-transformers":
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(p), device="cpu", local_files_only=True, trust_remote_code=False)
            else:
                model = _auto_class(kind).from_pretrained(str(p), local_files_only=True, trust_remote_code=False,
                                                          dtype=torch.float32)
    except ImportError as exc:
        raise TensorfoldError(f"loading {p} needs transformers and sentence-transformers: {exc}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{p}: cannot load the model offline ({type(exc).__name__}: {first})") from None
    model = linearize_conv1d(model.to("cpu"))
    model.eval()
    return model


# ---- tokenizing -----------------------------------------------------------------------------------


class Tokenize:
    """Turns lists of strings into the input batch the model's forward takes (a dict of tensors)."""

    def __init__(self, model, kind: str, path: Path, max_length: int = MAX_LENGTH):
        self.kind = kind
        self.max_length = max_length
        if kind == "sentence-transformers":
            self._st = model
            self.tokenizer = None
            return
        from transformers import AutoTokenizer

        with _offline_and_quiet():
            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError, KeyError) as exc:
                raise FileFormatError(f"{path}: no usable tokenizer ({type(exc).__name__}: {exc})") from None
        if tok.pad_token is None:
            # causal LMs often ship without a padding token; padded positions are masked out anyway
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise FileFormatError(f"{path}: the tokenizer has no padding, end or unknown token to pad batches with")
        self.tokenizer = tok

    def __call__(self, texts: list[str]) -> dict:
        texts = list(texts)
        if self.tokenizer is None:
            prepare = getattr(self._st, "preprocess", None) or self._st.tokenize
            # tensors only: the forward pass needs no more, and ONNX export takes tensors alone
            return {k: v for k, v in prepare(texts).items() if isinstance(v, torch.Tensor)}
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v for k, v in enc.items() if k in keep}


def batches_of(tokenize: Tokenize, texts, batch_size: int = 32) -> list[dict]:
    texts = list(texts)
    return [tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


# ---- text files -----------------------------------------------------------------------------------


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise FileFormatError(f"{path} is empty: give text samples, one a line")
    head = data[:65536]
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 13))
    if b"\x00" in head or controls > len(head) // 100:
        raise FileFormatError(f"{path} looks like a binary file, not text ({controls} control bytes in the first "
                              f"{len(head)})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileFormatError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8"
        ) from None


def read_texts(path: str | os.PathLike, text_field: str | None = None) -> list[str]:
    """The text samples in ``path``: ``.txt`` one a line, ``.jsonl`` the ``text_field`` (default ``text``)
    of each line's object, ``.csv`` the column ``text_field`` (default ``text``, or the only column).
    Blank samples are dropped; the file is only read."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileFormatError(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise FileFormatError(f"{p}: calibration text must be {', '.join(TEXT_SUFFIXES)}, got {suffix or 'no suffix'}")
    if text_field is not None and suffix == ".txt":
        raise InvalidArgumentError("--text-field applies to .jsonl and .csv files, not .txt")
    text = _decode(p)
    if suffix == ".txt":
        samples = text.splitlines()
    elif suffix == ".jsonl":
        samples = _jsonl_texts(p, text, text_field or "text")
    else:
        samples = _csv_texts(p, text, text_field)
    samples = [s.strip() for s in samples if s.strip()]
    if not samples:
        raise FileFormatError(f"{p} holds no text sample (only blank entries)")
    return samples


def _jsonl_texts(p: Path, text: str, field: str) -> list[str]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{p} line {i} is not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise FileFormatError(f"{p} line {i} is a JSON {type(obj).__name__}, not an object with a {field!r} field")
        if field not in obj:
            fields = ", ".join(sorted(map(str, obj))) or "none"
            raise FileFormatError(f"{p} line {i} has no field {field!r} (its fields: {fields}); pass --text-field")
        if not isinstance(obj[field], str):
            raise FileFormatError(f"{p} line {i}: field {field!r} is a {type(obj[field]).__name__}, not text")
        out.append(obj[field])
    return out


def _csv_texts(p: Path, text: str, column: str | None) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise FileFormatError(f"{p}: not valid CSV ({exc})") from None
    header, body = rows[0], rows[1:]
    if column is None:
        column = "text" if "text" in header else (header[0] if len(header) == 1 else None)
        if column is None:
            raise FileFormatError(f"{p} has columns {', '.join(header)} and none is called 'text'; pass --text-field")
    if column not in header:
        raise FileFormatError(f"{p} has no column {column!r} (its columns: {', '.join(header)}); pass --text-field")
    j = header.index(column)
    return [row[j] for row in body if len(row) > j]


@dataclass(frozen=True)
class TextSplit:
    """Disjoint calibration, fine-tuning and held-out evaluation samples of one text file."""

    calibration: tuple[str, ...]
    finetune: tuple[str, ...]
    evaluation: tuple[str, ...]

    def sizes(self) -> dict[str, int]:
        return {"calibration": len(self.calibration), "finetune": len(self.finetune),
                "evaluation": len(self.evaluation)}


def split_texts(texts, n_calib: int | None = None, seed: int = 0, eval_fraction: float = 0.2,
                max_eval: int = 1000) -> TextSplit:
    """Shuffle ``texts`` with ``seed``; hold out ``eval_fraction`` (at least 2, at most ``max_eval``) for
    evaluation, take ``n_calib`` of the rest (all if None or more) for calibration and leave the remainder
    for fine-tuning. Duplicates are removed first, so no sample is in two parts."""
    unique = list(dict.fromkeys(texts))
    if len(unique) < MIN_SAMPLES:
        raise InvalidArgumentError(
            f"the calibration text holds {len(unique)} distinct samples; at least {MIN_SAMPLES} are needed "
            f"(calibration plus a held-out evaluation part)"
        )
    gen = torch.Generator().manual_seed(int(seed))
    shuffled = [unique[i] for i in torch.randperm(len(unique), generator=gen).tolist()]
    n_eval = min(max_eval, max(2, math.ceil(eval_fraction * len(shuffled))))
    evaluation, rest = shuffled[:n_eval], shuffled[n_eval:]
    n_cal = len(rest) if n_calib is None else min(int(n_calib), len(rest))
    return TextSplit(tuple(rest[:n_cal]), tuple(rest[n_cal:]), tuple(evaluation))


def texts_digest(texts) -> str:
    """SHA-256 of the samples ``texts`` in order (one sample a line): names a held-out part exactly."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


def split_record(split: TextSplit, *, seed: int, n_calib: int, path: str | os.PathLike | None = None,
                 text_field: str | None = None) -> dict:
    """What re-creates ``split`` later (kept in ``hf.json`` and metrics.json): the text file (absolute path and
    SHA-256 of its bytes; ``source: shipped`` for tensorfold's own sentences), field, seed, calibration size,
    part sizes and the SHA-256 of the held-out samples."""
    record: dict = {"source": "shipped"}
    if path is not None:
        p = Path(path).expanduser().resolve()
        record = {"source": "file", "path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                  "text_field": text_field}
    return {**record, "seed": int(seed), "n_calib": int(n_calib), "sizes": split.sizes(),
            "evaluation_sha256": texts_digest(split.evaluation)}


def held_out_texts(record: dict | None, data: str | os.PathLike | None = None, text_field: str | None = None
                   ) -> tuple[list[str], bool | None]:
    """The held-out samples of a compress run from its :func:`split_record`, and whether they are exactly
    the run's (its digest matches).

    Without ``data`` the recorded file is read again (a file that is gone or has changed since is an error
    that says so); ``data`` evaluates on another file, split with the recorded seed. ``record=None`` (a
    directory written before splits were recorded): ``data``'s held-out part with seed 0, else the
    shipped held-out sentences; the second value is then None (unknown).
    """
    if record is None:
        if data is None:
            return shipped_texts()[1], None
        return list(split_texts(read_texts(data, text_field), seed=0).evaluation), None
    seed, n_calib = int(record.get("seed", 0)), record.get("n_calib")
    if data is None and record.get("source") == "file":
        p = Path(record["path"])
        if not p.is_file():
            raise FileFormatError(f"the compress run's text file {p} is gone (moved or deleted); put it back or pass "
                                  f"--calib-data FILE to evaluate on other text")
        if hashlib.sha256(p.read_bytes()).hexdigest() != record.get("sha256"):
            raise FileFormatError(f"the compress run's text file {p} has changed since compression, so its held-out "
                                  f"part is not the one the run kept apart; pass --calib-data FILE to evaluate on it "
                                  f"anyway")
        data, text_field = p, record.get("text_field")
    if data is None:
        texts = shipped_texts()[1]
    else:
        texts = list(split_texts(read_texts(data, text_field), n_calib, seed).evaluation)
    return texts, texts_digest(texts) == record.get("evaluation_sha256")


def shipped_texts() -> tuple[list[str], list[str]]:
    """tensorfold's shipped English sentences: (calibration pool, held-out evaluation sentences)."""
    from tensorfold.zoo import minilm

    return list(minilm.shipped_sentences()), minilm.eval_sentences()


# ---- quality by kind ------------------------------------------------------------------------------


@torch.no_grad()
def _outputs(model, kind: str, batch: dict) -> torch.Tensor:
    """Sentence embeddings (sentence-transformers, encoder: masked mean of the last hidden state) or
    logits (classifier, causal LM) for one batch."""
    if kind == "sentence-transformers":
        return model(dict(batch))["sentence_embedding"]
    out = model(**batch)
    if kind == "encoder":
        hidden = out.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return out.logits


def embedding_quality(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, float]:
    """Mean/min cosine between matching rows and nearest-neighbour agreement (same nearest other row)."""
    ref = torch.nn.functional.normalize(ref.double(), dim=1)
    cand = torch.nn.functional.normalize(cand.double(), dim=1)
    cos = (ref * cand).sum(1)

    def nearest(E):
        sim = E @ E.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
            "nn_agreement": float((nearest(ref) == nearest(cand)).double().mean())}


def classifier_quality(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(original || compressed) of the class distributions."""
    lp, lq = ref.double().log_softmax(-1), cand.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).double().mean()), "kl": float(kl.mean())}


def causal_quality(ref: list[torch.Tensor], cand: list[torch.Tensor], batches: list[dict]) -> dict[str, float]:
    """Perplexity of both models (logits ``ref`` and ``cand``, one tensor per batch) on the held-out text and
    top-1 next-token agreement, padding excluded."""
    nll0 = nll1 = agree = 0.0
    count = 0
    for l0, l1, batch in zip(ref, cand, batches):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        target, valid = ids[:, 1:], mask[:, 1:].bool() & mask[:, :-1].bool()
        if not valid.any():
            continue
        t = target[valid]
        l0, l1 = l0[:, :-1].double()[valid], l1[:, :-1].double()[valid]
        nll0 += float(torch.nn.functional.cross_entropy(l0, t, reduction="sum"))
        nll1 += float(torch.nn.functional.cross_entropy(l1, t, reduction="sum"))
        agree += float((l0.argmax(-1) == l1.argmax(-1)).sum())
        count += int(valid.sum())
    if count == 0:
        raise InvalidArgumentError("the held-out text has no sample of two or more tokens to measure perplexity on")
    return {"perplexity_original": math.exp(nll0 / count), "perplexity": math.exp(nll1 / count),
            "top1_agreement": agree / count, "tokens": float(count)}


def outputs_quality(kind: str, ref: list[torch.Tensor], cand: list[torch.Tensor], batches: list[dict]) -> dict:
    """The quality metrics of ``kind`` from the two models' outputs on ``batches`` (one tensor per batch:
    embeddings, or logits), e.g. PyTorch against ONNX Runtime."""
    if kind == "causal-lm":
        return causal_quality(ref, cand, batches)
    if kind in ("sentence-transformers", "encoder"):
        return embedding_quality(torch.cat(ref), torch.cat(cand))
    return classifier_quality(torch.cat(ref), torch.cat(cand))


def model_outputs(model, kind: str, batches: list[dict]) -> list[torch.Tensor]:
    """``model``'s embeddings or logits on each batch, in eval mode (its mode is restored)."""
    was = model.training
    model.eval()
    try:
        return [_outputs(model, kind, b) for b in batches]
    finally:
        model.train(was)


def quality(original, compressed, kind: str, batches: list[dict]) -> dict[str, float]:
    """The quality metrics of ``kind`` (see the module docs) of ``compressed`` against ``original``."""
    return outputs_quality(kind, model_outputs(original, kind, batches), model_outputs(compressed, kind, batches),
                           batches)


def output_fn_for(kind: str):
    """What the planner and the distillation compare in the model's output, for ``kind``."""
    return {"sentence-transformers": _sentence_embedding, "encoder": _hidden_state}.get(kind, _logits)


def _sentence_embedding(output):
    return output["sentence_embedding"]


def _hidden_state(output):
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _logits(output):
    return output.logits if hasattr(output, "logits") else output[0]


# ---- the entry ``tensorfold compress`` runs on ----------------------------------------------------


def entry(path: str | os.PathLike, data: str | os.PathLike | None = None, *, text_field: str | None = None,
          n_calib: int = 128, seed: int = 0, model=None) -> BuiltinModel:
    """A :class:`~tensorfold.zoo.BuiltinModel` for the directory ``path`` with the text of ``data``
    (split by :func:`split_texts`; without a file, tensorfold's shipped English sentences).

    ``extra`` holds ``kind``, ``path`` (the resolved directory), ``data``, ``split`` (part sizes) and
    ``split_record`` (what re-creates the split: :func:`split_record`).
    """
    p = resolve_path(path)
    kind = detect_kind(p)
    if data is not None:
        split = split_texts(read_texts(data, text_field), n_calib, seed)
        source = str(Path(data).expanduser().resolve())
        record = split_record(split, seed=seed, n_calib=n_calib, path=data, text_field=text_field)
    else:
        if text_field is not None:
            raise InvalidArgumentError("--text-field needs --calib-data FILE")
        pool, held_out = shipped_texts()
        gen = torch.Generator().manual_seed(int(seed))
        pool = [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]
        n = min(n_calib, len(pool))
        split = TextSplit(tuple(pool[:n]), tuple(pool[n:]), tuple(held_out))
        source = "tensorfold's shipped English sentences"
        record = split_record(split, seed=seed, n_calib=n_calib)
    loaded = model if model is not None else load_model(p)
    tokenize = Tokenize(loaded, kind, p)
    eval_batches = batches_of(tokenize, split.evaluation)

    def calibration(n: int = 128, seed_: int = seed, batch_size: int = 32) -> list[dict]:
        if n > len(split.calibration):
            raise InvalidArgumentError(
                f"--calib {n}: only {len(split.calibration)} calibration samples are set aside "
                f"({source}); pass --calib {len(split.calibration)} or give more text"
            )
        return batches_of(tokenize, split.calibration[:n], batch_size)

    def finetune_data(batch_size: int = 32, seed_: int = seed) -> tuple[list[dict], list[dict]]:
        # fine-tuning text: the samples left after calibration, or the calibration samples when too few
        # are left; never the held-out part. 15% of it validates (early stopping).
        texts = list(split.finetune) if len(split.finetune) >= 16 else list(split.finetune + split.calibration)
        n_val = max(1, len(texts) * 15 // 100)
        return batches_of(tokenize, texts[n_val:], batch_size), batches_of(tokenize, texts[:n_val], batch_size)

    def evaluate(original, compressed) -> dict[str, float]:
        return quality(original, compressed, kind, eval_batches)

    def example_inputs(batch_size: int = 32) -> dict:
        texts = [split.evaluation[i % len(split.evaluation)] for i in range(batch_size)]
        return tokenize(texts)

    return BuiltinModel(
        name=f"hf:{p}",
        description=f"{kind} model from {p}",
        load=lambda: load_model(p),
        calibration=calibration,
        evaluate=evaluate,
        example_inputs=example_inputs,
        finetune_data=finetune_data,
        exclude=EXCLUDE[kind],
        output_fn=output_fn_for(kind),
        extra={"kind": kind, "path": str(p), "data": source, "split": split.sizes(), "split_record": record,
               "model": loaded,
               "eval_batches": eval_batches,
               "distill_loss": "cosine" if kind in ("sentence-transformers", "encoder") else "kl",
               # fine-tuning distils every block's token outputs too (tensorfold.FinetuneConfig.for_transformers)
               "finetune_recipe": "transformers"},
    )


__all__ = ["KINDS", "TextSplit", "detect_kind", "entry", "held_out_texts", "load_model", "quality", "read_texts",
           "resolve_path", "split_record", "split_texts"]
