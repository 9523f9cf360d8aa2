"""Decomposition benchmark: tensorfold and its peers side by side, in one run, with 2 threads.

    .venv/bin/python bench/decompositions.py            # the full run (a few minutes)
    .venv/bin/python bench/decompositions.py --quick    # smaller tensors, one repeat
    .venv/bin/python bench/decompositions.py --json out.json

Every case runs in its own fresh process (multiprocessing 'spawn'), so each peak-memory figure is that
case's alone: the data are generated once here, saved, and loaded by the case; the peak resident set is
reset after loading (Linux /proc/self/clear_refs) and "extra memory" is the peak during the run minus the
resident set after loading. Seconds are the best of ``--repeats`` runs (the machine is shared). Fits are
``1 - ||X - Y|| / ||X||`` against the original tensor in float64, computed after the clock stops.

CP peers get the same precomputed SVD init (leading singular vectors of every unfolding, computed
once here and NOT included in their time) and run exactly 50 iterations (tol=0). tensorfold's own
row computes its init inside the timed call and stops on its default tolerance (n_iter_max=50 per
phase); the "same init, 50 sweeps" row runs plain uncompressed dimension-tree ALS for exactly 50
sweeps from the peers' init, for a like-for-like figure. Tucker and TT rows run the same number of
HOOI sweeps for every library (tol=0) from each library's own (ST-)HOSVD-type start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)  # inherited by the spawned case processes before they load BLAS
# BLAS worker threads that spin while they wait stall every library 5-15x when the 2 cores are shared with
# other jobs; --shared-machine makes both pools wait passively: OpenMP (torch's MKL: tensorfold, TensorLy's
# pytorch backend) and OpenBLAS (numpy and scipy: TensorLy's numpy backend, pyttb). On a quiet machine
# leave them alone: passive OpenMP waiting makes MKL's small eigensolvers several times slower (a 200x200
# eigh took 13 ms instead of 1.6 ms). Read here, before torch or numpy load their thread pools.
if "--shared-machine" in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


# --------------------------------------------------------------------------------------------------
# problems (built once in the parent, saved as .npy)
# --------------------------------------------------------------------------------------------------


def build_problems(workdir: Path, quick: bool) -> dict:
    import numpy as np
    import torch

    from tensorfold.testing import add_noise, random_cp, random_tt

    n3 = 100 if quick else 200
    n150 = 60 if quick else 150
    shape4 = (50, 50, 50, 20) if quick else (100, 100, 100, 40)
    tt_shape = (10,) * 6 if quick else (10,) * 7
    problems = {
        "cube": {"shape": (n3,) * 3, "make": lambda: add_noise(random_cp((n3,) * 3, 10, seed=0).to_tensor(), 0.01)},
        "c150": {"shape": (n150,) * 3,
                 "make": lambda: add_noise(random_cp((n150,) * 3, 10, seed=3).to_tensor(), 0.01)},
        "four": {"shape": shape4, "make": lambda: add_noise(random_cp(shape4, 10, seed=1).to_tensor(), 0.01)},
        "tt": {"shape": tt_shape, "make": lambda: add_noise(random_tt(tt_shape, [5] * 6 if not quick else [5] * 5,
                                                                      seed=2).to_tensor(), 0.01)},
    }
    out = {}
    for name, p in problems.items():
        X = p["make"]()
        path = workdir / f"{name}.npy"
        np.save(path, X.numpy())
        out[name] = {"path": str(path), "shape": list(X.shape)}
        if name == "cube":
            # the SVD init every CP peer gets: leading left singular vectors of each unfolding
            init = [torch.linalg.svd(X.movedim(n, 0).reshape(X.shape[n], -1), full_matrices=False)[0][:, :10]
                    for n in range(3)]
            init_path = workdir / "cube_init.npz"
            np.savez(init_path, *[f.numpy() for f in init])
            out[name]["init"] = str(init_path)
        del X
    return out


# --------------------------------------------------------------------------------------------------
# cases (each runs in a fresh process)
# --------------------------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fit_np(X, Y) -> float:
    import numpy as np

    return 1.0 - float(np.linalg.norm((X - Y).ravel()) / np.linalg.norm(X.ravel()))


def _load_init():
    import numpy as np

    def load(path):
        with np.load(path) as z:
            return [z[f"arr_{i}"].copy() for i in range(len(z.files))]

    return load


def run_case(case: dict, problems: dict, repeats: int, queue) -> None:  # runs in the child
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (peers print progress; the parent prints the table)
    torch.set_num_threads(THREADS)
    limiter = threadpool_limits(THREADS)  # numpy / scipy BLAS of the peers
    prob = problems[case["problem"]]
    X = np.load(prob["path"])
    init = _load_init()(prob["init"]) if "init" in prob else None
    # Warm up on a small slice of the same problem (imports, BLAS/LAPACK buffers, thread pools), outside
    # the clock and before the memory baseline, the same way for every library.
    side = 6 if case["algo"] == "tt" else max(np.atleast_1d(case["rank"])) + 4
    small = np.ascontiguousarray(X[tuple(slice(0, side) for _ in X.shape)])
    small_init = [np.ascontiguousarray(f[:side]) for f in init] if init is not None else None
    RUN[case["lib"]](PREPARE[case["lib"]](small, case, small_init), case)
    prepared = PREPARE[case["lib"]](X, case, init)  # conversions the library needs, outside the clock
    gc.collect()
    baseline = _rss_kb("VmRSS")
    exact_peak = _reset_peak()
    times, result = [], None
    budget = 25.0  # stop repeating slow cases
    for _ in range(repeats):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = RUN[case["lib"]](prepared, case)
        times.append(time.perf_counter() - t0)
        if sum(times) > budget:
            break
    peak = _rss_kb("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Y, n_iter = RECONSTRUCT[case["lib"]](result)
    if n_iter is None:  # peers run exactly n_iter sweeps (tol=0)
        n_iter = str(case.get("n_iter", "-"))
    queue.put({
        "seconds": min(times),
        "runs": len(times),
        "fit": _fit_np(X, Y),
        "iterations": n_iter,
        "extra_mb": max(peak - baseline, 0) / 1024,
        "input_mb": X.nbytes / 2**20,
    })
    del limiter


# -- per-library preparation, run and reconstruction -----------------------------------------------

def _prep_torch(X, case, init):
    import torch

    import tensorfold.decomp.cp
    import tensorfold.decomp.tt
    import tensorfold.decomp.tucker  # noqa: F401  (lazy public names: import before the baseline)

    T = torch.from_numpy(X)
    if case.get("dtype") == "float32":
        T = T.float()
    return {"X": T, "init": init}


def _prep_tensorly(X, case, init):
    import tensorly as tl

    backend = case.get("backend", "numpy")
    tl.set_backend(backend)
    if backend == "pytorch":
        import torch

        data = torch.from_numpy(X)
        init = [torch.from_numpy(f) for f in init] if init is not None else None
    else:
        data = X
    return {"X": data, "init": init, "backend": backend}


def _prep_pyttb(X, case, init):
    import numpy as np
    import pyttb as ttb

    return {"X": ttb.tensor(np.asfortranarray(X), copy=False), "init": init}


PREPARE = {"tensorfold": _prep_torch, "tensorly": _prep_tensorly, "pyttb": _prep_pyttb}


def _run_tensorfold(p, case):
    import torch

    import tensorfold as tf

    algo = case["algo"]
    if algo == "cp":
        kwargs = dict(case.get("kwargs", {}))
        if kwargs.pop("same_init", False):
            factors = [torch.from_numpy(f).to(p["X"].dtype) for f in p["init"]]
            kwargs["init"] = tf.CPTensor(torch.ones(factors[0].shape[1], dtype=p["X"].dtype), factors)
        return tf.cp(p["X"], case["rank"], **kwargs)
    if algo == "tucker":
        return tf.tucker(p["X"], case["rank"], method="hooi", n_iter_max=case["n_iter"], tol=0)
    if algo == "tt":
        return tf.tensor_train(p["X"], max_rank=case["rank"])
    raise ValueError(algo)


def _run_tensorly(p, case):
    import tensorly as tl
    from tensorly.decomposition import parafac, tensor_train, tucker

    algo = case["algo"]
    if algo == "cp":
        R = case["rank"]
        weights = tl.ones(R, **tl.context(p["X"]))
        init = tl.cp_tensor.CPTensor((weights, [tl.copy(f) for f in p["init"]]))
        tol = case.get("peer_tol", 0)  # 0: exactly n_iter iterations
        result, errors = parafac(p["X"], R, n_iter_max=case["n_iter"], init=init, tol=tol, return_errors=True)
        return result, len(errors)
    if algo == "tucker":
        return tucker(p["X"], rank=list(case["rank"]), n_iter_max=case["n_iter"], tol=0)
    if algo == "tt":
        return tensor_train(p["X"], rank=[1] + [case["rank"]] * (p["X"].ndim - 1) + [1])
    raise ValueError(algo)


def _run_pyttb(p, case):
    import numpy as np
    import pyttb as ttb

    algo = case["algo"]
    if algo == "cp":
        R = case["rank"]
        init = ttb.ktensor([f.copy() for f in p["init"]], np.ones(R))
        stoptol = case.get("peer_tol", 0)
        result, _, out = ttb.cp_als(p["X"], R, stoptol=stoptol, maxiters=case["n_iter"], init=init, printitn=0)
        return result, out["iters"] + 1  # pyttb reports the last (0-based) iteration index
    if algo == "tucker":
        result, _, _ = ttb.tucker_als(p["X"], list(case["rank"]), stoptol=0, maxiters=case["n_iter"],
                                      init="nvecs", printitn=0)
        return result
    raise ValueError(algo)


RUN = {"tensorfold": _run_tensorfold, "tensorly": _run_tensorly, "pyttb": _run_pyttb}


def _rec_tensorfold(result):
    info = result.info
    d = info.details if info is not None else {}
    if "core_iterations" in d:  # compressed CP: sweeps on the small core, then on the full tensor
        sweeps = f"{d['core_iterations']} on core + {d['full_iterations']} on X"
    else:
        sweeps = str(info.n_iter) if info is not None and info.n_iter else "-"
    return result.to_tensor().double().numpy(), sweeps


def _rec_tensorly(result):
    import numpy as np
    import tensorly as tl

    if isinstance(result, tuple):  # (CP result, iterations run)
        Y, _ = _rec_tensorly(result[0])
        return Y, str(result[1])
    if isinstance(result, tl.cp_tensor.CPTensor):
        Y = tl.cp_to_tensor(result)
    elif isinstance(result, tl.tucker_tensor.TuckerTensor):
        Y = tl.tucker_to_tensor(result)
    else:
        Y = tl.tt_to_tensor(result)
    return np.asarray(tl.to_numpy(Y), dtype=np.float64), None


def _rec_pyttb(result):
    import numpy as np

    if isinstance(result, tuple):  # (CP result, iterations run)
        Y, _ = _rec_pyttb(result[0])
        return Y, str(result[1])
    return np.ascontiguousarray(result.full().data), None


RECONSTRUCT = {"tensorfold": _rec_tensorfold, "tensorly": _rec_tensorly, "pyttb": _rec_pyttb}


# --------------------------------------------------------------------------------------------------
# the plan, the table and the ratios
# --------------------------------------------------------------------------------------------------


def make_cases(problems: dict) -> list[dict]:
    cube = "x".join(map(str, problems["cube"]["shape"]))
    four = "x".join(map(str, problems["four"]["shape"]))
    tt = "x".join(map(str, problems["tt"]["shape"]))
    cp = {"algo": "cp", "problem": "cube", "rank": 10, "n_iter": 50, "group": f"CP-ALS rank 10, {cube}"}
    tk3 = {"algo": "tucker", "problem": "cube", "rank": (20, 20, 20), "n_iter": 10,
           "group": f"Tucker HOOI (20,20,20), 10 sweeps, {cube}"}
    c150 = "x".join(map(str, problems["c150"]["shape"]))
    tk150 = {"algo": "tucker", "problem": "c150", "rank": (10, 10, 10), "n_iter": 10,
             "group": f"Tucker HOOI (10,10,10), 10 sweeps, {c150}"}
    tk4 = {"algo": "tucker", "problem": "four", "rank": (10, 10, 10, 10), "n_iter": 5,
           "group": f"Tucker HOOI ranks 10, 5 sweeps, {four}"}
    ttc = {"algo": "tt", "problem": "tt", "rank": 5, "group": f"TT-SVD max rank 5, {tt}"}
    return [
        {**cp, "lib": "tensorfold", "label": "tensorfold cp (float64)", "key": "cp_ours",
         "kwargs": {"n_iter_max": 50}},
        {**cp, "lib": "tensorfold", "label": "tensorfold cp (float32 data)", "key": "cp_ours_f32",
         "dtype": "float32", "kwargs": {"n_iter_max": 50}},
        {**cp, "lib": "tensorfold", "label": "tensorfold cp, same init, 50 sweeps, no compression/line search",
         "key": "cp_ours_plain",
         "kwargs": {"n_iter_max": 50, "tol": 0, "compress": False, "line_search": False, "same_init": True}},
        {**cp, "lib": "tensorly", "label": "TensorLy parafac (numpy)", "key": "cp_tl_numpy", "backend": "numpy"},
        {**cp, "lib": "tensorly", "label": "TensorLy parafac (pytorch)", "key": "cp_tl_torch", "backend": "pytorch"},
        {**cp, "lib": "pyttb", "label": "pyttb cp_als", "key": "cp_pyttb"},
        {**cp, "lib": "tensorly", "label": "TensorLy parafac (numpy), its default tol=1e-8", "key": "cp_tl_own_tol",
         "backend": "numpy", "peer_tol": 1e-8},
        {**cp, "lib": "pyttb", "label": "pyttb cp_als, its default stoptol=1e-4", "key": "cp_pyttb_own_tol",
         "peer_tol": 1e-4},
        {**tk3, "lib": "tensorfold", "label": "tensorfold tucker hooi", "key": "tk3_ours"},
        {**tk3, "lib": "tensorly", "label": "TensorLy tucker (numpy)", "key": "tk3_tl"},
        {**tk3, "lib": "pyttb", "label": "pyttb tucker_als", "key": "tk3_pyttb"},
        {**tk150, "lib": "tensorfold", "label": "tensorfold tucker hooi", "key": "tk150_ours"},
        {**tk150, "lib": "tensorly", "label": "TensorLy tucker (numpy)", "key": "tk150_tl"},
        {**tk150, "lib": "pyttb", "label": "pyttb tucker_als", "key": "tk150_pyttb"},
        {**tk4, "lib": "tensorfold", "label": "tensorfold tucker hooi", "key": "tk4_ours"},
        {**tk4, "lib": "tensorly", "label": "TensorLy tucker (numpy)", "key": "tk4_tl"},
        {**tk4, "lib": "pyttb", "label": "pyttb tucker_als", "key": "tk4_pyttb"},
        {**ttc, "lib": "tensorfold", "label": "tensorfold tensor_train", "key": "tt_ours"},
        {**ttc, "lib": "tensorly", "label": "TensorLy tensor_train (numpy)", "key": "tt_tl"},
    ]


RATIOS = [
    ("CP: TensorLy numpy / tensorfold", "cp_tl_numpy", "cp_ours"),
    ("CP: TensorLy pytorch / tensorfold", "cp_tl_torch", "cp_ours"),
    ("CP: pyttb / tensorfold", "cp_pyttb", "cp_ours"),
    ("CP: TensorLy numpy / tensorfold float32", "cp_tl_numpy", "cp_ours_f32"),
    ("CP: pyttb / tensorfold float32", "cp_pyttb", "cp_ours_f32"),
    ("CP: TensorLy numpy at its own tol / tensorfold", "cp_tl_own_tol", "cp_ours"),
    ("CP: pyttb at its own stoptol / tensorfold", "cp_pyttb_own_tol", "cp_ours"),
    ("CP: TensorLy numpy / tensorfold plain 50 sweeps", "cp_tl_numpy", "cp_ours_plain"),
    ("CP: pyttb / tensorfold plain 50 sweeps", "cp_pyttb", "cp_ours_plain"),
    ("Tucker 3-way: TensorLy / tensorfold", "tk3_tl", "tk3_ours"),
    ("Tucker 3-way: pyttb / tensorfold", "tk3_pyttb", "tk3_ours"),
    ("Tucker 150^3 ranks 10: TensorLy / tensorfold", "tk150_tl", "tk150_ours"),
    ("Tucker 150^3 ranks 10: pyttb / tensorfold", "tk150_pyttb", "tk150_ours"),
    ("Tucker 4-way: TensorLy / tensorfold", "tk4_tl", "tk4_ours"),
    ("Tucker 4-way: pyttb / tensorfold", "tk4_pyttb", "tk4_ours"),
    ("TT-SVD: TensorLy / tensorfold", "tt_tl", "tt_ours"),
]


def render(rows: list[dict], ratios: list[dict]) -> str:
    lines = []
    group = None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            lines += ["", f"**{group}** (input {r.get('input_mb', float('nan')):.0f} MB)", "",
                      "| library | seconds | fit | sweeps | extra memory (MB) |", "|---|---|---|---|---|"]
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | |")
            continue
        cells = [r["label"], f"{r['seconds']:.3f}", f"{r['fit']:.7f}", r["iterations"], f"{r['extra_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio (peer seconds / tensorfold seconds) | value |", "|---|---|"]
    lines += [f"| {q['name']} | {q['value']:.2f}x |" for q in ratios]
    return "\n".join(lines).lstrip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller tensors, one repeat")
    parser.add_argument("--shared-machine", action="store_true",
                        help="thread pools wait passively (use when other jobs share the cores)")
    parser.add_argument("--json", metavar="OUT", help="save the table (and the ratios) as JSON")
    parser.add_argument("--repeats", type=int, default=None, help="runs per case, best time kept (default 3)")
    parser.add_argument("--only", default=None, help="comma-separated case keys to run (e.g. cp_ours,cp_pyttb)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)

    ctx = mp.get_context("spawn")
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        problems = build_problems(Path(tmp), args.quick)
        cases = make_cases(problems)
        if args.only:
            keep = set(args.only.split(","))
            cases = [c for c in cases if c["key"] in keep]
        rows = []
        for case in cases:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_case, args=(case, problems, repeats, queue))
            proc.start()
            try:
                out = queue.get(timeout=900)
            except Exception as exc:  # a crashed or hung case: record it, keep going
                out = {"error": type(exc).__name__}
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
            row = {**{k: v for k, v in case.items() if k != "kwargs"}, **out}
            rows.append(row)
            status = out.get("error") or f"{out['seconds']:.3f} s, fit {out['fit']:.7f}, +{out['extra_mb']:.0f} MB"
            print(f"  {case['group']} | {case['label']}: {status}", file=sys.stderr, flush=True)

    by_key = {r["key"]: r for r in rows if "error" not in r}
    ratios = [{"name": name, "value": by_key[a]["seconds"] / by_key[b]["seconds"]}
              for name, a, b in RATIOS if a in by_key and b in by_key]
    print(render(rows, ratios))
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python bench/decompositions.py" + (" --quick" if args.quick else ""),
        "threads": THREADS,
        "repeats": repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }
    print(f"\n{meta['date']}, {meta['threads']} threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
          f"OPENBLAS_THREAD_TIMEOUT={meta['openblas_thread_timeout']}, best of up to {repeats}, "
          f"load average at end {', '.join(f'{x:.1f}' for x in meta['load_average'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
