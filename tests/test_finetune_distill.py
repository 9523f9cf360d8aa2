"""Layer-wise distillation of transformers (token features, padding masked), learning-rate schedules and the
wall-clock budget of :func:`tensorfold.finetune`."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import bert_encoder, token_batches
from torch import nn

from tensorfold.compression.config import FinetuneConfig
from tensorfold.compression.finetune import (
    FinetuneHistory,
    block_feature_layers,
    feature_loss,
    finetune,
    lr_factor,
)
from tensorfold.errors import InvalidArgumentError
from tensorfold.nn import LowRankLinear
from tensorfold.nn.transformer import SkipBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_feature_loss_by_hand_ignores_padding():
    teacher = torch.tensor([[[1.0, 2.0], [2.0, 0.0], [9.0, 9.0]],
                            [[0.0, 1.0], [5.0, 5.0], [7.0, 7.0]]])
    student = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
                            [[1.0, 1.0], [4.0, 5.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the last token of each sentence is padding
    # kept squared errors 1 + 4 + 1 + 1 = 7; kept teacher squares 5 + 4 + 1 + 50 = 60
    assert float(feature_loss(student, teacher, mask)) == pytest.approx(7 / 60)
    # the padding's values do not matter at all
    other = student.clone()
    other[:, 2] = 100.0
    assert float(feature_loss(other, teacher, mask)) == pytest.approx(7 / 60)
    # without a mask: every position counts (errors 7 + 81 + 81 + 36 + 36 = 241, squares 60 + 162 + 98 = 320)
    assert float(feature_loss(student, teacher)) == pytest.approx(241 / 320)
    # a mask that does not fit the feature's leading dimensions (a pooled output) is ignored
    assert float(feature_loss(student[:, 0], teacher[:, 0], mask)) == pytest.approx(2 / 6)  # errors 1 + 1, squares 6


def test_lr_factor_at_known_points():
    assert lr_factor(0.0) == 1.0 and lr_factor(0.7) == 1.0
    assert [lr_factor(p, "linear", 0.25) for p in (0.0, 0.125, 0.25, 0.625, 1.0)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factor(0.25, "cosine", 0.25) == pytest.approx(1.0)
    assert lr_factor(0.625, "cosine", 0.25) == pytest.approx(0.5)
    assert lr_factor(0.8125, "cosine", 0.25) == pytest.approx(0.5 * (1 - 2 ** -0.5))  # 3/4 of the decay
    assert lr_factor(1.0, "cosine") == pytest.approx(0.0)
    with pytest.raises(InvalidArgumentError, match="schedule"):
        FinetuneConfig(schedule="step")
    with pytest.raises(InvalidArgumentError, match="warmup"):
        FinetuneConfig(warmup=1.0)
    with pytest.raises(InvalidArgumentError, match="max_seconds"):
        FinetuneConfig(max_seconds=0)


def tiny_mlp_batches(n: int = 10, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=gen) for _ in range(n)]


def test_schedule_sets_the_learning_rate_step_by_step():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    student = copy.deepcopy(teacher)
    history = FinetuneHistory()
    # 5 epochs of 2 batches: 10 steps; the last step of epoch e is step 2e, done at progress 2e / 10
    finetune(student, tiny_mlp_batches(2), teacher=teacher, epochs=5, lr=1e-3, schedule="linear", warmup=0.2,
             distill_loss="mse", progress=False, history=history)
    assert [e["lr"] for e in history.epochs] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0])

    class Loader:  # re-iterable, of unknown length
        def __iter__(self):
            return iter(tiny_mlp_batches(2))

    with pytest.raises(InvalidArgumentError, match="run length"):
        finetune(student, Loader(), teacher=teacher, schedule="cosine", progress=False)
    finetune(student, Loader(), teacher=teacher, schedule="cosine", max_steps=3, progress=False)  # a length: fine


class FakeClock:
    """Seconds that pass only when the student runs: one second per forward."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += 1.0


def clocked_student(teacher: nn.Module, clock: FakeClock) -> nn.Module:
    student = copy.deepcopy(teacher)
    # a function is shared, not copied, by the deep copy finetune trains (a bound method would copy the clock)
    student.register_forward_pre_hook(lambda module, inputs: clock.tick())
    return student


def test_max_seconds_stops_with_room_for_the_final_validation():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    clock = FakeClock()
    history = FinetuneHistory(clock=clock)
    # without validation: steps start at 0, 1, 2, ... s; each takes 1 s, the next must end by 6.5 s
    finetune(clocked_student(teacher, clock), tiny_mlp_batches(), teacher=teacher, epochs=100, max_seconds=6.5,
             distill_loss="mse", progress=False, history=history)
    assert history.steps == 6 and history.out_of_time and history.seconds == 6.0
    assert len(history.epochs) == 1  # the budget ended the first epoch (10 batches)
    # with one validation batch: the first validation takes 1 s, and each step must leave 1 s for the last one
    clock = FakeClock()
    history = FinetuneHistory(clock=clock)
    finetune(clocked_student(teacher, clock), tiny_mlp_batches(), teacher=teacher, epochs=100, max_seconds=6.5,
             val_data=tiny_mlp_batches(1, seed=1), distill_loss="mse", progress=False, history=history)
    assert history.steps == 4 and history.out_of_time and history.seconds == 6.0
    # a time budget is also the schedule's run length: halfway through the time, half the decay
    clock = FakeClock()
    history = FinetuneHistory(clock=clock)
    finetune(clocked_student(teacher, clock), tiny_mlp_batches(), teacher=teacher, epochs=100, max_seconds=10.0,
             eval_every=5, val_data=tiny_mlp_batches(1, seed=1), lr=1e-3, schedule="linear", patience=None,
             distill_loss="mse", progress=False, history=history)
    # the 5th step started at 1 (first validation) + 4 = 5 s: factor 1 - 5/10
    assert history.checks[0]["steps"] == 5 and history.checks[0]["lr"] == pytest.approx(0.5e-3)


def test_block_distillation_on_a_tiny_bert_lowers_the_gap_more_than_the_embedding_alone():
    teacher = bert_encoder(layers=2, hidden=32, heads=4, inter=64, init=0.3)
    student = copy.deepcopy(teacher)
    for layer in student.encoder.layer:  # rank 4 of 32: the embeddings' cosine to the teacher's falls to 0.34
        layer.intermediate.dense = LowRankLinear.from_dense(layer.intermediate.dense, rank=4)
    assert block_feature_layers(student, teacher) == ["encoder.layer.0", "encoder.layer.1"]

    def pooled(output):
        return output.last_hidden_state.mean(dim=1)

    train, held_out = token_batches(6, seed=0), token_batches(4, seed=1)

    @torch.no_grad()
    def gap(model) -> tuple[float, float]:
        """(1 - cosine of the pooled outputs, masked relative token error of the last hidden state) on held-out
        batches."""
        cos = [1 - torch.cosine_similarity(pooled(model(**b)), pooled(teacher(**b)), dim=-1).mean() for b in held_out]
        tok = [feature_loss(model(**b).last_hidden_state, teacher(**b).last_hidden_state, b["attention_mask"])
               for b in held_out]
        return float(sum(cos) / len(cos)), float(sum(tok) / len(tok))

    settings = dict(teacher=teacher, epochs=10, max_steps=12, lr=1e-3, distill_loss="cosine", output_fn=pooled,
                    train_mode=False, progress=False)
    before = gap(student)
    embedding_only = gap(finetune(student, train, distill="logits", **settings))
    blocks = gap(finetune(student, train, distill="blocks", **settings))
    assert before == pytest.approx((0.659, 1.329), abs=2e-3)
    assert embedding_only == pytest.approx((0.222, 0.462), abs=2e-3)
    assert blocks == pytest.approx((0.213, 0.441), abs=2e-3)  # both gaps lower than with the embedding alone
    assert blocks[0] < embedding_only[0] and blocks[1] < embedding_only[1]


def test_block_distillation_leaves_dropped_blocks_out():
    teacher = bert_encoder(layers=3, hidden=32, heads=4, inter=64, init=0.3)
    student = copy.deepcopy(teacher)
    student.encoder.layer[1] = SkipBlock.like(teacher.encoder.layer[1])
    # block 2 of the student must reproduce the teacher's block 2 (whatever block 1 did); block 1 has no output
    assert block_feature_layers(student, teacher) == ["encoder.layer.0", "encoder.layer.2"]
    held_out = token_batches(2, seed=1)

    @torch.no_grad()
    def gap(model) -> float:
        return sum(float(feature_loss(model(**b).last_hidden_state, teacher(**b).last_hidden_state,
                                      b["attention_mask"])) for b in held_out) / len(held_out)

    history = FinetuneHistory()
    tuned = finetune(student, token_batches(4, seed=0), teacher=teacher, distill="blocks", distill_loss="mse",
                     output_fn=lambda o: o.last_hidden_state, lr=1e-3, epochs=3, progress=False, history=history)
    assert isinstance(tuned.encoder.layer[1], SkipBlock) and history.steps == 12
    assert (gap(student), gap(tuned)) == pytest.approx((0.873, 0.392), abs=2e-3)


def test_a_models_recipe_fills_only_the_settings_left_at_their_defaults():
    from tensorfold.compression.config import TRANSFORMER_RECIPE
    from tensorfold.compression.finetune import model_finetune_config

    extra = {"finetune_recipe": "transformers", "finetune_lr": 3e-5}
    cfg = model_finetune_config(extra, FinetuneConfig(epochs=4, max_seconds=60.0, warmup=0.2), embeddings=True)
    assert (cfg.epochs, cfg.max_seconds, cfg.warmup) == (4, 60.0, 0.2)  # set on purpose: kept
    assert cfg.lr == 3e-5  # the model's own value beats the recipe's
    assert (cfg.distill, cfg.patience, cfg.eval_every, cfg.train_mode, cfg.freeze) == (
        "blocks", None, 50, False, ("*embeddings*",))
    assert cfg.distill_loss == "cosine"  # embeddings: cosine, not KL
    assert model_finetune_config({"distill_loss": "kl"}, embeddings=True).distill_loss == "kl"  # a causal LM's logits
    assert model_finetune_config({}) == FinetuneConfig()  # no recipe: the defaults
    assert FinetuneConfig.for_transformers() == FinetuneConfig(**TRANSFORMER_RECIPE)
