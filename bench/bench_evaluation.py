"""Benchmark: how long a full held-out evaluation takes (bootstrap CIs included). Prints figures only.

Run: `.venv/bin/python bench/bench_evaluation.py`.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.special import expit

from masml import evaluation


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'rows':>8} {'n_boot':>7} {'evaluate s':>11} {'compare(3) s':>13}")
    for n in (1_000, 5_000, 20_000):
        p = expit(rng.normal(-1, 1.5, n))
        y = (rng.random(n) < p).astype(float)
        start = time.perf_counter()
        evaluation.evaluate(y, p, n_boot=1000)
        t_eval = time.perf_counter() - start
        start = time.perf_counter()
        evaluation.compare(y, {"a": p, "b": np.clip(p * 1.1, 0, 1), "ref": p}, reference="ref", n_boot=1000)
        t_cmp = time.perf_counter() - start
        print(f"{n:>8,} {1000:>7} {t_eval:>11.2f} {t_cmp:>13.2f}")


if __name__ == "__main__":
    main()
