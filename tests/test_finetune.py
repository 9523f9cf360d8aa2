"""Fine-tuning with distillation: it recovers accuracy, distils from inputs alone, is deterministic."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorfold.compression.finetune import (
    FinetuneHistory,
    distillation_loss,
    feature_layer_names,
    finetune,
    split_batch,
)
from tensorfold.errors import InvalidArgumentError, ShapeError
from tensorfold.nn import LowRankLinear
from tensorfold.nn.base import DenseSpec
from tensorfold.zoo.vision import VisionTask, accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    task = VisionTask("digits-cnn")
    return task, task.load()


def badly_compressed(model: nn.Module) -> nn.Module:
    """The digits CNN with fc1 (64x512) cut to rank 4 (test accuracy 0.66 instead of 0.98)."""
    small = copy.deepcopy(model)
    small.fc1 = LowRankLinear.from_dense(model.fc1, rank=4)
    return small


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_recovers_accuracy_on_held_out_split(digits):
    task, model = digits
    bad = badly_compressed(model)
    before_bad = copy.deepcopy(bad.state_dict())
    before_teacher = copy.deepcopy(model.state_dict())
    train, val = task.finetune_data(batch_size=64, seed=0)
    test = task.splits.test
    acc_bad = accuracy(bad, test)
    tuned = finetune(bad, train, teacher=model, epochs=3, lr=3e-3, val_data=val, seed=0, progress=False)
    acc_tuned = accuracy(tuned, test)
    assert acc_bad < 0.8
    assert acc_tuned >= acc_bad + 0.15
    assert acc_tuned >= 0.9
    # inputs untouched
    assert all(torch.equal(v, bad.state_dict()[k]) for k, v in before_bad.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_teacher.items())
    assert not model.training  # the teacher's mode is restored


def test_supervised_only_without_teacher(digits):
    task, model = digits
    bad = badly_compressed(model)
    train, _ = task.finetune_data(batch_size=64, seed=1)
    tuned = finetune(bad, train, teacher=None, epochs=2, lr=3e-3, seed=1, progress=False)
    assert accuracy(tuned, task.splits.test) >= accuracy(bad, task.splits.test) + 0.08


def test_pure_distillation_from_inputs_alone_reduces_the_loss(digits):
    task, model = digits
    bad = badly_compressed(model)
    inputs = task.calibration(512, seed=3, batch_size=64)  # tensors only: no labels anywhere
    held_out = task.splits.val.images

    def kd(student):
        with torch.no_grad():
            return float(distillation_loss(student(held_out), model(held_out), temperature=2.0))

    history = FinetuneHistory()
    tuned = finetune(bad, inputs, teacher=model, epochs=3, lr=3e-3, seed=0, progress=False, history=history)
    assert kd(tuned) < 0.5 * kd(bad)
    assert len(history.epochs) == 3
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]


def test_feature_distillation_taps_the_replaced_layers():
    gen = torch.Generator().manual_seed(2)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = copy.deepcopy(teacher)
    student[0] = LowRankLinear(DenseSpec(8, 16, True), rank=6)  # a badly initialised replacement of layer "0"
    assert feature_layer_names(student, teacher) == ["0"]
    inputs = [torch.randn(32, 8, generator=gen) for _ in range(8)]
    held_out = torch.randn(256, 8, generator=gen)

    def layer0_error(model):
        with torch.no_grad():
            return float(((model[0](held_out) - teacher[0](held_out)) ** 2).mean() / teacher[0](held_out).pow(2).mean())

    kwargs = dict(teacher=teacher, epochs=20, lr=1e-2, seed=0, progress=False)
    with_features = finetune(student, inputs, distill="features", **kwargs)
    logits_only = finetune(student, inputs, distill="logits", **kwargs)
    assert layer0_error(with_features) < 0.2 * layer0_error(student)
    assert layer0_error(with_features) < 0.5 * layer0_error(logits_only)
    # hooks are removed from both models
    assert not teacher[0]._forward_hooks and not with_features[0]._forward_hooks


def test_same_seed_same_weights_and_max_steps(digits):
    task, model = digits
    bad = badly_compressed(model)
    batches = list(task.splits.train.batches(64))
    runs = [finetune(bad, batches, teacher=model, epochs=1, seed=5, progress=False, max_steps=6) for _ in range(2)]
    assert state_equal(runs[0], runs[1])
    other = finetune(bad, batches, teacher=model, epochs=1, seed=6, progress=False, max_steps=6)
    assert not state_equal(runs[0], other)
    history = FinetuneHistory()
    finetune(bad, batches, teacher=model, epochs=4, seed=5, progress=False, max_steps=6, history=history)
    assert history.steps == 6


def test_early_stopping_restores_the_best_weights():
    # a model already at the optimum: any step with a huge learning rate makes validation worse
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    w = torch.randn(2, 4, generator=gen)
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    data = [(x, x @ w.T)]
    history = FinetuneHistory()
    epochs_seen = []
    tuned = finetune(model, data, teacher=None, epochs=10, lr=5.0, val_data=data, patience=2,
                     progress=epochs_seen.append, history=history)
    assert torch.equal(tuned.weight, w)  # best = the untouched input
    assert history.best_epoch == 0 and history.stopped_early
    assert len(history.epochs) == 2 == len(epochs_seen)


def test_eval_every_validates_within_an_epoch_and_stops_on_patience():
    # one long epoch of 12 batches: with eval_every=3 validation runs after steps 3, 6, ... and early
    # stopping acts inside the epoch (lr so large that every step makes things worse)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    w = torch.randn(2, 4, generator=gen)
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    data = [(x, x @ w.T)] * 12
    history = FinetuneHistory()
    tuned = finetune(model, data, teacher=None, epochs=1, lr=5.0, val_data=data[:1], patience=2, eval_every=3,
                     progress=False, history=history)
    assert [c["steps"] for c in history.checks] == [3, 6] and history.steps == 6 and history.stopped_early
    assert torch.equal(tuned.weight, w)
    # a good learning rate: the loss falls at every check and the last weights are kept
    history = FinetuneHistory()
    small = nn.Linear(4, 2, bias=False)
    finetune(small, data, teacher=None, epochs=1, lr=1e-2, val_data=data[:1], eval_every=4, progress=False,
             history=history, seed=0)
    losses = [c["val_loss"] for c in history.checks]
    assert len(losses) == 3 and losses == sorted(losses, reverse=True) and history.best_epoch == 1
    with pytest.raises(InvalidArgumentError, match="eval_every"):
        finetune(small, data, teacher=None, eval_every=0, progress=False)


def test_train_mode_false_trains_without_dropout():
    # a student with heavy dropout: in eval mode it trains exactly as the same student without the dropout
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 4, generator=gen) for _ in range(5)]
    teacher = nn.Linear(4, 3)
    plain = nn.Sequential(nn.Linear(4, 3))
    noisy = nn.Sequential(copy.deepcopy(plain[0]), nn.Dropout(0.9))
    kw = dict(teacher=teacher, epochs=2, lr=1e-2, distill_loss="mse", seed=0, progress=False)
    a = finetune(plain, data, **kw)
    b = finetune(noisy, data, train_mode=False, **kw)
    c = finetune(noisy, data, **kw)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)


def test_freeze_keeps_the_matching_parameters():
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 4, generator=gen) for _ in range(3)]
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tuned = finetune(student, data, teacher=teacher, lr=1e-2, distill_loss="mse", freeze=("0.*",), progress=False)
    assert torch.equal(tuned[0].weight, student[0].weight) and torch.equal(tuned[0].bias, student[0].bias)
    assert not torch.equal(tuned[2].weight, student[2].weight)
    assert all(p.requires_grad for p in student.parameters())  # the input model is left as it was


def test_dict_inputs_are_keyword_arguments_and_output_fn():
    class Keyworded(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.proj = nn.Linear(6, width)
            self.head = nn.Linear(width, 3)

        def forward(self, features, scale=1.0):
            return {"embedding": self.head(torch.relu(self.proj(features))) * scale}

    gen = torch.Generator().manual_seed(1)
    teacher, student = Keyworded(32), Keyworded(4)
    batches = [{"features": torch.randn(16, 6, generator=gen), "scale": 2.0} for _ in range(4)]
    pick = lambda out: out["embedding"]  # noqa: E731

    def loss(m):
        with torch.no_grad():
            return sum(float(distillation_loss(pick(m(**b)), pick(teacher(**b)), kind="mse")) for b in batches)

    tuned = finetune(student, batches, teacher=teacher, epochs=30, lr=1e-2, distill_loss="mse", output_fn=pick,
                     progress=False)
    assert loss(tuned) < 0.5 * loss(student)


def test_split_batch_forms():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert split_batch(x).targets is None
    assert split_batch((x, y)).targets is y
    assert split_batch((x,)).targets is None
    assert split_batch({"a": x}).kwargs == {"a": x}
    with pytest.raises(ShapeError):
        split_batch((x, y, y))


def test_bad_arguments(digits):
    task, model = digits
    inputs = task.calibration(64, seed=0)
    with pytest.raises(InvalidArgumentError):
        finetune(model, inputs, teacher=None, progress=False)  # no targets and no teacher
    with pytest.raises(InvalidArgumentError):
        finetune(model, inputs, teacher=model, distill="attention", progress=False)
    with pytest.raises(InvalidArgumentError):
        finetune(model, inputs, teacher=model, epochs=0, progress=False)
    with pytest.raises(InvalidArgumentError):
        finetune(model, [], teacher=model, progress=False)
    with pytest.raises(InvalidArgumentError):
        finetune(model, inputs[0], teacher=model, progress=False)
    with pytest.raises(InvalidArgumentError):
        finetune(model, inputs, teacher=model, alpha=1.5, progress=False)
    with pytest.raises(ShapeError):
        finetune(model, [(inputs[0], torch.zeros(3, dtype=torch.long))], teacher=None, progress=False)


def test_balance_factors_keeps_the_function_and_evens_the_norms():
    from tensorfold.compression.finetune import balance_factors
    from tensorfold.nn import SVDConv

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(LowRankLinear(DenseSpec(12, 10, True), rank=3), nn.ReLU())
    conv = SVDConv(nn.Conv2d(8, 6, 3, padding=1, groups=2), rank=2)
    with torch.no_grad():
        model[0].first.weight.copy_(torch.randn(3, 12, generator=gen) * 1e-3)
        model[0].second.weight.copy_(torch.randn(10, 3, generator=gen) * 1e3)
        conv.first.weight.copy_(torch.randn(conv.first.weight.shape, generator=gen) * 1e-3)
        conv.last.weight.copy_(torch.randn(conv.last.weight.shape, generator=gen) * 1e3)
    x, images = torch.randn(5, 12, generator=gen), torch.randn(2, 8, 5, 5, generator=gen)
    before, before_conv = model(x), conv(images)
    assert balance_factors(model) == 1 and balance_factors(conv) == 1
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv(images), before_conv, rtol=1e-4, atol=1e-4)
    n1 = model[0].first.weight.norm(dim=1)
    n2 = model[0].second.weight.norm(dim=0)
    torch.testing.assert_close(n1, n2)
    c1 = conv.first.weight.flatten(1).norm(dim=1)  # (groups * rank,)
    w2 = conv.last.weight.reshape(2, 3, 2)  # (groups, out per group, rank)
    c2 = w2.transpose(1, 2).reshape(4, 3).norm(dim=1)
    torch.testing.assert_close(c1, c2)


def test_a_forward_that_takes_the_whole_dict_gets_it_whole():
    """SentenceTransformer.forward(features) takes the tokenized dict as one argument and adds keys to it."""

    class WholeDict(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.proj = nn.Linear(6, width)
            self.head = nn.Linear(width, 3)

        def forward(self, features):
            features["sentence_embedding"] = self.head(torch.relu(self.proj(features["input"])))
            return features

    gen = torch.Generator().manual_seed(2)
    teacher, student = WholeDict(32), WholeDict(4)
    batches = [{"input": torch.randn(16, 6, generator=gen)} for _ in range(4)]

    def loss(m):
        with torch.no_grad():
            return sum(
                float(distillation_loss(m(dict(b))["sentence_embedding"], teacher(dict(b))["sentence_embedding"],
                                        kind="mse"))
                for b in batches
            )

    tuned = finetune(student, batches, teacher=teacher, epochs=30, lr=1e-2, distill_loss="mse", progress=False)
    assert loss(tuned) < 0.5 * loss(student)
    assert all(set(b) == {"input"} for b in batches)  # the caller's batches are not modified
