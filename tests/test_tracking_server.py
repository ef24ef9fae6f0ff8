"""MLflow as a team server: masml's real pipeline against a real `mlflow server` on loopback.

The server has a SQLite backend and proxies artifacts (``--serve-artifacts``) to its own folder, so every
file a run logs and every model a deployment loads travels over HTTP, as it does for a team whose
members never see the server's disk. The client's working directory must stay empty: a run that quietly
fell back to a local store would pass every other check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from masml import tracking
from masml.cli import app
from masml.cohort import simulate, write_cohort
from masml.encoding import encode_inputs
from masml.io import load_dataset
from masml.predict import onnx_session
from masml.tracking import TrackingServerUnreachable
from pipelines.risk import run_risk_pipeline

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
TINY = "tuning:\n  n_trials: 1\n  max_rounds: 60\nn_boot: 50\nfolds: 2\n"
MODEL = "masml-onset"  # the onset config's registered_model
START_TIMEOUT_S = 120  # ~5 s on an idle 2-core machine; generous for a loaded one
STOP_TIMEOUT_S = 30


@dataclass
class Server:
    url: str
    root: Path  # the server's working directory
    artifacts: Path  # --artifacts-destination
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:]


def _stop(proc: subprocess.Popen) -> None:
    """TERM, then KILL, the server's process group (the `mlflow` CLI starts uvicorn as a child)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server`: SQLite backend, proxied artifact store, one worker, no job runner."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    artifacts = root / "artifacts"
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(artifacts), "--serve-artifacts",
    ]  # fmt: skip
    with log.open("wb") as sink:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with code {proc.returncode}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server gave no /health in {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(0.25)
        yield Server(url, root, artifacts, log)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def team(server, tmp_path_factory):
    """The client side: MLFLOW_TRACKING_URI names the server, and the working directory is an empty folder
    (where a silent fallback to a local store would leave mlflow.db, mlruns/ or mlartifacts/)."""
    import mlflow

    tmp = tmp_path_factory.mktemp("team")
    data, _ = write_cohort(simulate(3_000, seed=21), tmp / "cohort.parquet")
    config = tmp / "tiny.yaml"
    config.write_text(TINY)
    workdir = tmp / "workdir"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.url)
        mp.chdir(workdir)
        try:
            yield {"tmp": tmp, "data": data, "config": config, "workdir": workdir}
        finally:
            mlflow.set_tracking_uri(None)  # mlflow keeps the URI in a global: later modules must not see it


@pytest.fixture(scope="module")
def first(team):
    """The first onset run on a fresh server: it becomes the first champion."""
    out = team["tmp"] / "models" / "onset"
    return run_risk_pipeline("onset", team["data"], out, config_path=team["config"], log=lambda m: None)


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def _on_server_disk(server, artifact_uri: str) -> Path:
    """Where the server keeps a proxied artifact URI (``mlflow-artifacts:/<path>``)."""
    assert artifact_uri.startswith("mlflow-artifacts:"), artifact_uri  # proxied, not a client-side path
    return server.artifacts / artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_params_metrics_and_artifacts_live_on_the_server(server, team, first):
    client = _client(server)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["config.task"] == "onset" and run.data.params["config.tuning.n_trials"] == "1"
    assert run.data.metrics["test.auroc.estimate"] == first.manifest["metrics"]["auroc"]["estimate"]
    assert run.data.metrics["parity_max_abs_diff"] <= 1e-5
    assert run.data.tags["champion"] == "True"
    listed = {a.path for a in client.list_artifacts(first.run_id)}  # over HTTP
    assert {"bundle", "plots", "shap", "evaluation", "card"} <= listed
    # ...and on the server's disk, under its artifact destination, byte for byte what the client wrote
    stored = _on_server_disk(server, run.info.artifact_uri)
    bundle = first.bundle_dir
    for name in ("model.onnx", "explainer.onnx", "manifest.json"):
        assert _sha(stored / "bundle" / name) == _sha(bundle / name), name
    assert _sha(stored / "bundle" / "model.onnx") == first.manifest["model_sha256"]
    card = json.loads((stored / "card" / "card.json").read_text())
    assert card == json.loads((bundle / "card.json").read_text())
    for name in ("card/card.html", "plots/roc.png", "plots/calibration.png", "evaluation/evaluation.json"):
        assert (stored / name).stat().st_size > 0, name
    # nothing was written on the client's side, nor beside the server outside its two stores
    assert sorted(p.name for p in team["workdir"].iterdir()) == []
    assert not (server.root / "mlruns").exists() and not (server.root / "mlartifacts").exists()


def test_the_model_is_registered_with_the_champion_alias_and_stored_on_the_server(server, first):
    client = _client(server)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == first.registered_version == "1"
    assert champion.run_id == first.run_id
    assert champion.source.startswith("models:/m-")  # MLflow 3: the version points at a logged model
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))
    stored = _on_server_disk(server, logged.artifact_location)
    assert [_sha(p) for p in stored.rglob("*.onnx")] == [first.manifest["model_sha256"]]
    assert (stored / "MLmodel").is_file()


def test_the_champion_loads_over_http_and_predicts_like_the_bundle(server, team, first):
    """What a deployment does: fetch `models:/NAME@champion` from the server and score with it."""
    import mlflow.artifacts
    import mlflow.onnx
    import mlflow.pyfunc

    names = [i["name"] for i in first.manifest["inputs"]]
    x = encode_inputs(load_dataset(team["data"]).head(300), names)
    assert np.isnan(x).any()  # missing values travel through the loaded model too
    session = onnx_session((first.bundle_dir / "model.onnx").read_bytes())
    risk, margin = session.run(["risk", "margin"], {session.get_inputs()[0].name: x})

    proto = mlflow.onnx.load_model(f"models:/{MODEL}@champion")
    assert hashlib.sha256(proto.SerializeToString()).hexdigest() == first.manifest["model_sha256"]
    loaded = onnx_session(proto.SerializeToString())
    np.testing.assert_allclose(loaded.run(["risk"], {loaded.get_inputs()[0].name: x})[0], risk, atol=1e-6)

    predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(x)
    np.testing.assert_allclose(np.ravel(predicted["risk"]), np.ravel(risk), atol=1e-6)
    np.testing.assert_allclose(np.ravel(predicted["margin"]), np.ravel(margin), atol=1e-6)

    # masml serve needs the whole bundle (manifest, explainer): the champion's run holds it
    champion = _client(server).get_model_version_by_alias(MODEL, "champion")
    fetched = Path(mlflow.artifacts.download_artifacts(
        run_id=champion.run_id, artifact_path="bundle", dst_path=str(team["tmp"] / "fetched")
    ))  # fmt: skip
    for name in ("model.onnx", "explainer.onnx", "manifest.json"):
        assert _sha(fetched / name) == _sha(first.bundle_dir / name), name
    assert sorted(p.name for p in team["workdir"].iterdir()) == []


def test_a_second_run_is_compared_with_the_champion_over_http(server, team, first):
    """`masml train` again, same data, config and seed: the same model, which cannot beat the champion it
    downloads from the server and scores on the same held-out patients; the alias stays."""
    out = team["tmp"] / "models" / "onset-again"
    args = ["train", "onset", "--data", str(team["data"]), "--config", str(team["config"]), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    said = " ".join(result.output.split())  # rich wraps long lines
    pattern = r"MLflow run (\w+), masml-onset v(\d+): champion v(\d+) \((\S+)\) kept; v\d+ scored (\S+)"
    found = re.search(pattern, said)
    assert found, said[-2000:]
    run_id, version, champion_version, champion_score, new_score = found.groups()
    assert (version, champion_version) == ("2", first.registered_version)
    assert champion_score == new_score  # the champion's graph, fetched over HTTP, scored the same data
    assert float(champion_score) == pytest.approx(first.manifest["metrics"]["auroc"]["estimate"], abs=1e-3)
    assert json.loads((out / "manifest.json").read_text())["model_sha256"] == first.manifest["model_sha256"]
    client = _client(server)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first.registered_version
    assert client.get_run(run_id).data.tags["champion"] == "False"
    assert {str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")} == {"1", "2"}


def test_report_downloads_the_card_over_http(server, team, first):
    out = team["tmp"] / "from-server.html"
    result = CliRunner().invoke(app, ["report", first.run_id, "--out", str(out)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert out.read_text() == (first.bundle_dir / "card.html").read_text()
    unknown = CliRunner().invoke(app, ["report", "0" * 32, "--out", str(team["tmp"] / "none.html")])
    assert unknown.exit_code == 2
    assert server.url in " ".join(unknown.output.split()) and not (team["tmp"] / "none.html").exists()


# mlflow's own retries on a refused connection sleep 0+4+8+16+32+64+120 s: if masml's check went away, this
# test would fail on the timeout instead of stalling the suite.
@pytest.mark.timeout(200)
def test_a_server_that_does_not_answer_fails_in_seconds_naming_the_uri(team, monkeypatch):
    """The user's server is down (or the URI mistyped): training stops before it starts, with a message
    naming the URI, in seconds rather than after mlflow's minutes of retries or a wasted training run."""
    with socket.socket() as held:  # bound but not listening: connections are refused, and no one can take it
        held.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{held.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
        out = team["tmp"] / "models" / "onset-unreachable"
        args = ["train", "onset", "--data", str(team["data"]), "--config", str(team["config"])]
        result = CliRunner().invoke(app, [*args, "--out", str(out)])
        with pytest.raises(TrackingServerUnreachable, match="Connection refused"):
            tracking.check_server()
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert dead in message and "MLFLOW_TRACKING_URI" in message and "Connection refused" in message
    assert not out.exists()  # nothing was trained for a run that could not be tracked
