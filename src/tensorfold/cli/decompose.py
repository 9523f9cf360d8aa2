"""``tensorfold decompose`` and ``tensorfold info``: decompose a tensor file, describe a saved result.

Methods are looked up in :data:`METHODS`, a small registry from name to :class:`Method`. Adding a
method to the CLI is one ``register_method(Method(...))`` call with a function
``fit(X, options) -> Decomposition``; options the method needs beyond the common ones travel in
``FitOptions.extra``.

>>> sorted(METHODS)
['cp', 'ncp', 'ntucker', 'svd', 'symcp', 'tr', 'tt', 'tucker']
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from tensorfold.cli.common import (
    DEVICES,
    DTYPES,
    check_option_choice,
    check_outputs,
    decomposition_rows,
    fit_progress,
    parse_rank,
    print_key_value_table,
    publish_result,
    summary_path_for,
)
from tensorfold.errors import InvalidArgumentError, InvalidTensorError, RankError

if TYPE_CHECKING:
    import torch

    from tensorfold.decomp.results import Decomposition


# --- the method registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class FitOptions:
    """Options of one run, already validated against the method's declared capabilities.

    ``max_iter``/``tol`` are None when not given, so the algorithm's own defaults apply.
    """

    rank: int | tuple[int, ...] | None
    eps: float | None = None
    seed: int = 0
    max_iter: int | None = None
    tol: float | None = None
    callback: Callable[[int, float], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def iteration_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by the iterative algorithms, only those that were set."""
        kwargs: dict[str, Any] = {"seed": self.seed}
        if self.max_iter is not None:
            kwargs["n_iter_max"] = self.max_iter
        if self.tol is not None:
            kwargs["tol"] = self.tol
        if self.callback is not None:
            kwargs["callback"] = self.callback
        return kwargs


@dataclass(frozen=True)
class Method:
    """A decomposition the CLI can run.

    ``fit(X, options)`` builds the result. The flags say which options make sense, so the CLI can
    refuse the others with a clear message before any work is done.
    """

    name: str
    description: str
    fit: Callable[[torch.Tensor, FitOptions], Decomposition]
    iterative: bool = False  # takes --max-iter/--tol and reports progress through a callback
    per_mode_rank: bool = False  # --rank may be a comma list
    uses_eps: bool = False  # --eps is an error target that may replace --rank
    min_order: int = 2
    max_order: int | None = None
    rank_optional: bool = False  # the method can find the rank itself (symcp)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add (or replace) a method of ``tensorfold decompose``."""
    METHODS[method.name] = method
    return method


def _single_rank(options: FitOptions, method: str) -> int | None:
    if isinstance(options.rank, tuple):
        raise RankError(f"method {method!r} takes a single --rank, got {','.join(map(str, options.rank))}")
    return options.rank


def _fit_cp(X, options: FitOptions):
    import tensorfold

    return tensorfold.cp(X, _single_rank(options, "cp"), **options.iteration_kwargs())


def _fit_tucker(X, options: FitOptions):
    import tensorfold

    return tensorfold.tucker(X, options.rank, method="hooi", **options.iteration_kwargs())


def _fit_tt(X, options: FitOptions):
    import tensorfold

    return tensorfold.tensor_train(X, max_rank=options.rank, eps=options.eps)


def _fit_tr(X, options: FitOptions):
    import tensorfold

    return tensorfold.tensor_ring(X, options.rank, eps=options.eps, **options.iteration_kwargs())


def _fit_svd(X, options: FitOptions):
    import tensorfold

    return tensorfold.svd_lowrank(X, _single_rank(options, "svd"), method="exact", seed=options.seed, eps=options.eps)


register_method(Method("cp", "CP (CANDECOMP/PARAFAC) by ALS with line search", _fit_cp, iterative=True))
register_method(Method("tucker", "Tucker by HOOI (per-mode ranks)", _fit_tucker, iterative=True, per_mode_rank=True))
register_method(
    Method("tt", "tensor train by TT-SVD (max bond rank and/or --eps)", _fit_tt, per_mode_rank=True, uses_eps=True)
)
register_method(
    Method(
        "tr", "tensor ring by TR-SVD + ALS (per-bond ranks, or --eps)", _fit_tr,
        iterative=True, per_mode_rank=True, uses_eps=True,
    )
)
register_method(
    Method("svd", "truncated SVD of a matrix (rank and/or --eps)", _fit_svd, uses_eps=True, min_order=2, max_order=2)
)


def _fit_ncp(X, options: FitOptions):
    import tensorfold

    return tensorfold.nonnegative_cp(X, _single_rank(options, "ncp"), **options.iteration_kwargs())


def _fit_ntucker(X, options: FitOptions):
    import tensorfold

    return tensorfold.nonnegative_tucker(X, options.rank, **options.iteration_kwargs())


def _fit_symcp(X, options: FitOptions):
    import tensorfold

    return tensorfold.symmetric_cp(X, _single_rank(options, "symcp"), seed=options.seed)


register_method(Method("ncp", "nonnegative CP by HALS (input >= 0)", _fit_ncp, iterative=True))
register_method(
    Method("ntucker", "nonnegative Tucker by HALS (input >= 0)", _fit_ntucker, iterative=True, per_mode_rank=True)
)
register_method(
    Method(
        "symcp", "symmetric CP by the subspace power method (order 3 or 4; finds the rank without --rank)",
        _fit_symcp, min_order=3, max_order=4, rank_optional=True,
    )
)


def _check_method_options(method: Method, options: FitOptions) -> None:
    """Refuse options the method does not take, before loading or fitting anything."""
    if options.rank is None and not method.rank_optional and not (method.uses_eps and options.eps is not None):
        needs = "--rank or --eps" if method.uses_eps else "--rank"
        raise RankError(f"method {method.name!r} needs {needs}")
    if isinstance(options.rank, tuple) and not method.per_mode_rank:
        raise RankError(f"method {method.name!r} takes a single --rank, got {','.join(map(str, options.rank))}")
    if options.eps is not None and not method.uses_eps:
        users = ", ".join(m.name for m in METHODS.values() if m.uses_eps)
        raise InvalidArgumentError(f"--eps applies to {users}, not to {method.name!r}")
    if (options.max_iter is not None or options.tol is not None) and not method.iterative:
        users = ", ".join(m.name for m in METHODS.values() if m.iterative)
        raise InvalidArgumentError(f"--max-iter and --tol apply to iterative methods ({users}), not to {method.name!r}")
    if options.eps is not None and not 0 < options.eps < 1:
        raise InvalidArgumentError(f"--eps must be a relative error in (0, 1), got {options.eps}")
    if options.max_iter is not None and options.max_iter <= 0:
        raise InvalidArgumentError(f"--max-iter must be a positive integer, got {options.max_iter}")
    if options.tol is not None and not options.tol >= 0:
        raise InvalidArgumentError(f"--tol must be >= 0, got {options.tol}")


def _check_order(method: Method, X, source: str) -> None:
    order = X.ndim
    if order < method.min_order or (method.max_order is not None and order > method.max_order):
        if method.max_order == method.min_order == 2:
            want = "a 2-way tensor (a matrix)"
        elif method.max_order is None:
            want = f"at least {method.min_order} modes"
        else:
            want = f"{method.min_order} to {method.max_order} modes"
        raise InvalidTensorError(
            f"method {method.name!r} needs {want}; {source} has shape {tuple(X.shape)} ({order} modes)"
        )


def prepare_tensor(X, source: str, dtype: str | None, device: str):
    """Cast to the requested float dtype and move to ``device``, refusing what cannot be decomposed.

    Without ``dtype``, float32/float64 input keeps its dtype and other dtypes are refused with a hint,
    so no silent conversion happens.
    """
    import torch

    from tensorfold.core.validate import check_tensor

    if X.is_complex():
        raise InvalidTensorError(f"{source} is complex ({X.dtype}); only real tensors can be decomposed")
    if dtype is not None:
        X = X.to(getattr(torch, dtype))
    elif X.dtype not in (torch.float32, torch.float64):
        raise InvalidTensorError(
            f"{source} has dtype {str(X.dtype).replace('torch.', '')}; pass --dtype float32 or --dtype float64 "
            "to convert it"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: CUDA is not available on this machine")
    X = check_tensor(X, source)
    return X.to(device)


def run_method(name: str, X, options: FitOptions, *, source: str = "the input") -> Decomposition:
    """Validate ``options`` for method ``name`` and fit it to the prepared tensor ``X``."""
    method = METHODS.get(name)
    if method is None:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    _check_method_options(method, options)
    _check_order(method, X, source)
    return method.fit(X, options)


def rank_clipping(method: str, requested, result, shape: tuple[int, ...]) -> str | None:
    """A warning when a TT ``--rank`` above what the shape allows was lowered to the largest possible
    ranks (TT-SVD clips bond ranks silently; every other method refuses such a rank)."""
    if method != "tt" or requested is None:
        return None
    bonds = tuple(result.rank)[1:-1]
    asked = (requested,) * len(bonds) if isinstance(requested, int) else tuple(requested)
    if len(asked) != len(bonds) or all(a <= b for a, b in zip(asked, bonds)):
        return None
    limits = tuple(min(math.prod(shape[:k + 1]), math.prod(shape[k + 1:])) for k in range(len(bonds)))
    if not any(a > lim for a, lim in zip(asked, limits)):
        return None
    shown = requested if isinstance(requested, int) else ",".join(map(str, requested))
    return (f"--rank {shown} exceeds what a {'x'.join(map(str, shape))} tensor allows; clipped to bond ranks "
            f"{result.rank} (at most {limits})")


def summarize(X, result: Decomposition, wall_seconds: float) -> dict[str, Any]:
    """Quality and size figures of ``result`` as an approximation of ``X`` (JSON-friendly)."""
    import tensorfold

    info = getattr(result, "info", None)
    summary = result.summary()
    rel = float(tensorfold.relative_error(X, result))
    return {
        "rank": summary["rank"],
        "relative_error": rel,
        "n_params": summary["n_params"],
        "compression_ratio": summary["compression_ratio"],
        "iterations": info.n_iter if info is not None else None,
        "converged": info.converged if info is not None else None,
        "seconds": info.seconds if info is not None and info.seconds > 0 else wall_seconds,
        "dtype": summary["dtype"],
        "device": summary["device"],
    }


# --- commands -----------------------------------------------------------------------------------
DECOMPOSE_EPILOG = """\
Examples:

  tensorfold decompose data.npy --method cp --rank 10 --out cp10.safetensors

  tensorfold decompose arrays.npz --key video --method tucker --rank 20,16,16 --out tucker.safetensors

  tensorfold decompose cube.pt --method tt --eps 0.05 --out tt.safetensors --dtype float32

  tensorfold decompose weights.safetensors --key layer1.weight --method svd --rank 64 --out w.safetensors

  tensorfold decompose ratings.npy --mask observed.npy --method cp --rank 8 --out cp8.safetensors

  tensorfold decompose cells.npz --coo --method cp-wopt --rank 8 --out cp8.safetensors

  tensorfold decompose big.zarr --method tucker --rank 20 --scheduler local --memory-limit 1GB --out tk.safetensors

Writes OUT (safetensors, readable with tensorfold.load) and OUT with suffix .json (the summary).
"""


def decompose(
    input_path: Path = typer.Argument(
        ..., metavar="INPUT", help="Tensor file: .npy, .npz, .pt/.pth (safe load) or .safetensors."
    ),
    method: str = typer.Option(
        ..., "--method", "-m",
        help="Decomposition: cp, tucker, tt, tr, svd, ncp, ntucker or symcp "
             "(with --mask/--coo: cp, cp-als, cp-em, cp-wopt, tucker).",
    ),
    rank: str | None = typer.Option(
        None, "--rank", "-r", help="Rank: an integer, or a comma list of per-mode ranks (tucker, tt, tr)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (safetensors); the summary goes beside it."),
    eps: float | None = typer.Option(None, "--eps", help="Relative error target (tt, tr, svd); may replace --rank."),
    key: str | None = typer.Option(None, "--key", "-k", help="Array name inside .npz/.pt/.safetensors files."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 or float64 (default: the input's float dtype; required for other dtypes)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation (results are reproducible)."),
    max_iter: int | None = typer.Option(None, "--max-iter", help="Iteration limit of cp, tucker, tr."),
    tol: float | None = typer.Option(None, "--tol", help="Stopping tolerance on the change of fit (cp, tucker, tr)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT and its .json if they exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary instead of the table."),
    mask: Path | None = typer.Option(
        None, "--mask", help="File marking the observed cells of INPUT (bool or 0/1): fit only those "
        "(completion; --method cp, cp-als, cp-em, cp-wopt or tucker)."
    ),
    coo: bool = typer.Option(
        False, "--coo", help="INPUT holds observed cells as arrays indices (nnz, d), values, shape: completion "
        "without densifying (--method cp, cp-wopt or tucker)."
    ),
    chunks: str | None = typer.Option(
        None, "--chunks", help="Read INPUT block by block (out of core): block shape, an int or a comma list. "
        "Zarr stores (.zarr) and HDF5 files (.h5) are always read this way (--method cp or tucker)."
    ),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Out of core on Dask: 'local' (a LocalCluster of 2 workers) or a "
        "dask.distributed scheduler ADDRESS (default: Dask's threads in this process)."
    ),
    memory_limit: str | None = typer.Option(
        None, "--memory-limit", help="Memory cap per worker of --scheduler local, e.g. 1GB."
    ),
) -> None:
    """Decompose a tensor stored in a file and save the result.

    Prints a summary (rank, relative error, parameters, compression, iterations, seconds), saved as JSON beside OUT.

    The input file is only read, never modified.
    """
    from tensorfold import __version__
    from tensorfold.io import load_array

    started = time.perf_counter()
    if mask is not None or coo:  # completion: only the observed cells are fitted (tensorfold.cli.completion)
        from tensorfold.cli.completion import decompose_observed

        return decompose_observed(
            input_path, method=method, rank=rank, mask_path=mask, coo=coo, out=out, eps=eps, key=key, dtype=dtype,
            device=device, seed=seed, max_iter=max_iter, tol=tol, overwrite=overwrite, as_json=as_json,
        )
    from tensorfold.cli.outofcore import decompose_out_of_core, wants_out_of_core

    if wants_out_of_core(input_path, chunks, scheduler, memory_limit):  # block by block (cli.outofcore)
        return decompose_out_of_core(
            input_path, method=method, rank=rank, out=out, key=key, seed=seed, max_iter=max_iter, tol=tol,
            overwrite=overwrite, as_json=as_json, chunks=chunks, scheduler=scheduler, memory_limit=memory_limit,
        )
    check_option_choice(method, "--method", METHODS)
    options = FitOptions(rank=parse_rank(rank), eps=eps, seed=seed, max_iter=max_iter, tol=tol)
    _check_method_options(METHODS[method], options)
    if dtype is not None:
        check_option_choice(dtype, "--dtype", DTYPES)
    check_option_choice(device, "--device", DEVICES)
    summary_path = summary_path_for(out)
    check_outputs([(out, "--out", "file"), (summary_path, "the summary beside --out", "file")],
                  overwrite=overwrite, inputs=[input_path])

    raw = load_array(input_path, key)
    source = str(input_path) if key is None else f"{input_path}[{key}]"
    X = prepare_tensor(raw, source, dtype, device)
    fit_started = time.perf_counter()
    if METHODS[method].iterative:
        with fit_progress(f"{method} rank {rank}", total=max_iter) as callback:
            options = replace(options, callback=callback)
            result = run_method(method, X, options, source=source)
    else:
        result = run_method(method, X, options, source=source)
    wall = time.perf_counter() - fit_started

    summary = {
        "method": method,
        "requested_rank": list(options.rank) if isinstance(options.rank, tuple) else options.rank,
        "eps": eps,
        **summarize(X, result, wall),
        "seed": seed,
        "input": {
            "path": str(input_path),
            "key": key,
            "shape": list(raw.shape),
            "dtype": str(raw.dtype).replace("torch.", ""),
        },
        "output": str(out),
        "tensorfold_version": __version__,
    }
    clipped = rank_clipping(method, options.rank, result, tuple(X.shape))
    if clipped:
        summary["warnings"] = [clipped]
    publish_result(
        result, summary, out=out, summary_path=summary_path, started=started, as_json=as_json,
        title=f"tensorfold decompose: {method}",
        first_rows=decomposition_rows(method, source, summary["input"]["shape"], summary),
    )


INFO_EPILOG = """\
Examples:

  tensorfold info cp10.safetensors

  tensorfold info cp10.safetensors --json

  tensorfold info runs/mlp-50 --check

  tensorfold info runs/mine --check --trust-factory
"""


def info(
    path: Path = typer.Argument(..., metavar="FILE",
                                help="A result saved by tensorfold (.safetensors), or a compress output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored header as JSON."),
    check: bool = typer.Option(False, "--check", help="Compress directories: rebuild the model and load its weights "
                                                      "(proves the directory is complete)."),
    trust_factory: bool = typer.Option(False, "--trust-factory",
                                       help="With --check: let the rebuild import and call the 'module:factory' "
                                            "that plan.json names (runs that code; only for directories you trust)."),
) -> None:
    """Describe a saved decomposition from its header (type, shape, rank, size, how it was fitted), or a
    compress output directory (plan totals, quality, weights) and its weights.safetensors.

    Only the header is read, so this is instant even for large files; --check rebuilds a compressed model.
    """
    from tensorfold.decomp.results import read_header

    if trust_factory and not check:
        raise InvalidArgumentError("--trust-factory only matters with --check (nothing else runs code)")
    if path.is_dir() or _compressed_weights(path):
        return describe_compressed(path, as_json, check=check, trust_factory=trust_factory)
    if check:
        raise InvalidArgumentError(f"--check rebuilds compressed models; {path} is a decomposition (its header "
                                   "is all there is to check)")
    header = read_header(path)
    if as_json:
        typer.echo(json.dumps(header, indent=2))
        return
    fit = header.get("info") or {}
    history = fit.get("fit_history") or []
    ratio = header.get("compression_ratio")
    rows = [
        ("type", header.get("type")),
        ("shape", header.get("shape")),
        ("rank", header.get("rank")),
        ("parameters", header.get("n_params")),
        ("compression", f"{ratio:.3g}x" if isinstance(ratio, (int, float)) else None),
        ("dtype", header.get("dtype")),
        ("fitted by", fit.get("method")),
        ("iterations", fit.get("n_iter")),
        ("converged", fit.get("converged")),
        ("final fit", history[-1] if history else None),
        ("seconds", fit.get("seconds")),
        ("format version", header.get("format_version")),
    ]
    details = fit.get("details") or {}
    rows += [(f"detail: {k}", v if isinstance(v, (int, float, str, list)) else str(v)) for k, v in details.items()]
    print_key_value_table(f"tensorfold result: {path}", rows)


def _compressed_weights(path: Path) -> bool:
    """True for the ``weights.safetensors`` of a ``tensorfold compress`` directory (its metadata says so)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "tensorfold-compressed"
    except Exception:  # not readable: let read_header report it
        return False


def rebuild_check(directory: Path, trust_factory: bool) -> dict[str, Any]:
    """Rebuild the compressed model of ``directory`` as ``load_compressed`` does and count its parameters.

    A user factory named in plan.json is imported and called only with ``trust_factory`` (the option
    ``--trust-factory``); without it the refusal names the option, before anything is imported."""
    from tensorfold.compression.storage import load_compressed, read_plan, user_factory_named

    factory = user_factory_named(directory)
    if factory is not None and not trust_factory:
        raise InvalidArgumentError(
            f"{directory}/plan.json names the model factory {factory!r}; rebuilding the model would import and "
            f"run that code. Add --trust-factory (tensorfold info {directory} --check --trust-factory) only if "
            "you trust this directory")
    model = load_compressed(directory, trust_factory=trust_factory)
    params = sum(p.numel() for p in model.parameters())
    expected = read_plan(directory).totals()["model_params_after"]
    return {"rebuilt": type(model).__name__, "parameters": params, "plan_parameters": expected,
            "matches_plan": params == expected, "factory_run": factory}


def describe_compressed(path: Path, as_json: bool, *, check: bool = False, trust_factory: bool = False) -> None:
    """``tensorfold info`` on a compress output directory or its ``weights.safetensors``: the plan's totals,
    the recorded quality and speed, and the weights (tensor count, parameters, dtypes); nothing is run unless
    ``check`` (rebuild and load the weights; a user factory only with ``trust_factory``)."""
    from safetensors import safe_open

    from tensorfold.compression.storage import PLAN_FILE, WEIGHTS_FILE, read_metrics, read_plan
    from tensorfold.errors import FileFormatError

    directory = path if path.is_dir() else path.parent
    weights = path if not path.is_dir() else path / WEIGHTS_FILE
    has_plan = (directory / PLAN_FILE).is_file()
    if path.is_dir() and not has_plan:
        raise FileFormatError(f"{path}: a directory without {PLAN_FILE}, not a tensorfold compress result")
    info: dict[str, Any] = {"path": str(path)}
    if has_plan:
        plan = read_plan(directory)
        tot = plan.totals()
        info["plan"] = {"model": plan.model_name, "allocator": plan.allocator, "budget": plan.budget,
                        "target": plan.target, "calibrated": plan.calibrated, "layers": tot["layers"],
                        "factored": tot["factored"], "skipped": tot["skipped"],
                        "params_fraction": tot["params_fraction"], "model_params": tot["model_params"],
                        "model_params_after": tot["model_params_after"],
                        "methods": sorted({lp.method for lp in plan.layers if lp.factored})}
        metrics = read_metrics(directory)
        for key in ("quality", "speed", "finetune"):
            if metrics.get(key):
                info[key] = metrics[key]
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                names = list(f.keys())
                shapes = [f.get_slice(k).get_shape() for k in names]
                dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in names})
        except Exception as exc:
            raise FileFormatError(f"{weights}: not a readable safetensors file ({exc})") from None
        n = sum(math.prod(s) for s in shapes)
        info["weights"] = {"file": str(weights), "tensors": len(names), "values": n, "dtypes": dtypes,
                           "bytes": weights.stat().st_size}
    if check:
        if not has_plan:
            raise FileFormatError(f"{directory}: no {PLAN_FILE} beside {weights.name}; nothing to rebuild")
        info["check"] = rebuild_check(directory, trust_factory)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    rows: list[tuple[str, Any]] = [("type", "compressed model (tensorfold compress)")]
    if "plan" in info:
        pl = info["plan"]
        rows += [("model", pl["model"]), ("plan", f"{pl['allocator']}, budget {pl['budget']:g} of {pl['target']}, "
                                                  f"{'calibrated' if pl['calibrated'] else 'weight-only'}"),
                 ("layers", f"{pl['factored']} of {pl['layers']} factored, {pl['skipped']} skipped"),
                 ("methods", ", ".join(pl["methods"]) or "-"),
                 ("parameters", f"{pl['model_params_after']:,} of {pl['model_params']:,} "
                                f"({pl['model_params_after'] / max(pl['model_params'], 1):.3f})")]
    for key, value in (info.get("quality") or {}).items():
        rows.append((f"quality: {key}", value))
    if "finetune" in info:
        ft = info["finetune"]
        key = ft.get("metric")
        change = (f": {key} {ft['quality_before'][key]:.4g} -> {ft['quality_after'][key]:.4g}"
                  if key and key in ft.get("quality_before", {}) else "")
        kept = "the fine-tuned model" if ft.get("kept", "fine-tuned") == "fine-tuned" else \
            "the model from before fine-tuning"
        rows.append(("fine-tuning", f"{len(ft.get('epochs', []))} epochs{change}, kept {kept}"))
    if "speed" in info:
        sp = info["speed"]
        rows.append(("measured speedup", f"{sp.get('speedup_median', sp.get('speedup')):.2f}x"))
    if "weights" in info:
        w = info["weights"]
        rows.append(("weights", f"{w['file']}: {w['tensors']} tensors, {w['values']:,} values, "
                                f"{', '.join(w['dtypes'])}, {w['bytes']:,} bytes"))
    if "check" in info:
        ck = info["check"]
        same = "as planned" if ck["matches_plan"] else f"the plan says {ck['plan_parameters']:,}"
        rows.append(("check", f"rebuilt a {ck['rebuilt']} and loaded its weights: {ck['parameters']:,} "
                              f"parameters ({same})"))
    rows.append(("load it", "tensorfold.load_compressed(DIR, base_model=...) "
                            "(the model is rebuilt; a user factory runs only with trust_factory=True)"))
    print_key_value_table(f"tensorfold result: {path}", rows)


def register(app: typer.Typer) -> None:
    """Add ``decompose`` and ``info`` to ``app``."""
    methods = "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
    app.command("decompose", epilog=DECOMPOSE_EPILOG + f"\nMethods: {methods}.")(decompose)
    app.command("info", epilog=INFO_EPILOG)(info)
