"""Mixed-precision fine-tuning (:class:`FinetuneConfig` ``precision``): bfloat16 autocast of the training forward
passes with float32 weights, losses and validation; float16 only on CUDA; "auto" by the hardware."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import bert_encoder, token_batches
from torch import nn

from tensorfold.compression import finetune as finetune_module
from tensorfold.compression.config import FinetuneConfig
from tensorfold.compression.finetune import FinetuneHistory, feature_loss, finetune, resolve_precision
from tensorfold.errors import InvalidArgumentError
from tensorfold.nn import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def pooled(output) -> torch.Tensor:
    return output.last_hidden_state.mean(dim=1)


def tiny_bert_pair() -> tuple[nn.Module, nn.Module]:
    """A tiny random BERT and a copy whose feed-forward up-projections are cut to rank 4 (as in
    test_finetune_distill: the pooled cosine to the teacher falls to 0.34)."""
    teacher = bert_encoder(layers=2, hidden=32, heads=4, inter=64, init=0.3)
    student = copy.deepcopy(teacher)
    for layer in student.encoder.layer:
        layer.intermediate.dense = LowRankLinear.from_dense(layer.intermediate.dense, rank=4)
    return teacher, student


@torch.no_grad()
def gap(model: nn.Module, teacher: nn.Module, batches: list[dict]) -> tuple[float, float]:
    """(1 - cosine of the pooled outputs, masked relative token error), float32, on held-out batches."""
    cos = [1 - torch.cosine_similarity(pooled(model(**b)), pooled(teacher(**b)), dim=-1).mean() for b in batches]
    tok = [feature_loss(model(**b).last_hidden_state, teacher(**b).last_hidden_state, b["attention_mask"])
           for b in batches]
    return float(sum(cos) / len(cos)), float(sum(tok) / len(tok))


def tuned(student, teacher, precision: str, history: FinetuneHistory | None = None, **changes) -> nn.Module:
    settings = dict(teacher=teacher, epochs=10, max_steps=12, lr=1e-3, distill="blocks", distill_loss="cosine",
                    output_fn=pooled, train_mode=False, progress=False, precision=precision)
    return finetune(student, token_batches(6, seed=0), history=history, **{**settings, **changes})


def test_bfloat16_block_distillation_closes_the_gap_with_float32_weights():
    teacher, student = tiny_bert_pair()
    held_out = token_batches(4, seed=1)
    history = FinetuneHistory()
    mixed = tuned(student, teacher, "bfloat16", history)
    full = tuned(student, teacher, "float32")
    assert history.precision == "bfloat16" and history.notes == [] and history.steps == 12
    # the master weights stay float32: only the forward arithmetic was bfloat16
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    assert all(b.dtype != torch.bfloat16 for b in mixed.buffers())
    before, after, reference = gap(student, teacher, held_out), gap(mixed, teacher, held_out), gap(full, teacher,
                                                                                                   held_out)
    assert before == pytest.approx((0.659, 1.329), abs=2e-3)
    assert reference == pytest.approx((0.213, 0.441), abs=2e-3)  # test_finetune_distill's float32 figure
    # bfloat16 steps close the gap as far (12 steps; its rounding moves the result in the 4th digit)
    assert after == pytest.approx((0.214, 0.441), abs=2e-3)
    assert after[0] < 0.4 * before[0] and after[1] < 0.4 * before[1]
    # and it did run in bfloat16: the weights differ from the float32 run's
    assert not torch.equal(mixed.encoder.layer[0].attention.self.query.weight,
                           full.encoder.layer[0].attention.self.query.weight)


def test_bfloat16_forwards_in_training_float32_in_validation_and_losses():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    seen: list[tuple[bool, torch.dtype]] = []  # (training step?, dtype of the student's first layer's output)
    losses: list[torch.dtype] = []
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=gen), torch.randint(3, (8,), generator=gen)) for _ in range(3)]

    def loss_fn(outputs, targets):
        losses.append(outputs.dtype)
        return nn.functional.cross_entropy(outputs, targets)

    def record(module, inputs, output):
        seen.append((torch.is_grad_enabled(), output.dtype))

    student[0].register_forward_hook(record)  # a function is shared by the deep copy finetune trains
    history = FinetuneHistory()
    finetune(student, data, teacher=teacher, val_data=data[:1], epochs=2, lr=1e-2, precision="bfloat16",
             loss_fn=loss_fn, progress=False, history=history)
    assert history.steps == 6
    training = [dtype for grad, dtype in seen if grad]
    validation = [dtype for grad, dtype in seen if not grad]
    assert training == [torch.bfloat16] * 6  # every training step's forward ran under bfloat16 autocast
    assert validation == [torch.float32] * 3  # before training and after each epoch: the model as returned
    assert set(losses) == {torch.float32}  # the task loss got float32 outputs


def test_same_seed_same_bfloat16_result():
    teacher, student = tiny_bert_pair()
    first, second = tuned(student, teacher, "bfloat16"), tuned(student, teacher, "bfloat16")
    third = tuned(student, teacher, "bfloat16", seed=1)  # another batch order
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), third.state_dict().values()))


def test_precision_values_are_checked():
    with pytest.raises(InvalidArgumentError, match="precision must be one of 'float32', 'bfloat16', 'float16', "
                                                   "'auto'; got 'bf16'"):
        FinetuneConfig(precision="bf16")
    with pytest.raises(InvalidArgumentError, match="precision must be one of"):
        resolve_precision("half")
    # float16 needs CUDA: on a CPU it is an error, not a silent change
    with pytest.raises(InvalidArgumentError, match="'float16' needs a CUDA device .* on a CPU"):
        resolve_precision("float16", "cpu")
    teacher, student = tiny_bert_pair()
    with pytest.raises(InvalidArgumentError, match="'float16' needs a CUDA device"):
        tuned(student, teacher, "float16")
    assert resolve_precision("float32", "cpu") == ("float32", None)
    assert resolve_precision("bfloat16", "cpu") == ("bfloat16", None)


def test_auto_follows_the_hardware_and_says_so_when_it_falls_back(monkeypatch):
    teacher, student = tiny_bert_pair()
    monkeypatch.setattr(finetune_module, "bfloat16_native", lambda device="cpu": False)
    assert resolve_precision("auto", "cpu")[0] == "float32"
    history = FinetuneHistory()
    fallback = tuned(student, teacher, "auto", history)
    assert history.precision == "float32" and len(history.notes) == 1
    assert "no native bfloat16" in history.notes[0] and "float32" in history.notes[0]
    full = tuned(student, teacher, "float32")
    assert all(torch.equal(a, b) for a, b in zip(fallback.state_dict().values(), full.state_dict().values()))

    monkeypatch.setattr(finetune_module, "bfloat16_native", lambda device="cpu": True)
    history = FinetuneHistory()
    native = tuned(student, teacher, "auto", history)
    assert history.precision == "bfloat16" and history.notes == []
    mixed = tuned(student, teacher, "bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(native.state_dict().values(), mixed.state_dict().values()))


def test_bfloat16_native_answers_for_any_device():
    assert isinstance(finetune_module.bfloat16_native("cpu"), bool)
    assert finetune_module.bfloat16_native("meta") is False


def test_the_transformer_recipe_asks_for_auto_and_an_explicit_float32_wins():
    from tensorfold.compression.finetune import model_finetune_config

    recipe = {"finetune_recipe": "transformers"}
    assert FinetuneConfig().precision is None and resolve_precision(None) == ("float32", None)
    assert FinetuneConfig.for_transformers().precision == "auto"
    assert model_finetune_config(recipe, FinetuneConfig(max_seconds=60.0)).precision == "auto"
    # set on purpose: kept, whatever the recipe says
    assert model_finetune_config(recipe, FinetuneConfig(precision="float32")).precision == "float32"
    assert model_finetune_config({}, FinetuneConfig()).precision is None  # no recipe: float32


def test_float16_steps_scale_the_loss_and_still_learn(monkeypatch):
    """The CUDA float16 path (autocast + GradScaler), run on the CPU by letting float16 through: no GPU here."""
    real = finetune_module.resolve_precision
    monkeypatch.setattr(finetune_module, "resolve_precision",
                        lambda p, d="cpu": ("float16", None) if p == "float16" else real(p, d))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 6, generator=gen) for _ in range(4)]
    scales: list[float] = []
    update = torch.amp.GradScaler.update

    def recorded(self, *args, **kwargs):
        update(self, *args, **kwargs)
        scales.append(self.get_scale())

    monkeypatch.setattr(torch.amp.GradScaler, "update", recorded)
    history = FinetuneHistory()
    half = finetune(student, data, teacher=teacher, val_data=data[:1], epochs=3, lr=1e-2, distill_loss="mse",
                    precision="float16", progress=False, history=history)
    assert history.precision == "float16" and {p.dtype for p in half.parameters()} == {torch.float32}
    # the loss is scaled: the first two steps' gradients overflow float16 at 2**16 and 2**15 and are skipped,
    # then the scale holds at 2**14
    assert scales == [2.0 ** 15] + [2.0 ** 14] * 11
    # so it trails float32 (1.826, 1.418, 1.100 with these 12 steps), but it learns
    assert [e["val_loss"] for e in history.epochs] == pytest.approx([2.141, 1.675, 1.295], abs=2e-3)
