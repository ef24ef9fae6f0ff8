"""Benchmark: wall time and peak memory of each training pipeline, as a user runs it (`masml train`).

Each run is its own `masml train` process (so its peak RSS is its own, read from the kernel with
``os.wait4``), tracked in a throw-away SQLite store. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_pipeline.py                      # 20,000 and 100,000 patients
    .venv/bin/python bench/bench_pipeline.py --n 20000 --task onset
    .venv/bin/python bench/bench_pipeline.py --config small.yaml  # a cheaper tuning budget
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from masml.cohort import simulate, write_cohort

MASML = str(Path(sys.executable).with_name("masml"))


def run_once(task: str, data: Path, out: Path, env: dict, config: str | None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one `masml train` process."""
    cmd = [MASML, "train", task, "--data", str(data), "--out", str(out)]
    if config:
        cmd += ["--config", config]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(proc.stderr.read().decode()[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--task", nargs="+", default=["onset", "icu"], choices=["onset", "icu"])
    parser.add_argument("--config", default=None, help="YAML overrides for every run (e.g. fewer trials)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'task':>6} {'patients':>9} {'wall s':>8} {'peak RSS MiB':>13} {'exit':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        for n in args.n:
            data, _ = write_cohort(simulate(n, seed=args.seed), tmp / f"cohort{n}.parquet")
            for task in args.task:
                wall, rss, code = run_once(task, data, tmp / f"{task}{n}", env, args.config)
                print(f"{task:>6} {n:>9,} {wall:>8.1f} {rss:>13.0f} {code:>5}", flush=True)


if __name__ == "__main__":
    main()
