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
    values = session.run(wanted, {session.get_inputs()[0].name: x})
    out = pd.DataFrame({"patient_id": frame["patient_id"].to_numpy()})
    for name, v in zip(wanted, values, strict=True):
        out[name] = np.asarray(v, dtype=np.float64).reshape(len(frame))
    if manifest.get("guardrails"):  # the benefit model: its cautions travel with every prediction
        from masml.guardrails import evaluate, summary_column

        outputs = {name: out[name].to_numpy() for name in wanted}
        status = evaluate(manifest["guardrails"], frame.reset_index(drop=True), outputs)
        out["guardrails"] = summary_column(status).to_numpy()
    return out
