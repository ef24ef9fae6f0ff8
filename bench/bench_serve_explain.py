"""Benchmark: explanations served over HTTP, end to end (issue 6 targets <= 1 ms per patient).

Why end to end: the explainer alone is timed by bench/bench_explain.py; a clinician's app waits for JSON
parsing, validation, unit conversion, both graphs (risk and explainer), the ``top`` list and the JSON
answer. Builds a bundle with 300 trees of depth 6 (the issue's size; or takes ``--bundle``), starts
``python -m serve`` (one worker, audit log to a file, as deployed) and times with one keep-alive client
(bench/bench_serve.py's): REST ``/v1/models/{task}/explain`` with 1 and 10 patients per call,
``/predict`` with 1 patient for comparison, and OIP ``/v2/models/{m}/explain`` with 1 row. Prints
p50/p99 per call and per patient; asserts nothing. With wrk installed, each case is timed again by wrk
(one connection, ``--seconds``): a Python client costs about as much per call as the server on a
2-core machine, so its figures are the pair's, wrk's are close to the server's alone.

    .venv/bin/python bench/bench_serve_explain.py [--bundle DIR] [--n 4000] [--latency-n 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import _latency, _wrk, free_port, pct, wait_http  # noqa: E402

from masml.cohort import simulate  # noqa: E402
from masml.encoding import encode_inputs  # noqa: E402
from masml.schema import INPUT_NAMES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_bundle(out: Path, n: int) -> Path:
    """300 trees of depth 6 on simulated patients, Platt-calibrated, with its explainer; the manifest's
    inputs are the repository's onset bundle's (same canonical inputs)."""
    import xgboost as xgb

    from masml import shap_export
    from masml.bundle import write_bundle
    from masml.calibration import fit_calibrator
    from masml.features import feature_names, feature_spec, transform
    from masml.onnx_export import risk_model_to_onnx

    names = list(INPUT_NAMES)
    cohort = simulate(n, seed=5)
    x = encode_inputs(cohort.data, names)
    y = cohort.data["mas_onset"].to_numpy(dtype=float)
    spec = feature_spec(names, ["hscore"])
    params = {"objective": "binary:logistic", "max_depth": 6, "eta": 0.05, "nthread": 1, "seed": 0}
    t0 = time.perf_counter()
    dtrain = xgb.DMatrix(transform(x, spec), label=y, feature_names=feature_names(spec))
    booster = xgb.train(params, dtrain, 300)
    cal = fit_calibrator(booster.predict(dtrain, output_margin=True), y, "platt")
    model = risk_model_to_onnx(booster, spec, len(names), cal, input_names=names)
    explainer, section = shap_export.explainer_to_onnx(booster, spec, names)
    base = json.loads((REPO / "models" / "onset" / "manifest.json").read_text())
    assert [i["name"] for i in base["inputs"]] == names, "models/onset's inputs differ from masml.schema"
    manifest = {
        "task": "onset",
        "model_name": "bench-onset-300x6",
        "inputs": base["inputs"],
        "outputs": [{"name": "risk"}, {"name": "margin"}],
        "explainer": section,
    }
    ex_bytes = explainer.SerializeToString()
    write_bundle(out, model.SerializeToString(), manifest, ex_bytes)
    print(
        f"bundle: 300 trees of depth 6 on {n:,} patients, explainer.onnx {len(ex_bytes) / 1e6:.1f} MB, "
        f"built in {time.perf_counter() - t0:.0f} s"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="a bundle with explainer.onnx (default: build a 300x6 one)")
    ap.add_argument("--n", type=int, default=4000, help="patients to train the built bundle on")
    ap.add_argument("--latency-n", type=int, default=1000, help="timed calls per case")
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk run per case")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-explain-"))
    bundle = Path(args.bundle) if args.bundle else build_bundle(tmp / "models" / "onset", args.n)
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [i["name"] for i in manifest["inputs"]]
    specs = {i["name"]: i for i in manifest["inputs"]}
    frame = simulate(200, seed=11).data.reset_index(drop=True)
    x = encode_inputs(frame, names)
    patients = []
    for row in x[:10]:  # as a bedside app sends them: missing values left out, categories by label
        p = {}
        for name, v in zip(names, row.tolist(), strict=True):
            if v == v:
                cats = specs[name]["categories"]
                p[name] = cats[int(v)] if cats else v
        patients.append(p)
    task = manifest["task"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASML_SERVE_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--models", str(bundle.parent), "--port", str(port),
         "--log-level", "warning", "--audit-log", str(tmp / "audit.jsonl")],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_http(port, "/readyz", proc)
        k = len(names)
        lows = np.array([specs[n]["low"] or 0 for n in names], dtype=np.float32)
        one_row = np.where(np.isnan(x[:1]), lows, x[:1])  # OIP JSON has no NaN: gaps at the valid low
        oip = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1, k], "data": one_row.tolist()}]}
        cases = [
            ("REST /predict, 1 patient (no explanation)", f"/v1/models/{task}/predict", patients[:1], 1),
            ("REST /explain, 1 patient", f"/v1/models/{task}/explain", patients[:1], 1),
            ("REST /explain, 10 patients per call", f"/v1/models/{task}/explain", patients, 10),
            ("REST /predict explain:true, 1 patient", f"/v1/models/{task}/predict", patients[:1], 1),
            ("OIP /v2/.../explain, 1 row (JSON)", f"/v2/models/{task}/explain", None, 1),
        ]
        wrk = shutil.which("wrk") is not None
        head = f"{'case':<44} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms/patient':>15}"
        print("\n" + head + (f" {'wrk p50':>8} {'wrk p99':>8} {'wrk ms/patient':>15}" if wrk else ""))
        for label, path, pts, n in cases:
            if pts is None:
                body = json.dumps(oip).encode()
            else:
                extra = {"explain": True} if "explain:true" in label else {}
                body = json.dumps({"patients": pts, **extra}).encode()
            lat = asyncio.run(_latency(port, path, body, args.latency_n))
            line = f"{label:<44} {pct(lat, 50):8.3f} {pct(lat, 99):8.3f} {pct(lat, 50) / n:15.3f}"
            if wrk:
                p50, p99, _, bad = _wrk(port, path, body, 1, args.seconds, tmp)
                line += f" {p50:8.3f} {p99:8.3f} {p50 / n:15.3f}" + (f"  ({bad} non-200)" if bad else "")
            print(line)
        if not wrk:
            print("\n(wrk not found: `apt-get install wrk` adds the same cases timed by a C client)")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
