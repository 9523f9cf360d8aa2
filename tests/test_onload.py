"""Planner statistics one transformer block at a time (compression/onload.py): the same menus and plan as
one pass over the whole model, one block's statistics held at a time, today's path where blocks do not chain."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from tensorfold.compression import onload as onload_module
from tensorfold.compression.api import Planner
from tensorfold.compression.config import CompressConfig
from tensorfold.compression.onload import BlockOnload

transformers = pytest.importorskip("transformers")
hf_tiny = pytest.importorskip("hf_tiny")


_ONLOAD_OF = BlockOnload.of.__func__


def _fake_time(module: nn.Module) -> float:
    # latencies from the parameter count: a deterministic clock, so both paths see the same tie-breaks
    return 1e-6 + 1e-9 * sum(p.numel() for p in module.parameters())


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        return hf_tiny.bert_encoder(3, init=0.3)
    config = hf_tiny._config(family)
    config.num_hidden_layers = config.n_layer = 3
    model = (transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM)(config)
    return model.eval()


def _batches(family: str) -> list[dict]:
    batches = hf_tiny.token_batches(4, 6, 10, seed=1)
    if family != "bert":  # the tiny decoders' vocabulary
        for b in batches:
            b["input_ids"] = b["input_ids"] % hf_tiny.VOCAB
    return batches


def _planner(monkeypatch, model, batches, sequential: bool, methods) -> tuple[Planner, list]:
    used: list = []

    def spy(cls, *args, **kwargs):
        used.append(_ONLOAD_OF(cls, *args, **kwargs))
        return used[-1]

    monkeypatch.setattr(Planner, "sequential", sequential)
    monkeypatch.setattr(BlockOnload, "of", classmethod(spy))
    return Planner(model, CompressConfig(budget=0.5, methods=methods), calib=batches), used


def _menus(planner: Planner) -> list:
    return [(m.name, m.sensitivity, [(c.method, c.rank, c.params, c.flops, c.latency, c.error) for c in m.options])
            for m in planner.menus]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_block_by_block_statistics_give_the_menus_and_plan_of_one_pass(monkeypatch, family):
    hf_tiny.use_fake_latency(monkeypatch, _fake_time)
    model, batches = _model(family), _batches(family)
    methods = "svd,mlp-select,qk-select,vo-svd,drop" if family != "gpt2" else "svd,mlp-select,drop"
    once, used_once = _planner(monkeypatch, model, batches, False, methods)
    seq, used_seq = _planner(monkeypatch, model, batches, True, methods)
    assert used_once == [] and len(used_seq) == 1 and used_seq[0] is not None  # each path was taken
    a, b = _menus(once), _menus(seq)
    assert [m[0] for m in a] == [m[0] for m in b]
    assert any(len(m[2]) > 1 and m[2][1][0] != "svd" for m in a)  # block menus were built
    for (name, s1, opts1), (_, s2, opts2) in zip(a, b):
        assert s1 == pytest.approx(s2, rel=1e-9), name
        assert [o[:5] for o in opts1] == [o[:5] for o in opts2], name
        assert [o[5] for o in opts1] == pytest.approx([o[5] for o in opts2], rel=1e-9, abs=1e-12), name
    p1, p2 = once.plan(), seq.plan()
    assert [(lp.name, lp.method, lp.rank) for lp in p1.layers] == [(lp.name, lp.method, lp.rank) for lp in p2.layers]
    assert p1.objective == pytest.approx(p2.objective, rel=1e-9)
    assert list(once.layer_menus) == list(seq.layer_menus)
    assert set(seq.seconds) >= {"calibration", "menus", "sensitivities", "block menus"}


def test_one_block_of_statistics_is_held_at_a_time():
    model, batches = _model("bert"), _batches("bert")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    onload = BlockOnload.of(model, layers, batches)
    assert onload is not None and len(onload.blocks) == 3
    seen = []
    for block, grams, _ in onload.by_block():
        gc.collect()
        # the previous block's Gram matrices are gone once this block's are handed out
        assert all(ref() is None for ref in seen)
        assert set(grams) == {n for n in layers if n.startswith(block.name + ".")}
        assert all(g.rows == sum(int(b["attention_mask"].sum()) for b in batches) for g in grams.values())
        seen = [weakref.ref(g) for g in grams.values()]
        del grams


class _FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.intermediate, self.output = nn.Module(), nn.Module()
        self.intermediate.dense, self.output.dense = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return x + self.output.dense(torch.relu(self.intermediate.dense(x)))


class _Parallel(nn.Module):
    """Two recognised blocks on the same input: no chain, the second block never sees the first's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = _FFN(), _FFN(), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


def test_blocks_that_do_not_chain_take_the_one_pass_path(monkeypatch):
    torch.manual_seed(0)
    calib = [torch.randn(16, 8) for _ in range(3)]
    chain = nn.Sequential(_FFN(), _FFN(), nn.Linear(8, 4))
    layers = {n: m for n, m in chain.named_modules() if isinstance(m, nn.Linear)}
    assert BlockOnload.of(chain, layers, calib) is not None
    parallel = _Parallel()
    layers = {n: m for n, m in parallel.named_modules() if isinstance(m, nn.Linear)}
    assert BlockOnload.of(parallel, layers, calib) is None
    # and the plans of both paths agree on the chained model (its head outside the blocks included)
    plans = []
    for sequential in (False, True):
        monkeypatch.setattr(Planner, "sequential", sequential)
        plans.append(Planner(chain, CompressConfig(budget=0.5, methods="svd"), calib=calib).plan())
    assert [(lp.name, lp.rank, lp.error) for lp in plans[0].layers] == [(lp.name, lp.rank, lp.error)
                                                                       for lp in plans[1].layers]
    assert onload_module._same(chain(calib[0]), chain(calib[0]).clone())
