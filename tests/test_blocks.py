"""Transformer block methods: discovery, mlp-select, qk-select, vo-svd, drop, and the planner with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.blocks import find_blocks
from tensorfold.compression.blocks.attention import (
    HeadLayout,
    Projection,
    input_gram,
    qk_select,
    qk_weights,
    vo_svd,
    vo_weights,
)
from tensorfold.compression.blocks.mlp import ActivationStats, mlp_select, select_neurons
from tensorfold.errors import InvalidArgumentError, RankError

transformers = pytest.importorskip("transformers")
hf_tiny = pytest.importorskip("hf_tiny")


def _bert(layers=2, **shape):
    return hf_tiny.bert_encoder(layers, **shape)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaModel(cfg).eval()


def _batches(n=4, batch=8, length=12, seed=0):
    return hf_tiny.token_batches(n, batch, length, seed)


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


# ---- discovery --------------------------------------------------------------------------------------


def test_blocks_found_in_bert_gpt2_and_llama_gqa():
    bert = find_blocks(_bert())
    assert [b.name for b in bert] == ["encoder.layer.0", "encoder.layer.1"]
    b0 = bert[0]
    assert b0.ffn.ups == ("encoder.layer.0.intermediate.dense",) and b0.ffn.down == "encoder.layer.0.output.dense"
    assert b0.ffn.hidden == 64
    a = b0.attention
    assert (a.q, a.o) == ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense")
    assert (a.heads, a.kv_heads, a.head_dim, a.rebuildable) == (4, 4, 8, True)

    gpt = find_blocks(_gpt2())
    assert [b.name for b in gpt] == ["h.0", "h.1"]
    assert gpt[0].ffn.ups == ("h.0.mlp.c_fc",) and gpt[0].ffn.down == "h.0.mlp.c_proj" and gpt[0].ffn.hidden == 128
    assert gpt[0].attention is None  # fused c_attn: per-matrix methods only

    llama = find_blocks(_llama())
    f, a = llama[1].ffn, llama[1].attention
    assert f.ups == ("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj") and f.down == "layers.1.mlp.down_proj"
    assert (a.heads, a.kv_heads, a.head_dim) == (4, 2, 8)
    assert not a.rebuildable  # rotary positions: kept as the model's own attention


def test_unknown_architecture_has_no_blocks_and_plans_as_before():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    assert find_blocks(model) == []
    calib = [torch.randn(64, 16, generator=torch.Generator().manual_seed(0))]
    p = tf.plan(model, 0.5, calib=calib)  # default menu includes the block methods: no error, per-matrix only
    assert {lp.method for lp in p.layers} <= {"svd", "tt", "dense"}
    assert p.fraction <= 0.5


class _FcPair(nn.Module):
    """A plain network with an fc1/fc2 pair: recognised as one block, the model itself."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_planning_a_model_that_is_its_own_block_leaves_it_as_it_was():
    torch.manual_seed(0)
    model = _FcPair()
    assert [b.name for b in find_blocks(model)] == [""]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    p = tf.plan(model, 0.5, calib=calib, curve=False)  # measures mlp-select options on the model itself
    assert "drop" not in {lp.method for lp in p.layers}  # no block to skip to: the model itself
    assert [n for n, _ in model.named_modules()] == ["", "fc1", "fc2"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert p.fraction <= 0.5 + 1e-9


# ---- mlp-select ---------------------------------------------------------------------------------------


def _ffn_data(m=24, d=8, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    up, down = nn.Linear(d, m).double(), nn.Linear(m, d).double()
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return up, down, X


def test_mlp_select_exact_at_full_size():
    up, down, X = _ffn_data()
    H = torch.relu(up(X)).detach()
    new_up, new_down, kept = mlp_select([up], down, ActivationStats.of(H), 24)
    assert kept.tolist() == list(range(24))
    y, y2 = down(H), new_down(torch.relu(new_up[0](X)))
    assert torch.allclose(y, y2, atol=1e-6, rtol=1e-6)


def test_mlp_select_recovers_planted_neurons():
    up, down, X = _ffn_data(m=30)
    planted = [3, 7, 11, 19, 23, 28]
    with torch.no_grad():
        mask = torch.zeros(30, dtype=torch.bool)
        mask[planted] = True
        down.weight[:, ~mask] = 0.0  # the output depends on the planted neurons only
    H = torch.relu(up(X)).detach()
    sel = select_neurons(ActivationStats.of(H), down.weight, down.bias)
    assert sorted(sel.order[:6].tolist()) == planted
    assert float(sel.errors[6]) < 1e-6 and float(sel.errors[5]) > 1e-3
    new_up, new_down, kept = mlp_select([up], down, ActivationStats.of(H), 6)
    assert kept.tolist() == planted
    assert torch.allclose(new_down(torch.relu(new_up[0](X))), down(H), atol=1e-4)  # the ridge alone


def test_refit_beats_plain_selection_and_errors_fall():
    up, down, X = _ffn_data(m=32, n=800, seed=1)
    H = torch.nn.functional.gelu(up(X)).detach()
    stats = ActivationStats.of(H)
    y = down(H)

    @torch.no_grad()
    def err(refit):
        u, dn, _ = mlp_select([up], down, stats, 12, refit=refit)
        # relative to the output without its bias, as every planner error is
        return float((dn(torch.nn.functional.gelu(u[0](X))) - y).norm() / (y - down.bias).norm())

    assert err(True) < 0.8 * err(False)
    sel = select_neurons(stats, down.weight, down.bias)
    e = sel.errors
    assert bool((e[1:] <= e[:-1] + 1e-12).all()) and float(e[-1]) < 1e-9
    assert abs(err(True) - float(e[12])) < 1e-6  # the predicted error is the measured one (same data)


def test_rank_deficient_activations_are_handled():
    up, down, X = _ffn_data(m=16, n=40)
    H = torch.relu(up(X)).detach()
    H[:, 5] = 0.0  # a dead neuron
    H[:, 9] = H[:, 2]  # a duplicated one
    stats = ActivationStats.of(H[:6])  # fewer rows than neurons
    sel = select_neurons(stats, down.weight, down.bias)
    assert torch.isfinite(sel.errors).all() and sorted(sel.order.tolist()) == list(range(16))
    _, new_down, _ = mlp_select([up], down, stats, 4)
    assert torch.isfinite(new_down.weight).all()
    with pytest.raises(RankError):
        mlp_select([up], down, stats, 0)


def test_mlp_select_on_gpt2_conv1d_pair_keeps_the_model_exact():
    model = _gpt2()
    block = find_blocks(model)[0]
    batch = {"input_ids": torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))}
    before = _hidden(model, batch)
    from tensorfold.compression.blocks.stats import capture_stats

    down = model.get_submodule(block.ffn.down)
    stats = capture_stats(model, {"d": down}, [batch])["d"]
    ups, new_down, _ = mlp_select([model.get_submodule(block.ffn.ups[0])], down, stats, block.ffn.hidden)
    model.h[0].mlp.c_fc, model.h[0].mlp.c_proj = ups[0], new_down
    assert isinstance(model.h[0].mlp.c_fc, nn.Linear)
    assert torch.allclose(_hidden(model, batch), before, atol=1e-4)


# ---- attention ------------------------------------------------------------------------------------------


def test_qk_select_and_vo_svd_exact_at_full_size_gqa():
    g = torch.Generator().manual_seed(0)
    d, heads, kv, dh = 12, 4, 2, 3
    X = torch.randn(300, d, generator=g, dtype=torch.float64)
    Wq, Wk = torch.randn(heads * dh, d, generator=g, dtype=torch.float64), torch.randn(kv * dh, d, generator=g,
                                                                                       dtype=torch.float64)
    bq, bk = torch.randn(heads * dh, generator=g, dtype=torch.float64), torch.randn(kv * dh, generator=g,
                                                                                    dtype=torch.float64)
    G = input_gram(X)
    layout, query, key = HeadLayout(heads, kv, dh), Projection(Wq, bq), Projection(Wk, bk)
    fit = qk_select(G, query, key, layout)
    assert float(fit.errors[0]) == pytest.approx(1.0) and float(fit.errors[-1]) == 0.0
    assert bool((fit.errors[1:] <= fit.errors[:-1] + 1e-12).all())
    nq, nbq, nk, nbk = qk_weights(fit, G, query, key, layout, keep=dh)
    Xa = torch.cat([X, torch.ones(300, 1, dtype=X.dtype)], 1)

    def scores(Wq_, bq_, Wk_, bk_, r):
        Q = (X @ Wq_.T + bq_).reshape(300, heads, r)
        K = (X @ Wk_.T + bk_).reshape(300, kv, r).repeat_interleave(heads // kv, dim=1)
        K = K - K.mean(dim=0)  # the softmax ignores the keys' mean: errors count their variation
        return torch.einsum("ihr,jhr->hij", Q, K)

    assert torch.allclose(scores(nq, nbq, nk, nbk, dh), scores(Wq, bq, Wk, bk, dh), atol=1e-8)
    nq, nbq, nk, nbk = qk_weights(fit, G, query, key, layout, keep=2)
    S, S2 = scores(Wq, bq, Wk, bk, dh), scores(nq, nbq, nk, nbk, 2)
    measured = float((S - S2).norm() / S.norm())
    assert measured == pytest.approx(float(fit.errors[2]), rel=1e-6)  # predicted = measured on its data
    del Xa

    Wv, Wo = torch.randn(kv * dh, d, generator=g, dtype=torch.float64), torch.randn(d, heads * dh, generator=g,
                                                                                    dtype=torch.float64)
    bv, bo = torch.randn(kv * dh, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    vfit = vo_svd(G, Wv, Wo, layout)
    assert float(vfit.errors[-1]) < 1e-9 and float(vfit.errors[0]) == pytest.approx(1.0)
    nv, no, nbo = vo_weights(vfit, Wo, bo, bv, layout, keep=dh)

    def vo_out(Wv_, bv_, Wo_, bo_, r):  # uniform attention over all tokens: output = O (mean of V) per head
        V = (X @ Wv_.T + (bv_ if bv_ is not None else 0)).reshape(300, kv, r).repeat_interleave(heads // kv, dim=1)
        return V.reshape(300, heads * r) @ Wo_.T + bo_

    assert torch.allclose(vo_out(nv, None, no, nbo, dh), vo_out(Wv, bv, Wo, bo, dh), atol=1e-8)


def test_block_plan_on_bert_fits_saves_and_loads(tmp_path):
    model = _bert()
    calib = _batches()
    for methods, expected in ((("mlp-select",), {"mlp-select"}), (("qk-select", "vo-svd"), {"qk-select", "vo-svd"})):
        p = tf.plan(model, 0.6, methods=methods, calib=calib, curve=False)
        used = {lp.method for lp in p.layers} - {"dense"}
        assert used and used <= expected, used
        assert p.fraction <= 0.6
    p = tf.plan(model, 0.5, methods=("svd", "mlp-select", "qk-select", "vo-svd"), calib=calib, curve=False)
    small = tf.apply(model, p, calib)
    x = _batches(1, seed=5)[0]
    ref, out = _hidden(model, x), _hidden(small, x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).mean()
    assert cos > 0.5
    n_params = sum(q.numel() for name, q in small.named_parameters() if "encoder" in name and "weight" in name)
    assert n_params < sum(q.numel() for name, q in model.named_parameters() if "encoder" in name and "weight" in name)
    tf.save_compressed(small, p, tmp_path / "run")
    again = tf.load_compressed(tmp_path / "run", base_model=model)
    assert torch.allclose(_hidden(again, x), out, atol=1e-6)
    assert tf.Plan.from_json(p.to_json()) == p


def test_full_size_head_attention_reproduces_bert():
    model = _bert()
    calib = _batches()
    from tensorfold.compression.blocks.fit import apply_block_plan

    p = tf.plan(model, 0.9, methods=("qk-select", "vo-svd"), calib=calib, curve=False)
    for lp in p.layers:  # every attention at full head size: the rebuilt modules must give the same output
        if lp.name.endswith("attention.self.query") or lp.name.endswith("attention.self.value"):
            lp.method, lp.rank = ("qk-select" if "query" in lp.name else "vo-svd"), 8
        if lp.name.endswith("attention.self.key"):
            lp.method, lp.rank = "qk-select", 8
        if lp.name.endswith("attention.output.dense"):
            lp.method, lp.rank = "vo-svd", 8
    small = apply_block_plan(model, p, calib)
    x = _batches(1, seed=3)[0]
    assert torch.allclose(_hidden(small, x), _hidden(model, x), atol=1e-4)


def test_drop_removes_a_block_and_keeps_the_residual():
    model = _bert(layers=3)
    calib = _batches()
    p = tf.plan(model, 0.4, methods=("drop",), calib=calib, curve=False)
    dropped = {lp.name.split(".attention")[0].split(".intermediate")[0].split(".output")[0]
               for lp in p.layers if lp.method == "drop"}
    assert len(dropped) >= 2 and p.fraction <= 0.4
    small = tf.apply(model, p, calib)
    x = _batches(1, seed=2)[0]
    assert _hidden(small, x).shape == _hidden(model, x).shape
    assert sum(type(m).__name__ == "SkipBlock" for m in small.modules()) == len(dropped)


def test_llama_gqa_mlp_select_through_the_planner():
    model = _llama()
    calib = [{"input_ids": b["input_ids"]} for b in _batches()]
    p = tf.plan(model, 0.7, methods=("svd", "mlp-select"), calib=calib, curve=False)
    small = tf.apply(model, p, calib)
    x = calib[0]
    assert _hidden(small, x).shape == _hidden(model, x).shape
    assert p.fraction <= 0.7


def test_bad_method_and_budget_are_clear_errors():
    model = _bert()
    with pytest.raises(InvalidArgumentError, match="mlp-selekt"):
        tf.plan(model, 0.5, methods=("mlp-selekt",), calib=_batches(1))
    with pytest.raises(InvalidArgumentError, match="budget"):
        tf.plan(model, 1.5, methods=("mlp-select",), calib=_batches(1))
    p = tf.plan(model, 0.6, methods=("mlp-select",), calib=_batches(2), curve=False)
    with pytest.raises(InvalidArgumentError, match="calib"):
        tf.apply(model, p)


def test_gpt2_blocks_planned_with_mlp_select_and_drop(tmp_path):
    model = _gpt2()
    calib = [{"input_ids": b["input_ids"]} for b in _batches()]
    p = tf.plan(model, 0.6, methods=("mlp-select", "drop"), calib=calib, curve=False)
    assert {lp.method for lp in p.layers} - {"dense"} <= {"mlp-select", "drop"} and p.fraction <= 0.6
    assert any(lp.layer.startswith("Conv1D") for lp in p.layers)
    small = tf.apply(model, p, calib)
    x = calib[0]
    assert _hidden(small, x).shape == _hidden(model, x).shape
    tf.save_compressed(small, p, tmp_path / "g")
    again = tf.load_compressed(tmp_path / "g", base_model=model)
    assert torch.allclose(_hidden(again, x), _hidden(small, x), atol=1e-6)


def test_correction_toward_the_original_lowers_the_error_on_held_out_inputs(monkeypatch):
    from tensorfold.compression.blocks import fit
    from tensorfold.compression.blocks.fit import apply_block_plan

    # the correction itself (its cross-validation, tested below, needs more calibration rows than this)
    monkeypatch.setattr(fit, "CROSS_VALIDATE", False)
    model = _bert(layers=3)
    calib, held = _batches(8), _batches(2, seed=7)

    def error(small, batches):
        return (sum(float(((_hidden(small, b) - _hidden(model, b)) ** 2).sum()) for b in batches)
                / sum(float((_hidden(model, b) ** 2).sum()) for b in batches))

    for methods in (("svd", "mlp-select"), ("svd", "vo-svd")):
        p = tf.plan(model, 0.5, methods=methods, calib=calib, curve=False)
        plain, corrected = (apply_block_plan(model, p, calib, correct=c) for c in (False, True))
        # the layers ending each sub-block now aim at the original's output from the compressed inputs
        assert error(corrected, calib) < 0.9 * error(plain, calib)
        assert error(corrected, held) < error(plain, held)
        # the same structure: only weights changed
        assert [tuple(q.shape) for q in corrected.parameters()] == [tuple(q.shape) for q in plain.parameters()]


def test_cross_validated_correction_applies_a_real_map_and_refuses_to_fit_noise():
    from tensorfold.compression.blocks.fit import _Held, _refit_toward

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(40, 12, generator=g, dtype=torch.float64) for _ in range(8)]
    true = torch.randn(12, 5, generator=g, dtype=torch.float64)

    def refit(targets):
        layer = nn.Linear(12, 5, bias=False, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.zero_()
        G = sum(Z.T @ Z for Z in batches)
        C = sum(Z.T @ T for Z, T in zip(batches, targets))
        held = _Held()
        for i in (3, 7):  # every 4th batch held out
            held.add(batches[i].T @ batches[i], batches[i].T @ targets[i])
        _refit_toward(layer, G, C, held=held)
        return layer.weight.T

    # the target is a linear map of the inputs: corrected (to the map, up to the small ridge)
    got = refit([Z @ true for Z in batches])
    assert torch.allclose(got, true, atol=1e-3)
    # the target is noise the inputs cannot predict: any fit only overfits, the weights stay as they were
    noise = [torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in batches]
    assert torch.count_nonzero(refit(noise)) == 0
