"""The planner's cheaper paths give the numbers of the paths they replace: one SVD of a layer's whitened
weight serves its menu (spectrum) and its sensitivity fit, the measured-candidate errors share one output
energy, and the sensitivity probe changes the model itself (restored) instead of a private copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorfold.compression import api, calibration
from tensorfold.compression.api import Planner
from tensorfold.compression.calibration import (
    GramStats,
    relative_tail_errors,
    whitened_lowrank,
    whitened_spectrum,
    whitening_factor,
)
from tensorfold.compression.candidates import layer_menu
from tensorfold.compression.config import CompressConfig
from tensorfold.compression.probe import OutputProbe
from tensorfold.nn import layer_class_for

hf_tiny = pytest.importorskip("hf_tiny")


def _layer_and_gram(out: int = 24, inp: int = 40, rows: int = 300) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, inp, generator=g))
    # correlated inputs: the whitening matters
    X = torch.randn(rows, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g,
                                                                                dtype=torch.float64)
    return layer, X.T @ X


def test_menu_errors_equal_the_separate_spectrum_and_the_per_size_output_errors():
    layer, G = _layer_and_gram()
    stats = GramStats(gram=G, rows=300)
    menu = layer_menu("fc", layer, ("svd", "tt"), input_shape=(8, 40), gram=stats, prune=False)
    # before: svdvals of W L, a separate decomposition from the sensitivity fit's
    L, _ = whitening_factor(G)
    old = relative_tail_errors(torch.linalg.svdvals(layer.weight.detach().double() @ L))
    svd = [c for c in menu.options if c.method == "svd"]
    assert len(svd) > 5
    for c in svd:
        assert c.error == pytest.approx(float(old[c.rank]), rel=1e-12, abs=1e-14)
    # before: every measured size computed its own denominator W G W^T
    W = layer.weight.detach().double()
    tt = [c for c in menu.options if c.method == "tt"]
    assert tt
    cls, opts = layer_class_for("tt", layer)
    opts = cls.pinned_options(layer, **opts)
    for c in tt:
        D = W - cls.from_dense(layer, c.rank, **opts).dense_weight().detach().double()
        assert c.error == pytest.approx((float(((D @ G) * D).sum()) / float(((W @ G) * W).sum())) ** 0.5, rel=1e-12)


def test_the_sensitivity_fit_reuses_the_menu_svd_bit_for_bit_and_only_for_the_same_weight():
    layer, G = _layer_and_gram()
    W = layer.weight.detach()
    fresh = whitened_lowrank(W, G.clone(), 9)  # another Gram tensor: decomposed anew
    spectrum = whitened_spectrum(W, G)
    reused = whitened_lowrank(W, G, 9)
    assert torch.equal(reused.first, fresh.first) and torch.equal(reused.second, fresh.second)
    assert reused.rel_error == fresh.rel_error
    assert torch.allclose(spectrum, fresh.spectrum, rtol=1e-12, atol=0)
    assert id(G) not in calibration._WHITENED_SVD  # handed out once
    # a different weight with the same Gram is not fitted from the kept decomposition
    whitened_spectrum(W, G)
    other = W.flip(0).contiguous()
    fit = whitened_lowrank(other, G, 9)
    expected = whitened_lowrank(other, G.clone(), 9)
    assert torch.equal(fit.first, expected.first) and torch.equal(fit.second, expected.second)
    # nor after the Gram changed in place
    whitened_spectrum(W, G)
    G.mul_(2.0)
    fit = whitened_lowrank(W, G, 9)
    assert torch.equal(fit.first, whitened_lowrank(W, G.clone(), 9).first)


def _fake_time(module: nn.Module) -> float:
    return 1e-6 + 1e-9 * sum(p.numel() for p in module.parameters())


def _menus(planner: Planner) -> list:
    return [(m.name, m.sensitivity, [(c.method, c.rank, c.params, c.error) for c in m.options]) for m in planner.menus]


def test_probe_on_the_model_itself_plans_as_the_private_copy_and_leaves_the_model_as_it_was(monkeypatch):
    hf_tiny.use_fake_latency(monkeypatch, _fake_time)
    torch.manual_seed(0)
    model = hf_tiny.bert_encoder(3, init=0.3)
    batches = hf_tiny.token_batches(4, 6, 10, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    config = CompressConfig(budget=0.5, methods="svd,mlp-select,qk-select,vo-svd,drop")
    on_model = Planner(model, config, calib=batches)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert dict(model.named_modules()) == modules and not model.training

    def copied(model, batches, output_fn, blocks):
        return OutputProbe(model, api.sensitivity_batches(batches), output_fn, stages=[b.name for b in blocks])

    monkeypatch.setattr(api, "_probe", copied)
    on_copy = Planner(model, config, calib=batches)
    # and with the kept SVDs off (every fit decomposes anew): the same sensitivities, bit for bit
    monkeypatch.setattr(calibration, "_WHITENED_SVD_KEPT", 0)
    anew = Planner(model, config, calib=batches)
    assert _menus(on_model) == _menus(on_copy) == _menus(anew)
    assert any(m[2][1][0] == "drop" or len(m[2]) > 1 for m in _menus(on_model))
    assert on_model.plan().layers == on_copy.plan().layers


class _WholeCopy:
    """The fitting's copy before blockwise copying: the whole model at once."""

    def __init__(self, model, blocks):
        import copy

        self.new = copy.deepcopy(model)

    def own(self, name):
        pass

    def own_holder(self, layer):
        pass

    def replaced(self, name):
        pass

    def done(self):
        return self.new


@pytest.mark.parametrize("training", [False, True])
def test_fitting_copies_the_model_block_by_block_with_the_result_of_a_whole_copy(monkeypatch, training):
    import tensorfold as tf
    from tensorfold.compression.blocks import fit

    hf_tiny.use_fake_latency(monkeypatch, _fake_time)
    torch.manual_seed(0)
    model = hf_tiny.bert_encoder(3, init=0.3)
    batches = hf_tiny.token_batches(4, 6, 10, seed=1)
    plan = tf.plan(model, CompressConfig(budget=0.4, methods="svd,mlp-select,qk-select,vo-svd,drop"), calib=batches)
    assert {lp.method for lp in plan.layers} & {"mlp-select", "qk-select", "vo-svd"}
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pending: list[int] = []
    own = fit._BlockwiseCopy.own

    def spy(self, name):
        pending.append(len(self.pending))
        own(self, name)

    monkeypatch.setattr(fit._BlockwiseCopy, "own", spy)
    new = tf.apply(model, plan, batches)
    assert pending and pending[0] == 3  # the first block is copied while the others still share
    monkeypatch.setattr(fit, "_BlockwiseCopy", _WholeCopy)
    whole = tf.apply(model, plan, batches)
    a, b = new.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(n, m.training) for n, m in new.named_modules()] == [(n, m.training) for n, m in whole.named_modules()]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ours = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not any(t.data_ptr() in ours for t in new.state_dict().values() if t.numel())


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.q, self.k, self.last = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        y = self.q(h) + self.k(h)  # q and k read the very same tensor
        del h
        return self.last(torch.relu(y))


def test_shared_inputs_are_found_without_holding_every_layer_input():
    import weakref

    from tensorfold.compression.calibration import forward_order_and_shared_inputs

    net = _Shared()
    refs, alive_at_last = {}, []
    def on_q(module, args):
        refs.setdefault("h", weakref.ref(args[0]))

    def on_last(module, args):
        alive_at_last.append(refs["h"]() is not None)

    net.q.register_forward_pre_hook(on_q)
    net.last.register_forward_pre_hook(on_last)
    layers = {n: getattr(net, n) for n in ("a", "q", "k", "last")}
    order, leader = forward_order_and_shared_inputs(net, layers, torch.randn(4, 8))
    assert order == ["a", "q", "k", "last"]
    assert leader == {"a": "a", "q": "q", "k": "q", "last": "last"}
    assert alive_at_last == [False]  # q's input was not kept for the rest of the pass


def test_a_second_layer_of_the_same_shape_times_nothing(monkeypatch):
    from tensorfold.compression.candidates import LatencyModel
    from tensorfold.nn import LowRankLinear

    timed: list = []

    def fake(self, module, shape):
        timed.append(module)
        return _fake_time(module)

    hf_tiny.use_fake_latency(monkeypatch, _fake_time)  # and no shipped table
    monkeypatch.setattr(LatencyModel, "_measure", fake)
    latency = LatencyModel(probe_seconds=0.0, scaled=True)
    ranks = list(range(1, 40))
    first, second = nn.Linear(96, 96), nn.Linear(96, 96)
    a = latency.factored("block0.fc", "svd", LowRankLinear, first, {}, ranks, (4, 96))
    n_first = len(timed)
    b = latency.factored("block1.fc", "svd", LowRankLinear, second, {}, ranks, (4, 96))
    assert 6 <= n_first < len(ranks)  # six ranks timed, the rest interpolated
    assert len(timed) == n_first  # the next block's layer: every rank from the cache
    assert a == b


def test_fitting_frees_each_shared_capture_after_its_last_reader(monkeypatch):
    import weakref

    import tensorfold as tf
    from tensorfold.compression import replace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    calib = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plan = tf.plan(model, CompressConfig(budget=0.5, methods=("svd",)), calib=calib)
    n = sum(lp.factored for lp in plan.layers)
    assert n >= 2
    made: list = []
    capture = replace.layer_input_grams

    def spy(*args, **kwargs):
        stats = capture(*args, **kwargs)
        made.append(weakref.ref(stats))
        return stats

    alive: list[int] = []
    monkeypatch.setattr(replace, "layer_input_grams", spy)
    tf.apply(model, plan, calib, progress=lambda stage, d, t: alive.append(sum(r() is not None for r in made)))
    # only the layer just fitted still holds its capture (all of them were held to the end before: 1, 2, ...)
    assert len(made) == n and alive == [1] * n, alive


def test_a_model_that_is_one_block_is_planned_and_fitted_with_block_methods():
    """The model itself as the block (see test_blocks' planning test, which checks the model is left as it
    was): its feed-forward pair is fitted with the planned number of neurons."""
    from test_blocks import _FcPair

    import tensorfold as tf

    torch.manual_seed(0)
    model = _FcPair()
    batches = [torch.randn(64, 16) for _ in range(4)]
    plan = tf.plan(model, CompressConfig(budget=0.5, methods="svd,mlp-select,drop"), calib=batches)
    assert "drop" not in {lp.method for lp in plan.layers}  # nothing is left to drop the only block from
    new = tf.apply(model, plan, batches)
    kept = {lp.name: lp for lp in plan.layers}["fc1"]
    assert kept.method == "mlp-select" and plan.fraction <= 0.5
    assert new.fc1.out_features == kept.rank < model.fc1.out_features == 48


def test_fitting_replaces_a_layer_its_block_does_not_list():
    """GPT-2's fused ``c_attn`` lies inside a block's module but outside the layers the block discovery pairs;
    the block-by-block copy must still keep its replacement (it once copied the original block over it)."""
    import transformers as t

    import tensorfold as tf

    torch.manual_seed(0)
    from tensorfold.zoo.hf import linearize_conv1d

    model = linearize_conv1d(t.GPT2Model(hf_tiny._config("gpt2")).eval())
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(4, hf_tiny.VOCAB, (4, 8), generator=g)} for _ in range(4)]
    plan = tf.plan(model, CompressConfig(budget=0.5, methods="svd,mlp-select"), calib=batches,
                   output_fn=lambda out: out.last_hidden_state)
    planned = {lp.name: lp for lp in plan.layers if lp.method == "svd"}
    assert any(name.endswith("c_attn") for name in planned)
    assert "mlp-select" in {lp.method for lp in plan.layers}  # the block-by-block fitting path
    new = tf.apply(model, plan, batches)
    for name in planned:
        assert type(new.get_submodule(name)) is not type(model.get_submodule(name)), name
