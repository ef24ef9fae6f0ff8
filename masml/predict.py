"""Scoring from a bundle alone: the manifest says which inputs, in which order; onnxruntime runs the graph.

Why not the trained Python objects: what a hospital deploys is the bundle, so ``masml predict`` scores
exactly what the service will score, and a bundle that cannot score here cannot ship.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from masml.bundle import read_bundle
from masml.encoding import encode_inputs


def onnx_session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # deterministic, and one row never needs more
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


# Rows per onnxruntime call. Why not all at once: above its small-batch size the scoring graph writes
# every tree's leaf to its own column before summing them in order (masml/onnx_export.py ``_trees``), so
# one call holds two float32 matrices of rows x trees: 1.7 GB for a 250,000-row partition of an 844-tree
# model, which was the peak memory of one-process training at a million patients (its parity gate) and
# of cluster scoring. A row's outputs do not depend on the other rows of its call, so the results are
# the same, bit for bit. ``score_frame`` goes further and uses the manifest's ``small_batch_rows``.
ROWS_PER_RUN = 16_384


def run_rows(session, outputs: list[str], x: np.ndarray, rows: int = ROWS_PER_RUN) -> list[np.ndarray]:
    """``session.run(outputs, {input: x})``, ``rows`` rows at a time, each output flattened. Flattened,
    not shaped to [N]: a graph that returns the wrong number of values is the caller's to report (the
    parity gates say how many they got)."""
    name = session.get_inputs()[0].name
    if len(x) <= rows:
        return [np.asarray(v).reshape(-1) for v in session.run(outputs, {name: x})]
    parts = [session.run(outputs, {name: x[i : i + rows]}) for i in range(0, len(x), rows)]
    return [np.concatenate([np.asarray(p[j]).reshape(-1) for p in parts]) for j in range(len(outputs))]


def predict_frame(bundle_dir: str | Path, frame: pd.DataFrame) -> pd.DataFrame:
    """``patient_id`` and every output the manifest declares (``risk``; or ``benefit`` and the risks)."""
    manifest, model = read_bundle(bundle_dir)
    return score_frame(manifest, onnx_session(model), frame)


def score_frame(manifest: dict, session, frame: pd.DataFrame) -> pd.DataFrame:
    """``predict_frame`` for a bundle already read and a session already made (a cluster's workers
    score many partitions with one session each)."""
    names = [i["name"] for i in manifest["inputs"]]
    x = encode_inputs(frame, names)
    wanted = [o["name"] for o in manifest["outputs"]]
    # calls of the graph's small-batch size take its cheaper single-target ensemble (same values)
    values = run_rows(session, wanted, x, manifest.get("small_batch_rows") or ROWS_PER_RUN)
    out = pd.DataFrame({"patient_id": frame["patient_id"].to_numpy()})
    for name, v in zip(wanted, values, strict=True):
        out[name] = np.asarray(v, dtype=np.float64).reshape(len(frame))
    if manifest.get("guardrails"):  # the benefit model: its cautions travel with every prediction
        from masml.guardrails import evaluate, summary_column

        outputs = {name: out[name].to_numpy() for name in wanted}
        status = evaluate(manifest["guardrails"], frame.reset_index(drop=True), outputs)
        out["guardrails"] = summary_column(status).to_numpy()
    return out
