"""The construction contract, checked on every factorized layer class: Cls(spec, rank, **opts), empty,
from_dense, from_factors (round trip through factor_weights), options, the registry, and the low-rank
interface of the two-factor classes."""

import pytest
import torch
from torch import nn

from tensorfold.errors import RankError, ShapeError
from tensorfold.nn import LAYER_KINDS, METHODS, FactorizedLayer, LowRankLayer, layer_class_for, layer_kind
from tensorfold.nn.base import DenseSpec
from tensorfold.testing import random_cp  # noqa: F401  (imports tensorfold.decomp for CPConv)

# (class name, dense layer, rank, options)
CASES = [
    ("LowRankLinear", lambda: nn.Linear(24, 16), 5, {}),
    ("SVDConv", lambda: nn.Conv2d(6, 8, 3, padding=1), 4, {"scheme": "channel"}),
    ("SVDConv", lambda: nn.Conv2d(6, 8, 3, padding=1), 4, {"scheme": "input"}),
    ("SVDConv", lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), 3, {"scheme": "spatial"}),
    ("TuckerConv", lambda: nn.Conv2d(6, 8, 3, stride=2, groups=2), (2, 3), {}),
    ("CPConv", lambda: nn.Conv1d(6, 8, 3, bias=False), 4, {}),
    ("TTLinear", lambda: nn.Linear(24, 16), (3, 4), {"in_dims": (2, 3, 4), "out_dims": (2, 2, 4)}),
]
IDS = [f"{c[0]}-{c[3].get('scheme', '')}" for c in CASES]


def dense_of(make):
    torch.manual_seed(0)
    return make().double()


def x_for(layer):
    spec = DenseSpec.of(layer)
    shape = (3, spec.in_features) if not spec.is_conv else (3, spec.in_features, *([7] * spec.dim))
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name, make, rank, opts", CASES, ids=IDS)
def test_constructor_empty_and_registry(name, make, rank, opts):
    cls = layer_kind(name)
    assert LAYER_KINDS[name] is cls and issubclass(cls, FactorizedLayer)
    dense = dense_of(make)
    spec = DenseSpec.of(dense)
    a = cls(spec, rank, dtype=torch.float64, **opts)
    b = cls(dense, rank, dtype=torch.float64, **opts)  # the dense layer itself is as good as its spec
    c = cls.empty(spec, list(rank) if isinstance(rank, tuple) else rank, dtype=torch.float64,
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()})  # plan (JSON) data
    for layer in (a, b, c):
        assert layer.spec == spec and layer.rank == a.rank
        assert [tuple(w.shape) for w in layer.factor_weights()] == [tuple(w.shape) for w in a.factor_weights()]
        assert layer.n_params == cls.cost(spec, rank, (1,) * 0 + tuple(x_for(dense).shape), **opts).params
    again = cls.empty(spec, a.rank, **a.options())
    assert [tuple(w.shape) for w in again.factor_weights()] == [tuple(w.shape) for w in a.factor_weights()]


@pytest.mark.parametrize("name, make, rank, opts", CASES, ids=IDS)
def test_from_dense_and_from_factors_round_trip(name, make, rank, opts):
    cls = layer_kind(name)
    dense = dense_of(make)
    fitted = cls.from_dense(dense, rank, **opts)
    x = x_for(dense)
    assert fitted(x).shape == dense(x).shape
    rebuilt = cls.from_factors(fitted.spec, fitted.factor_weights(), fitted.bias_tensor(), **fitted.options())
    assert type(rebuilt) is cls and rebuilt.rank == fitted.rank
    assert torch.equal(rebuilt(x), fitted(x))
    assert torch.allclose(rebuilt.to_dense()(x), fitted(x), atol=1e-10)
    with pytest.raises((ShapeError, RankError)):  # a missing factor
        cls.from_factors(fitted.spec, fitted.factor_weights()[:-1], fitted.bias_tensor(), **fitted.options())


@pytest.mark.parametrize("name, make, rank, opts", CASES, ids=IDS)
def test_the_planner_reaches_every_class_through_the_method_registry(name, make, rank, opts):
    dense = dense_of(make)
    found = [layer_class_for(m, dense) for m in METHODS]
    assert any(f is not None and f[0] is layer_kind(name) for f in found)


@pytest.mark.parametrize("name, make, rank, opts", [c for c in CASES if issubclass(layer_kind(c[0]), LowRankLayer)],
                         ids=[i for c, i in zip(CASES, IDS) if issubclass(layer_kind(c[0]), LowRankLayer)])
def test_low_rank_interface(name, make, rank, opts):
    cls = layer_kind(name)
    dense = dense_of(make)
    spec = DenseSpec.of(dense)
    fitted = cls.from_dense(dense, rank, **opts)
    # the fitted weight, matricised as the class says, has rank `rank` per group, and is the truncated SVD
    for M, W in zip(cls.matrices(fitted.dense_weight().detach(), spec, **opts),
                    cls.matrices(dense.weight.detach(), spec, **opts)):
        s = torch.linalg.svdvals(M)
        assert int((s > 1e-9 * s[0]).sum()) == rank
        assert torch.allclose(s, torch.linalg.svdvals(W)[: len(s)] * (torch.arange(len(s)) < rank), atol=1e-9)
    # from_lowrank of the exact factors rebuilds the dense weight
    lefts, rights = [], []
    for W in cls.matrices(dense.weight.detach(), spec, **opts):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        full = len(S)
        lefts.append(U * S)
        rights.append(Vh)
    if cls.max_rank(spec, **opts) == full:
        exact = cls.from_lowrank(spec, lefts, rights, dense.bias.detach() if dense.bias is not None else None, **opts)
        assert torch.allclose(exact.dense_weight(), dense.weight, atol=1e-10)
    inner, outer = fitted.lowrank_sides()
    weights = [id(w) for w in fitted.factor_weights()]
    assert id(inner.weight) in weights and id(outer.weight) in weights
    groups = getattr(inner, "groups", 1)
    assert inner.weight.shape[0] == groups * fitted.rank and outer.weight.shape[1] == fitted.rank


def test_a_new_layer_kind_plugs_in():
    """A class defined outside tensorfold registers itself and is planned once a method points at it."""
    import tensorfold as tf
    from tensorfold.compression.methods import known_methods
    from tensorfold.nn import TTLinear, register_method

    class TwoCoreTT(TTLinear):
        """A stand-in for a new layer kind: a TT layer that says how it is shown."""

        def extra_repr(self) -> str:
            return "two cores: " + super().extra_repr()

    register_method("tt2", "linear", TwoCoreTT, {"n_cores": 2})
    try:
        assert layer_kind("TwoCoreTT") is TwoCoreTT and "tt2" in known_methods()
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        small, p = tf.compress(model, 0.5, methods=("tt2",), curve=False)
        assert isinstance(small[0], TwoCoreTT) and len(small[0].cores) == 2
        assert p.layers[0].options["in_dims"] == small[0].in_dims
    finally:
        del METHODS["tt2"]
        del LAYER_KINDS["TwoCoreTT"]
