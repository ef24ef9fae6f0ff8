"""MLflow tracking: every pipeline run is one MLflow run, and its ONNX model a registered version.

Why MLflow's own API and store: hospital data scientists already read MLflow runs, and the registry's
``champion`` alias is how a deployment knows which version to serve. Default store: a local SQLite file
(``sqlite:///mlflow.db`` in the working directory); ``MLFLOW_TRACKING_URI`` points it at a team server.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION = "champion"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingServerUnreachable(RuntimeError):
    """The tracking server named by ``MLFLOW_TRACKING_URI`` does not answer."""


def check_server(uri: str | None = None, timeout_s: float = 10.0) -> None:
    """Fail in seconds, naming the URI, when nothing answers at an HTTP tracking URI.

    Why: mlflow's client retries a refused or timed-out connection with exponential backoff for about
    four minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7) before it raises a long urllib3 message;
    to a user whose server is down, or whose URI has a typo, that looks like a hang. Only a failed
    connection is refused here: any HTTP answer (401 from an authenticating server, 404 behind a path
    prefix), a TLS error (TLS settings are mlflow's to apply) or a slow answer is left to mlflow.
    """
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as err:  # raised while connecting: nothing answered
        if isinstance(err.reason, ssl.SSLError):
            return
        raise TrackingServerUnreachable(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: {err.reason}. Start the "
            f"server (docs/team-tracking.md), correct MLFLOW_TRACKING_URI, or unset it to track in "
            f"{DEFAULT_TRACKING_URI}."
        ) from None
    except OSError:  # connected, then slow or cut off while answering: mlflow's retries apply
        return


@contextmanager
def run(experiment: str, run_name: str, tags: dict[str, str] | None = None) -> Iterator:
    """An MLflow run in ``experiment`` (created on first use) against the configured tracking store."""
    import mlflow

    check_server()
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags or {}) as active:
        yield active


def log_files(run_id: str, paths, artifact_path: str) -> None:
    """Add files to a finished run (the model card is written after the run's registry step)."""
    import mlflow

    check_server()
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path)


def flat_metrics(prefix: str, report: dict) -> dict[str, float]:
    """Scalar metrics of an evaluation report, flattened to MLflow metric names (``test.auroc``...)."""
    out: dict[str, float] = {}

    def walk(key: str, value) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, int | float | np.floating | np.integer):
            if np.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}.{k}", v)
        elif isinstance(value, list | tuple) and len(value) == 3 and all(_is_number(v) for v in value):
            for name, v in zip(("", ".ci_low", ".ci_high"), value, strict=True):
                walk(f"{key}{name}", v)

    walk(prefix, report)
    return out


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def log_dataset(frame, name: str, label: str, context: str) -> None:
    import mlflow

    dataset = mlflow.data.from_pandas(frame, name=name, targets=label)
    # ``schema`` is a cached property: filled here, mlflow never runs its own inference (see frame_schema)
    dataset.__dict__["schema"] = frame_schema(frame)
    mlflow.log_input(dataset, context=context)


def frame_schema(frame):
    """The MLflow schema ``mlflow.data.from_pandas`` would infer for ``frame``, without its per-value loops.

    Why: mlflow 3.x decides each column's ``required`` flag by testing every value in Python, and the
    type of a string column by looking at every value; on 1M training rows (40 columns) that took 38 s,
    and on 5M about five minutes and the run's peak memory. Here ``required`` is ``notna().all()`` (the
    same test, vectorised), a pandas string column is typed ``string`` from its dtype, and any other
    column keeps mlflow's own inference (fast for numeric dtypes). Equality with mlflow's schema is
    tested on frames with missing values in every kind of column."""
    import pandas as pd
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.utils import _infer_pandas_column

    specs = []
    for name in frame.columns:
        col = frame[name]
        if isinstance(col.dtype, pd.StringDtype):
            kind = DataType.string
        else:
            kind = _infer_pandas_column(col)
        specs.append(ColSpec(type=kind, name=name, required=not bool(col.isna().any())))
    return Schema(specs)


def log_json(obj, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(json.dumps(obj, indent=2, default=float), artifact_file)


def log_onnx_model(
    model_bytes: bytes, x_example: np.ndarray, outputs: dict[str, np.ndarray], registered: str
):
    """Log the bundle's graph as an MLflow ONNX model (signature + input example) and register it."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    signature = infer_signature(x_example, {k: np.asarray(v) for k, v in outputs.items()})
    info = mlflow.onnx.log_model(
        onnx.load_from_string(model_bytes),
        name="model",
        signature=signature,
        input_example=x_example,
        onnx_execution_providers=["CPUExecutionProvider"],
        pip_requirements=["onnxruntime", "onnx", "numpy"],
    )
    return mlflow.register_model(info.model_uri, registered)


def promote_if_better(
    registered: str, version: str, new_score: float, score_champion: Callable[[bytes], float]
) -> tuple[bool, str]:
    """Move the ``champion`` alias to ``version`` only if it beats the current champion on the same
    held-out data (``score_champion`` scores the champion's ONNX graph on it; higher is better)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    try:
        current = client.get_model_version_by_alias(registered, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is None:
        client.set_registered_model_alias(registered, CHAMPION, version)
        return True, f"version {version} is the first champion of {registered}"
    champion_bytes = _model_bytes(f"models:/{registered}@{CHAMPION}")
    try:
        old_score = score_champion(champion_bytes)
    except Exception as err:  # e.g. the champion takes other inputs: no like-for-like comparison exists
        return False, (
            f"champion v{current.version} kept: it cannot score this held-out data ({type(err).__name__}: "
            f"{str(err)[:200]}), so v{version} ({new_score:.4f}) was not compared; move the alias by hand"
        )
    if new_score > old_score:
        client.set_registered_model_alias(registered, CHAMPION, version)
        old = current.version
        return True, f"version {version} ({new_score:.4f}) beats champion v{old} ({old_score:.4f})"
    return False, f"champion v{current.version} ({old_score:.4f}) kept; v{version} scored {new_score:.4f}"


def _model_bytes(uri: str) -> bytes:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(uri))
    files = sorted(local.rglob("*.onnx"))
    if not files:
        raise FileNotFoundError(f"no .onnx file in {uri}")
    return files[0].read_bytes()
