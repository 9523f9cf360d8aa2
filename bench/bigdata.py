"""Out-of-core and generalized-loss benchmark (issue 13), 2 threads per process.

    .venv/bin/python bench/bigdata.py gcp                      # GCP vs pyttb gcp_opt (Poisson, Bernoulli, Gaussian)
    .venv/bin/python bench/bigdata.py overhead                 # in-memory tensors passed as dask arrays
    .venv/bin/python bench/bigdata.py make --side 1260 --dir D # write a float32 Zarr tensor chunk by chunk (8 GB)
    .venv/bin/python bench/bigdata.py ooc --dir D              # Tucker/CP on a LocalCluster, 2 workers x 1 GB
    .venv/bin/python bench/bigdata.py slice --dir D            # out-of-core vs in-memory on a slice of the store
    .venv/bin/python bench/bigdata.py sweeps                   # cp_chunked one-pass vs exact sweeps, nonneg, masked

Every figure is printed with the load average; run under ``flock /tmp/tf-cpu.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

THREADS = 2
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tensorfold as tf  # noqa: E402
from tensorfold.decomp.gcp import factor_match_score  # noqa: E402


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------------------
# GCP side by side with pyttb gcp_opt
# ---------------------------------------------------------------------------------------------------------


def poisson_problem():
    Y, truth = tf.testing.poisson_cp_problem((60, 70, 80), 5, seed=0)
    return Y.numpy(), truth


def bernoulli_problem():
    Y, truth = tf.testing.bernoulli_cp_problem((60, 70, 80), 5, seed=1)
    return Y.numpy(), truth


def _pyttb_gcp(Y, rank, objective, init=None):
    import pyttb as ttb
    from pyttb.gcp.fg_setup import Objectives
    from pyttb.gcp.optimizers import LBFGSB

    T = ttb.tensor(np.asfortranarray(Y), copy=False)
    kw = {} if init is None else {"init": ttb.ktensor([f.numpy().copy() for f in init.factors],
                                                        init.weights.numpy().copy())}
    np.random.seed(0)
    t0 = time.perf_counter()
    M, _, _ = ttb.gcp_opt(T, rank, objective=getattr(Objectives, objective), optimizer=LBFGSB(maxiter=500),
                          printitn=0, **kw)
    secs = time.perf_counter() - t0
    factors = [torch.from_numpy(np.array(f)) for f in M.factor_matrices]
    return secs, tf.CPTensor(torch.from_numpy(np.array(M.weights)), factors)


def bench_gcp() -> list[dict]:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    rows = []
    for name, (Y, truth), loss, objective in (
        ("Poisson 60x70x80 rank 5", poisson_problem(), "poisson", "POISSON"),
        ("Bernoulli 60x70x80 rank 5", bernoulli_problem(), "bernoulli-logit", "BERNOULLI_LOGIT"),
    ):
        X = torch.from_numpy(Y)
        tf.gcp(X[:10, :10, :10], 2, loss=loss)  # warm-up
        t0 = time.perf_counter()
        ours = tf.gcp(X, 5, loss=loss)
        secs = time.perf_counter() - t0
        fms = (factor_match_score(ours, truth), factor_match_score(ours, truth, weight_penalty=False))
        rows.append({"problem": name, "who": "tensorfold gcp (L-BFGS-B, auto init, init timed)", "seconds": secs,
                     "fms": fms[0], "fms_no_weights": fms[1], "iters": ours.info.n_iter})
        secs, theirs = _pyttb_gcp(Y, 5, objective)
        rows.append({"problem": name, "who": "pyttb gcp_opt (LBFGSB maxiter=500, random init)", "seconds": secs,
                     "fms": factor_match_score(theirs, truth),
                     "fms_no_weights": factor_match_score(theirs, truth, weight_penalty=False)})
        start = tf.gcp(X, 5, loss=loss, n_iter_max=1)  # our start, handed to pyttb too (not timed)
        secs, theirs = _pyttb_gcp(Y, 5, objective, init=start)
        rows.append({"problem": name, "who": "pyttb gcp_opt from tensorfold's start", "seconds": secs,
                     "fms": factor_match_score(theirs, truth),
                     "fms_no_weights": factor_match_score(theirs, truth, weight_penalty=False)})
    X = tf.testing.add_noise(tf.testing.random_cp((60, 70, 80), 5, seed=2).to_tensor(), 0.05)
    for who, fn in (("tensorfold gcp gaussian", lambda: tf.gcp(X, 5, loss="gaussian")),
                    ("tensorfold cp (ALS)", lambda: tf.cp(X, 5))):
        t0 = time.perf_counter()
        res = fn()
        rows.append({"problem": "Gaussian 60x70x80 rank 5, 5% noise", "who": who,
                     "seconds": time.perf_counter() - t0, "relative_error": tf.relative_error(X, res)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# in-memory tensors as dask arrays
# ---------------------------------------------------------------------------------------------------------


def bench_overhead() -> list[dict]:
    import dask.array as da

    X = tf.testing.add_noise(tf.testing.random_cp((200, 200, 200), 10, seed=0).to_tensor(), 0.01).float()
    D = da.from_array(X.numpy(), chunks=(100, 200, 200))
    rows = []
    cases = [
        ("tucker_sketch 3-pass ranks 20, torch tensor", lambda: tf.tucker_sketch(X, 20, passes=3)),
        ("tucker_sketch 3-pass ranks 20, dask array (threads)", lambda: tf.tucker_sketch(D, 20, passes=3)),
        ("cp_chunked rank 10, torch tensor", lambda: tf.cp_chunked(X, 10, n_iter_max=2, tol=0)),
        ("cp_chunked rank 10, dask array (threads)", lambda: tf.cp_chunked(D, 10, n_iter_max=2, tol=0)),
        ("in-memory tf.tucker HOOI ranks 20, torch tensor (reference)", lambda: tf.tucker(X, 20)),
        ("in-memory tf.tucker HOOI ranks 20, dask array (read into memory)", lambda: tf.tucker(D, 20)),
        ("in-memory tf.cp rank 10, torch tensor (reference)", lambda: tf.cp(X, 10)),
        ("in-memory tf.cp rank 10, dask array (read into memory)", lambda: tf.cp(D, 10)),
    ]
    for label, fn in cases:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
        rows.append({"case": label, "seconds": min(times), "relative_error": tf.relative_error(X, res)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# the out-of-core target
# ---------------------------------------------------------------------------------------------------------

PLANT_RANK, NOISE, SEED = 10, 0.1, 0


def _planted(side: int):
    gen = torch.Generator().manual_seed(SEED)
    return [torch.randn(side, PLANT_RANK, generator=gen, dtype=torch.float64) for _ in range(3)]


def make_store(directory: str, side: int, chunk: int) -> dict:
    """CP rank 10 + Gaussian noise (about NOISE relative), float32, written one chunk at a time."""
    import zarr

    path = os.path.join(directory, f"x{side}.zarr")
    A = _planted(side)
    sigma = NOISE * np.sqrt(float(torch.prod(torch.stack([(a.T @ a) for a in A]), 0).sum())) / side**1.5
    # no compression: noise does not compress, and the store is then exactly 4 bytes an entry on disk
    z = zarr.create_array(path, shape=(side,) * 3, chunks=(chunk,) * 3, dtype="float32", compressors=None,
                          overwrite=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(SEED + 1)
    for i in range(0, side, chunk):
        for j in range(0, side, chunk):
            for k in range(0, side, chunk):
                s = (slice(i, i + chunk), slice(j, j + chunk), slice(k, k + chunk))
                block = torch.einsum("ir,jr,kr->ijk", A[0][s[0]], A[1][s[1]], A[2][s[2]]).float().numpy()
                block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(sigma)
                z[s] = block
    return {"path": path, "side": side, "gb": side**3 * 4 / 1e9, "seconds": time.perf_counter() - t0}


def _worker_peaks(client) -> dict:
    def peak():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    # LocalCluster keeps its scheduler and the nannies in this (the client's) process; see client_process_mb.
    return {"workers_mb": client.run(peak)}


def bench_ooc(path: str, what: str, memory_limit: str, chunk: int | None) -> dict:
    import distributed
    import zarr

    z = zarr.open(path, mode="r")
    out = {"path": path, "shape": list(z.shape), "gb": float(np.prod(z.shape)) * 4 / 1e9, "load_start": _load()}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=memory_limit,
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        client.run(torch.set_num_threads, 1)  # one BLAS thread per single-threaded worker: 2 cores, 2 workers
        before = {w: info["id"] for w, info in client.scheduler_info()["workers"].items()}
        t0 = time.perf_counter()
        if what == "tucker":
            res = tf.tucker_sketch(z, 20, passes=3, scheduler=client, chunks=chunk)
        else:
            res = tf.cp_chunked(z, 10, scheduler=client, chunks=chunk)  # default tol 1e-6: stops when a sweep confirms
        out["seconds"] = time.perf_counter() - t0
        out["fit_history"] = list(res.info.fit_history)
        out["relative_error"] = 1 - res.info.fit_history[-1]
        after = {w: info["id"] for w, info in client.scheduler_info()["workers"].items()}
        out["workers_unchanged"] = before == after
        out.update(_worker_peaks(client))
    out["client_process_mb"] = _peak_mb()  # client + scheduler + nannies (one process)
    out["load_end"] = _load()
    out["method"] = what
    return out


def bench_slice(path: str, side: int) -> list[dict]:
    import dask.array as da
    import zarr

    z = zarr.open(path, mode="r")
    D = da.from_zarr(z)[:side, :side, :side]  # the out-of-core path reads the slice from the store, on dask
    X = torch.from_numpy(np.asarray(z[:side, :side, :side]))
    rows = []
    for label, fn in (
        ("tucker out of core (tucker_sketch 3 passes, ranks 20), dask slice of the store",
         lambda: tf.tucker_sketch(D, 20, passes=3)),
        ("tucker in memory (HOOI, ranks 20)", lambda: tf.tucker(X, 20)),
        ("cp out of core (cp_chunked rank 10), dask slice of the store",
         lambda: tf.cp_chunked(D, 10)),
        ("cp in memory (tf.cp rank 10)", lambda: tf.cp(X, 10)),
    ):
        t0 = time.perf_counter()
        res = fn()
        rows.append({"case": label, "slice": [side] * 3, "seconds": time.perf_counter() - t0,
                     "relative_error": tf.relative_error(X, res)})
    return rows


def bench_sweeps() -> list[dict]:
    """cp_chunked on planted problems where the refinement sweeps matter (collinear factors, a seed from a
    core of the rank's size): one-pass (block-Jacobi) vs exact (Gauss-Seidel) sweeps; then nonnegative and
    30%-missing fits."""
    out = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        fs = [torch.randn(n, 1, generator=g, dtype=torch.float64)
              + 0.5 * torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (40, 41, 42)]
        X = tf.testing.add_noise(tf.CPTensor(torch.ones(5, dtype=torch.float64), fs).to_tensor(), 0.1, seed=seed)
        for sweep in ("exact", "one-pass"):
            t = time.perf_counter()
            r = tf.cp_chunked(X, 5, chunks=20, sweep=sweep, core_margin=0, n_iter_max=100, tol=1e-9)
            out.append({"case": f"collinear seed {seed}", "sweep": sweep, "seconds": round(time.perf_counter() - t, 2),
                        "rel_error": round(tf.relative_error(X, r), 7), "passes": r.info.details["passes"]})
            print(out[-1], file=sys.stderr, flush=True)
    g = torch.Generator().manual_seed(0)
    X = tf.CPTensor(torch.ones(5), tuple(torch.rand(n, 5, generator=g) for n in (40, 41, 42))).to_tensor()
    r = tf.cp_chunked(X, 5, chunks=20, nonnegative=True, n_iter_max=100, tol=1e-10)
    out.append({"case": "nonnegative rank 5", "fit": 1 - tf.relative_error(X, r),
                "min_entry": min(float(f.min()) for f in r.factors), "passes": r.info.details["passes"]})
    X = tf.CPTensor(torch.ones(5), tuple(torch.randn(n, 5, generator=g) for n in (40, 41, 42))).to_tensor()
    mask = torch.rand(X.shape, generator=g) > 0.3
    r = tf.cp_chunked(X, 5, chunks=20, mask=mask, n_iter_max=200, tol=1e-10)
    Y = r.to_tensor()
    out.append({"case": "rank 5, 30% missing (EM)", "passes": r.info.details["passes"],
                "observed_error": float((Y - X)[mask].norm() / X[mask].norm()),
                "held_out_error": float((Y - X)[~mask].norm() / X[~mask].norm())})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["gcp", "overhead", "make", "ooc", "slice", "sweeps"])
    p.add_argument("--dir", default="/tmp/tf-bigdata")
    p.add_argument("--side", type=int, default=1260, help="cube side of the store (1260: 8.0 GB float32)")
    p.add_argument("--chunk", type=int, default=180, help="chunk side of the store")
    p.add_argument("--method", default="tucker", choices=["tucker", "cp"])
    p.add_argument("--memory-limit", default="1GB", help="per worker (2 workers)")
    p.add_argument("--slice", type=int, default=300)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    print(f"load before: {_load()}", file=sys.stderr)
    if args.part == "gcp":
        out = bench_gcp()
    elif args.part == "overhead":
        out = bench_overhead()
    elif args.part == "make":
        os.makedirs(args.dir, exist_ok=True)
        out = make_store(args.dir, args.side, args.chunk)
    elif args.part == "sweeps":
        out = bench_sweeps()
    elif args.part == "ooc":
        out = bench_ooc(os.path.join(args.dir, f"x{args.side}.zarr"), args.method, args.memory_limit, None)
    else:
        out = bench_slice(os.path.join(args.dir, f"x{args.side}.zarr"), args.slice)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    print(f"load after: {_load()}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
