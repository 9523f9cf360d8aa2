"""LowRankLinear, cost counting and rank resolution (tensorfold.nn.base / nn.linear)."""

import io

import pytest
import torch

from tensorfold.errors import InvalidArgumentError, NotCompressibleError, RankError, ShapeError
from tensorfold.nn import LayerCost, LowRankLinear, dense_flops, dense_params, layer_class_for
from tensorfold.nn.base import DenseSpec


def _linear(i, o, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o, bias=bias, dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (17, 17)])
def test_full_rank_equals_dense(shape, bias):
    dense = _linear(*shape, bias=bias)
    layer = LowRankLinear.from_dense(dense, rank=min(shape))
    x = torch.randn(5, 3, shape[0])
    assert (layer(x) - dense(x)).abs().max() <= 1e-5
    back = layer.to_dense()
    assert isinstance(back, torch.nn.Linear)
    assert (back.weight - dense.weight).abs().max() <= 1e-5
    assert (back.bias is None) == (not bias)


def test_error_is_eckart_young_tail_and_non_increasing():
    dense = _linear(30, 50, dtype=torch.float64)
    S = torch.linalg.svdvals(dense.weight.detach())
    errors = []
    for r in range(1, 31):
        W_r = LowRankLinear.from_dense(dense, r).dense_weight().detach()
        err_sq = float(((W_r - dense.weight.detach()) ** 2).sum())
        assert err_sq == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-9, abs=1e-20)
        errors.append(err_sq)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-20


def test_counts_for_768x3072():
    dense = torch.nn.Linear(768, 3072)
    assert dense_params(dense) == 768 * 3072 + 3072 == 2362368
    assert dense_flops(dense, (32, 768)) == 75497472
    assert dense_flops(dense, (4, 8, 768)) == 32 * 768 * 3072
    cost = LowRankLinear.cost(dense, 64, (32, 768))
    assert cost == LayerCost(params=248832, flops=7864320)  # 64 * (768 + 3072) (+ bias 3072); 32 * 64 * 3840
    layer = LowRankLinear(DenseSpec(768, 3072, True), 64)
    assert layer.n_params == 248832
    assert layer.flops((32, 768)) == 7864320


def test_fraction_resolves_to_largest_rank_within_budget():
    dense = torch.nn.Linear(768, 3072)
    r = LowRankLinear.resolve_rank(dense, 0.25)
    budget = 0.25 * dense_params(dense)
    assert LowRankLinear.cost(dense, r, (1, 768)).params <= budget
    assert LowRankLinear.cost(dense, r + 1, (1, 768)).params > budget
    assert r == 153  # (0.25 * 2362368 - 3072) // 3840
    assert LowRankLinear.from_dense(_linear(768, 64), 0.5).rank == 29  # (0.5 * 49216 - 64) // 832


def test_max_rank_and_layer_class_for():
    dense = torch.nn.Linear(12, 20)
    assert LowRankLinear.max_rank(dense) == 12
    assert layer_class_for("svd", dense) == (LowRankLinear, {})
    assert layer_class_for("tucker", dense) is None
    assert layer_class_for("svd", torch.nn.LSTM(4, 4)) is None
    with pytest.raises(InvalidArgumentError, match="method"):
        layer_class_for("magic", dense)


def test_gradients_flow_into_both_factors():
    layer = LowRankLinear.from_dense(_linear(10, 8), 3)
    layer(torch.randn(4, 10)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip_and_dtype():
    dense = _linear(10, 8, dtype=torch.float64)
    layer = LowRankLinear.from_dense(dense, 4)
    assert layer.first.weight.dtype == torch.float64
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = LowRankLinear(DenseSpec(10, 8, True), 4, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 10, dtype=torch.float64)
    assert torch.equal(fresh(x), layer(x))
    assert "rank=4" in repr(layer)


def test_from_factors_checks_shapes():
    spec = DenseSpec(5, 3, True)
    layer = LowRankLinear.from_factors(spec, [torch.ones(2, 5), torch.ones(3, 2)], torch.zeros(3))
    assert torch.allclose(layer(torch.ones(1, 5)), torch.full((1, 3), 10.0))
    with pytest.raises(ShapeError):
        LowRankLinear.from_factors(spec, [torch.ones(2, 5), torch.ones(3, 4)], torch.zeros(3))
    with pytest.raises(ShapeError):
        LowRankLinear.from_factors(spec, [torch.ones(2, 5), torch.ones(3, 2)], torch.zeros(4))
    with pytest.raises(ShapeError, match="bias"):
        LowRankLinear.from_factors(spec, [torch.ones(2, 5), torch.ones(3, 2)])
    with pytest.raises(InvalidArgumentError, match="DenseSpec"):
        LowRankLinear(5, 2)  # a number where the spec goes: the error shows the new shape


@pytest.mark.parametrize("rank", [0, -1, 13, 1.0, 0.0, 1.5, -0.2, float("nan"), "3", None, True])
def test_bad_ranks_raise(rank):
    with pytest.raises(RankError):
        LowRankLinear.from_dense(torch.nn.Linear(12, 20), rank)


def test_unsupported_layers_and_options_raise():
    with pytest.raises(NotCompressibleError, match="LSTM"):
        LowRankLinear.from_dense(torch.nn.LSTM(4, 4), 2)
    with pytest.raises(NotCompressibleError, match="Linear"):
        LowRankLinear.from_dense(torch.nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(InvalidArgumentError, match="svd_method"):
        LowRankLinear.from_dense(torch.nn.Linear(4, 4), 2, svd_method="qr")
    with pytest.raises(ShapeError):
        dense_flops(torch.nn.Linear(4, 4), (2, 5))


def test_randomized_svd_close_to_exact_on_low_rank_weight():
    dense = torch.nn.Linear(60, 80, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(80, 5, dtype=torch.float64) @ torch.randn(5, 60, dtype=torch.float64))
    layer = LowRankLinear.from_dense(dense, 5, svd_method="randomized")
    assert (layer.dense_weight() - dense.weight).abs().max() < 1e-9


def test_input_never_modified():
    dense = _linear(10, 8)
    before = dense.weight.detach().clone()
    LowRankLinear.from_dense(dense, 3)
    assert torch.equal(dense.weight, before)


# ---- latency helpers (tensorfold.nn.latency) -----------------------------------------------------


def test_measure_latency_positive_and_restores_threads():
    from tensorfold.nn import measure_latency

    before = torch.get_num_threads()
    seconds = measure_latency(torch.nn.Linear(8, 4), (2, 8), threads=1, repeats=3, warmup=1)
    assert seconds > 0
    assert torch.get_num_threads() == before
    with pytest.raises(InvalidArgumentError):
        measure_latency(torch.nn.Linear(8, 4), (2, 8), repeats=0)


def test_latency_table_predicts_from_entries(tmp_path):
    import json

    from tensorfold.errors import FileFormatError
    from tensorfold.nn import LatencyTable
    from tensorfold.nn.latency import layer_key

    dense = torch.nn.Linear(768, 3072)
    key = layer_key(dense)

    def entry(rank, seconds, batch=32):
        flops = LowRankLinear.cost(dense, rank, (batch, 768)).flops
        return {"kind": "svd", "layer": key, "input_shape": [batch, 768], "rank": rank, "batch": batch,
                "threads": 2, "seconds": seconds, "dense_seconds": 1.0, "flops": flops}

    path = tmp_path / "table.json"
    path.write_text(json.dumps({"version": 1, "entries": [entry(64, 0.2), entry(128, 0.4)]}))
    table = LatencyTable.load(path)
    assert table.predict("svd", dense, 64, (32, 768)) == pytest.approx(0.2)
    assert table.predict("svd", dense, 96, (32, 768)) == pytest.approx(0.3)  # linear in FLOPs between ranks
    assert table.predict("svd", dense, 64, (16, 768)) == pytest.approx(0.1)  # scaled from the nearest batch
    assert table.predict("dense", dense, None, (32, 768)) == pytest.approx(1.0)
    assert table.predict("svd", torch.nn.Linear(10, 10), 4, (32, 10)) is None
    assert table.predict("svd", dense, 64, (32, 768), memory_format="channels_last") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FileFormatError):
        LatencyTable.load(bad)
    assert isinstance(LatencyTable.load().entries, list)  # the shipped table loads
