"""Offline image data for the vision models: scikit-learn's digits and a procedural shapes task.

Both datasets are generated or loaded without any network access and are a pure function of their
seed, so every split is the same on every machine.

* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 grey 8x8 images of handwritten digits),
  scaled to [0, 1] and split 1,197 / 300 / 300 (train / val / test) by a seeded permutation.
* ``shapes``: 32x32 RGB images of 10 classes (disk, square, triangle, ring, cross, star, half-disk,
  striped patch, checkered patch, dotted patch) with random position, scale, rotation, foreground and
  background colour, contrast, a background gradient and pixel noise. Generated in numpy in well under a
  second per thousand images.

>>> splits = load_split("digits", seed=0)
>>> splits.train.images.shape, splits.test.labels.shape
(torch.Size([1197, 1, 8, 8]), torch.Size([300]))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tensorfold.errors import InvalidArgumentError

DATASETS = ("digits", "shapes")
SHAPE_CLASSES = (
    "disk", "square", "triangle", "ring", "cross", "star", "half-disk", "stripes", "checkers", "dots",
)
SHAPES_SIZES = {"train": 6000, "val": 1000, "test": 1000}
IMAGE_SIZE = 32


@dataclass(frozen=True)
class ImageSet:
    """Images (N, C, H, W) float32 and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None) -> Batches:
        """A re-iterable loader of ``(images, labels)`` batches (reshuffled every pass when seeded)."""
        return Batches(self, batch_size, shuffle_seed)


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet


class Batches:
    """Iterate over ``(images, labels)`` batches of an :class:`ImageSet`.

    With ``shuffle_seed`` every pass draws a new permutation from a private generator, so a loop over
    epochs sees a different order each epoch and the same sequence of orders on every run.
    """

    def __init__(self, data: ImageSet, batch_size: int, shuffle_seed: int | None = None):
        if int(batch_size) < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.data = data
        self.batch_size = int(batch_size)
        self._generator = None
        if shuffle_seed is not None:
            self._generator = torch.Generator().manual_seed(int(shuffle_seed))

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.arange(n) if self._generator is None else torch.randperm(n, generator=self._generator)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.data.images[index], self.data.labels[index]


_CACHE: dict[tuple[str, int], Splits] = {}


def load_split(dataset: str, seed: int = 0) -> Splits:
    """The train/val/test splits of ``dataset`` ("digits" or "shapes") for ``seed`` (cached in memory)."""
    if dataset not in DATASETS:
        raise InvalidArgumentError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    key = (dataset, int(seed))
    if key not in _CACHE:
        _CACHE[key] = _load_digits(int(seed)) if dataset == "digits" else _load_shapes(int(seed))
    return _CACHE[key]


def _load_digits(seed: int) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_val = n_test = 300
    parts = (order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test])
    return Splits(*(ImageSet(images[p].contiguous(), labels[p].contiguous()) for p in parts))


def _load_shapes(seed: int) -> Splits:
    rng = np.random.default_rng([seed, 20_261_128])
    sets = [generate_shapes(n, rng) for n in SHAPES_SIZES.values()]
    return Splits(*sets)


def generate_shapes(n: int, rng: np.random.Generator | int) -> ImageSet:
    """``n`` shapes images with balanced classes in random order, drawn from ``rng`` (or a seed).

    >>> data = generate_shapes(20, 0)
    >>> data.images.shape, int(data.labels.max()) <= 9
    (torch.Size([20, 3, 32, 32]), True)
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(int(rng))
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES))
    radius = rng.uniform(6.0, 13.0, n)  # shape half-size in pixels
    centre = rng.uniform(0.0, 1.0, (n, 2)) * (IMAGE_SIZE - 2 * radius[:, None] * 0.8) + radius[:, None] * 0.8
    angle = rng.uniform(0.0, 2 * np.pi, n)
    aspect = rng.uniform(0.85, 1.15, n)  # mild anisotropic scaling
    grid = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    dy = grid[None, :, None] - centre[:, 1, None, None]
    dx = grid[None, None, :] - centre[:, 0, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / (radius[:, None, None] * aspect[:, None, None])
    v = (-sin * dx + cos * dy) / (radius[:, None, None] / aspect[:, None, None])
    pixel = 1.0 / radius[:, None, None]  # one pixel in shape units: sets the edge softness

    signed = np.empty_like(u)  # > 0 inside the shape, in shape units
    for k in range(len(SHAPE_CLASSES)):
        rows = labels == k
        if rows.any():
            signed[rows] = _SHAPE_FUNCS[k](u[rows], v[rows], rng)
    alpha = 1.0 / (1.0 + np.exp(-np.clip(signed / (0.5 * pixel), -30, 30)))

    fg, bg = _colours(n, rng)
    ramp = rng.normal(0.0, 0.08, (n, 2))
    gradient = (ramp[:, 0, None, None] * (dx / IMAGE_SIZE) + ramp[:, 1, None, None] * (dy / IMAGE_SIZE))
    image = bg[:, :, None, None] * (1 - alpha[:, None]) + fg[:, :, None, None] * alpha[:, None]
    image = image + gradient[:, None] + rng.normal(0.0, rng.uniform(0.02, 0.08, n)[:, None, None, None], image.shape)
    image = (np.clip(image, 0.0, 1.0) - 0.5) / 0.25
    return ImageSet(torch.from_numpy(image.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)))


def _colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours whose brightness differs by at least 0.2."""
    bg = rng.uniform(0.0, 1.0, (n, 3))
    fg = rng.uniform(0.0, 1.0, (n, 3))
    weights = np.array([0.3, 0.59, 0.11])
    gap = (fg - bg) @ weights
    sign = np.where(gap >= 0, 1.0, -1.0)
    shortfall = np.maximum(0.0, 0.2 - np.abs(gap))
    fg = np.clip(fg + (sign * shortfall)[:, None], 0.0, 1.0)
    bright = (fg - bg) @ weights
    dim = np.abs(bright) < 0.2  # clipping ate the margin: swap to the other side of the background
    fg[dim] = np.clip(bg[dim] - sign[dim, None] * 0.35, 0.0, 1.0)
    still_dim = np.abs((fg - bg) @ weights) < 0.2
    fg[still_dim], bg[still_dim] = np.full(3, 0.9), np.full(3, 0.1)
    return fg, bg


def _patch(u, v):
    return 1.0 - np.maximum(np.abs(u), np.abs(v))


def _texture(patch, pattern, pixel_scale=4.0):
    """Inside a square patch, keep the pattern (> 0 inside); its own edges are sharp."""
    return np.minimum(patch, pattern / pixel_scale)


def _triangle(u, v, rng):
    # equilateral triangle with circumradius 1: three half-planes
    normals = np.array([[0.0, -1.0], [np.sqrt(3) / 2, 0.5], [-np.sqrt(3) / 2, 0.5]])
    dists = [0.5 - (u * a + v * b) for a, b in normals]
    return np.minimum(np.minimum(dists[0], dists[1]), dists[2]) * 1.5


def _star(u, v, rng):
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    return (0.62 + 0.38 * np.cos(5 * theta)) - r


def _stripes(u, v, rng):
    period = rng.uniform(2.5, 3.5, (u.shape[0], 1, 1))
    return _texture(_patch(u, v), np.sin(period * np.pi * u))


def _checkers(u, v, rng):
    period = rng.uniform(1.5, 2.2, (u.shape[0], 1, 1))
    return _texture(_patch(u, v), np.sin(period * np.pi * u) * np.sin(period * np.pi * v) * 2)


def _dots(u, v, rng):
    period = rng.uniform(1.8, 2.4, (u.shape[0], 1, 1))
    return _texture(_patch(u, v), np.cos(period * np.pi * u) + np.cos(period * np.pi * v) - 1.0)


_SHAPE_FUNCS = (
    lambda u, v, rng: 1.0 - np.hypot(u, v),  # disk
    lambda u, v, rng: 0.85 - np.maximum(np.abs(u), np.abs(v)),  # square
    _triangle,
    lambda u, v, rng: 0.22 - np.abs(np.hypot(u, v) - 0.72),  # ring
    lambda u, v, rng: np.maximum(  # cross
        np.minimum(0.28 - np.abs(u), 1.0 - np.abs(v)), np.minimum(0.28 - np.abs(v), 1.0 - np.abs(u))
    ),
    _star,
    lambda u, v, rng: np.minimum(1.0 - np.hypot(u, v), v + 0.1),  # half-disk
    _stripes,
    _checkers,
    _dots,
)
