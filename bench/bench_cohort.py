"""Benchmark: how fast the synthetic cohort is generated, and how much memory it takes.

Prints figures; asserts nothing (speed goals are read, not tested). Run: `make bench` or
`.venv/bin/python bench/bench_cohort.py [--n 100000] [--repeat 3]`.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

from masml.cohort import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    simulate(1_000, seed=0)  # warm imports and caches
    print(f"{'patients':>10} {'best s':>8} {'patients/s':>12} {'peak traced MiB':>16}")
    for n in args.n:
        times = []
        for r in range(args.repeat):
            start = time.perf_counter()
            simulate(n, seed=r)
            times.append(time.perf_counter() - start)
        tracemalloc.start()
        simulate(n, seed=0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        best = min(times)
        print(f"{n:>10,} {best:>8.2f} {n / best:>12,.0f} {peak / 2**20:>16.1f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
