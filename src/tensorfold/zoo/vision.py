"""Built-in vision models: ``digits-cnn`` (sklearn digits) and ``resnet20-shapes`` (procedural shapes).

Each model comes with its data (see :mod:`tensorfold.zoo.vision_data`), trained weights shipped in
``tensorfold/zoo/weights/`` (safetensors, loaded without pickle) and the hooks the compression tools
need: calibration batches, an accuracy evaluation, example inputs for latency, and fine-tuning data.
When the shipped weights are missing (e.g. a trimmed install) the model is trained on first use and
cached under ``$TENSORFOLD_CACHE`` or ``~/.cache/tensorfold``.

>>> task = VisionTask("digits-cnn")
>>> model = task.load()
>>> round(task.evaluate(model, model)["accuracy_drop"], 6)
0.0
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tensorfold.core.modules import eval_mode
from tensorfold.errors import FileFormatError, InvalidArgumentError
from tensorfold.zoo.vision_data import Batches, ImageSet, Splits, load_split
from tensorfold.zoo.vision_models import digits_cnn, resnet20

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DATA_SEED = 0  # the fixed split every recorded accuracy refers to


@dataclass(frozen=True)
class Recipe:
    """How a reference model is trained (see examples/train_vision.py)."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str  # "adam" or "sgd" (momentum 0.9, nesterov)
    weight_decay: float
    label_smoothing: float = 0.0
    finetune_lr: float = 1e-3  # Adam learning rate that suits a short fine-tune of a compressed copy


@dataclass(frozen=True)
class VisionSpec:
    name: str
    description: str
    dataset: str
    build: Callable[..., nn.Module]
    recipe: Recipe
    store_dtype: torch.dtype  # dtype of the shipped weights (float16 halves the repo footprint)


SPECS = {
    "digits-cnn": VisionSpec(
        "digits-cnn",
        "conv16-conv32-pool-fc64-fc10 CNN on scikit-learn's 8x8 digits (1,797 images)",
        "digits",
        digits_cnn,
        Recipe(epochs=30, lr=3e-3, batch_size=32, optimizer="adam", weight_decay=0.0, finetune_lr=3e-3),
        torch.float32,
    ),
    "resnet20-shapes": VisionSpec(
        "resnet20-shapes",
        "CIFAR ResNet-20 (0.27 M params) on 32x32 procedural shapes/textures (10 classes)",
        "shapes",
        resnet20,
        Recipe(epochs=15, lr=0.1, batch_size=128, optimizer="sgd", weight_decay=5e-4, finetune_lr=1e-4),
        torch.float16,
    ),
}


def names() -> list[str]:
    return sorted(SPECS)


def spec(name: str) -> VisionSpec:
    if name not in SPECS:
        raise InvalidArgumentError(f"unknown vision model {name!r}; built-in vision models: {', '.join(names())}")
    return SPECS[name]


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode (the model's mode is restored afterwards)."""
    with eval_mode(model):
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        correct = 0
        for images, labels in data.batches(batch_size):
            logits = model(images.to(device=device, dtype=dtype))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
    return correct / max(1, len(data))


class VisionTask:
    """One built-in vision model with its data; the callables of its :class:`BuiltinModel` live here."""

    def __init__(self, name: str, data_seed: int = DATA_SEED):
        self.spec = spec(name)
        self.name = name
        self.data_seed = data_seed

    @property
    def splits(self) -> Splits:
        return load_split(self.spec.dataset, self.data_seed)

    def load(self) -> nn.Module:
        """The trained model in eval mode (shipped weights, else the cache, else trained now and cached)."""
        return load_model(self.name)

    def calibration(self, n: int = 256, seed: int = 0, batch_size: int = 128) -> list[torch.Tensor]:
        """``n`` training images drawn by ``seed``, as a list of input batches."""
        train = self.splits.train
        n = int(n)
        if n < 1:
            raise InvalidArgumentError(f"calibration size must be a positive integer, got {n!r}")
        gen = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(len(train), generator=gen)[: min(n, len(train))]
        images = train.images[index]
        return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]

    def evaluate(self, original: nn.Module, compressed: nn.Module) -> dict[str, float]:
        """Test accuracy of both models and the drop (original minus compressed)."""
        test = self.splits.test
        acc_original = accuracy(original, test)
        acc = accuracy(compressed, test)
        return {"accuracy": acc, "accuracy_original": acc_original, "accuracy_drop": acc_original - acc}

    def example_inputs(self, batch_size: int = 32) -> torch.Tensor:
        """The first ``batch_size`` test images (repeated if the test split is smaller)."""
        images = self.splits.test.images
        reps = -(-int(batch_size) // len(images))
        return images.repeat(reps, 1, 1, 1)[: int(batch_size)].contiguous()

    def finetune_data(self, batch_size: int = 64, seed: int = 0) -> tuple[Batches, Batches]:
        """(train, val): re-iterable loaders of ``(images, labels)``; train is reshuffled every pass."""
        splits = self.splits
        return splits.train.batches(batch_size, shuffle_seed=seed), splits.val.batches(512)


def builtin(name: str):
    """The :class:`tensorfold.zoo.BuiltinModel` for ``"digits-cnn"`` or ``"resnet20-shapes"``."""
    from tensorfold.zoo import BuiltinModel

    task = VisionTask(name)
    return BuiltinModel(
        name=name,
        description=task.spec.description,
        load=task.load,
        calibration=task.calibration,
        evaluate=task.evaluate,
        example_inputs=task.example_inputs,
        finetune_data=task.finetune_data,
        extra={"finetune_lr": task.spec.recipe.finetune_lr, "metric": "accuracy"},
    )


# ---------------------------------------------------------------------------------------------------
# weights: shipped, cached, or trained on first use


def cache_dir() -> Path:
    root = os.environ.get("TENSORFOLD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tensorfold"
    )
    return Path(root) / "zoo"


def weights_path(name: str) -> Path | None:
    """The shipped weights file of ``name`` if present, else the cached one if present, else None."""
    for folder in (WEIGHTS_DIR, cache_dir()):
        path = folder / f"{name}.safetensors"
        if path.is_file():
            return path
    return None


def load_model(name: str, *, train_if_missing: bool = True) -> nn.Module:
    """The trained ``name`` model (float32, eval mode)."""
    spec(name)
    path = weights_path(name)
    if path is None:
        if not train_if_missing:
            raise FileFormatError(f"no weights for {name!r} in {WEIGHTS_DIR} or {cache_dir()}")
        print(f"tensorfold: training {name} once (no shipped weights); cached in {cache_dir()}", file=sys.stderr)
        model, record = train_reference(name, progress=False)
        path = save_weights(model, name, record, cache_dir())
    return read_weights(name, path)


def read_weights(name: str, path: str | os.PathLike) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = spec(name).build(seed=None)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FileFormatError(f"{path}: cannot read weights ({exc})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(f"{path}: weights do not fit {name}: {exc}") from None
    return model.eval()


def read_record(name: str) -> dict[str, str]:
    """The metadata stored with the weights of ``name`` (test accuracy, recipe, seed...)."""
    from safetensors import safe_open

    path = weights_path(name)
    if path is None:
        raise FileFormatError(f"no weights for {name!r}")
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def save_weights(model: nn.Module, name: str, record: dict, folder: str | os.PathLike = WEIGHTS_DIR) -> Path:
    """Write ``model``'s state dict (in the spec's storage dtype) and ``record`` as safetensors, atomically."""
    from safetensors.torch import save_file

    from tensorfold.io import atomic_path

    store = spec(name).store_dtype
    state = {
        k: (v.detach().to(store) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    path = Path(folder) / f"{name}.safetensors"
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in record.items()})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # the temporary file was private
    return path


def train_reference(
    name: str, *, seed: int = 0, epochs: int | None = None, progress: bool = True
) -> tuple[nn.Module, dict]:
    """Train the reference ``name`` model from scratch; returns (model, record with the test accuracy).

    The model with the best validation accuracy is kept. Runs in one to two minutes on 2 CPU cores.
    """
    task = VisionTask(name)
    recipe = task.spec.recipe
    epochs = recipe.epochs if epochs is None else int(epochs)
    model = task.spec.build(seed=seed)
    splits = task.splits
    loader = splits.train.batches(recipe.batch_size, shuffle_seed=seed)
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                              weight_decay=recipe.weight_decay)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    best, best_acc, start = None, -1.0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val_acc = accuracy(model, splits.val)
        if val_acc >= best_acc:
            best_acc, best = val_acc, copy.deepcopy(model.state_dict())
        if progress:
            print(f"{name} epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} val acc {val_acc:.4f} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    model.load_state_dict(best)
    model.eval()
    # the recorded accuracy is that of the weights as stored (float16 for the larger model)
    stored = spec(name).store_dtype
    rounded = copy.deepcopy(model)
    for p in rounded.parameters():
        p.data = p.data.to(stored).float()
    record = {
        "model": name, "seed": seed, "epochs": epochs, "train_seconds": round(time.perf_counter() - start, 1),
        "val_accuracy": best_acc, "test_accuracy": accuracy(rounded, splits.test),
        "data_seed": task.data_seed, "recipe": repr(recipe), "torch": torch.__version__,
    }
    return model, record
