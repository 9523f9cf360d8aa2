"""Tensorized adapters: config, zero init, forward paths, merge, gradients, targets, save/load, DoTA, LoTR."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.adapters import (
    AdapterConfig,
    AdapterLayer,
    adapter_layers,
    describe,
    load_adapter,
    merge,
    save_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from tensorfold.errors import FileFormatError, InvalidArgumentError, RankError

METHODS = ("lora", "tt", "tucker", "cp", "tr")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.proj = nn.Conv2d(12, 16, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 48)
        self.head = nn.Linear(48, 6)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.proj(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.head(torch.relu(self.fc1(x)))


def make_net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)


def randomize(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every trainable tensor off its initial value (a zero factor makes the update vanish)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


# ---- config ------------------------------------------------------------------------------------------


def test_config_validates_and_round_trips():
    config = AdapterConfig(method="tr", rank=(2, 3, 4), alpha=8, dropout=0.1, target_modules=["fc1", "conv2"],
                           modules_to_save=["head"], n_cores=2, init="dota", seed=3)
    again = AdapterConfig.from_json(config.to_json())
    assert again == config
    assert again.target_modules == ("fc1", "conv2") and again.rank == (2, 3, 4)
    assert config.scaling == pytest.approx(8 / 4)
    assert AdapterConfig(rank=8).scaling == 1.0


@pytest.mark.parametrize("kwargs, error, text", [
    ({"method": "ia3"}, InvalidArgumentError, "method must be one of"),
    ({"rank": 0}, RankError, "positive int"),
    ({"rank": ()}, RankError, "empty"),
    ({"rank": 2.5}, RankError, "positive int"),
    ({"dropout": 1.0}, InvalidArgumentError, "dropout"),
    ({"alpha": -1}, InvalidArgumentError, "alpha"),
    ({"init": "pissa"}, InvalidArgumentError, "init"),
    ({"target_modules": "conv[("}, InvalidArgumentError, "regular expression"),
    ({"target_modules": []}, InvalidArgumentError, "at least one"),
    ({"share_factors": True, "method": "tt"}, InvalidArgumentError, "tucker"),
    ({"share_factors": True, "method": "tucker", "init": "dota"}, InvalidArgumentError, "dota"),
    ({"method": "lora", "rank": (2, 3)}, RankError, "one rank"),
    ({"n_cores": 0}, InvalidArgumentError, "n_cores"),
])
def test_config_rejects_bad_values(kwargs, error, text):
    with pytest.raises(error, match=text):
        AdapterConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(FileFormatError, match="has no setting"):
        AdapterConfig.from_dict({"method": "lora", "lora_r": 8})


# ---- building, zero init, forward paths, merging -----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_zero_init_leaves_outputs_unchanged_and_input_untouched(method):
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = inputs()
    adapted = tf.adapt(net, AdapterConfig(method=method, rank=3, target_modules="all", alpha=6))
    assert torch.equal(adapted(x), net(x))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, AdapterLayer) for m in net.modules())
    assert len(adapter_layers(adapted)) == 5


@pytest.mark.parametrize("method", METHODS)
def test_forward_paths_agree_and_merge_is_exact(method):
    net = make_net()
    x = inputs()
    adapted = tf.adapt(net, AdapterConfig(method=method, rank=3, target_modules="all", alpha=6))
    randomize(adapted)
    outputs = {}
    for mode in ("factored", "sum", "auto"):
        for _, layer in adapter_layers(adapted):
            layer.forward_mode = mode
            layer._paths.clear()
        with torch.no_grad():
            outputs[mode] = adapted(x)
    assert (outputs["sum"] - net(x)).abs().max() > 1e-2  # the update does something
    for mode in ("factored", "auto"):
        torch.testing.assert_close(outputs[mode], outputs["sum"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        merge(adapted)
        merged = adapted(x)
        unmerge(adapted)
        unmerged = adapted(x)
    torch.testing.assert_close(merged, outputs["sum"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unmerged, outputs["sum"], atol=1e-5, rtol=1e-5)
    for (_, layer), base in zip(adapter_layers(adapted), (net.conv1, net.conv2, net.proj, net.fc1, net.head)):
        torch.testing.assert_close(layer.base.weight, base.weight, atol=1e-6, rtol=0)
    plain = unload(adapted)
    assert not adapter_layers(plain)
    torch.testing.assert_close(plain(x), outputs["sum"], atol=1e-5, rtol=1e-5)


def test_merged_update_equals_scaled_delta_known_answer():
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    adapted = tf.adapt(nn.Sequential(lin), AdapterConfig(method="lora", rank=1, alpha=2))
    layer = adapter_layers(adapted)[0][1]
    with torch.no_grad():
        layer.factors[0].copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))  # A (1, 4)
        layer.factors[1].copy_(torch.tensor([[1.0], [0.0], [-1.0]]))  # B (3, 1)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # y = alpha / r * B A x = 2 * [10, 0, -10]
    torch.testing.assert_close(adapted(x), torch.tensor([[20.0, 0.0, -20.0]]))


def test_parameter_counts_known_answers():
    model = nn.Sequential(nn.Linear(32, 64))
    counts = {}
    for method, rank in (("lora", 4), ("tt", 4), ("tucker", 2), ("cp", 5), ("tr", 2)):
        adapted = tf.adapt(model, AdapterConfig(method=method, rank=rank, n_cores=3))
        counts[method] = trainable_parameters(adapted)[0]
        assert describe(model, AdapterConfig(method=method, rank=rank, n_cores=3)).trainable == counts[method]
    # 32 = 2*4*4, 64 = 4*4*4; MPO sites (4x2), (4x4), (4x4)
    assert counts["lora"] == 4 * (32 + 64)
    assert counts["tt"] == 4 * 2 * 4 + 4 * 4 * 4 * 4 + 4 * 4 * 4
    assert counts["tucker"] == 2**6 + 2 * (4 + 4 + 4 + 2 + 4 + 4)
    assert counts["cp"] == 5 * (4 + 4 + 4 + 2 + 4 + 4)
    assert counts["tr"] == 2 * 8 * 2 + 2 * 16 * 2 + 2 * 16 * 2


def test_ranks_are_clipped_to_the_full_rank():
    adapted = tf.adapt(nn.Sequential(nn.Linear(6, 4)), AdapterConfig(method="lora", rank=50))
    assert trainable_parameters(adapted)[0] == 4 * (6 + 4)


# ---- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_get_gradients(method):
    net = make_net()
    adapted = tf.adapt(net, AdapterConfig(method=method, rank=3, target_modules="all", dropout=0.1,
                                          modules_to_save=["bn"]))
    adapted.train()
    adapted(inputs()).square().mean().backward()
    names = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert names
    for n, p in adapted.named_parameters():
        trainable = ".factors." in n or n.startswith("bn.")
        assert p.requires_grad == trainable, n
        if not trainable:
            assert p.grad is None, n
    assert any(n.startswith("bn.") for n in names)


def test_finetune_trains_only_the_adapters():
    net = make_net()
    adapted = tf.adapt(net, AdapterConfig(method="tucker", rank=2, target_modules="all"))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 6, (8,), generator=gen)) for _ in range(3)]
    tuned = tf.finetune(adapted, data, epochs=2, lr=1e-2, distill=None, progress=False)
    base_before = {n: p for n, p in adapted.named_parameters() if not p.requires_grad}
    changed = 0
    for n, p in tuned.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
            assert not p.requires_grad
        else:
            changed += int(not torch.equal(p, dict(adapted.named_parameters())[n]))
    assert changed > 0


# ---- targets -----------------------------------------------------------------------------------------


def test_target_matching_names_regex_and_all_linear():
    net = make_net()

    def targets(**kw):
        return [row.name for row in describe(net, AdapterConfig(**kw)).rows]

    assert targets(target_modules="all-linear") == ["fc1", "head"]
    assert targets(target_modules="all-conv") == ["conv1", "conv2", "proj"]
    assert targets(target_modules="all") == ["conv1", "conv2", "proj", "fc1", "head"]
    assert targets(target_modules=["head", "conv1"]) == ["conv1", "head"]
    assert targets(target_modules=r"conv\d") == ["conv1", "conv2"]
    assert targets(target_modules="all", exclude_modules=["head"], modules_to_save=["fc1"]) == [
        "conv1", "conv2", "proj"]
    nested = nn.Sequential(make_net())
    assert [r.name for r in describe(nested, AdapterConfig(target_modules=["fc1"])).rows] == ["0.fc1"]


def test_target_errors_list_the_candidates():
    net = make_net()
    with pytest.raises(InvalidArgumentError, match=r"'query' matches no module(.|\n)*fc1 \(Linear 48x256\)"):
        tf.adapt(net, AdapterConfig(target_modules=["query"]))
    with pytest.raises(InvalidArgumentError, match=r"bn \(BatchNorm2d\), which an adapter cannot wrap(.|\n)*conv1"):
        tf.adapt(net, AdapterConfig(target_modules=["bn"]))
    with pytest.raises(InvalidArgumentError, match="only layers an adapter cannot wrap: bn"):
        tf.adapt(net, AdapterConfig(target_modules="b.*"))
    with pytest.raises(InvalidArgumentError, match="selects no layer"):
        tf.adapt(net, AdapterConfig(target_modules="nothing-here"))
    with pytest.raises(InvalidArgumentError, match="modules_to_save entry 'classifier'"):
        tf.adapt(net, AdapterConfig(modules_to_save=["classifier"]))
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(InvalidArgumentError, match="cannot wrap"):
        tf.adapt(depthwise, AdapterConfig(target_modules=["0"]))
    with pytest.raises(InvalidArgumentError, match="already carries adapters"):
        tf.adapt(tf.adapt(net, AdapterConfig()), AdapterConfig())


def test_dry_run_prints_and_builds_nothing(capsys):
    net = make_net()
    summary = tf.adapt(net, AdapterConfig(method="cp", rank=4, target_modules="all"), dry_run=True)
    out = capsys.readouterr().out
    assert "fc1" in out and "trainable params:" in out
    built = tf.adapt(net, AdapterConfig(method="cp", rank=4, target_modules="all"))
    assert summary.trainable == trainable_parameters(built)[0]
    assert summary.total == trainable_parameters(built)[1]


# ---- save / load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, init", [("tt", "zero"), ("tucker", "dota"), ("lora", "zero")])
def test_save_load_round_trip(tmp_path, method, init):
    net = make_net()
    x = inputs()
    adapted = tf.adapt(net, AdapterConfig(method=method, rank=2, target_modules="all", init=init,
                                          modules_to_save=["bn"]))
    randomize(adapted)
    with torch.no_grad():
        expected = adapted(x)
    save_adapter(adapted, tmp_path / "ad")
    header = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert header["config"]["method"] == method
    size = (tmp_path / "ad" / "adapter.safetensors").stat().st_size
    assert size < 4 * trainable_parameters(adapted)[0] + 4096  # the adapter alone, not the model
    again = load_adapter(net, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=1e-6, rtol=1e-6)


def test_load_adapter_errors(tmp_path):
    net = make_net()
    adapted = tf.adapt(net, AdapterConfig(method="lora", rank=2, target_modules=["fc1"]))
    save_adapter(adapted, tmp_path / "ad")
    with pytest.raises(FileFormatError, match="cannot read"):
        load_adapter(net, tmp_path / "missing")
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(FileFormatError, match="does not fit"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(InvalidArgumentError, match="not made by tensorfold.adapt"):
        save_adapter(net, tmp_path / "x")


# ---- DoTA and LoTR -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "tt", "tucker", "cp", "tr"])
def test_dota_init_reproduces_the_pretrained_layer_at_full_rank(method):
    net = make_net(torch.float64)
    x = inputs(torch.float64)
    targets = ["conv2", "fc1"] if method != "cp" else ["conv2"]  # CP's full rank of the fc1 tensor is large
    rank = 10_000 if method != "cp" else 200
    adapted = tf.adapt(net, AdapterConfig(method=method, rank=rank, target_modules=targets, init="dota", alpha=4))
    for name, layer in adapter_layers(adapted):
        original = net.get_submodule(name).weight
        delta = layer.scaling * layer.delta_weight().detach()
        tol = 1e-8 if method != "tr" else 1e-6
        assert float((delta - original).norm() / original.norm()) < tol
        assert float(layer.base.weight.norm() / original.norm()) < tol  # residual ~ 0
    torch.testing.assert_close(adapted(x), net(x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_dota_at_low_rank_keeps_outputs_and_trains_the_leading_part(method):
    net = make_net(torch.float64)
    x = inputs(torch.float64)
    adapted = tf.adapt(net, AdapterConfig(method=method, rank=2, target_modules=["fc1", "conv2"], init="dota"))
    torch.testing.assert_close(adapted(x), net(x), atol=1e-9, rtol=1e-9)
    layer = dict(adapter_layers(adapted))["fc1"]
    assert float(layer.delta_weight().norm()) > 0.1 * float(net.fc1.weight.norm())


def test_lotr_shares_factor_matrices_across_layers_of_one_shape():
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)], nn.Linear(16, 8))
    config = AdapterConfig(method="tucker", rank=2, n_cores=1, share_factors=True)
    adapted = tf.adapt(model, config)
    layers = [layer for _, layer in adapter_layers(adapted)]
    assert layers[0].shared is layers[1].shared is layers[2].shared
    assert layers[3].shared is not layers[0].shared
    # shared: U_out (16x2) + U_in (16x2) for the 16x16 group and 8x2 + 16x2 for the last; one 2x2 core each
    assert trainable_parameters(adapted)[0] == (16 * 2 + 16 * 2) + (8 * 2 + 16 * 2) + 4 * 4
    assert describe(model, config).trainable == trainable_parameters(adapted)[0]
    x = torch.randn(4, 16)
    assert torch.equal(adapted(x), model(x))


def test_lotr_save_load_keeps_sharing(tmp_path):
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)])
    adapted = tf.adapt(model, AdapterConfig(method="tucker", rank=2, n_cores=1, share_factors=True))
    randomize(adapted)
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = adapted(x)
    save_adapter(adapted, tmp_path / "lotr")
    again = load_adapter(model, tmp_path / "lotr")
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected)
    layers = [layer for _, layer in adapter_layers(again)]
    assert layers[0].shared is layers[2].shared


# ---- compressed models -------------------------------------------------------------------------------


def test_adapting_a_compressed_model():
    from tensorfold.nn import LowRankLinear, TTLinear

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 12))
    small = nn.Sequential(LowRankLinear.from_dense(dense[0], 4), nn.ReLU(), TTLinear.from_dense(dense[2], 2))
    summary = describe(small, AdapterConfig(method="tt", rank=2, target_modules="all-linear"))
    assert [(r.name, r.layer) for r in summary.rows] == [("0.first", "Linear"), ("0.second", "Linear"),
                                                         ("2", "TTLinear")]
    adapted = tf.adapt(small, AdapterConfig(method="lora", rank=2, target_modules=["second", "2"]))
    x = torch.randn(5, 24)
    assert torch.equal(adapted(x), small(x))
    randomize(adapted)
    with torch.no_grad():
        y = adapted(x)
        for _, layer in adapter_layers(adapted):  # the TTLinear update has no weight to fold into
            layer.forward_mode = "sum"
            layer._paths.clear()
        torch.testing.assert_close(adapted(x), y)
    with pytest.raises(InvalidArgumentError, match="cannot merge an adapter into a TTLinear"):
        merge(adapted)


# ---- PEFT as an oracle -------------------------------------------------------------------------------


def test_lora_matches_peft_lora_numerically():
    peft = pytest.importorskip("peft")
    net = make_net(torch.float64)
    x = inputs(torch.float64)
    targets = ["conv2", "fc1", "head"]
    ours = tf.adapt(net, AdapterConfig(method="lora", rank=4, alpha=8, target_modules=targets))
    theirs = peft.get_peft_model(
        make_net(torch.float64), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    randomize(ours, scale=0.2)
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            lora = theirs.base_model.model.get_submodule(name)
            A, B = layer.factors
            lora.lora_A["default"].weight.copy_(A.reshape(lora.lora_A["default"].weight.shape))
            lora.lora_B["default"].weight.copy_(B.reshape(lora.lora_B["default"].weight.shape))
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-10, rtol=1e-10)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for name, layer in adapter_layers(ours):
        lora = theirs.base_model.model.get_submodule(name)
        gA = lora.lora_A["default"].weight.grad
        gB = lora.lora_B["default"].weight.grad
        torch.testing.assert_close(layer.factors[0].grad.reshape(gA.shape), gA, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(layer.factors[1].grad.reshape(gB.shape), gB, atol=1e-9, rtol=1e-9)
    assert trainable_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_forward_path_choice_follows_the_counted_cost():
    adapted = tf.adapt(nn.Sequential(nn.Linear(1024, 1024)), AdapterConfig(method="lora", rank=4))
    layer = adapter_layers(adapted)[0][1]
    # training on many rows: the weight-sized gradient of the folded path dwarfs the thin factors
    assert layer._cheapest(4096, True, True, True) == "factored"
    # inference on a huge batch: building delta W once beats pushing every row through the factors
    assert layer._cheapest(100_000, False, True, True) == "sum"
    assert layer._cheapest(1, False, True, True) == "factored"
    x = torch.randn(2, 1024)
    with torch.no_grad():
        layer(x)
    assert layer._paths == {(2, False): "factored"}


def test_unload_without_merge_gives_the_original_layers_back():
    net = make_net()
    x = inputs()
    adapted = tf.adapt(net, AdapterConfig(method="cp", rank=3, target_modules="all"))
    randomize(adapted)
    plain = unload(adapted, merge=False)
    assert torch.equal(plain(x), net(x))
    dota = tf.adapt(net, AdapterConfig(method="cp", rank=3, target_modules=["fc1"], init="dota"))
    with pytest.raises(InvalidArgumentError, match="residual"):
        unload(dota, merge=False)


@pytest.mark.parametrize("method", METHODS)
def test_conv1d_and_conv3d_paths_agree(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 5, 2, stride=2))

    class Lift(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], x.shape[1], 2, 2, -1)

    model.insert(2, Lift())
    x = torch.randn(2, 4, 16)
    adapted = tf.adapt(model, AdapterConfig(method=method, rank=2, target_modules="all-conv"))
    randomize(adapted)
    outs = []
    for mode in ("factored", "sum"):
        for _, layer in adapter_layers(adapted):
            layer.forward_mode = mode
            layer._paths.clear()
        with torch.no_grad():
            outs.append(adapted(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        merge(adapted)
        torch.testing.assert_close(adapted(x), outs[1], atol=1e-5, rtol=1e-5)
