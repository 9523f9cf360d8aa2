"""A decomposition demo on a real tensor: ``python -m tensorfold.demo``.

The data is scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, shipped with the
package, so nothing is downloaded), stacked as a (1797, 8, 8) float64 tensor. It is decomposed with
CP, Tucker, tensor train and, after unfolding to a (1797, 64) matrix, truncated SVD at a few ranks,
through the same method registry as ``tensorfold decompose``. A table shows what each costs and keeps.
It runs in a few seconds on 2 CPU cores.

>>> rows = run_demo(quick=True)  # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from tensorfold.cli.common import print_records_table, stdout_console
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


def main() -> None:
    import torch

    # The tensors are small (115k entries), so threads only add overhead, and on a busy machine they
    # spin against each other. This is the script's entry point, not library code, so it may choose.
    torch.set_num_threads(1)
    console = stdout_console()
    X = load_digits_tensor()
    console.print(
        f"tensorfold demo: scikit-learn digits as a {tuple(X.shape)} {str(X.dtype).replace('torch.', '')} tensor "
        f"({X.numel():,} entries), seed {SEED}, 1 thread"
    )
    rows = run_demo()
    columns = ["method", "rank", "rel. error", "params", "ratio", "iters", "conv.", "sec", "dtype"]
    print_records_table("Decompositions of the digits tensor", columns, rows, console=console)
    console.print("rel. error = ||X - approx|| / ||X||;  ratio = entries of X per stored parameter;")
    console.print("iters/conv. = sweeps run and whether the tolerance was met (iterative methods only);")
    console.print(f"svd* = truncated SVD of the ({X.shape[0]}, {X.shape[1] * X.shape[2]}) images x pixels unfolding;")
    console.print(f"cp: n_iter_max={CP_OPTIONS['max_iter']}, tol={CP_OPTIONS['tol']:g}, svd initialisation.")
    console.print("Decompose your own tensor file: tensorfold decompose --help")


if __name__ == "__main__":
    main()
