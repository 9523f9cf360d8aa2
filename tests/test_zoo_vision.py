"""Built-in vision models: deterministic data, shipped weights that reach their recorded accuracy."""

from __future__ import annotations

import pytest
import torch

from tensorfold import zoo
from tensorfold.errors import FileFormatError, InvalidArgumentError
from tensorfold.zoo import vision
from tensorfold.zoo.vision_data import SHAPE_CLASSES, generate_shapes, load_split
from tensorfold.zoo.vision_models import digits_cnn, resnet20

pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_splits_are_deterministic_disjoint_and_complete():
    a = vision.load_split("digits", 0)
    sizes = (len(a.train), len(a.val), len(a.test))
    assert sizes == (1197, 300, 300)
    assert a.train.images.shape[1:] == (1, 8, 8) and a.train.images.dtype == torch.float32
    assert float(a.train.images.min()) >= 0.0 and float(a.train.images.max()) <= 1.0
    everything = torch.cat([a.train.images, a.val.images, a.test.images]).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] >= 1790  # (sklearn's digits hold a few duplicates)
    assert sorted(torch.cat([a.train.labels, a.val.labels, a.test.labels]).bincount().tolist())[0] >= 170
    b = vision.load_split("digits", 1)
    assert not torch.equal(a.test.labels, b.test.labels)  # another seed, another split


def test_shapes_generation_is_a_pure_function_of_the_seed():
    x, y = generate_shapes(50, 7), generate_shapes(50, 7)
    assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    z = generate_shapes(50, 8)
    assert not torch.equal(x.images, z.images)
    assert x.images.shape == (50, 3, 32, 32)
    assert x.labels.bincount(minlength=len(SHAPE_CLASSES)).tolist() == [5] * 10  # balanced classes
    assert torch.isfinite(x.images).all()


def test_shapes_splits():
    s = load_split("shapes", 0)
    assert (len(s.train), len(s.val), len(s.test)) == (6000, 1000, 1000)
    assert not torch.equal(s.train.images[:10], s.test.images[:10])


def test_batches_reshuffle_each_pass_reproducibly():
    data = load_split("digits", 0).train
    loader = data.batches(100, shuffle_seed=3)
    assert len(loader) == 12
    first, second = [y for _, y in loader], [y for _, y in loader]
    assert not torch.equal(first[0], second[0])
    again = data.batches(100, shuffle_seed=3)
    assert torch.equal(next(iter(again))[1], first[0])
    assert sum(len(y) for y in first) == len(data)


def test_shipped_digits_weights_reach_their_recorded_accuracy():
    record = vision.read_record("digits-cnn")
    model = vision.load_model("digits-cnn", train_if_missing=False)
    acc = vision.accuracy(model, load_split("digits", 0).test)
    assert acc >= 0.95
    assert acc == pytest.approx(float(record["test_accuracy"]), abs=1e-9)
    assert not model.training


@pytest.mark.skipif(vision.weights_path("resnet20-shapes") is None, reason="resnet20-shapes weights not shipped")
def test_shipped_resnet20_weights_reach_their_recorded_accuracy():
    record = vision.read_record("resnet20-shapes")
    model = vision.load_model("resnet20-shapes", train_if_missing=False)
    test = load_split("shapes", 0).test
    acc = vision.accuracy(model, test)
    assert acc >= 0.9
    assert acc == pytest.approx(float(record["test_accuracy"]), abs=2e-3)
    assert sum(p.numel() for p in model.parameters()) == 269_722


def test_builtin_entries_follow_the_zoo_contract():
    entry = zoo.get("digits-cnn")
    assert isinstance(entry, zoo.BuiltinModel) and entry.name == "digits-cnn"
    model = entry.load()
    calib = entry.calibration(300, 0)
    assert sum(len(b) for b in calib) == 300 and calib[0].shape[1:] == (1, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(calib, entry.calibration(300, 0)))
    assert entry.example_inputs(32).shape == (32, 1, 8, 8)
    assert entry.example_inputs(700).shape[0] == 700
    metrics = entry.evaluate(model, model)
    assert metrics["accuracy_drop"] == 0.0 and metrics["accuracy"] >= 0.95
    broken = digits_cnn(seed=1)  # untrained
    assert entry.evaluate(model, broken)["accuracy_drop"] > 0.5
    train, val = entry.finetune_data(64, 0)
    images, labels = next(iter(train))
    assert images.shape == (64, 1, 8, 8) and labels.dtype == torch.int64
    assert sum(len(y) for _, y in val) == 300
    assert "resnet20-shapes" in zoo.names()


def test_models_build_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a, b = resnet20(seed=0), resnet20(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    out = a.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(InvalidArgumentError):
        vision.VisionTask("vgg16")
    with pytest.raises(InvalidArgumentError):
        load_split("cifar10")
    bad = tmp_path / "digits-cnn.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FileFormatError):
        vision.read_weights("digits-cnn", bad)
    with pytest.raises(InvalidArgumentError):
        vision.VisionTask("digits-cnn").calibration(0)


def test_weights_round_trip_through_safetensors(tmp_path):
    model = vision.load_model("digits-cnn")
    path = vision.save_weights(model, "digits-cnn", {"note": "copy"}, tmp_path)
    again = vision.read_weights("digits-cnn", path)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
