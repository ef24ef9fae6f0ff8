"""Benchmark: exact SHAP from the bundle's explainer.onnx (onnxruntime, 1 thread) beside shap in-process.

Why these two: the service explains with onnxruntime only (issue 6 targets <= 1 ms per patient), while
today's reference is ``shap.TreeExplainer`` (xgboost's TreeSHAP) inside a training environment. Trains
300 trees of depth 6 on simulated patients, exports the explainer, then times:

* one patient at a time (median of ``--repeat`` single-row calls);
* 1,000 patients, in batches of ``--batch`` rows for the graph (its intermediates are a few MB per row:
  small batches stay in cache) and in one call for shap;

and prints the explainer's size and its parity with shap on those 1,000 patients. Asserts nothing.

    .venv/bin/python bench/bench_explain.py [--n 20000] [--repeat 200] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import pandas as pd
import xgboost as xgb

from masml import shap_export
from masml.cohort import simulate
from masml.encoding import encode_inputs
from masml.features import feature_names, feature_spec, transform
from masml.schema import INPUT_NAMES


def median_ms(fn, repeat: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds per call: on a shared machine the CPU time (this process, every
    thread) is what the work costs, the wall time what a caller waited."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="simulated patients to train on")
    ap.add_argument("--repeat", type=int, default=200, help="single-patient calls timed")
    ap.add_argument("--batch", type=int, default=8, help="rows per explainer call for the 1,000 patients")
    args = ap.parse_args()

    import shap

    names = list(INPUT_NAMES)
    cohort = simulate(args.n + 1000, seed=5)
    X = encode_inputs(cohort.data, names)
    spec = feature_spec(names, ["hscore"])
    fnames = feature_names(spec)
    y = cohort.data["mas_onset"].to_numpy(dtype=float)
    params = {"objective": "binary:logistic", "max_depth": 6, "eta": 0.05, "nthread": 1, "seed": 0}
    start = time.perf_counter()
    dtrain = xgb.DMatrix(transform(X[: args.n], spec), label=y[: args.n], feature_names=fnames)
    booster = xgb.train(params, dtrain, 300)
    print(f"trained 300 trees of depth 6 on {args.n:,} patients in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    model, section = shap_export.explainer_to_onnx(booster, spec, names)
    data = model.SerializeToString()
    build_s = time.perf_counter() - start
    leaves = sum(d.count("leaf=") for d in booster.get_dump())
    print(f"explainer: {len(data) / 1e6:.2f} MB, {leaves:,} leaves, built in {build_s:.1f} s")

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    rows = X[args.n : args.n + 1000]
    one = rows[:1]
    explainer = shap.TreeExplainer(booster)
    frame = pd.DataFrame(transform(rows, spec), columns=fnames)
    booster.set_param({"nthread": 1})
    dm, dm_one = xgb.DMatrix(frame), xgb.DMatrix(frame.iloc[:1])

    def onnx_1000(batch: int):
        def run() -> None:
            for i in range(0, len(rows), batch):
                sess.run(None, {"inputs": rows[i : i + batch]})

        return run

    few = max(10, args.repeat // 10)
    results = [
        ("onnxruntime explainer.onnx (1 thread)",
         median_ms(lambda: sess.run(None, {"inputs": one}), args.repeat),
         median_ms(onnx_1000(args.batch), 3)),
        ("  same, 1,000 patients one row per call", None, median_ms(onnx_1000(1), 3)),
        ("shap.TreeExplainer in-process (feature frame given)",
         median_ms(lambda: explainer(frame.iloc[:1]), few), median_ms(lambda: explainer(frame), 3)),
        ("xgboost pred_contribs (1 thread, DMatrix given)",
         median_ms(lambda: booster.predict(dm_one, pred_contribs=True), few),
         median_ms(lambda: booster.predict(dm, pred_contribs=True), 3)),
    ]  # fmt: skip
    print(f"\n{'method':<52} {'1 patient: wall / CPU ms':>26} {'1,000 patients: wall / CPU ms':>31}")
    for name, single, thousand in results:
        one_text = f"{single[0]:.3f} / {single[1]:.3f}" if single else "-"
        print(f"{name:<52} {one_text:>26} {f'{thousand[0]:.0f} / {thousand[1]:.0f}':>31}")

    out = shap_export.run_explainer(sess, rows, args.batch)
    ref, base = shap_export.reference_shap(booster, transform(rows, spec), fnames, 300)
    diff = np.abs(out["contributions"] - ref).max()
    add = np.abs(out["base_value"] + out["contributions"].sum(axis=1) - out["margin"]).max()
    print(f"\nparity on these 1,000 patients: max |Δ shap| {diff:.2e}, max |base + Σ - margin| {add:.2e}")


if __name__ == "__main__":
    main()
