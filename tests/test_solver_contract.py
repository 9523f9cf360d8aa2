"""One loop contract for the iterative solvers (decomp/iteration.py FitTracker): the callback gets
``(iteration, fit)`` and returning True stops the run, the fit history is what the callback saw, the
iteration limit warns, and a bad ``n_iter_max`` is an InvalidArgumentError."""

import pytest
import torch

import tensorfold as tf
from tensorfold.errors import ConvergenceWarning, InvalidArgumentError
from tensorfold.testing import add_noise, random_cp


def noisy():
    return add_noise(random_cp((6, 7, 8), 3, seed=3).to_tensor(), 0.3)


NONNEG = torch.rand(6, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
MASK = torch.rand(6, 7, 8, generator=torch.Generator().manual_seed(1)) < 0.7

SOLVERS = {
    "cp": lambda **kw: tf.cp(noisy(), 3, init="random", **kw),
    "tucker": lambda **kw: tf.tucker(noisy(), (2, 3, 3), **kw),
    "tensor_ring": lambda **kw: tf.tensor_ring(noisy(), 2, init="random", **kw),
    "nonnegative_cp": lambda **kw: tf.nonnegative_cp(NONNEG, 3, **kw),
    "nonnegative_tucker": lambda **kw: tf.nonnegative_tucker(NONNEG, (2, 2, 2), **kw),
    "complete": lambda **kw: tf.complete(noisy(), mask=MASK, rank=2, method="als", **kw),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_callback_sees_the_fit_and_stops_the_run(name):
    seen = []

    def callback(iteration, fit):
        seen.append((iteration, fit))
        return iteration == 3

    result = SOLVERS[name](n_iter_max=50, tol=0, callback=callback)
    assert [i for i, _ in seen] == [1, 2, 3]
    assert all(0.0 < fit <= 1.0 for _, fit in seen)  # the fit (1 - relative error), not the error
    assert not result.info.converged
    assert list(result.info.fit_history)[-3:] == [f for _, f in seen]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_the_iteration_limit_warns(name):
    with pytest.warns(ConvergenceWarning, match="tol"):
        result = SOLVERS[name](n_iter_max=1, tol=1e-15)
    assert not result.info.converged


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_a_bad_iteration_limit_is_an_invalid_argument(name, bad):
    with pytest.raises(InvalidArgumentError, match="n_iter_max"):
        SOLVERS[name](n_iter_max=bad)


def test_symmetric_cp_iteration_limit_is_an_invalid_argument():
    X = torch.einsum("i,j,k->ijk", *([torch.arange(1.0, 5.0, dtype=torch.float64)] * 3))
    with pytest.raises(InvalidArgumentError, match="n_iter_max"):
        tf.symmetric_cp(X, rank=1, n_iter_max=0)
