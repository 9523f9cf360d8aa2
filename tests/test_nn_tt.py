"""TTLinear (MPO): dims, exactness at full rank, both sweep orders, counts, training, bad options."""

import io

import pytest
import torch

from tensorfold.errors import InvalidArgumentError, NotCompressibleError, RankError, ShapeError
from tensorfold.nn import LayerCost, TTLinear, dense_params, layer_class_for
from tensorfold.nn.base import DenseSpec
from tensorfold.nn.tt_linear import (
    balanced_factors,
    candidate_plans,
    contraction_plan,
    skewed_factors,
    skewed_geometry,
)


def _linear(i, o, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o, bias=bias, dtype=dtype)


@pytest.mark.parametrize("n,parts,expected", [
    (768, 3, (8, 8, 12)), (3072, 3, (12, 16, 16)), (1024, 2, (32, 32)), (7, 3, (1, 1, 7)), (384, 4, (4, 4, 4, 6)),
])
def test_balanced_factors(n, parts, expected):
    assert balanced_factors(n, parts) == expected


@pytest.mark.parametrize("n,parts,expected", [
    (768, 3, (2, 2, 192)), (3072, 2, (2, 1536)), (35, 3, (5, 1, 7)), (7, 3, (1, 1, 7)), (1, 2, (1, 1)),
])
def test_skewed_factors(n, parts, expected):
    assert skewed_factors(n, parts) == expected


def test_skewed_geometry_is_the_default():
    assert skewed_geometry(768, 3072, 3) == ((2, 192, 2), (2, 2, 768))
    assert skewed_geometry(384, 1536, 2) == ((192, 2), (2, 768))
    layer = TTLinear(DenseSpec(768, 3072, True), 8)
    assert (layer.in_dims, layer.out_dims) == ((2, 192, 2), (2, 2, 768))
    assert TTLinear(DenseSpec(768, 3072, True), 8, geometry="balanced").in_dims == (8, 8, 12)
    # the bond after the 2x2 first core is full at 4; the main bond splits 4*768 rows from 192*2 columns
    assert TTLinear.max_rank(torch.nn.Linear(768, 3072)) == (4, 1536)
    # explicit dims win over the rule
    assert TTLinear(DenseSpec(768, 3072, True), 8, in_dims=(4, 12, 16), out_dims=(16, 12, 16)).in_dims == (4, 12, 16)
    # a plan saves the resolved dims, so a later change of default cannot change a saved layer
    dense = torch.nn.Linear(768, 3072)
    assert TTLinear.pinned_options(dense) == {"in_dims": (2, 192, 2), "out_dims": (2, 2, 768)}
    assert TTLinear.pinned_options(dense, geometry="balanced", n_cores=2) == {"in_dims": (24, 32), "out_dims": (48, 64)}


@pytest.mark.parametrize("shape,opts", [
    ((96, 64), {}),
    ((64, 96), {"bias": False}),
    ((60, 35), {"n_cores": 2}),
    ((48, 80), {"n_cores": 4}),
    ((24, 30), {"in_dims": (2, 3, 4), "out_dims": (5, 3, 2)}),
    ((96, 64), {"geometry": "balanced"}),
    ((35, 21), {}),
    ((48, 80), {"n_cores": 4, "geometry": "balanced"}),
])
def test_full_rank_equals_dense(shape, opts):
    bias = opts.pop("bias", True)
    dense = _linear(*shape, bias=bias)
    layer = TTLinear.from_dense(dense, TTLinear.max_rank(dense, **opts), **opts)
    x = torch.randn(2, 3, shape[0])
    assert (layer(x) - dense(x)).abs().max() <= 1e-5
    assert (layer.to_dense().weight - dense.weight).abs().max() <= 1e-5
    for plan in range(len(candidate_plans(layer.in_dims, layer.out_dims, layer.rank))):
        for batch_last in (0, 1):  # every contraction plan and state layout computes the same map
            layer.force_plan, layer.batch_last = plan, batch_last
            assert (layer(x) - dense(x)).abs().max() <= 1e-5
            layer._bmm_below = 0  # big-core path (transposed copy + one GEMM) for every core
            assert (layer(x) - dense(x)).abs().max() <= 1e-5
            layer._bmm_below = 1 << 40  # small-core path (one matmul per output prefix)
            assert (layer(x) - dense(x)).abs().max() <= 1e-5


def test_forward_never_builds_the_dense_weight(monkeypatch):
    layer = TTLinear.from_dense(_linear(96, 64), 8)
    expected = layer(torch.ones(1, 96))

    def forbidden(self):
        raise AssertionError("forward rebuilt the dense weight")

    monkeypatch.setattr(TTLinear, "dense_weight", forbidden)
    assert torch.equal(layer(torch.ones(1, 96)), expected)


def test_counts_for_768x3072_skewed():
    dense = torch.nn.Linear(768, 3072)
    layer = TTLinear(DenseSpec(768, 3072, True), 64)
    assert layer.rank == (4, 64)
    # cores (1, 2, 2, 4), (4, 2, 192, 64), (64, 768, 2, 1), plus the bias
    assert layer.n_params == 16 + 98304 + 98304 + 3072 == 199696
    # One row, no merging, left to right: 16 * 384 (core 1 over the 192*2 inputs still to come)
    # + 98304 * 2 * 2 (core 2, per output index of core 1 and remaining input index)
    # + 98304 * 4 (core 3, per output prefix) = 792576 multiply-adds, 0.34x the dense 2359296.
    assert layer.flops((1, 768)) == 16 * 384 + 98304 * 4 + 98304 * 4 == 792576
    # 32 rows: merging cores 1-2 once (4 * 4 * 2*192*64 multiply-adds into a (1, 4, 384, 64) core), then
    # per row 98304 * 2 (merged core, per remaining input index) + 98304 * 4 (core 3) is cheaper.
    groups, reverse, cost = contraction_plan(layer.in_dims, layer.out_dims, layer.rank, 32)
    assert (groups, reverse) == ([(0, 2), (2, 3)], False)
    assert cost == 32 * (98304 * 2 + 98304 * 4) + 4 * 4 * 2 * 192 * 64 == 19267584
    assert TTLinear.cost(dense, 64, (32, 768)) == LayerCost(params=199696, flops=19267584)


def test_counts_for_768x3072_balanced():
    dense = torch.nn.Linear(768, 3072)
    assert TTLinear.max_rank(dense, geometry="balanced") == (96, 192)
    layer = TTLinear(DenseSpec(768, 3072, True), 16, geometry="balanced")
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
    assert TTLinear.cost(dense, 16, (32, 768), geometry="balanced") == LayerCost(params=40448, flops=97517568)


def test_plan_follows_the_number_of_rows():
    layer = TTLinear(DenseSpec(768, 3072, True), 16, geometry="balanced")
    plans = candidate_plans(layer.in_dims, layer.out_dims, layer.rank)
    assert len(plans) == 6 and all(len(groups) >= 2 for groups, *_ in plans)  # never the dense weight
    one, many = contraction_plan(layer.in_dims, layer.out_dims, layer.rank, 1), contraction_plan(
        layer.in_dims, layer.out_dims, layer.rank, 32)
    assert len(one[0]) == 3 and many[0] == [(0, 2), (2, 3)]  # merging pays off only for many rows
    assert layer.flops((1, 768)) == one[2] and layer.flops((32, 768)) == many[2]


@pytest.mark.parametrize("opts", [{}, {"geometry": "balanced"}, {"n_cores": 2}, {"n_cores": 4}])
def test_error_non_increasing_and_fraction(opts):
    dense = _linear(48, 64, dtype=torch.float64)
    W = dense.weight.detach()
    top = max(TTLinear.max_rank(dense, **opts))
    errors = [float((TTLinear.from_dense(dense, r, **opts).dense_weight().detach() - W).norm())
              for r in range(1, top + 1)]
    assert all(b <= a + 1e-10 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10 < errors[-2]
    budget = 0.2 * dense_params(dense)
    r = TTLinear.resolve_rank(dense, 0.2, **opts)
    assert TTLinear.cost(dense, r, (1, 48), **opts).params <= budget
    assert TTLinear.cost(dense, tuple(min(v + 1, m) for v, m in zip(r, TTLinear.max_rank(dense, **opts))),
                         (1, 48), **opts).params > budget


def test_n_cores_2_skewed_is_a_kronecker_twisted_svd():
    # With 2 cores the skewed MPO is W[(i1 i2), (j1 j2)] = sum_r A[i1, j1, r] B[r, i2, j2] with i1, j2 of
    # size 2: at rank r its error is the tail of the singular values of that 2*96-by-64*2 rearrangement.
    dense = _linear(128, 192, dtype=torch.float64)
    layer = TTLinear.from_dense(dense, 10, n_cores=2)
    assert (layer.in_dims, layer.out_dims) == ((64, 2), (2, 96))
    R = dense.weight.detach().reshape(2, 96, 64, 2).permute(0, 2, 1, 3).reshape(128, 192)
    S = torch.linalg.svdvals(R)
    err = (layer.dense_weight().detach() - dense.weight.detach()).norm()
    assert abs(float(err) - float(S[10:].norm())) < 1e-9


def test_flops_match_counted_multiply_adds():
    from torch.utils.flop_counter import FlopCounterMode

    for opts in ({}, {"geometry": "balanced"}, {"n_cores": 4}):
        layer = TTLinear(DenseSpec(96, 64, False), 6, **opts)
        for rows in (1, 5, 32):
            x = torch.randn(rows, 96)
            for plan, (_, _, sweep, merge) in enumerate(candidate_plans(layer.in_dims, layer.out_dims, layer.rank)):
                for batch_last in (0, 1):
                    layer.force_plan, layer.batch_last = plan, batch_last
                    with FlopCounterMode(display=False) as counter:
                        layer(x)
                    assert counter.get_total_flops() == 2 * (rows * sweep + merge), (opts, rows, plan)
            layer.force_plan = -1
            with FlopCounterMode(display=False) as counter:
                layer(x)
            assert counter.get_total_flops() == 2 * layer.flops((rows, 96))


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
    fresh = TTLinear(DenseSpec(24, 30, True), layer.rank, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), layer(x))
    assert "in_dims=(2, 6, 2)" in repr(layer) and f"rank={layer.rank}" in repr(layer)
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
    with pytest.raises(InvalidArgumentError, match="geometry"):
        TTLinear.from_dense(dense, 2, geometry="fast")
    with pytest.raises(InvalidArgumentError, match="unknown"):
        TTLinear.from_dense(dense, 2, n_core=3)
    with pytest.raises(NotCompressibleError):
        TTLinear.from_dense(torch.nn.Conv2d(3, 3, 3), 2)
