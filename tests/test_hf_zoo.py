"""Hugging Face directories and calibration text files (tensorfold.zoo.hf), on tiny random models."""

import json

import pytest
import torch

from tensorfold.errors import FileFormatError, InvalidArgumentError
from tensorfold.zoo import hf

hf_tiny = pytest.importorskip("hf_tiny")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.mark.parametrize("kind,expected,cls", [
    ("bert", "encoder", "BertModel"),
    ("mpnet", "encoder", "MPNetModel"),
    ("bert-classifier", "classifier", "BertForSequenceClassification"),
    ("gpt2", "causal-lm", "GPT2LMHeadModel"),
    ("llama", "causal-lm", "LlamaForCausalLM"),
])
def test_load_model_picks_the_auto_class(root, kind, expected, cls):
    path = hf_tiny.model_dir(root, kind)
    assert hf.detect_kind(path) == expected
    model = hf.load_model(path)
    assert type(model).__name__ == cls
    assert not model.training


def test_gpt2_conv1d_becomes_an_equal_linear(root):
    import transformers

    path = hf_tiny.model_dir(root, "gpt2")
    ours = hf.load_model(path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    assert not any(type(m).__name__ == "Conv1D" for m in ours.modules())
    assert isinstance(ours.transformer.h[0].attn.c_attn, torch.nn.Linear)
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_sentence_transformers_directory(root):
    path = hf_tiny.sentence_transformers_dir(root)
    assert hf.detect_kind(path) == "sentence-transformers"
    model = hf.load_model(path)
    assert type(model).__name__ == "SentenceTransformer"
    assert model.encode(["the cat sat"]).shape == (1, 32)


def test_not_a_model_directory_and_uncached_hub_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))  # an empty cache: nothing is found locally
    with pytest.raises(FileFormatError, match="neither modules.json"):
        hf.load_model(tmp_path)
    with pytest.raises(FileFormatError, match="not in the local Hugging Face cache.*never downloads"):
        hf.load_model("someone/not-a-local-model")
    with pytest.raises(FileFormatError, match="no such model directory"):
        hf.load_model(tmp_path / "missing")


def test_remote_code_is_never_run(root, tmp_path):
    import shutil

    path = tmp_path / "remote"
    shutil.copytree(hf_tiny.model_dir(root, "bert"), path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="my-custom", auto_map={"AutoModel": "modeling_custom.CustomModel"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(FileFormatError, match="cannot load the model offline"):
        hf.load_model(path)


# ---- text files ----------------------------------------------------------------------------------

LINES = [f"sample number {i}" for i in range(40)]


def test_read_txt_jsonl_csv(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(LINES[:3]) + "\n\n  \n" + LINES[3] + "\n")
    assert hf.read_texts(tmp_path / "a.txt") == LINES[:4]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(LINES[:3])))
    assert hf.read_texts(tmp_path / "a.jsonl") == LINES[:3]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in LINES[:3]))
    assert hf.read_texts(tmp_path / "b.jsonl", text_field="body") == LINES[:3]
    (tmp_path / "a.csv").write_text('id,sentence\n1,"hello, world"\n2,second\n')
    assert hf.read_texts(tmp_path / "a.csv", text_field="sentence") == ["hello, world", "second"]
    (tmp_path / "b.csv").write_text("text,label\nfirst,0\nsecond,1\n")
    assert hf.read_texts(tmp_path / "b.csv") == ["first", "second"]


@pytest.mark.parametrize("name,content,field,match", [
    ("empty.txt", b"", None, "is empty"),
    ("blank.txt", b"\n  \n\n", None, "is empty"),
    ("junk.txt", bytes(range(256)) * 4, None, "looks like a binary file"),
    ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"), None, r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
    ("wrong.jsonl", b'{"body": "x"}\n', None, r"line 1 has no field 'text' \(its fields: body\); pass --text-field"),
    ("notjson.jsonl", b'{"text": "x"}\nnot json\n', None, "line 2 is not JSON"),
    ("number.jsonl", b'{"text": 3}\n', None, "field 'text' is a int, not text"),
    ("cols.csv", b"a,b\n1,2\n", None, "none is called 'text'; pass --text-field"),
    ("cols2.csv", b"a,b\n1,2\n", "c", "has no column 'c'"),
    ("data.parquet", b"PAR1", None, "must be .txt, .jsonl, .csv"),
])
def test_bad_text_files_are_clear_errors(tmp_path, name, content, field, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=match):
        hf.read_texts(path, text_field=field)
    assert path.read_bytes() == content  # only read


def test_split_is_seeded_disjoint_and_sized():
    texts = [f"s{i}" for i in range(50)] + ["s0", "s1"]  # duplicates are dropped first
    a = hf.split_texts(texts, n_calib=30, seed=1)
    assert a == hf.split_texts(texts, n_calib=30, seed=1)
    assert a != hf.split_texts(texts, n_calib=30, seed=2)
    assert a.sizes() == {"calibration": 30, "finetune": 10, "evaluation": 10}
    assert len(set(a.calibration) | set(a.finetune) | set(a.evaluation)) == 50
    with pytest.raises(InvalidArgumentError, match="holds 3 distinct samples; at least 10"):
        hf.split_texts(["x", "y", "z", "x"])


def test_split_record_recreates_the_held_out_part(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("\n".join(f"sample number {i}" for i in range(60)))
    split = hf.split_texts(hf.read_texts(data), n_calib=16, seed=7)
    record = json.loads(json.dumps(hf.split_record(split, seed=7, n_calib=16, path=data)))  # survives JSON
    assert record["seed"] == 7 and record["sizes"] == {"calibration": 16, "finetune": 32, "evaluation": 12}
    texts, same = hf.held_out_texts(record)
    assert texts == list(split.evaluation) and same is True
    # seed 0 (what export used to re-derive) holds out other samples: the record is what makes it the same
    assert hf.split_texts(hf.read_texts(data), seed=0).evaluation != split.evaluation
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"another line {i}" for i in range(40)))
    texts, same = hf.held_out_texts(record, other)
    assert len(texts) == 8 and same is False
    assert hf.held_out_texts(None, other) == (list(hf.split_texts(hf.read_texts(other), seed=0).evaluation), None)
    data.write_text(data.read_text() + "\none more line")
    with pytest.raises(FileFormatError, match="has changed since compression"):
        hf.held_out_texts(record)
    data.unlink()
    with pytest.raises(FileFormatError, match="is gone"):
        hf.held_out_texts(record)
    shipped = hf.TextSplit(("a",), (), tuple(hf.shipped_texts()[1]))
    assert hf.held_out_texts(hf.split_record(shipped, seed=0, n_calib=1)) == (hf.shipped_texts()[1], True)


# ---- quality by kind ----------------------------------------------------------------------------


def test_quality_metrics_on_known_answers():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    q = hf.embedding_quality(ref, ref * 3)
    assert q == pytest.approx({"mean_cos": 1.0, "min_cos": 1.0, "nn_agreement": 1.0})
    q = hf.embedding_quality(ref, torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.1]]))
    assert q["min_cos"] == pytest.approx(0.0) and q["mean_cos"] == pytest.approx(2 / 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert hf.classifier_quality(logits, logits) == pytest.approx({"top1_agreement": 1.0, "kl": 0.0})
    flipped = hf.classifier_quality(logits, logits.flip(1))
    assert flipped["top1_agreement"] == 0.0 and flipped["kl"] > 1.0


@pytest.mark.parametrize("kind", ["sentence-transformers", "bert-classifier", "gpt2"])
def test_entry_identity_quality(root, tmp_path, kind):
    path = hf_tiny.sentence_transformers_dir(root / "e") if kind == "sentence-transformers" else \
        hf_tiny.model_dir(root, kind)
    data = tmp_path / "text.txt"
    data.write_text("\n".join(hf_tiny.sentences(60)))
    e = hf.entry(path, data, n_calib=16, seed=0)
    assert e.extra["split"] == {"calibration": 16, "finetune": 32, "evaluation": 12}
    model = e.extra["model"]
    q = e.evaluate(model, model)
    if kind == "gpt2":
        assert q["top1_agreement"] == 1.0 and q["perplexity"] == pytest.approx(q["perplexity_original"])
        assert 10 < q["perplexity"] < 200  # a random model over a 36-word vocabulary: about the vocabulary size
    elif kind == "bert-classifier":
        assert q == pytest.approx({"top1_agreement": 1.0, "kl": 0.0})
    else:
        assert q["mean_cos"] == pytest.approx(1.0) and q["nn_agreement"] == 1.0
    batches = e.calibration(16)
    assert sum(len(b["input_ids"]) for b in batches) == 16
    with pytest.raises(InvalidArgumentError, match="only 16 calibration samples"):
        e.calibration(17)
    train, val = e.finetune_data(8)
    assert sum(len(b["input_ids"]) for b in train + val) == 32
