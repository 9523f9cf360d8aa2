"""Wall time of the CLI, the API and the demo on a quiet CPU and beside one busy process.

    .venv/bin/python bench/under_load.py [--cases cli,api-plan,api-fit,demo] [--repeats 3] [--old-src DIR]

Each case runs quiet (``--repeats`` times), then the same number of times beside ``--busy`` pure-Python
spinning processes (``while True: pass``), which are stopped afterwards. Every run is a fresh process
(the OpenMP wait policy is read once, when torch loads) with ``OMP_WAIT_POLICY`` removed from the
environment, as a user's shell has it. Variants:

- ``cli``: ``tensorfold compress --model digits-cnn --out out --overwrite`` (its defaults). "now" is the
  command as installed (it sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads); "runtime default" imports
  torch first, so the runtime keeps its spinning default (what the command did before).
- ``api-plan`` / ``api-fit``: a user script that imports torch, then ``tensorfold``, and plans (weight-only,
  default methods) / plans and applies (calibrated, svd+tt) a 256-512-512-10 MLP; the script times itself.
  "now" is this tree; "before" is ``--old-src`` (a tree without ``compression/threads.py``).
- ``demo``: ``python -m tensorfold.demo`` (MiniLM to 50%), once per column unless ``--repeats`` says more;
  ``demo-compress``: its ``tensorfold compress`` command without the two extra ``--curve`` refits.

Run it under the project's CPU lock (the busy process is deliberate load) and quote ``uptime`` before/after.
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

SRC = str(Path(__file__).resolve().parents[1] / "src")

USER_SCRIPT = """
import sys, time
sys.path.insert(0, {src!r})
import torch
import tensorfold as tf
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10))
calib = [torch.randn(64, 256) for _ in range(4)]
t0 = time.perf_counter()
if {fit!r}:
    plan = tf.plan(model, budget=0.5, target="params", methods=("svd", "tt"), calib=calib)
    small = tf.apply(model, plan, calib)
else:
    plan = tf.plan(model, budget=0.5)
print("SECONDS", time.perf_counter() - t0)
"""

CLI_NOW = ("import sys; sys.path.insert(0, {src!r}); from tensorfold.cli.main import app; "
           "sys.argv[0] = 'tensorfold'; app()")
# torch loaded before the tensorfold.cli package can set the policy: the runtime's spinning default
CLI_DEFAULT = "import torch; " + CLI_NOW


def variants(case: str, old_src: str | None) -> list[tuple[str, list[str]]]:
    py = sys.executable
    if case == "cli":
        args = ["compress", "--model", "digits-cnn", "--out", "out", "--overwrite"]
        return [("runtime default (before)", [py, "-c", CLI_DEFAULT.format(src=SRC), *args]),
                ("now (PASSIVE set by the command)", [py, "-c", CLI_NOW.format(src=SRC), *args])]
    if case in ("api-plan", "api-fit"):
        fit = case == "api-fit"
        out = []
        if old_src:
            out.append(("before (--old-src)", [py, "-c", USER_SCRIPT.format(src=old_src, fit=fit)]))
        out.append(("now", [py, "-c", USER_SCRIPT.format(src=SRC, fit=fit)]))
        return out
    if case == "demo":
        return [("now", [py, "-c", f"import sys; sys.path.insert(0, {SRC!r}); "
                                   "from tensorfold.demo import main; main()"])]
    if case == "demo-compress":  # the demo's command without its two extra --curve refits
        args = ["compress", "--model", "minilm", "--budget", "0.5", "--target", "params", "--calib", "128",
                "--out", "runs/minilm-50", "--overwrite"]
        return [("now (PASSIVE set by the command)", [py, "-c", CLI_NOW.format(src=SRC), *args])]
    raise SystemExit(f"unknown case {case!r}")


def run(cmd: list[str], cwd: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PYTHONPATH")}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)[:200]} failed:\n{res.stderr[-3000:]}")
    for line in res.stdout.splitlines():  # the API script times itself (without Python/torch start-up)
        if line.startswith("SECONDS "):
            return float(line.split()[1])
    return time.perf_counter() - t0


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} ({', '.join(f'{t:.2f}' for t in times)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="cli,api-plan,api-fit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded runs")
    ap.add_argument("--old-src", default=None, help="src/ of a tree before the change, for the 'before' rows")
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    print(f"load before: {os.getloadavg()[0]:.2f}  ({time.strftime('%H:%M:%S', time.gmtime())} UTC)", flush=True)
    print("| case | variant | quiet s, median (runs) | beside a busy process s, median (runs) | ratio |")
    print("|---|---|---|---|---|")
    for case in args.cases.split(","):
        for label, cmd in variants(case, args.old_src):
            quiet = [run(cmd, work) for _ in range(args.repeats)]
            print(f"  ({case}, {label}: quiet {fmt(quiet)})", flush=True)  # kept if the busy runs are cut
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                time.sleep(0.5)
                busy = [run(cmd, work) for _ in range(args.repeats)]
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
            ratio = statistics.median(busy) / statistics.median(quiet)
            print(f"| {case} | {label} | {fmt(quiet)} | {fmt(busy)} | {ratio:.2f}x |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}  ({time.strftime('%H:%M:%S', time.gmtime())} UTC)")


if __name__ == "__main__":
    main()
