"""``tensorfold decompose`` on tensors read block by block: Zarr, HDF5, .npy memmaps, on Dask.

Reached from :func:`tensorfold.cli.decompose.decompose` when the input is a Zarr store or an HDF5 file,
or when ``--chunks``, ``--scheduler`` or ``--memory-limit`` is given. Methods: ``cp`` (chunked CP-ALS
seeded from a sketched core) and ``tucker`` (streaming Tucker sketch + one HOOI pass + the core: three passes).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tensorfold.cli.common import (
    check_outputs,
    decomposition_rows,
    fit_progress,
    parse_rank,
    publish_result,
    summary_path_for,
)
from tensorfold.errors import InvalidArgumentError, RankError

METHODS = ("cp", "tucker")
STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")


def wants_out_of_core(input_path: Path, chunks, scheduler, memory_limit) -> bool:
    """True when the input or the options ask for the block-wise path."""
    suffix = input_path.suffix.lower()
    return any(v is not None for v in (chunks, scheduler, memory_limit)) or suffix in STORE_SUFFIXES or (
        input_path.is_dir()
    )


def parse_chunks(text: str | None):
    if text is None:
        return None
    try:
        values = [int(p) for p in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"--chunks must be an integer or a comma list of integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise InvalidArgumentError(f"--chunks must be positive, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


@contextlib.contextmanager
def dask_client(scheduler: str | None, memory_limit: str | None):
    """None (Dask's threads), a fresh LocalCluster (``local``), or a client of the cluster at ``ADDRESS``."""
    if scheduler is None:
        if memory_limit is not None:
            raise InvalidArgumentError("--memory-limit applies to --scheduler local (the workers' memory cap)")
        yield None
        return
    try:
        import distributed
    except ImportError:
        raise InvalidArgumentError("--scheduler needs dask.distributed: pip install 'tensorfold[dask]'") from None
    if scheduler == "local":
        kwargs = {"memory_limit": memory_limit} if memory_limit is not None else {}
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                                      silence_logs=40, **kwargs) as cluster, distributed.Client(cluster) as client:
            yield client
        return
    if memory_limit is not None:
        raise InvalidArgumentError("--memory-limit applies to --scheduler local; a remote cluster sets its own")
    with distributed.Client(scheduler, timeout="20s") as client:
        yield client


def decompose_out_of_core(
    input_path: Path, *, method: str, rank: str | None, out: Path, key: str | None, seed: int,
    max_iter: int | None, tol: float | None, overwrite: bool, as_json: bool, chunks: str | None,
    scheduler: str | None, memory_limit: str | None,
) -> None:
    import tensorfold
    from tensorfold import __version__

    started = time.perf_counter()
    if method not in METHODS:
        raise InvalidArgumentError(f"--method {method!r} does not run out of core; choose one of {', '.join(METHODS)}")
    ranks = parse_rank(rank)
    if ranks is None:
        raise RankError(f"method {method!r} needs --rank")
    if method == "cp" and isinstance(ranks, tuple):
        raise RankError(f"method 'cp' takes a single --rank, got {rank}")
    if method == "tucker" and (max_iter is not None or tol is not None):
        raise InvalidArgumentError("--max-iter and --tol apply to cp; out-of-core tucker makes three passes")
    block_shape = parse_chunks(chunks)
    summary_path = summary_path_for(out)  # the one output rule of every command (cli.common)
    check_outputs([(out, "--out", "file"), (summary_path, "the summary beside --out", "file")],
                  overwrite=overwrite, inputs=[input_path])
    data = tensorfold.open_tensor(input_path, key)
    source = str(input_path) if key is None else f"{input_path}[{key}]"
    with dask_client(scheduler, memory_limit) as client:
        fit_started = time.perf_counter()
        if method == "cp":
            kwargs = {k: v for k, v in (("n_iter_max", max_iter), ("tol", tol)) if v is not None}
            with fit_progress(f"cp rank {rank} (sweeps over the data)", total=max_iter) as callback:
                result = tensorfold.cp_chunked(data, ranks, seed=seed, chunks=block_shape, scheduler=client,
                                               callback=callback, **kwargs)
        else:
            with fit_progress("tucker sketch (blocks)") as callback:
                result = tensorfold.tucker_sketch(data, ranks, passes=3, seed=seed, chunks=block_shape,
                                                  scheduler=client, progress=lambda done, total: callback(done))
        wall = time.perf_counter() - fit_started
    info = result.info
    summary_info = result.summary()
    summary = {
        "method": method,
        "requested_rank": list(ranks) if isinstance(ranks, tuple) else ranks,
        "rank": summary_info["rank"],
        # the fit of the last sweep / the exact two-pass fit: no extra pass over the data
        "relative_error": 1.0 - info.fit_history[-1],
        "n_params": summary_info["n_params"],
        "compression_ratio": summary_info["compression_ratio"],
        "iterations": info.n_iter,
        "converged": info.converged,
        "seconds": wall,
        "dtype": summary_info["dtype"],
        "device": "cpu",
        "out_of_core": {"chunks": chunks, "scheduler": scheduler, "memory_limit": memory_limit,
                        "input_kind": info.details.get("input")},
        "seed": seed,
        "input": {"path": str(input_path), "key": key, "shape": list(result.shape),
                  "dtype": str(getattr(data, "dtype", ""))},
        "output": str(out),
        "tensorfold_version": __version__,
    }
    publish_result(
        result, summary, out=out, summary_path=summary_path, started=started, as_json=as_json,
        title=f"tensorfold decompose: {method} (out of core)",
        first_rows=decomposition_rows(method, source, result.shape, summary),
    )
