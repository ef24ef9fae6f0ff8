"""The risk pipelines end to end: real xgboost, real onnxruntime, real MLflow (SQLite and a server)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from masml.cohort import simulate, write_cohort
from masml.config import load_config
from masml.encoding import encode_inputs
from masml.io import load_dataset
from pipelines.risk import run_risk_pipeline

MASML = str(Path(sys.executable).with_name("masml"))
TINY = "tuning:\n  n_trials: 2\n  max_rounds: 120\nn_boot: 100\nfolds: 3\n"


def _tiny_config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(TINY + extra)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small cohort, a tiny config and a private SQLite tracking store."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data, _ = write_cohort(simulate(3_000, seed=21), tmp / "cohort.parquet")
    return {"tmp": tmp, "data": data, "config": _tiny_config(tmp), "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def onset_run(workspace):
    return _train_onset(workspace, "onset")


def _train_onset(workspace, out_name: str):
    """One onset run tracked in the workspace's private SQLite store."""
    os.environ["MLFLOW_TRACKING_URI"] = workspace["uri"]
    try:
        return run_risk_pipeline(
            "onset", workspace["data"], workspace["tmp"] / "models" / out_name,
            config_path=workspace["config"], log=lambda m: None,
        )  # fmt: skip
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_bundle_holds_graph_and_a_complete_manifest(onset_run):
    bundle = onset_run.bundle_dir
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest() == manifest["model_sha256"]
    for key in ("schema_version", "task", "label", "population", "inputs", "outputs", "thresholds", "metrics",
                "training_data", "versions", "created_at"):  # fmt: skip
        assert key in manifest, key
    names = [i["name"] for i in manifest["inputs"]]
    assert names[:3] == ["age_years", "sex", "trigger"]
    ferritin = next(i for i in manifest["inputs"] if i["name"] == "ferritin")
    assert ferritin["unit"] == "ng/mL" and ferritin["low"] == 1
    assert manifest["training_data"]["synthetic"] is True
    assert {"onnx", "onnxruntime", "masml", "xgboost"} <= set(manifest["versions"])
    # the explainer ships beside the model, checked at export and pinned by its own sha256
    explainer = bundle / manifest["explainer"]["file"]
    assert hashlib.sha256(explainer.read_bytes()).hexdigest() == manifest["explainer"]["sha256"]
    assert manifest["explainer"]["parity"]["max_abs_diff_contributions"] <= 1e-4
    assert manifest["explainer"]["input_names"] == names


def test_export_passed_the_parity_gate(onset_run):
    assert onset_run.parity["max_abs_diff_risk"] <= 1e-5
    assert onset_run.parity["n_threshold_rows"] > 0 and onset_run.parity["n_missing_rows"] > 0


def test_comparison_has_model_baselines_scores_and_ceiling(onset_run):
    models = set(onset_run.comparison["model"])
    assert {"model", "logistic_baseline", "ceiling", "hscore", "hlh2004", "ferritin"} <= models
    row = onset_run.comparison.set_index("model").loc["model"]
    assert 0.5 < row["auroc"] <= 1 and row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
    assert row["auroc_diff"] < 0.05  # the ceiling is the best possible: the model cannot beat it by much
    # The truth is calibrated: its error against itself is 0, and the model's is what the manifest says.
    assert onset_run.comparison.set_index("model").loc["ceiling", "ece_vs_truth"] == 0
    metrics = onset_run.manifest["metrics"]
    assert metrics["ece_vs_truth"] == row["ece_vs_truth"] and 0 < metrics["ece_floor"] < 0.1


def test_predict_scores_from_the_bundle_like_the_trained_model(onset_run, workspace):
    out = workspace["tmp"] / "pred.csv"
    r = subprocess.run(
        [MASML, "predict", str(onset_run.bundle_dir), "--data", str(workspace["data"]), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(out)
    assert list(pred.columns) == ["patient_id", "risk"]
    frame = load_dataset(workspace["data"])
    model = onset_run.extra["model"]
    expected = model.predict_risk(encode_inputs(frame, model.input_names))
    assert np.max(np.abs(pred["risk"].to_numpy() - expected)) <= 1e-5
    assert pred["risk"].between(0, 1).all()


def test_run_is_tracked_and_the_model_registered_as_champion(onset_run, workspace):
    from mlflow import MlflowClient

    client = MlflowClient(workspace["uri"])
    run = client.get_run(onset_run.run_id)
    assert "test.auroc.estimate" in run.data.metrics
    assert run.data.params["config.task"] == "onset"
    artifacts = {a.path for a in client.list_artifacts(onset_run.run_id)}
    assert {"bundle", "evaluation", "shap", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(onset_run.run_id, "plots")}
    assert {"plots/roc.png", "plots/calibration.png", "plots/decision_curve.png"} <= plots
    # the training data is logged as an MLflow dataset, with the bundle's fingerprint source
    source = onset_run.manifest["training_data"]["source"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [source]
    champion = client.get_model_version_by_alias("masml-onset", "champion")
    assert str(champion.version) == onset_run.registered_version
    # the registered ONNX model carries a signature (inputs [-1, K] float32; risk, margin) and an example
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = workspace["uri"]
    try:
        info = mlflow.models.get_model_info(f"models:/masml-onset/{champion.version}")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert info.signature is not None and info.saved_input_example_info is not None
    assert {o.name for o in info.signature.outputs.inputs} == {"risk", "margin"}


def test_champion_moves_only_for_a_better_model(onset_run, workspace):
    """Retraining with the same data, config and seed gives the same model: it cannot beat the champion."""
    from mlflow import MlflowClient

    again = _train_onset(workspace, "onset2")
    # Determinism: same data, config and seed -> identical graph and identical metrics.
    assert again.manifest["model_sha256"] == onset_run.manifest["model_sha256"]
    assert again.manifest["metrics"] == onset_run.manifest["metrics"]
    assert again.registered_version != onset_run.registered_version
    client = MlflowClient(workspace["uri"])
    champion = client.get_model_version_by_alias("masml-onset", "champion")
    assert str(champion.version) == onset_run.registered_version
    assert "kept" in again.champion_message


def test_icu_pipeline_skips_and_counts_rows_outside_its_population(workspace, tmp_path):
    """Also: HScore as a feature, computed inside the exported graph (the parity gate checks it)."""
    config = _tiny_config(tmp_path, "score_features: [hscore]\n")
    result = run_risk_pipeline(
        "icu", workspace["data"], workspace["tmp"] / "models" / "icu",
        config_path=config, log=lambda m: None, track=False,
    )  # fmt: skip
    assert result.extra["model"].feature_names[-1] == "hscore"
    assert result.parity["max_abs_diff_risk"] <= 1e-5
    report = result.extra["population"]
    frame = pd.read_parquet(workspace["data"])
    assert report.skipped_outside_population == int((frame["mas_onset"] == 0).sum())
    assert report.rows_used == int(frame["icu_admission"].notna().sum())
    assert result.manifest["population"]["rule"] == "mas_only"
    assert "ceiling" in set(result.comparison["model"])


def test_a_search_cut_short_by_the_timeout_is_said_in_the_log_the_run_and_the_card(workspace, tmp_path):
    """A ``tuning.timeout_s`` that stops the search makes the model depend on the machine's speed: the run
    must say so (a warning line, an MLflow tag and the trials run) and the card must not claim the
    planned number of trials."""
    from mlflow.tracking import MlflowClient

    config = tmp_path / "cut.yaml"
    config.write_text("tuning:\n  n_trials: 3\n  max_rounds: 60\n  timeout_s: 1.0e-9\nn_boot: 20\nfolds: 3\n")
    lines: list[str] = []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        result = run_risk_pipeline(
            "icu", workspace["data"], tmp_path / "icu", config_path=config, log=lines.append
        )
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert any(line.startswith("WARNING: icu: tuning.timeout_s") and "after 1 of 3 trials" in line
               for line in lines), lines  # fmt: skip
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.params["tuning.trials_run"] == "1"
    assert run.data.tags["tuning.stopped_by_timeout"] == "true"
    algorithm = result.extra["card"]["model"]["algorithm"]
    assert "1 of 3 planned trials" in algorithm and "3 trials," not in algorithm


def test_train_refuses_a_config_naming_an_unknown_column(workspace, tmp_path):
    bad = _tiny_config(tmp_path, "inputs: [ferritin, feritin]\n")
    args = [
        "train",
        "onset",
        "--data",
        str(workspace["data"]),
        "--config",
        str(bad),
        "--out",
        str(tmp_path / "m"),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": workspace["uri"]}
    r = subprocess.run([MASML, *args], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert "feritin" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def test_train_refuses_data_without_the_label(workspace, tmp_path):
    frame = pd.read_parquet(workspace["data"]).drop(columns=["icu_admission"])
    frame.to_parquet(tmp_path / "nolabel.parquet")
    with pytest.raises(Exception, match="icu_admission"):
        config = load_config(workspace["config"], "icu")
        run_risk_pipeline("icu", tmp_path / "nolabel.parquet", tmp_path / "m", config=config, track=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` process on loopback, with a SQLite backend and a local artifact store."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("mlflow server did not start within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_training_against_a_real_mlflow_server(workspace, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        result = run_risk_pipeline(
            "icu", workspace["data"], tmp_path / "icu", config_path=workspace["config"], log=lambda m: None
        )
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    client = MlflowClient(mlflow_server)
    assert client.get_run(result.run_id).data.metrics["test.auroc.estimate"] > 0.5
    assert (
        str(client.get_model_version_by_alias("masml-icu", "champion").version) == result.registered_version
    )
    import mlflow.onnx

    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.onnx.load_model("models:/masml-icu@champion")
    assert hashlib.sha256(loaded.SerializeToString()).hexdigest() == result.manifest["model_sha256"]


# ------------------------------------------------------------------------------------- the model card


def test_card_is_written_with_the_runs_own_numbers(onset_run):
    from masml.card import fmt

    bundle = onset_run.bundle_dir
    card = json.loads((bundle / "card.json").read_text())
    page = (bundle / "card.html").read_text()
    row = onset_run.comparison.set_index("model").loc["model"]
    assert card["performance"]["model"]["auroc"] == pytest.approx(row["auroc"])
    assert card["performance"]["model"]["calibration_slope"] == pytest.approx(row["calibration_slope"])
    assert card["model"]["bundle_sha256"] == onset_run.manifest["model_sha256"]
    assert card["model"]["version"] == onset_run.registered_version
    assert card["data"]["flow"]["test_rows"] == onset_run.manifest["metrics"]["test_rows"]
    # the page prints those numbers, warns loudly that the data are synthetic, and embeds its figures
    for value in (row["auroc"], row["auroc_lo"], row["auroc_hi"], row["calibration_slope"]):
        assert fmt(float(value)) in page
    assert 'id="synthetic"' in page and "SYNTHETIC DATA" in page
    assert page.count("data:image/png;base64,") >= 5 and "http://" not in page and "https://" not in page
    for threshold in onset_run.test_report["threshold_metrics"]:
        assert fmt(float(threshold["sensitivity"])) in page
    # the subgroup table is the run's, row for row, and the page prints its AUROCs
    subgroups = onset_run.extra["subgroups"]
    assert [(r["group"], r["level"], r["n"]) for r in card["subgroups"]["table"]] == list(
        zip(subgroups["group"], subgroups["level"], subgroups["n"], strict=True)
    )
    for value in subgroups["auroc"].dropna():
        assert fmt(float(value)) in page
    assert card["data"]["training"]["prevalence"] == pytest.approx(
        float(onset_run.extra["population"].prevalence), abs=0.02
    )
    items = [i["item"] for i in card["tripod_ai"]]
    assert len({i.rstrip("abc") for i in items}) == 27
    assert {i["status"] for i in card["tripod_ai"]} == {"reported", "not reported", "not applicable"}


def test_report_regenerates_the_card_from_a_bundle_and_from_a_run(onset_run, workspace, tmp_path):
    bundle = onset_run.bundle_dir
    html_out = tmp_path / "again.html"
    r = subprocess.run([MASML, "report", str(bundle), "--out", str(html_out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert html_out.read_text() == (bundle / "card.html").read_text()
    json_out = tmp_path / "from_run.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": workspace["uri"]}
    r = subprocess.run([MASML, "report", onset_run.run_id, "--out", str(json_out)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(json_out.read_text()) == json.loads((bundle / "card.json").read_text())
    bad = subprocess.run([MASML, "report", str(bundle), "--out", str(tmp_path / "card.docx")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "must end in .html, .pdf or .json" in bad.stderr + bad.stdout
