"""Completion from the command line: ``tensorfold decompose INPUT --mask MASK`` or ``--coo``.

A dense INPUT with a MASK file (boolean or 0/1, same shape) or a COO INPUT (arrays ``indices`` (nnz, d),
``values`` (nnz,), ``shape`` (d,) in one .npz/.pt/.safetensors file) is fitted on its observed entries
with :func:`tensorfold.complete`; the COO form is never densified. The summary reports the error on the
observed entries (the others are unknown).
"""

from __future__ import annotations

import time
from pathlib import Path

from tensorfold.cli.common import check_option_choice, fit_progress, publish_result
from tensorfold.errors import FileFormatError, InvalidArgumentError, InvalidTensorError, RankError

# --method under --mask/--coo -> (model, algorithm) of tensorfold.complete; "cp" lets complete() choose
# between imputation (EM) and ALS on the observed cells (EM needs the dense --mask form)
COMPLETION_METHODS = {"cp": ("cp", "auto"), "cp-als": ("cp", "als"), "cp-em": ("cp", "em"),
                      "cp-wopt": ("cp", "wopt"), "tucker": ("tucker", "als")}


def load_observations(input_path: Path, *, mask_path: Path | None, coo: bool, key: str | None,
                      dtype: str | None, device: str):
    """The observed entries as a validated COOTensor on ``device``, and ``(X, mask)`` for a --mask input
    (else None)."""
    import torch

    from tensorfold.decomp.sparse import as_coo, observed
    from tensorfold.io import load_array

    def cast(values, what):
        if values.is_complex():
            raise InvalidTensorError(f"{what} is complex; only real tensors can be completed")
        if dtype is not None:
            return values.to(getattr(torch, dtype))
        if values.dtype not in (torch.float32, torch.float64):
            raise InvalidTensorError(f"{what} has dtype {str(values.dtype).replace('torch.', '')}; pass --dtype "
                                     "float32 or --dtype float64 to convert it")
        return values

    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: CUDA is not available on this machine")
    if coo:
        if key is not None:
            raise InvalidArgumentError("--key does not apply to --coo input (it reads 'indices', 'values', 'shape')")
        try:
            indices, values, shape = (load_array(input_path, k) for k in ("indices", "values", "shape"))
        except FileFormatError as exc:
            raise FileFormatError(f"{exc} (a --coo file holds arrays 'indices', 'values' and 'shape')") from None
        data = as_coo((indices, cast(values, f"{input_path}[values]"), shape.reshape(-1).tolist()), "the COO input")
        return type(data)(data.indices.to(device), data.values.to(device), data.shape), None
    X = cast(load_array(input_path, key), str(input_path)).to(device)
    mask = load_array(mask_path).to(device)
    return observed(X, mask, name=str(input_path)), (X, mask)


def decompose_observed(input_path: Path, *, method: str, rank: str | None, mask_path: Path | None, coo: bool,
                       out: Path, eps: float | None, key: str | None, dtype: str | None, device: str, seed: int,
                       max_iter: int | None, tol: float | None, overwrite: bool, as_json: bool) -> None:
    """Run :func:`tensorfold.complete` for ``tensorfold decompose --mask/--coo`` and save the result.

    Every option is checked before anything is read or written.
    """
    import tensorfold
    from tensorfold import __version__
    from tensorfold.cli.common import DEVICES, DTYPES, check_outputs, parse_rank, summary_path_for

    check_option_choice(method, "--method (with --mask/--coo)", COMPLETION_METHODS)
    if mask_path is not None and coo:
        raise InvalidArgumentError("give either --mask FILE (dense INPUT) or --coo (COO INPUT), not both")
    if eps is not None:
        raise InvalidArgumentError("--eps does not apply to completion (--mask/--coo); give --rank")
    rank = parse_rank(rank)
    if rank is None:
        raise RankError("completion needs --rank")
    if dtype is not None:
        check_option_choice(dtype, "--dtype", DTYPES)
    check_option_choice(device, "--device", DEVICES)
    if max_iter is not None and max_iter <= 0:
        raise InvalidArgumentError(f"--max-iter must be a positive integer, got {max_iter}")
    if tol is not None and not tol >= 0:
        raise InvalidArgumentError(f"--tol must be >= 0, got {tol}")
    inputs = [input_path] + ([mask_path] if mask_path is not None else [])
    summary_path = summary_path_for(out)
    check_outputs([(out, "--out", "file"), (summary_path, "the summary beside --out", "file")],
                  overwrite=overwrite, inputs=inputs)
    model, algorithm = COMPLETION_METHODS[method]
    if model == "cp" and isinstance(rank, tuple):
        raise RankError(f"method {method!r} takes a single --rank, got {','.join(map(str, rank))}")
    started = time.perf_counter()
    data, dense = load_observations(input_path, mask_path=mask_path, coo=coo, key=key, dtype=dtype, device=device)
    kwargs = {"seed": seed}
    if max_iter is not None:
        kwargs["n_iter_max"] = max_iter
    if tol is not None:
        kwargs["tol"] = tol
    with fit_progress(f"complete {method} rank {rank}", total=max_iter) as callback:
        observations = {"X": dense[0], "mask": dense[1]} if dense is not None else {"coo": data}
        result = tensorfold.complete(**observations, rank=rank, model=model, method=algorithm, callback=callback,
                                     **kwargs)
    info = result.info
    summary = {
        "method": f"complete ({method})",
        "algorithm": info.method,
        "requested_rank": list(rank) if isinstance(rank, tuple) else rank,
        "rank": list(result.rank) if isinstance(result.rank, tuple) else result.rank,
        "observed": data.nnz,
        "density": data.density,
        "observed_relative_error": info.details["observed_relative_error"],
        "n_params": result.n_params,
        "compression_ratio": result.compression_ratio,
        "iterations": info.n_iter,
        "converged": info.converged,
        "seconds": info.seconds,
        "dtype": str(result.dtype).replace("torch.", ""),
        "device": str(result.device),
        "seed": seed,
        "input": {"path": str(input_path), "key": key, "mask": None if mask_path is None else str(mask_path),
                  "coo": coo, "shape": list(data.shape)},
        "output": str(out),
        "tensorfold_version": __version__,
    }
    publish_result(
        result, summary, out=out, summary_path=summary_path, started=started, as_json=as_json,
        title="tensorfold decompose: completion",
        first_rows=[
            ("method", summary["method"]),
            ("input", f"{input_path} {tuple(data.shape)}, {data.nnz:,} observed ({data.density:.3g})"),
            ("rank", summary["rank"]),
            ("relative error (observed)", summary["observed_relative_error"]),
        ],
    )
