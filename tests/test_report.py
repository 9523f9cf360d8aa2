"""The HTML report: self-contained page with the plots embedded as PNG."""

from __future__ import annotations

import base64
import re

import torch
from torch import nn

import tensorfold as tf
from tensorfold.report import render_report, write_report


def small_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    calib = [torch.randn(64, 32, generator=torch.Generator().manual_seed(0))]
    return tf.plan(model, 0.5, methods=("svd",), calib=calib)


def test_report_embeds_every_plot_and_the_tables(tmp_path):
    p = small_plan()
    metrics = {"quality": {"rel_error": 0.12, "mean_cos": 0.98},
               "speed": {"seconds_original": 0.01, "seconds_compressed": 0.008, "speedup": 1.25},
               "quality_curve": [{"budget": 0.3, "fraction": 0.29, "mean_cos": 0.9},
                                 {"budget": 0.5, "fraction": 0.5, "mean_cos": 0.98}]}
    html = render_report(p, metrics, title="test <report>")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 4  # per-layer choices, spectra, predicted error curve, quality curve
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "test &lt;report&gt;" in html  # escaped
    for lp in p.layers:
        assert lp.name in html
    assert "saves nothing" in html  # skipped layer with its reason
    assert "http" not in html.replace("http-equiv", "")  # nothing to fetch
    path = tmp_path / "r" / "report.html"
    write_report(path, p, metrics)
    assert path.read_text() == render_report(p, metrics)


def test_report_without_metrics_or_spectra():
    p = small_plan()
    p.spectra, p.curve = {}, []
    html = render_report(p)
    assert html.count("data:image/png;base64,") == 1
