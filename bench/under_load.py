"""Wall time of the CLI and the API on a quiet and on a shared CPU, with and without passive OpenMP waiting.

    .venv/bin/python bench/under_load.py [--repeats 2] [--busy 1] [--skip-cli] [--skip-api]

"busy" runs start ``--busy`` pure-Python spinning processes (``while True: pass``) beside the measured
command and stop them afterwards. Each command runs in a fresh process (the OpenMP wait policy is read
once, when torch's OpenMP runtime starts), with ``OMP_WAIT_POLICY`` as given in the table: ``(unset)``
is the runtime's default (spin for a while, then sleep), ``PASSIVE`` what the CLI now sets when the user
has not. Run it under the project's CPU lock and report ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-c", "import sys; from tensorfold.cli.main import app; sys.argv[0] = 'tensorfold'; app()"]

API_MLP = """
import os, time, torch, tensorfold as tf
if os.environ.get("TF_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["TF_BENCH_THREADS"]))
t0 = time.perf_counter()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10))
calib = [torch.randn(64, 256) for _ in range(4)]
plan = tf.plan(model, budget=0.5, target="params", methods=("svd", "tt"), calib=calib)
small = tf.apply(model, plan, calib)
print("SECONDS", time.perf_counter() - t0)
"""


def run(cmd: list[str], policy: str | None, cwd: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        policy, _, threads = policy.partition("+")
        if policy != "unset":
            env["OMP_WAIT_POLICY"] = policy
        if threads:
            env["TF_BENCH_THREADS"] = threads.removesuffix("t")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    for line in res.stdout.splitlines():  # the API script times itself (without Python/torch start-up)
        if line.startswith("SECONDS "):
            return float(line.split()[1])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded runs")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-api", action="store_true")
    ap.add_argument("--policies", default="unset,PASSIVE")
    ap.add_argument("--old-cli-src", default=None,
                    help="src/ of a tensorfold without the CLI's passive default, for the '(unset)' CLI rows")
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    cases = []
    if not args.skip_cli:
        cases.append(("CLI compress --model digits-cnn",
                      [*CLI, "compress", "--model", "digits-cnn", "--budget", "0.5", "--out", "out", "--overwrite"]))
    if not args.skip_api:
        cases.append(("API plan+apply, 3-layer MLP (svd, tt, calibrated; in-process seconds)",
                      [sys.executable, "-c", API_MLP]))
    print(f"load before: {os.getloadavg()[0]:.2f}")
    print("| command | OMP_WAIT_POLICY | quiet s (median) | beside busy s (median) |")
    print("|---|---|---|---|")
    for label, cmd in cases:
        for policy in args.policies.split(","):
            pol = None if policy == "unset" else policy  # "PASSIVE+1t": also torch.set_num_threads(1) (API)
            env_note = policy if pol else "(unset)"
            if label.startswith("CLI") and pol is None:
                # the CLI now sets PASSIVE itself; '(unset)' means the old entry point without that default
                if not args.old_cli_src:
                    continue
                old = [sys.executable, "-c", f"import sys; sys.path.insert(0, {args.old_cli_src!r}); "
                       + "from tensorfold.cli.main import app; sys.argv[0] = 'tensorfold'; app()"]
                cmd_run = old + cmd[len(CLI):]
                env_note = "(unset, old CLI)"
            else:
                cmd_run = cmd
            quiet = [run(cmd_run, pol, work) for _ in range(args.repeats)]
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                time.sleep(0.5)
                busy = [run(cmd_run, pol, work) for _ in range(args.repeats)]
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
            print(f"| {label} | {env_note} | {statistics.median(quiet):.2f} ({', '.join(f'{t:.1f}' for t in quiet)}) "
                  f"| {statistics.median(busy):.2f} ({', '.join(f'{t:.1f}' for t in busy)}) |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    Path(work, "out").exists()


if __name__ == "__main__":
    main()
