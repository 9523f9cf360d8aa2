"""tensorfold.io: safe loading of every supported format, clear errors, atomic writes."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tensorfold.errors import FileFormatError
from tensorfold.io import atomic_path, load_array, write_text_atomic


@pytest.fixture
def array():
    return np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7.0


def test_npy(tmp_path, array):
    np.save(tmp_path / "x.npy", array)
    out = load_array(tmp_path / "x.npy")
    assert out.dtype == torch.float64 and out.shape == (2, 3, 4)
    assert np.array_equal(out.numpy(), array)


def test_npy_refuses_key(tmp_path, array):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(FileFormatError, match="holds one array"):
        load_array(tmp_path / "x.npy", key="x")


def test_npz_with_and_without_key(tmp_path, array):
    np.savez(tmp_path / "one.npz", only=array)
    assert np.array_equal(load_array(tmp_path / "one.npz").numpy(), array)
    np.savez(tmp_path / "two.npz", a=array, b=array[0].astype(np.float32))
    b = load_array(tmp_path / "two.npz", key="b")
    assert b.dtype == torch.float32 and np.array_equal(b.numpy(), array[0].astype(np.float32))
    with pytest.raises(FileFormatError, match=r"holds 2 arrays \(a, b\); choose one with --key"):
        load_array(tmp_path / "two.npz")
    with pytest.raises(FileFormatError, match="no array named 'c'; available: a, b"):
        load_array(tmp_path / "two.npz", key="c")


def test_pt_tensor_and_dict(tmp_path, array):
    t = torch.from_numpy(array)
    torch.save(t, tmp_path / "t.pt")
    assert torch.equal(load_array(tmp_path / "t.pt"), t)
    torch.save({"w": t, "b": t[0], "step": 3}, tmp_path / "d.pt")
    assert torch.equal(load_array(tmp_path / "d.pt", key="b"), t[0])
    with pytest.raises(FileFormatError, match="choose one with --key"):
        load_array(tmp_path / "d.pt")
    with pytest.raises(FileFormatError, match="does not apply"):
        load_array(tmp_path / "t.pt", key="w")


def test_safetensors(tmp_path, array):
    t = torch.from_numpy(array)
    save_file({"layer.weight": t, "layer.bias": t[0, 0].clone()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_array(tmp_path / "w.safetensors", key="layer.weight"), t)
    with pytest.raises(FileFormatError, match="no array named 'weight'"):
        load_array(tmp_path / "w.safetensors", key="weight")


class Payload:
    """A pickled object of this class would run code on load: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pt_with_pickled_object_refused(tmp_path, capsys):
    torch.save({"x": torch.zeros(2), "obj": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(FileFormatError, match="cannot read as .pt"):
        load_array(tmp_path / "evil.pt", key="x")
    assert "unpickled!" not in capsys.readouterr().out


def test_pt_holding_a_list_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(FileFormatError, match="holds a list"):
        load_array(tmp_path / "list.pt")


def test_object_npy_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FileFormatError, match="cannot read as .npy"):
        load_array(tmp_path / "obj.npy")


def test_pickle_disguised_as_npz_refused(tmp_path):
    (tmp_path / "p.npz").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(FileFormatError, match="cannot read as .npz"):
        load_array(tmp_path / "p.npz")


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors"])
def test_corrupt_files(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x93NUMPY not really an array file" * 3)
    with pytest.raises(FileFormatError, match=rf"broken\{suffix}: cannot read as \{suffix}"):
        load_array(path)


@pytest.mark.parametrize("make", ["truncate", "empty"])
def test_truncated_and_empty_files(tmp_path, array, make):
    path = tmp_path / "x.npy"
    np.save(path, array)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if make == "truncate" else b"")
    with pytest.raises(FileFormatError, match="cannot read as .npy"):
        load_array(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        load_array(tmp_path / "absent.npy")
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(FileFormatError, match="unknown format '.csv'"):
        load_array(tmp_path / "data.csv")
    with pytest.raises(FileFormatError, match="no such file"):
        load_array(tmp_path)  # a directory is not a file


def test_atomic_path_success_replaces_in_one_step(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_exception_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_exception_keeps_existing_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_text_atomic(tmp_path):
    target = tmp_path / "summary.json"
    write_text_atomic(target, '{"a": 1}\n')
    write_text_atomic(target, '{"a": 2}\n')
    assert target.read_text() == '{"a": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_directory_publishes_whole_or_nothing(tmp_path):
    from tensorfold.errors import InvalidArgumentError
    from tensorfold.io import atomic_directory

    target = tmp_path / "run"
    with atomic_directory(target) as tmp:
        (tmp / "plan.json").write_text("first")
        assert not target.exists()
    assert (target / "plan.json").read_text() == "first"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # the usual mode, not mkdtemp's private 0700
    with pytest.raises(InvalidArgumentError, match="already exists"), atomic_directory(target):
        pass
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "sweep.json").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["plan.json"]  # the old directory is untouched
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "sweep.json").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["sweep.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary leftovers
