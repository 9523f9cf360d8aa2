"""End to end from the CLI: tiny random BERT, MPNet, GPT-2 and Llama directories (and a sentence-transformers
directory) compressed with a text file, reloaded with load_compressed, exported to ONNX (+ int8)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

hf_tiny = pytest.importorskip("hf_tiny")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

import tensorfold as tf  # noqa: E402
from tensorfold.errors import FileFormatError  # noqa: E402
from tensorfold.zoo import hf  # noqa: E402


def cli(*args, ok=True):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tensorfold", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    if ok and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfcli")
    (root / "text.txt").write_text("\n".join(hf_tiny.sentences(120, seed=3)) + "\n")
    return root


@pytest.mark.parametrize("kind,metric", [("bert", "mean_cos"), ("mpnet", "mean_cos"), ("gpt2", "perplexity"),
                                         ("llama", "perplexity"), ("bert-classifier", "kl")])
def test_compress_directory_end_to_end(root, kind, metric):
    path = hf_tiny.model_dir(root, kind)
    out = root / f"out-{kind}"
    # default menus (block methods included) on every architecture: MPNet's tuple-returning layers and
    # Llama's key/value cache once broke the drop and block-refit paths
    proc = cli("compress", "--model", path, "--calib-data", root / "text.txt", "--calib", 48, "--budget", 0.5,
               "--no-speed", "--out", out)
    assert "calibration 48, finetune 48, evaluation 24 samples" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    q = metrics["quality"]
    assert metrics["data"]["evaluation"] == 24 and metrics["memory"]["peak_rss_mb"] > 50
    assert 0.40 < metrics["plan_totals"]["fraction"] <= 0.5 if "fraction" in metrics["plan_totals"] else True
    if metric == "mean_cos":
        assert 0.3 < q["mean_cos"] < 0.9999 and 0 <= q["nn_agreement"] <= 1
    elif metric == "perplexity":
        assert q["perplexity"] != pytest.approx(q["perplexity_original"], rel=1e-4)
        assert 0 < q["top1_agreement"] < 1
    else:
        assert q["kl"] > 0 and 0 < q["top1_agreement"] <= 1
    model = tf.load_compressed(out)
    original = hf.load_model(path)
    assert type(model) is type(original)
    # memory: the peak after each stage never falls, and the tensor sizes are the models' own
    mem = metrics["memory"]
    stages = [mem[f"peak_rss_mb_after_{s}"] for s in ("load", "plan", "apply", "evaluate")]
    assert mem["peak_rss_mb_at_start"] <= stages[0] and stages == sorted(stages) and stages[-1] <= mem["peak_rss_mb"]
    distinct = {p.data_ptr(): p for p in [*original.parameters(), *original.buffers()]}.values()
    assert mem["model_mb"] == pytest.approx(sum(p.numel() * p.element_size() for p in distinct) / 2**20, rel=1e-9)
    assert 0 < mem["compressed_mb"] < mem["model_mb"]
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())
    # the reloaded model computes what the job measured: same quality on the same held-out split
    e = hf.entry(path, root / "text.txt", n_calib=48, seed=0, model=original)
    again = e.evaluate(original, model)
    for k, v in q.items():
        assert again[k] == pytest.approx(v, rel=1e-6, abs=1e-9)
    if kind in ("gpt2", "llama"):
        ids = torch.tensor([[2, 7, 8, 9]])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
        assert generated.shape == (1, 8)


def test_sentence_transformers_standalone_finetune_export(root, tmp_path):
    st = hf_tiny.sentence_transformers_dir(root / "st")
    out = root / "out-st"
    proc = cli("compress", "--model", st, "--calib-data", root / "text.txt", "--calib", 48, "--budget", 0.5,
               "--finetune-epochs", 2, "--standalone", "--export", "onnx-int8", "--out", out)
    assert "compressed int8" in proc.stdout
    assert (out / "base" / "modules.json").is_file() and (out / "model-int8.onnx").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    variants = {r["variant"]: r for r in metrics["export"]["variants"]}
    assert set(variants) == {"dense fp32", "dense int8", "compressed fp32", "compressed int8"}
    assert variants["dense fp32"]["mean_cos"] == pytest.approx(1.0)
    assert variants["compressed fp32"]["mean_cos"] == pytest.approx(metrics["quality"]["mean_cos"], abs=1e-6)
    assert all(":" not in op for op in metrics["export"]["ops"])  # standard ONNX ops only
    # the int8 file: quantized from ONNX Runtime's fused graph (verified like model.onnx), its ops recorded
    assert metrics["export"]["int8_graph"]["graph"] == "fused", metrics["export"]["int8_graph"]
    assert "com.microsoft:SkipLayerNormalization" in metrics["export"]["int8_ops"]
    assert variants["dense int8"]["int8_graph"]["fused"]["Attention"] == 2
    report = (out / "report.html").read_text()
    assert "the four variants" in report and "compressed int8" in report and "peak rss mb" in report
    # the compressed blocks (factor pairs, fewer query/key dimensions) keep Attention from fusing; the rest fuses
    assert "The int8 file was quantized from the fused graph: 2 BiasGelu" in report
    # standalone: the output directory moves alone and the base directory can go
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(st)
    model = tf.load_compressed(moved)
    assert type(model).__name__ == "SentenceTransformer"
    emb = model.encode(["the cat sat on the mat"], convert_to_tensor=True)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = model.tokenize(["the cat sat on the mat"])
    got = sess.run(None, {i.name: batch[i.name].numpy() for i in sess.get_inputs()})[0]
    torch.testing.assert_close(torch.from_numpy(got), emb, rtol=1e-4, atol=1e-5)
    (moved / "base" / "modules.json").unlink()
    with pytest.raises(FileFormatError, match="changed since compression"):
        tf.load_compressed(moved)
    shutil.rmtree(moved / "base")
    with pytest.raises(FileFormatError, match="incomplete: its copy of the base model"):
        tf.load_compressed(moved)


def test_moved_base_and_incomplete_output_are_clear_errors(root, tmp_path):
    path = tmp_path / "bert"
    shutil.copytree(hf_tiny.model_dir(root, "bert"), path)
    out = tmp_path / "out"
    cli("compress", "--model", path, "--calib-data", root / "text.txt", "--calib", 32, "--no-speed", "--out", out)
    stored = json.loads((out / "hf.json").read_text())
    assert stored["base"] == str(path.resolve()) and not stored["standalone"]
    # only the tensors that differ from the base model are stored (not the embeddings)
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("embeddings" in k for k in keys)
    path.rename(tmp_path / "elsewhere")
    with pytest.raises(FileFormatError, match="is gone \\(moved or deleted\\).*--standalone"):
        tf.load_compressed(out)
    (tmp_path / "elsewhere").rename(path)
    (out / "weights.safetensors").unlink()
    with pytest.raises(FileFormatError, match="incomplete: weights.safetensors is missing"):
        tf.load_compressed(out)


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"one\ntwo\nthree\n", "holds 3 distinct samples; at least 10"),
    (b"\x00\x01\x02binary" * 50, "looks like a binary file"),
    ("d\u00e9j\u00e0 vu\n".encode("latin-1") * 20, "not UTF-8 text"),
])
def test_bad_text_file_is_one_error_line_and_no_output(root, tmp_path, content, match):
    data = tmp_path / "bad.txt"
    data.write_bytes(content)
    out = tmp_path / "out"
    proc = cli("compress", "--model", hf_tiny.model_dir(root, "bert"), "--calib-data", data, "--out", out, ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and match.split(";")[0] in lines[-1]
    assert not out.exists()


def test_wrong_jsonl_field_and_hub_name(root, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps({"body": s}) for s in hf_tiny.sentences(30)))
    out = tmp_path / "out"
    proc = cli("compress", "--model", hf_tiny.model_dir(root, "bert"), "--calib-data", data, "--out", out, ok=False)
    assert proc.returncode == 2 and "has no field 'text'" in proc.stderr and not out.exists()
    cli("compress", "--model", hf_tiny.model_dir(root, "bert"), "--calib-data", data, "--text-field", "body",
        "--calib", 16, "--no-speed", "--out", out)
    assert out.is_dir()
    env_cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "tensorfold", "compress", "--model", "nobody/no-such-model",
                           "--out", tmp_path / "o2"], capture_output=True, text=True,
                          env={**os.environ, "HF_HOME": str(env_cache)}, timeout=120)
    assert proc.returncode == 2 and "not in the local Hugging Face cache" in proc.stderr


def test_export_command(root, tmp_path):
    out = tmp_path / "out"
    cli("compress", "--model", hf_tiny.model_dir(root, "gpt2"), "--calib-data", root / "text.txt", "--calib", 32,
        "--seed", 5, "--no-speed", "--out", out)
    split = json.loads((out / "hf.json").read_text())["split"]
    assert split["seed"] == 5 and split["path"] == str((root / "text.txt").resolve())
    # no --calib-data: the compress run's own held-out part, re-read from the recorded file and seed
    proc = cli("export", out, "--onnx", "--int8", "--threads", 1)
    assert "held-out text: 24 samples, the compress run's held-out part" in proc.stderr
    assert "compressed int8" in proc.stdout and (out / "model-int8.onnx").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export"]["held_out"] == {"samples": 24, "same_as_compress": True}
    rows = {r["variant"]: r for r in metrics["export"]["variants"]}
    assert rows["dense fp32"]["top1_agreement"] == 1.0
    assert rows["compressed int8"]["perplexity"] > 0
    assert metrics["export"]["int8_graph"] == {"graph": "plain",
                                               "reason": "no BERT-style encoder (the fused graph is for encoders)"}
    assert "from the plain graph; no BERT-style encoder" in " ".join(proc.stderr.split())  # folded lines
    assert "int8 ops: " in proc.stdout and "quantized from the plain graph" in proc.stdout
    # the exported fp32 graph is the compressed model: same perplexity as the compress run measured
    assert rows["compressed fp32"]["perplexity"] == pytest.approx(metrics["quality"]["perplexity"], rel=1e-6)
    again = cli("export", out, "--onnx", ok=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    plain = cli("export", root, "--onnx", ok=False)
    assert plain.returncode == 2 and "no hf.json" in plain.stderr
    other = tmp_path / "other.txt"
    other.write_text("\n".join(hf_tiny.sentences(60, seed=9)) + "\n")
    proc = cli("export", out, "--onnx", "--overwrite", "--calib-data", other, "--threads", 1)
    assert "held-out text: 12 samples, NOT the compress run's held-out part" in proc.stderr


def test_skip_block_keeps_the_replaced_blocks_output_convention():
    import torch
    from torch import nn

    from tensorfold.nn.transformer import SkipBlock

    class TupleLayer(nn.Module):  # transformers' older convention: (hidden_states, attentions...)
        def forward(self, hidden_states, attention_mask=None, output_attentions=False):
            return (hidden_states + 1,)

    x = torch.arange(6.0).reshape(2, 3)
    assert SkipBlock.like(TupleLayer())(x)[0] is x
    assert SkipBlock.like(nn.Linear(3, 3))(x) is x
