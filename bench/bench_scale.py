"""Benchmark: how training and batch scoring cost grows with rows, on one process and on a Dask cluster.

For each size (default 100k, 1M and 5M simulated patients) it writes the cohort once as a single
Parquet file and as a folder of partitions (about 250k rows each), then times, as a user runs them:

* ``masml train onset`` (and with ``--tasks``, ``icu`` and ``il1_benefit``: the benefit model tunes three
  nuisance models and fits its learners on the MAS patients only) on one process (the single file) and
  ``--cluster local`` (the folder, a LocalCluster of 2 worker processes of one thread), with the same
  small tuning budget;
* ``masml predict --cluster local`` on the folder (rows per second, the whole command).

Peak memory is the largest sum of RSS over the command's process tree (the client and, on a cluster,
its scheduler and workers), sampled every 0.2 s. Runs are tracked in a throw-away SQLite store. Data
are cached under --cache between runs. Prints a table and writes JSON; asserts nothing.

    .venv/bin/python bench/bench_scale.py                          # 100k, 1M, 5M (hours on 2 cores)
    .venv/bin/python bench/bench_scale.py --rows 100000 1000000 --engines one cluster
    .venv/bin/python bench/bench_scale.py --rows 100000 --tasks onset il1_benefit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from masml.cohort import simulate, write_cohort

MASML = str(Path(sys.executable).with_name("masml"))
PART_ROWS = 250_000
# The tuning budget of every run: small, because this measures how cost grows, not model quality.
# timeout_s: null, so n_trials binds: with the default 900 s safety cap, one 3-fold trial at 5M patients
# on the 2-worker cluster took 896-900+ s, and identical runs tuned one trial or two (1,389 against
# 2,156-2,246 s), timing the machine's speed instead of the work.
CONFIG = (
    "tuning:\n  n_trials: 2\n  max_rounds: 300\n  early_stopping_rounds: 20\n  timeout_s: null\n"
    "folds: 3\nn_boot: 200\n"
)


def measured(cmd: list[str], env: dict) -> dict:
    """Wall seconds, peak RSS of the whole process tree (MiB) and exit code of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"rss": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak["rss"] = max(peak["rss"], total)
            except psutil.Error:
                return
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        print(stderr.decode()[-3000:], file=sys.stderr)
    return {"seconds": time.perf_counter() - start, "peak_mib": peak["rss"] / 2**20, "exit": proc.returncode}


def cohort(n: int, cache: Path) -> tuple[Path, Path]:
    """(single file, partition folder) of an n-patient cohort, made once."""
    single, folder = cache / f"cohort{n}.parquet", cache / f"cohort{n}"
    if not (single.exists() and folder.exists()):
        c = simulate(n, seed=0)
        write_cohort(c, single)
        write_cohort(c, folder, partitions=max(1, round(n / PART_ROWS)))
    return single, folder


def show(r: dict) -> None:
    rate = f"{r['rows_per_s']:,.0f}" if "rows_per_s" in r else ""
    cells = f"{r['rows']:>10,} {r['job']:>30} {r['seconds']:>8.1f} {r['peak_mib']:>9.0f} {rate:>10}"
    print(f"{cells} {r['exit']:>5}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--engines", nargs="+", default=["one", "cluster"], choices=["one", "cluster"])
    parser.add_argument("--tasks", nargs="+", default=["onset"], choices=["onset", "icu", "il1_benefit"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "masml-bench-scale")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'rows':>10} {'job':>30} {'wall s':>8} {'peak MiB':>9} {'rows/s':>10} {'exit':>5}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bench.yaml").write_text(CONFIG)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        for n in args.rows:
            single, folder = cohort(n, args.cache)
            for task in args.tasks:
                for engine in args.engines:
                    out = tmp / f"{task}-{n}-{engine}"
                    cmd = [MASML, "train", task, "--config", str(tmp / "bench.yaml"), "--out", str(out)]
                    if engine == "one":
                        cmd += ["--data", str(single)]
                    else:
                        cmd += ["--data", str(folder), "--cluster", "local"]
                    job = f"train {task} ({engine})" if args.tasks != ["onset"] else f"train ({engine})"
                    results.append({"rows": n, "job": job, **measured(cmd, env)})
                    show(results[-1])
            bundles = [tmp / f"onset-{n}-{e}" for e in args.engines if (tmp / f"onset-{n}-{e}").exists()]
            if bundles:
                cmd = [MASML, "predict", str(bundles[0]), "--data", str(folder), "--out",
                       str(tmp / f"scored-{n}"), "--cluster", "local"]  # fmt: skip
                r = {"rows": n, "job": "predict (cluster)", **measured(cmd, env)}
                r["rows_per_s"] = n / r["seconds"]
                results.append(r)
                show(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
