"""``tensorfold rank``: choose ranks for a tensor (Tucker core shape under a budget or an error target, TT
ranks by error target, CP rank by fit curve and core consistency), with a plot and an optional saved result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from tensorfold.cli.common import (
    check_option_choice,
    check_outputs,
    print_key_value_table,
    print_records_table,
    stdout_console,
    summary_path_for,
)
from tensorfold.errors import InvalidArgumentError

RANK_METHODS = ("tucker", "tt", "cp")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")

RANK_EPILOG = """\
Examples:

  tensorfold rank data.npy --method tucker --budget 50000 --plot spectra.png

  tensorfold rank data.npy --method tucker --eps 0.05 --out tucker.safetensors

  tensorfold rank data.npy --method tt --eps 0.01

  tensorfold rank data.npy --method tt --budget 20000

  tensorfold rank data.npy --method cp --max-rank 8 --plot cp_curve.png --json

Tucker with --budget picks the core shape maximising the captured HOSVD energy with core + factors <= budget
(exact knapsack; the greedy choice is shown beside it). Tucker with --eps guarantees the relative error.
CP fits ranks 1..--max-rank and suggests the largest rank whose core consistency (CORCONDIA) is at least
--min-consistency.
"""


def rank(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="Tensor file: .npy, .npz, .pt/.pth or .safetensors."),
    method: str = typer.Option("tucker", "--method", "-m", help="tucker, tt or cp."),
    eps: float | None = typer.Option(None, "--eps", help="Relative error target (tucker, tt; with cp: fit >= 1-eps)."),
    budget: int | None = typer.Option(None, "--budget", help="Parameter budget (tucker: core+factors; tt: cores)."),
    max_rank: int = typer.Option(8, "--max-rank", help="Largest CP rank tried."),
    min_consistency: float = typer.Option(80.0, "--min-consistency", help="CORCONDIA threshold in percent (cp)."),
    key: str | None = typer.Option(None, "--key", "-k", help="Array name inside .npz/.pt/.safetensors files."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 or float64 (default: the input's float dtype)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the CP initialisations."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a plot (.png/.svg/.pdf): spectra or CP curve."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Save the decomposition at the chosen ranks."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --out/--plot files."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary instead of tables."),
) -> None:
    """Choose ranks for a tensor and report the choice (and the fit at that choice)."""
    from tensorfold.cli.common import DEVICES, DTYPES
    from tensorfold.cli.decompose import prepare_tensor

    check_option_choice(method, "--method", RANK_METHODS)
    if dtype is not None:
        check_option_choice(dtype, "--dtype", DTYPES)
    check_option_choice(device, "--device", DEVICES)
    if method == "cp" and budget is not None:
        raise InvalidArgumentError("--budget applies to --method tucker; CP ranks are chosen by --max-rank/--eps")
    if method == "tucker" and (eps is None) == (budget is None):
        raise InvalidArgumentError("--method tucker needs exactly one of --eps or --budget")
    if method == "tt" and (eps is None) == (budget is None):
        raise InvalidArgumentError("--method tt needs exactly one of --eps or --budget")
    if max_rank <= 0:
        raise InvalidArgumentError(f"--max-rank must be positive, got {max_rank}")
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidArgumentError(f"--plot {plot}: give a {', '.join(PLOT_SUFFIXES)} file name")
    summary_path = summary_path_for(out) if out is not None else None
    check_outputs([(out, "--out", "file"), (summary_path, "the summary beside --out", "file"),
                   (plot, "--plot", "file")], overwrite=overwrite, inputs=[input_path])

    import tensorfold
    from tensorfold.decomp.rank_selection import core_size, tucker_core_shape
    from tensorfold.io import load_array, write_text_atomic

    started = time.perf_counter()
    source = str(input_path) if key is None else f"{input_path}[{key}]"
    X = prepare_tensor(load_array(input_path, key), source, dtype, device)
    result = tensorfold.select_rank(X, method, eps=eps, budget=budget, max_rank=max_rank,
                                    min_consistency=min_consistency, seed=seed)
    selection = dict(result.info.details["selection"])
    rank_value = result.rank
    summary = {
        "method": method,
        "input": source,
        "shape": list(X.shape),
        "eps": eps,
        "budget": budget,
        "chosen_rank": list(rank_value) if isinstance(rank_value, tuple) else rank_value,
        "relative_error": float(tensorfold.relative_error(X, result)),
        "n_params": result.n_params,
        "compression_ratio": result.compression_ratio,
    }
    spectra = selection.pop("spectra", None)
    if method == "tucker":
        summary.update({k: selection[k] for k in ("rule", "energy", "error_bound") if k in selection})
        if budget is not None:
            greedy = tucker_core_shape(spectra, budget, method="greedy")
            summary["greedy"] = {"ranks": list(greedy.ranks), "size": greedy.size, "energy": greedy.energy,
                                 "error_bound": greedy.error_bound}
            summary["size"] = core_size(result.rank, X.shape)
    elif method == "cp":
        summary.update({k: selection[k] for k in ("ranks", "fits", "core_consistency", "suggested_rank", "rule")})
    if plot is not None:
        from tensorfold.report.rank_plots import plot_cp_rank_curve, plot_mode_spectra

        if method == "cp":
            plot_cp_rank_curve(selection["ranks"], selection["fits"], selection["core_consistency"], plot,
                               suggested=selection["suggested_rank"])
        else:
            from tensorfold.decomp.rank_selection import mode_spectra

            spectra = spectra if spectra is not None else [s.tolist() for s in mode_spectra(X)]
            marks = result.rank if method == "tucker" else None
            plot_mode_spectra(spectra, plot, ranks=marks)
        summary["plot"] = str(plot)
    if out is not None:
        result.save(out)
        summary["output"] = str(out)
    summary["seconds"] = time.perf_counter() - started
    if out is not None:
        write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")

    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    rows = [(k.replace("_", " "), v) for k, v in summary.items()
            if k not in ("fits", "core_consistency", "ranks", "greedy")]
    if "greedy" in summary:
        g = summary["greedy"]
        rows.append(("greedy baseline", f"ranks {tuple(g['ranks'])}, size {g['size']}, energy {g['energy']:.6g}"))
    print_key_value_table(f"tensorfold rank: {method}", rows, console=stdout_console())
    if method == "cp":
        records = [{"rank": r, "fit": f, "CORCONDIA %": c}
                   for r, f, c in zip(summary["ranks"], summary["fits"], summary["core_consistency"])]
        print_records_table("CP rank curve", ["rank", "fit", "CORCONDIA %"], records, console=stdout_console())


def register(app: typer.Typer) -> None:
    """Add ``rank`` to ``app``."""
    app.command("rank", epilog=RANK_EPILOG)(rank)
