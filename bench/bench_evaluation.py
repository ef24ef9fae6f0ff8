"""Benchmark: how long a full held-out evaluation takes (bootstrap CIs included). Prints figures only.

Run: `.venv/bin/python bench/bench_evaluation.py [--rows 1000 5000 20000 250000 1250000]`.
Above `evaluation.BLB_MIN_ROWS` rows the intervals come from the bag of little bootstraps; `--plain`
also times the plain bootstrap there (minutes per model at a million rows), for comparison.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from scipy.special import expit

from masml import evaluation


def _time(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 5_000, 20_000, 250_000, 1_250_000])
    parser.add_argument("--plain", action="store_true", help="also time the plain bootstrap above the cut")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'rows':>10} {'method':>7} {'evaluate s':>11} {'compare(3) s':>13} {'noise floor s':>14}")
    for n in args.rows:
        p = expit(rng.normal(-1, 1.5, n))
        y = (rng.random(n) < p).astype(float)
        preds = {"a": p, "b": np.clip(p * 1.1, 0, 1), "ref": p}
        methods = ["little" if n > evaluation.BLB_MIN_ROWS else "plain"]
        if args.plain and n > evaluation.BLB_MIN_ROWS:
            methods.append("plain")
        for method in methods:
            saved = evaluation.BLB_MIN_ROWS
            if method == "plain":
                evaluation.BLB_MIN_ROWS = max(saved, n)
            try:
                t_eval = _time(evaluation.evaluate, y, p, n_boot=1000)
                t_cmp = _time(evaluation.compare, y, preds, reference="ref", n_boot=1000)
            finally:
                evaluation.BLB_MIN_ROWS = saved
            t_floor = _time(evaluation.ece_if_calibrated, p)
            print(f"{n:>10,} {method:>7} {t_eval:>11.2f} {t_cmp:>13.2f} {t_floor:>14.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak memory of this process: {peak:.2f} GB")


if __name__ == "__main__":
    main()
