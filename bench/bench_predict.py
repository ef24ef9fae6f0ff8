"""Benchmark: scoring throughput of the bundle (onnxruntime) against xgboost's own predict.

Trains one onset model in-process (a small tuning budget: throughput depends on the trees' number and
depth, which the run prints), then scores the same rows three ways:

* ``xgboost``: the Python path, features + ``Booster.inplace_predict`` + calibration;
* ``onnxruntime``: the bundle's one graph (features, trees, calibration) in one session call;
* ``masml predict``: the command end to end (read file, validate, encode, score, write CSV).

Prints rows/s (best of ``--repeat``) and single-row latency; asserts nothing.

    .venv/bin/python bench/bench_predict.py [--n 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from masml.cohort import simulate, write_cohort
from masml.config import load_config
from masml.encoding import encode_inputs
from masml.predict import onnx_session, run_rows
from pipelines.risk import run_risk_pipeline

MASML = str(Path(sys.executable).with_name("masml"))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="rows scored")
    parser.add_argument("--train-n", type=int, default=20_000, help="patients the model is trained on")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    config = load_config(None, "onset")
    config.tuning.n_trials = args.trials
    config.n_boot = 50
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, _ = write_cohort(simulate(args.train_n, seed=1), tmp / "train.parquet")
        result = run_risk_pipeline(
            "onset", train, tmp / "bundle", config=config, log=lambda m: None, track=False
        )
        model = result.extra["model"]
        print(f"model: {model.n_rounds} trees, best params {model.best_params}")
        scored = simulate(args.n, seed=2)
        data, _ = write_cohort(scored, tmp / "score.parquet")
        x = encode_inputs(scored.data, config.inputs)
        session = onnx_session((result.bundle_dir / "model.onnx").read_bytes())
        feed_name = session.get_inputs()[0].name
        # Same rows, same answer: the figures compare like with like.
        gap = np.abs(session.run(["risk"], {feed_name: x})[0].ravel() - model.predict_risk(x)).max()
        print(f"max |risk onnxruntime - risk xgboost| on {args.n:,} rows: {gap:.1e}")

        def cli() -> None:
            cmd = [MASML, "predict", str(result.bundle_dir), "--data", str(data), "--out", str(tmp / "o.csv")]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

        piece = json.loads((result.bundle_dir / "manifest.json").read_text())["small_batch_rows"]
        print(f"{'path':>22} {'rows/s':>12} {'1-row latency µs':>18}")
        rows = [
            ("xgboost predict", lambda: model.predict_risk(x), lambda: model.predict_risk(x[:1])),
            ("onnxruntime (bundle)", lambda: session.run(["risk"], {feed_name: x}),
             lambda: session.run(["risk"], {feed_name: x[:1]})),
            (f"  in {piece}-row calls", lambda: run_rows(session, ["risk"], x, piece), None),
            ("masml predict (CLI)", cli, None),
        ]  # fmt: skip
        for name, batch, single in rows:
            seconds = best_of(batch, args.repeat if single else max(1, args.repeat // 2))
            blank = "(process)" if batch is cli else "-"
            latency = f"{best_of(single, 200) * 1e6:>18.0f}" if single else f"{blank:>18}"
            print(f"{name:>22} {args.n / seconds:>12,.0f} {latency}")


if __name__ == "__main__":
    main()
