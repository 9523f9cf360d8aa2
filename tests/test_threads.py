"""Fitting threads: no more than the free cores while torch's OpenMP threads would spin (a shared CPU
collapses otherwise), the caller's count on a quiet machine or with passive waiting, and the caller's
count restored afterwards in every case. The kernel's runnable-task count is faked: known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression import threads as th


class Recorder(nn.Module):
    """A linear model that records torch's thread count at every forward call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return self.body(x)


@pytest.fixture()
def two_threads_two_cores(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(th, "_usable_cores", lambda: 2)
    monkeypatch.setattr(th, "_own_running", lambda: 1)  # only the reading thread of this process runs
    yield
    torch.set_num_threads(before)


def machine(monkeypatch, policy: str | None, runnable: list[int | None]):
    """The wait policy in the environment, and the kernel's successive runnable-task counts (this reader
    included)."""
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    counts = iter(runnable * 100)
    monkeypatch.setattr(th, "_runnable_tasks", lambda: next(counts))


@pytest.mark.parametrize("policy, runnable, inside", [
    (None, [1], 2),                 # quiet: nothing else runnable, the caller's two threads
    (None, [2], 1),                 # one busy process beside us on two cores: one thread
    (None, [1, 2, 2, 1, 2], 1),     # the median of five counts
    (None, [1, 2, 1, 1, 2], 2),
    (None, [7], 1),                 # more busy than cores: still one
    (None, [None], 2),              # no /proc/stat: unchanged
    ("active", [2], 1),
    ("PASSIVE", [2], 2),            # waiting threads sleep: the caller's count whatever the load
    ("passive", [7], 2),
])
def test_fitting_threads_by_wait_policy_and_free_cores(monkeypatch, two_threads_two_cores, policy, runnable,
                                                       inside):
    machine(monkeypatch, policy, runnable)
    with th.fitting_threads():
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), th.fitting_threads():
        raise RuntimeError("restored on the way out")
    assert torch.get_num_threads() == 2


def test_free_cores_of_this_machine_is_a_core_count():
    free = th.free_cores(samples=3)
    assert free is None or 0 <= free <= th._usable_cores()
    assert th._own_running() >= 1


def test_this_process_spinning_threads_are_not_counted_as_load(monkeypatch, two_threads_two_cores):
    """Our own idle OpenMP threads may still spin (runnable) after a parallel region: not other load."""
    machine(monkeypatch, None, [3])
    monkeypatch.setattr(th, "_own_running", lambda: 3)  # the reader and two spinning workers
    with th.fitting_threads():
        assert torch.get_num_threads() == 2
    monkeypatch.setattr(th, "_own_running", lambda: 2)  # one of them, and one other process
    with th.fitting_threads():
        assert torch.get_num_threads() == 1


@pytest.mark.parametrize("runnable, inside", [([1], 2), ([2], 1)])
def test_plan_and_apply_fit_on_the_free_cores(monkeypatch, two_threads_two_cores, runnable, inside):
    machine(monkeypatch, None, runnable)
    model = Recorder()
    calib = [torch.randn(32, 16, generator=torch.Generator().manual_seed(1))]
    small, plan = tf.compress(model, 0.5, methods=("svd",), calib=calib, curve=False)
    # calibration statistics, sensitivities (copies of the model) and the fitting pass all ran inside
    assert len(model.seen) >= 1 and set(model.seen) == {inside}
    assert set(small.seen) == {inside}
    assert torch.get_num_threads() == 2
    assert plan.fraction <= 0.5
