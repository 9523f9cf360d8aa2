"""CompressConfig / FinetuneConfig: validated once when built, JSON round trip, stored in the Plan, built
from the entry points' keywords; plans written before the config existed still load."""

import json

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.config import CompressConfig, FinetuneConfig
from tensorfold.compression.finetune import FinetuneHistory
from tensorfold.compression.methods import known_methods, register_method, unregister_method
from tensorfold.errors import FileFormatError, InvalidArgumentError


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("bad", [
    {"budget": 0}, {"budget": 1.5}, {"budget": float("nan")}, {"budget": True}, {"budget": "0.5"},
    {"target": "energy"}, {"methods": ()}, {"methods": "svd,magic"}, {"allocator": "greedy"},
    {"include": [""]}, {"exclude": [3]}, {"no_slower": "yes"}, {"speedup": 0}, {"speedup": True},
    {"speedup": 1.3, "allocator": "uniform"}, {"sensitivity": 1}, {"calib_samples": -1},
    {"calib_samples": 1.5}, {"seed": -1}, {"ridge": -1e-3}, {"correct_upstream": None},
])
def test_bad_compress_settings_are_rejected_when_built(bad):
    with pytest.raises(InvalidArgumentError):
        CompressConfig(**bad)


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"lr": 0}, {"lr": float("inf")}, {"distill": "attention"}, {"alpha": 1.5},
    {"temperature": -1}, {"distill_loss": "l1"}, {"patience": 0}, {"max_steps": 0}, {"weight_decay": -1},
    {"progress": "yes"},
])
def test_bad_finetune_settings_are_rejected_when_built(bad):
    with pytest.raises(InvalidArgumentError):
        FinetuneConfig(**bad)


def test_canonical_forms_and_json_round_trip():
    cfg = CompressConfig(budget=1, methods="svd, tucker,svd", include="enc*", speedup=2)
    assert cfg.budget == 1.0 and isinstance(cfg.budget, float)
    assert cfg.methods == ("svd", "tucker") and cfg.include == ("enc*",) and cfg.speedup == 2.0
    again = CompressConfig.from_json(cfg.to_json())
    assert again == cfg and again.methods == ("svd", "tucker")
    tune = FinetuneConfig(epochs=2, feature_layers=["0", "2"])
    assert FinetuneConfig.from_json(tune.to_json()) == tune
    with pytest.raises(FileFormatError):
        CompressConfig.from_dict({"budget": 0.5, "colour": "red"})
    with pytest.raises(InvalidArgumentError):
        cfg.replace(budget=2.0)
    with pytest.raises(AttributeError):  # frozen
        cfg.budget = 0.3


def test_keywords_build_or_amend_the_config():
    model = mlp()
    base = CompressConfig(budget=0.4, methods=("svd",), curve=False)
    p = tf.plan(model, base)
    assert p.config == base and p.budget == 0.4 and p.methods == ("svd",)
    p2 = tf.plan(model, base, budget=0.6)
    assert p2.config == base.replace(budget=0.6) and p2.fraction <= 0.6
    p3 = tf.plan(model, 0.4, methods=("svd",), curve=False)
    assert p3.config == base and p3.layers == p.layers
    with pytest.raises(InvalidArgumentError, match="unknown CompressConfig setting"):
        tf.plan(model, base, colour="red")
    with pytest.raises(InvalidArgumentError, match="twice"):
        tf.plan(model, 0.4, budget=0.5)
    with pytest.raises(InvalidArgumentError):
        tf.plan(model, "half")


def test_the_plan_stores_and_serialises_its_config(tmp_path):
    cfg = CompressConfig(budget=0.5, methods=("svd",), allocator="balanced", exclude=("4",), ridge=1e-4)
    p = tf.plan(mlp(), cfg)
    assert p.config == cfg and p.allocator == "balanced" and p.exclude == ("4",)
    d = json.loads(p.to_json())
    assert d["config"]["ridge"] == 1e-4 and d["config"]["exclude"] == ["4"]
    assert d["budget"] == 0.5 and d["methods"] == ["svd"]  # older readers find the settings where they were
    p.save(tmp_path / "plan.json")
    assert tf.Plan.load(tmp_path / "plan.json") == p


def test_a_plan_json_without_a_config_still_loads(tmp_path):
    """Plans written before CompressConfig kept budget/target/methods/include/exclude/speedup at the top level."""
    p = tf.plan(mlp(), 0.5, methods=("svd",), allocator="auto", exclude=["4"], curve=False)
    old = json.loads(p.to_json())
    del old["config"]
    (tmp_path / "plan.json").write_text(json.dumps(old))
    loaded = tf.Plan.load(tmp_path / "plan.json")
    assert loaded.layers == p.layers
    assert (loaded.budget, loaded.target, loaded.methods, loaded.exclude) == (0.5, "params", ("svd",), ("4",))
    assert loaded.allocator == "knapsack" and loaded.config.allocator == "knapsack"
    small = tf.apply(mlp(), loaded)
    assert sum(q.numel() for q in small.parameters()) == loaded.model_params_after
    old["budget"] = 3.0  # a bad setting in an old file is a file error, not a crash
    with pytest.raises(FileFormatError, match="budget"):
        tf.Plan.from_dict(old)


def test_apply_reads_the_fitting_settings_from_the_plan():
    model = mlp()
    calib = [torch.randn(16, 32, generator=torch.Generator().manual_seed(1))]
    p = tf.plan(model, 0.4, methods=("svd",), calib=calib, curve=False)
    plain = tf.apply(model, p, calib)
    ridged = tf.apply(model, tf.Plan.from_dict({**p.to_dict(), "config": p.config.replace(ridge=10.0).to_dict()}),
                      calib)
    x = calib[0]
    assert not torch.allclose(plain(x), ridged(x))


def test_the_method_registry_is_open():
    assert {"svd", "svd-input", "spatial", "tucker", "cp", "tt"} <= set(known_methods())
    with pytest.raises(InvalidArgumentError):
        CompressConfig(methods=("block-drop",))
    register_method("block-drop", description="test method handled elsewhere")
    try:
        cfg = CompressConfig(methods=("svd", "block-drop"))
        assert cfg.methods == ("svd", "block-drop")
        # layer planning ignores methods with their own candidates
        p = tf.plan(mlp(), cfg, curve=False)
        assert {lp.method for lp in p.layers} <= {"dense", "svd"}
    finally:
        unregister_method("block-drop")
    assert "block-drop" not in known_methods()


def test_finetune_takes_a_config():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    inputs = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    history = FinetuneHistory()
    cfg = FinetuneConfig(epochs=2, lr=1e-2, progress=False)
    a = tf.finetune(student, inputs, cfg, teacher=teacher, history=history)
    b = tf.finetune(student, inputs, teacher=teacher, epochs=2, lr=1e-2, progress=False)
    assert len(history.epochs) == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(InvalidArgumentError, match="unknown FinetuneConfig setting"):
        tf.finetune(student, inputs, teacher=teacher, learning_rate=1e-2)


def test_a_saved_run_from_before_the_config_still_loads(tmp_path):
    """A directory written before CompressConfig (plan.json without "config") loads and gives the same model."""
    model = mlp()
    small, p = tf.compress(model, 0.5, methods=("svd", "tt"), curve=False)
    out = tmp_path / "run"
    tf.save_compressed(small, p, out)
    d = json.loads((out / "plan.json").read_text())
    del d["config"]
    (out / "plan.json").write_text(json.dumps(d))
    again = tf.load_compressed(out, base_model=model)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again(x), small(x))
