"""Render a compression report the way a user sees it: build one for a 36-layer model (as many Linear
layers as MiniLM's encoder, names with a long shared prefix), then screenshot it in headless Chromium.

    .venv/bin/python docs/report_screenshot.py [--out docs/report.png] [--html runs/report-demo.html]

Needs ``chromium`` (Debian: ``apt-get install chromium``); without it only the HTML is written. Look at
the PNG: per-layer labels readable, the spectra legend whole, the predicted-error axis not squashed,
no empty rows in the totals.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn


class Encoder(nn.Module):
    """6 blocks x 6 Linear layers under ``model.encoder.layer.N.``: the names MiniLM's report shows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.ModuleList()
        for _ in range(6):
            block = nn.Module()
            for name, (i, o) in {"query": (64, 64), "key": (64, 64), "value": (64, 64), "dense": (64, 64),
                                 "intermediate": (64, 128), "output": (128, 64)}.items():
                setattr(block, name, nn.Linear(i, o))
            self.layer.append(block)

    def forward(self, x):
        for b in self.layer:
            h = b.dense(torch.tanh(b.query(x)) * torch.sigmoid(b.key(x)) + b.value(x))
            x = x + b.output(torch.relu(b.intermediate(h)))
        return x


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.encoder = Encoder()

    def forward(self, x):
        return self.model.encoder(x)


def build_report(path: Path) -> None:
    import tensorfold as tf
    from tensorfold.compression.evaluate import output_fidelity
    from tensorfold.report import write_report

    model = Wrapped()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(128, 64, generator=g) for _ in range(2)]
    plan = tf.plan(model, 0.5, methods=("svd", "tt"), calib=calib)
    small = tf.apply(model, plan, calib)
    held_out = [torch.randn(128, 64, generator=g)]
    quality = output_fidelity(model, small, held_out)
    metrics = {"quality": quality, "quality_curve": [{"budget": 0.5, "fraction": plan.fraction, **quality}],
               "finetune": {"epochs": [{"epoch": 1, "train_loss": 0.12, "val_loss": 0.1},
                                       {"epoch": 2, "train_loss": 0.08, "val_loss": 0.11}],
                            "best_epoch": 1, "quality_before": quality, "quality_after": quality,
                            "metric": "mean_cos", "kept": "fine-tuned"}}
    write_report(path, plan, metrics, title="tensorfold report (36-layer demo)")


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 4200) -> bool:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("chromium not found: wrote only", html)
        return False
    profile = tempfile.mkdtemp(prefix="tf-chromium-")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
           "--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
           html.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/report.png")
    ap.add_argument("--html", default="runs/report-demo.html")
    args = ap.parse_args()
    html, png = Path(args.html), Path(args.out)
    html.parent.mkdir(parents=True, exist_ok=True)
    build_report(html)
    if screenshot(html, png):
        print("wrote", html, "and", png)


if __name__ == "__main__":
    main()
