"""Calibrated (output-aware) fitting: whitened SVD, robustness to singular Gram matrices, batch kinds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.compression.calibration import (
    call_model,
    channel_gram,
    collect_grams,
    layer_rows,
    output_tensor,
    whitened_lowrank,
    whitening_factor,
)
from tensorfold.compression.fitting import build_factored
from tensorfold.errors import InvalidArgumentError


def correlated_inputs(n, d, seed=0, dtype=torch.float64):
    """Inputs with a strongly non-isotropic covariance (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, d, dtype=dtype)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    return torch.randn(n, d, generator=g, dtype=dtype) * scales @ basis.T


@torch.no_grad()
def out_err(layer, approx, X):
    return float((approx(X) - layer(X)).norm() / layer(X).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calibrated_fit_beats_weight_fit_on_the_outputs(dtype):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).to(dtype)
    X = correlated_inputs(512, 64, dtype=dtype)
    from tensorfold.compression.calibration import GramStats

    stats = GramStats()
    stats.add(X)
    for rank in (4, 8, 16):
        weight_only = build_factored(layer, "svd", rank)
        calibrated = build_factored(layer, "svd", rank, stats)
        assert calibrated.first.weight.dtype == dtype
        e_w, e_c = out_err(layer, weight_only, X), out_err(layer, calibrated, X)
        assert e_c < 0.7 * e_w, (rank, e_c, e_w)


def test_whitened_fit_is_exact_at_full_rank_and_predicts_its_error():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(20, 12, generator=g, dtype=torch.float64)
    X = correlated_inputs(200, 12, seed=2)
    G = X.T @ X
    full = whitened_lowrank(W, G, 12)
    torch.testing.assert_close(full.second @ full.first, W, rtol=1e-7, atol=1e-7)
    fit = whitened_lowrank(W, G, 5)
    A = fit.second @ fit.first
    actual = float((X @ (W - A).T).norm() / (X @ W.T).norm())
    assert fit.rel_error == pytest.approx(actual, rel=1e-3)
    # and it is optimal: no other rank-5 matrix tried does better on these inputs
    U, S, Vh = torch.linalg.svd(W)
    plain = (U[:, :5] * S[:5]) @ Vh[:5]
    assert actual < float((X @ (W - plain).T).norm() / (X @ W.T).norm())


def test_singular_and_zero_gram_do_not_crash():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 32, generator=g, dtype=torch.float64)
    X = torch.randn(5, 32, generator=g, dtype=torch.float64)  # 5 samples, 32 features: rank 5
    fit = whitened_lowrank(W, X.T @ X, 8)
    assert torch.isfinite(fit.first).all() and torch.isfinite(fit.second).all()
    X_dead = X.clone()
    X_dead[:, 10:] = 0.0  # dead input features
    fit = whitened_lowrank(W, X_dead.T @ X_dead, 4)
    assert torch.isfinite(fit.first).all()
    # on the data it saw, the fit is much better than the plain truncation
    A = fit.second @ fit.first
    U, S, Vh = torch.linalg.svd(W)
    plain = (U[:, :4] * S[:4]) @ Vh[:4]
    assert (X_dead @ (W - A).T).norm() < (X_dead @ (W - plain).T).norm()
    assert whitening_factor(torch.zeros(6, 6)) is None
    zero = whitened_lowrank(W, torch.zeros(32, 32, dtype=torch.float64), 4)
    torch.testing.assert_close(zero.second @ zero.first, plain, rtol=1e-8, atol=1e-8)


def test_conv_calibrated_fit_and_patch_rows():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    rows = layer_rows(conv, x)
    assert rows.shape == (2 * 36, 4 * 9)
    y = (rows @ conv.weight.reshape(8, -1).T).reshape(2, 36, 8).transpose(1, 2).reshape(2, 8, 6, 6)
    torch.testing.assert_close(y + conv.bias.view(1, -1, 1, 1), conv(x), rtol=1e-5, atol=1e-5)
    stats = collect_grams(nn.Sequential(conv), {"0": conv}, [x])["0"]
    weight_only = build_factored(conv, "svd", 3)
    calibrated = build_factored(conv, "svd", 3, stats)
    assert out_err(conv, calibrated, x) < out_err(conv, weight_only, x)


def test_padding_tokens_are_left_out_of_the_statistics():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = layer_rows(layer, x, mask)
    assert rows.shape == (3, 4)
    torch.testing.assert_close(rows, torch.stack([x[0, 0], x[0, 1], x[1, 0]]))


class DictModel(nn.Module):
    """forward(input: dict) like SentenceTransformer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, input):
        h = self.b(torch.relu(self.a(self.emb(input["input_ids"]))))
        m = input["attention_mask"].unsqueeze(-1).to(h.dtype)
        return {"token_embeddings": h, "sentence_embedding": (h * m).sum(1) / m.sum(1)}


def test_dict_batches_for_a_model_taking_the_dict():
    model = DictModel()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 50, (4, 7), generator=g),
             "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    out = output_tensor(call_model(model, batch))
    assert out.shape == (4, 16)  # sentence_embedding picked from the dict
    small, p = tf.compress(model, 0.5, methods=("svd",), calib=[batch, batch])
    assert p.calibrated and output_tensor(call_model(small, batch)).shape == (4, 16)


def test_output_tensor_needs_something_to_compare():
    with pytest.raises(InvalidArgumentError):
        output_tensor({"text": "no tensor"})
    assert output_tensor((torch.ones(2), 3)).shape == (2,)
    assert output_tensor({"x": 1}, output_fn=lambda o: torch.zeros(3)).shape == (3,)


def test_channel_gram_reduces_the_patch_gram():
    x = torch.randn(3, 5, 7, 7, dtype=torch.float64)
    pointwise = nn.Conv2d(5, 4, 1, dtype=torch.float64)
    rows = layer_rows(pointwise, x)
    torch.testing.assert_close(channel_gram(rows.T @ rows, 5), rows.T @ rows)  # one kernel position: itself
    conv = nn.Conv2d(5, 4, 3, padding=1, dtype=torch.float64)
    patches = layer_rows(conv, x)
    G = channel_gram(patches.T @ patches, 5)
    # each channel block of the 9 kernel positions summed: same trace, and symmetric positive definite
    assert float(torch.trace(G)) == pytest.approx(float(torch.trace(patches.T @ patches)), rel=1e-12)
    assert float(torch.linalg.eigvalsh(G).min()) > 0


def test_svd_input_calibrated_fit_beats_weight_fit_and_is_exact_at_full_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    mix = torch.randn(6, 6) * torch.tensor([10.0, 5.0, 1.0, 0.3, 0.1, 0.05])  # strongly uneven channels
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(16, 6, 10, 10))
    stats = collect_grams(nn.Sequential(conv), {"0": conv}, [x])["0"]
    weight_only = build_factored(conv, "svd-input", 2)
    calibrated = build_factored(conv, "svd-input", 2, stats)
    assert calibrated.scheme == "input" and calibrated.rank == 2
    assert out_err(conv, calibrated, x) < 0.5 * out_err(conv, weight_only, x)
    full = build_factored(conv, "svd-input", 6, stats)
    assert out_err(conv, full, x) < 1e-4
