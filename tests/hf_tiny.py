"""Tiny randomly initialised Hugging Face models written to directories, for the tests (built offline).

Each builder writes ``config.json``, ``model.safetensors`` and a small word-level tokenizer
(``tokenizer.json``) with ``save_pretrained``; :func:`sentence_transformers_dir` wraps an encoder
directory with mean pooling into a sentence-transformers directory (``modules.json``).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the", "a", "cat", "dog", "bird", "sat", "on", "mat", "ran", "fast", "slow", "big", "small", "red", "blue",
         "green", "house", "car", "tree", "park", "river", "sun", "moon", "day", "night", "runs", "jumps", "sleeps",
         "eats", "sees", "happy", "sad", "old", "new")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def sentences(n: int, seed: int = 0, length: tuple[int, int] = (3, 9)) -> list[str]:
    """``n`` distinct random sentences over the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        k = int(torch.randint(length[0], length[1], (1,), generator=gen))
        idx = torch.randint(len(WORDS), (k,), generator=gen).tolist()
        out[" ".join(WORDS[i] for i in idx)] = None
    return list(out)


def tokenizer(cls_sep: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]", bos_token="[CLS]",
                                   model_max_length=64)


VOCAB = len(SPECIALS) + len(WORDS)
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _config(kind: str):
    import transformers as t

    # a wide initialisation: with the default 0.02 the residual stream drowns the layers' contributions and
    # any compression looks lossless
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "initializer_range": 0.3}
    if kind in ("bert", "bert-classifier"):
        extra = {"num_labels": 3} if kind == "bert-classifier" else {}
        return t.BertConfig(**SMALL, max_position_embeddings=64, **common, **extra)
    if kind == "mpnet":
        return t.MPNetConfig(**SMALL, max_position_embeddings=66, **common)
    if kind == "gpt2":
        return t.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    if kind == "llama":
        return t.LlamaConfig(**SMALL, num_key_value_heads=1, max_position_embeddings=64, **common)
    raise ValueError(kind)


def model_dir(root: Path, kind: str, seed: int = 0) -> Path:
    """Write the tiny ``kind`` model (bert, bert-classifier, mpnet, gpt2, llama) into ``root/kind``."""
    import transformers as t

    classes = {"bert": t.BertModel, "bert-classifier": t.BertForSequenceClassification, "mpnet": t.MPNetModel,
               "gpt2": t.GPT2LMHeadModel, "llama": t.LlamaForCausalLM}
    torch.manual_seed(seed)
    model = classes[kind](_config(kind))
    path = Path(root) / kind
    model.save_pretrained(path)
    tokenizer(cls_sep=kind not in ("gpt2", "llama")).save_pretrained(path)
    return path


def sentence_transformers_dir(root: Path, encoder: str = "bert") -> Path:
    """A sentence-transformers directory: the tiny ``encoder`` with mean pooling."""
    from sentence_transformers import SentenceTransformer, models

    base = model_dir(Path(root) / "base", encoder)
    transformer = models.Transformer(str(base))
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    path = Path(root) / f"st-{encoder}"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(path))
    return path


def bert_encoder(layers: int = 2, hidden: int = 32, heads: int = 4, inter: int = 64, init: float = 0.02):
    """A seeded, randomly initialised ``BertModel`` (no pooler) in eval mode, built in memory (``init``: the
    weights' standard deviation; a wide one, e.g. 0.3, lets the blocks change the residual stream visibly)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=inter, vocab_size=100, max_position_embeddings=64,
                                  initializer_range=init)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def token_batches(n: int = 4, batch: int = 8, length: int = 12, seed: int = 0) -> list[dict]:
    """``n`` seeded batches of random token ids for :func:`bert_encoder`, half of each batch padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[: batch // 2, length - 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def use_fake_latency(monkeypatch, time_of) -> None:
    """Make every ``LatencyModel`` time a module with ``time_of(module)`` (seconds) and ignore the shipped
    latency table (which is not the fake clock), for planner tests that need latencies without timing."""
    from tensorfold.compression.candidates import LatencyModel

    monkeypatch.setattr(LatencyModel, "_measure", lambda self, module, shape: time_of(module))
    original_init = LatencyModel.__init__

    def without_table(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.table = None

    monkeypatch.setattr(LatencyModel, "__init__", without_table)
