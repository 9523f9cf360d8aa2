"""TTLinear (MPO): dims, exactness at full rank, both sweep orders, counts, training, bad options."""

import io

import pytest
import torch

from tensorfold.errors import InvalidArgumentError, NotCompressibleError, RankError, ShapeError
from tensorfold.nn import LayerCost, TTLinear, dense_params, layer_class_for
from tensorfold.nn.tt_linear import balanced_factors, candidate_plans, contraction_plan


def _linear(i, o, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o, bias=bias, dtype=dtype)


@pytest.mark.parametrize("n,parts,expected", [
    (768, 3, (8, 8, 12)), (3072, 3, (12, 16, 16)), (1024, 2, (32, 32)), (7, 3, (1, 1, 7)), (384, 4, (4, 4, 4, 6)),
])
def test_balanced_factors(n, parts, expected):
    assert balanced_factors(n, parts) == expected


@pytest.mark.parametrize("shape,opts", [
    ((96, 64), {}),
    ((64, 96), {"bias": False}),
    ((60, 35), {"n_cores": 2}),
    ((48, 80), {"n_cores": 4}),
    ((24, 30), {"in_dims": (2, 3, 4), "out_dims": (5, 3, 2)}),
])
def test_full_rank_equals_dense(shape, opts):
    bias = opts.pop("bias", True)
    dense = _linear(*shape, bias=bias)
    layer = TTLinear.from_dense(dense, TTLinear.max_rank(dense, **opts), **opts)
    x = torch.randn(2, 3, shape[0])
    assert (layer(x) - dense(x)).abs().max() <= 1e-5
    assert (layer.to_dense().weight - dense.weight).abs().max() <= 1e-5
    for plan in range(len(candidate_plans(layer.in_dims, layer.out_dims, layer.rank))):
        layer.force_plan = plan  # every contraction plan computes the same map
        assert (layer(x) - dense(x)).abs().max() <= 1e-5


def test_forward_never_builds_the_dense_weight(monkeypatch):
    layer = TTLinear.from_dense(_linear(96, 64), 8)
    expected = layer(torch.ones(1, 96))

    def forbidden(self):
        raise AssertionError("forward rebuilt the dense weight")

    monkeypatch.setattr(TTLinear, "dense_weight", forbidden)
    assert torch.equal(layer(torch.ones(1, 96)), expected)


def test_counts_for_768x3072():
    dense = torch.nn.Linear(768, 3072)
    assert TTLinear.max_rank(dense) == (96, 192)
    layer = TTLinear(768, 3072, 16)
    assert (layer.in_dims, layer.out_dims) == ((8, 8, 12), (12, 16, 16))
    # cores 1*12*8*16 + 16*16*8*16 + 16*16*12*1, plus the bias
    assert layer.n_params == 1536 + 32768 + 3072 + 3072 == 40448
    # Plain sweeps cost per row 18432 r^2 + 46080 r (left to right) or 16384 r^2 + 36864 r (right to
    # left): 4784128 at r=16, the cheapest for one row. Merging cores 1-2 first (once per call:
    # 96*16*128*16 multiply-adds) and sweeping the two cores (in 64|12, out 192|16) left to right
    # costs 64*192*16*12 + 16*12*16*192 per row, which is cheaper for 32 rows:
    assert layer.flops((1, 768)) == 4784128
    assert contraction_plan(layer.in_dims, layer.out_dims, layer.rank)[:2] == ([(0, 2), (2, 3)], False)
    assert layer.flops((32, 768)) == 32 * (64 * 192 * 16 * 12 + 16 * 12 * 16 * 192) + 96 * 16 * 128 * 16
    assert layer.flops((32, 768)) == 97517568 < 32 * 4784128
    assert TTLinear.cost(dense, 16, (32, 768)) == LayerCost(params=40448, flops=97517568)


def test_plan_follows_the_number_of_rows():
    layer = TTLinear(768, 3072, 16)
    plans = candidate_plans(layer.in_dims, layer.out_dims, layer.rank)
    assert len(plans) == 6 and all(len(groups) >= 2 for groups, *_ in plans)  # never the dense weight
    one, many = contraction_plan(layer.in_dims, layer.out_dims, layer.rank, 1), contraction_plan(
        layer.in_dims, layer.out_dims, layer.rank, 32)
    assert len(one[0]) == 3 and many[0] == [(0, 2), (2, 3)]  # merging pays off only for many rows
    assert layer.flops((1, 768)) == one[2] and layer.flops((32, 768)) == many[2]


def test_error_non_increasing_and_fraction():
    dense = _linear(48, 64, dtype=torch.float64)
    W = dense.weight.detach()
    errors = [float((TTLinear.from_dense(dense, r).dense_weight().detach() - W).norm()) for r in range(1, 17)]
    assert all(b <= a + 1e-10 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10
    budget = 0.2 * dense_params(dense)
    r = TTLinear.resolve_rank(dense, 0.2)
    assert TTLinear.cost(dense, r, (1, 48)).params <= budget
    assert TTLinear.cost(dense, tuple(min(v + 1, m) for v, m in zip(r, TTLinear.max_rank(dense))),
                         (1, 48)).params > budget


def test_gradients_state_dict_dtype():
    dense = _linear(24, 30, dtype=torch.float64)
    layer = TTLinear.from_dense(dense, 3)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x = torch.randn(4, 24, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = TTLinear(24, 30, layer.rank, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), layer(x))
    assert "in_dims=(2, 3, 4)" in repr(layer) and f"rank={layer.rank}" in repr(layer)
    assert layer_class_for("tt", dense) == (TTLinear, {})


def test_bad_options_raise():
    dense = torch.nn.Linear(24, 30)
    with pytest.raises(ShapeError):
        TTLinear.from_dense(dense, 2, in_dims=(2, 3, 5))
    with pytest.raises(ShapeError):
        TTLinear.from_dense(dense, 2, in_dims=(4, 6), out_dims=(2, 3, 5))
    with pytest.raises(RankError):
        TTLinear.from_dense(dense, (2, 2, 2))
    with pytest.raises(RankError):
        TTLinear.from_dense(dense, (7, 2))  # bond 0 allows at most 2*2 = 4
    with pytest.raises(RankError):
        TTLinear.from_dense(dense, 0)
    with pytest.raises(RankError):
        TTLinear.from_dense(dense, 1.2)
    with pytest.raises(InvalidArgumentError, match="n_cores"):
        TTLinear.from_dense(dense, 2, n_cores=1)
    with pytest.raises(NotCompressibleError):
        TTLinear.from_dense(torch.nn.Conv2d(3, 3, 3), 2)
