"""replace_layers: one place that rebuilds a model from a plan, in each build mode (fitted, empty, random)."""

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.replace import BUILD_MODES, densify, replace_layers
from tensorfold.errors import InvalidArgumentError, ShapeError
from tensorfold.nn import FactorizedLayer


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def planned():
    model = cnn()
    p = tf.plan(model, 0.4, methods=("tucker", "tt", "svd"), allocator="uniform", input_shape=(2, 3, 8, 8), curve=False,
                sensitivity=False)
    assert sum(lp.factored for lp in p.layers) >= 3
    return model, p


def structure(model):
    return {name: (type(m).__name__, getattr(m, "rank", None)) for name, m in model.named_modules()
            if isinstance(m, FactorizedLayer)}


def test_every_mode_builds_the_plans_structure_and_leaves_the_model_alone(planned):
    model, p = planned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {lp.name: lp.rank for lp in p.layers if lp.factored}
    for build in BUILD_MODES:
        new = replace_layers(model, p, build)
        got = structure(new)
        assert {n: r for n, (_, r) in got.items()} == expected, build
        assert sum(q.numel() for q in new.parameters()) == p.model_params_after
        assert new(batches()[0]).shape == (8, 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(not isinstance(m, FactorizedLayer) for m in model.modules())


def test_fitted_equals_apply_and_empty_loads_its_state(planned):
    model, p = planned
    x = batches()[0]
    fitted = replace_layers(model, p, "fitted")
    assert torch.equal(fitted(x), tf.apply(model, p)(x))
    shell = replace_layers(model, p, "empty")
    shell.load_state_dict(fitted.state_dict())
    assert torch.equal(shell(x), fitted(x))


def test_fitted_with_calibration_lowers_the_output_error():
    model = cnn()
    calib = batches()
    p = tf.plan(model, 0.3, methods=("svd",), calib=calib, curve=False, sensitivity=False)
    x = calib[0]
    ref = model(x)

    def err(m):
        return float((m(x) - ref).norm() / ref.norm())

    assert err(replace_layers(model, p, "fitted", calib=calib)) < err(replace_layers(model, p, "fitted"))


def test_random_is_seeded_and_inplace_modifies_only_when_asked(planned):
    model, p = planned
    x = batches()[0]
    a, b, c = (replace_layers(model, p, "random", seed=s) for s in (0, 0, 1))
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    work = cnn()
    same = replace_layers(work, p, "empty", inplace=True)
    assert same is work and structure(work)


def test_one_decision_alone_and_densify_is_exact(planned):
    model, p = planned
    one = next(lp for lp in p.layers if lp.factored)
    new = replace_layers(model, [one], "fitted")
    assert list(structure(new)) == [one.name]
    fitted = replace_layers(model, p, "fitted")
    dense = densify(fitted)
    x = batches()[0]
    assert not structure(dense)
    assert torch.allclose(dense(x), fitted(x), atol=1e-5)


def test_a_plan_that_does_not_fit_the_model_is_one_clear_error(planned):
    _, p = planned
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    for build in BUILD_MODES:
        with pytest.raises(ShapeError, match="plan's layer"):
            replace_layers(other, p, build)
    with pytest.raises(InvalidArgumentError, match="build"):
        replace_layers(cnn(), p, "zeros")
