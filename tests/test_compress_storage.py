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
    with pytest.raises(InvalidArgumentError, match="trust_factory=True"):
        tf.load_compressed(tmp_path / "run")  # a factory named in a file is never run by default
    again = tf.load_compressed(tmp_path / "run", trust_factory=True)
    x = torch.randn(3, 16)
    assert torch.equal(again(x), small(x))
    again = tf.load_compressed(tmp_path / "run", factory=model_factory_16)
    assert torch.equal(again(x), small(x))
    sys.modules.pop("tf_store_models", None)


def model_factory_16():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("source", ["os:abort", "this:s", "subprocess:getoutput", "tf_store_evil:run"])
def test_plan_naming_code_is_never_run(tmp_path, monkeypatch, source):
    """A plan.json naming a function to call is refused; the function is neither imported nor called."""
    evil = tmp_path / "tf_store_evil.py"
    evil.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('imported')\ndef run():\n    raise SystemExit(9)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = model_factory_16()
    small, p = tf.compress(model, 0.5, methods=("svd",))
    p.model_name = source
    tf.save_compressed(small, p, tmp_path / "run")
    before = set(sys.modules)
    with pytest.raises(InvalidArgumentError, match=r"trust_factory=True \(--trust-factory"):
        tf.load_compressed(tmp_path / "run")
    assert not (tmp_path / "ran").exists()
    assert "this" not in set(sys.modules) - before and "tf_store_evil" not in sys.modules
    again = tf.load_compressed(tmp_path / "run", base_model=model)  # the caller's model: fine
    x = torch.randn(2, 16)
    assert torch.equal(again(x), small(x))


@pytest.mark.parametrize("body, message", [
    ("def build(width):\n    return None\n", r"needs arguments \(width\)"),
    ("def build():\n    raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU here"),
    ("def build():\n    return 3\n", "returned a int"),
])
def test_bad_factory_is_one_clear_error(tmp_path, monkeypatch, body, message):
    from tensorfold.compression.storage import call_factory, load_factory

    (tmp_path / "tf_store_bad.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tf_store_bad", None)
    with pytest.raises(InvalidArgumentError, match=message):
        call_factory(load_factory("tf_store_bad:build"), "tf_store_bad:build")
    sys.modules.pop("tf_store_bad", None)


def test_weights_that_do_not_fit_name_every_difference(tmp_path):
    model = model_factory()
    small, p = tf.compress(model, 0.5, methods=("svd",))
    tf.save_compressed(small, p, tmp_path / "run")
    other = model_factory()
    other[6] = nn.Linear(16, 33)  # one shape differs, the rest fits
    with pytest.raises(FileFormatError) as info:
        tf.load_compressed(tmp_path / "run", base_model=other)
    text = str(info.value)
    assert "\n" not in text and "of another shape" in text and "(33" in text


def test_existing_directory_is_refused_and_kept(tmp_path):
    model = model_factory()
    small, p = tf.compress(model, 0.5, methods=("svd",))
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="exists"):
        tf.save_compressed(small, p, out)
    # a directory tensorfold did not write is never replaced, even with overwrite
    with pytest.raises(InvalidArgumentError, match="did not write"):
        tf.save_compressed(small, p, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    tf.save_compressed(small, p, out, overwrite=True)  # empty: fine
    tf.save_compressed(small, p, out, overwrite=True)  # an earlier result: fine
    assert sorted(f.name for f in out.iterdir()) == [PLAN_FILE, WEIGHTS_FILE]
    assert [f.name for f in tmp_path.iterdir()] == ["run"]  # no temporary directory left behind
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # one mode for every output file


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
