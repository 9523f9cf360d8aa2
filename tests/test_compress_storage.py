"""save_compressed / load_compressed round trips, refusal to overwrite, nothing written half-way."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.storage import PLAN_FILE, WEIGHTS_FILE
from tensorfold.errors import FileFormatError, InvalidArgumentError


def model_factory():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5),
    )


@pytest.mark.parametrize("methods", [("svd",), ("svd", "tucker", "spatial"), ("tt", "cp")])
def test_roundtrip_gives_identical_outputs(tmp_path, methods):
    model = model_factory()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    include = ["0", "6", "8"] if "cp" in methods else None  # CP-ALS candidates only on the small conv
    small, p = tf.compress(model, 0.5, methods=methods, calib=[x], include=include)
    out = tmp_path / "run"
    tf.save_compressed(small, p, out)
    assert sorted(f.name for f in out.iterdir()) == [PLAN_FILE, WEIGHTS_FILE]
    again = tf.load_compressed(out, base_model=model)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert [type(m).__name__ for m in again.modules()] == [type(m).__name__ for m in small.modules()]
    # the base model is not modified by loading
    assert not any(isinstance(m, tf.nn.FactorizedLayer) for m in model.modules())


def test_factory_source_is_rebuilt(tmp_path, monkeypatch):
    module = tmp_path / "tf_store_models.py"
    module.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from tensorfold.compression.storage import load_factory

    model = load_factory("tf_store_models:build")()
    small, p = tf.compress(model, 0.5, methods=("svd",))
    p.model_name = "tf_store_models:build"
    tf.save_compressed(small, p, tmp_path / "run")
    again = tf.load_compressed(tmp_path / "run")
    x = torch.randn(3, 16)
    assert torch.equal(again(x), small(x))
    sys.modules.pop("tf_store_models", None)


def test_existing_directory_is_refused_and_kept(tmp_path):
    model = model_factory()
    small, p = tf.compress(model, 0.5, methods=("svd",))
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="exists"):
        tf.save_compressed(small, p, out)
    assert (out / "keep.txt").read_text() == "mine"
    tf.save_compressed(small, p, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / PLAN_FILE).is_file()
    assert [f.name for f in tmp_path.iterdir()] == ["run"]  # no temporary directory left behind


def test_failed_save_writes_nothing(tmp_path):
    class Bad:
        pass

    with pytest.raises(InvalidArgumentError):
        tf.save_compressed(model_factory(), Bad(), tmp_path / "run")
    small, p = tf.compress(model_factory(), 0.5, methods=("svd",))

    class Exploding(nn.Module):
        def state_dict(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        tf.save_compressed(Exploding(), p, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_mismatched_files(tmp_path):
    model = model_factory()
    small, p = tf.compress(model, 0.5, methods=("svd",))
    out = tmp_path / "run"
    tf.save_compressed(small, p, out)
    with pytest.raises(FileFormatError):
        tf.load_compressed(out, base_model=nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(InvalidArgumentError, match="base_model"):
        tf.load_compressed(out)  # no model source recorded
    (out / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(FileFormatError):
        tf.load_compressed(out, base_model=model)
    (out / PLAN_FILE).write_text(json.dumps({"version": 99}))
    with pytest.raises(FileFormatError):
        tf.load_compressed(out, base_model=model)
    with pytest.raises(FileFormatError):
        tf.load_compressed(tmp_path / "missing", base_model=model)
