"""The `masml` command line, run as a user would: the installed executable in a subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

MASML = str(Path(sys.executable).with_name("masml"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MASML, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_command_has_help():
    top = run("--help")
    assert top.returncode == 0
    for command in ("cohort", "score", "validate", "main"):
        assert command in top.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0 and "Usage" in sub.stdout, command


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_cohort_writes_data_and_truth_apart_and_is_reproducible(tmp_path, ext):
    first, second = tmp_path / f"a.{ext}", tmp_path / f"b.{ext}"
    for path in (first, second):
        r = run("cohort", "--n", "800", "--seed", "3", "--out", str(path))
        assert r.returncode == 0, r.stderr
    truth = tmp_path / f"a.truth.{ext}"
    assert truth.exists() and "ceiling AUROC" in r.stdout
    data = pd.read_csv(first) if ext == "csv" else pd.read_parquet(first)
    assert len(data) == 800 and not [c for c in data.columns if c.startswith("true_")]
    if ext == "csv":  # byte-identical files for the same seed
        assert sha(first) == sha(second)


def test_cohort_into_a_folder_writes_partitions_with_truth_alike(tmp_path):
    folder = tmp_path / "parts"
    r = run("cohort", "--n", "900", "--seed", "4", "--out", str(folder), "--partitions", "3")
    assert r.returncode == 0, r.stderr
    files = sorted(folder.glob("*.parquet"))
    truths = sorted((tmp_path / "parts.truth").glob("*.parquet"))
    assert [f.name for f in files] == [f.name for f in truths] == [f"part-0000{i}.parquet" for i in range(3)]
    data = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    truth = pd.concat([pd.read_parquet(f) for f in truths], ignore_index=True)
    assert len(data) == 900 and data["patient_id"].tolist() == truth["patient_id"].tolist()
    again = run("cohort", "--n", "900", "--seed", "4", "--out", str(folder))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_cohort_output_validates_and_its_truth_is_refused_as_input(tmp_path):
    path = tmp_path / "c.csv"
    assert run("cohort", "--n", "500", "--seed", "1", "--out", str(path)).returncode == 0
    ok = run("validate", str(path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    merged = pd.read_csv(path).merge(pd.read_csv(tmp_path / "c.truth.csv"), on="patient_id")
    merged.to_csv(tmp_path / "leak.csv", index=False)
    refused = run("validate", str(tmp_path / "leak.csv"))
    assert refused.returncode == 1
    assert "true_p_mas_onset" in refused.stderr


def test_validate_reports_bad_input_with_column_value_and_expectation(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "patient_id,age_years,sex,trigger,ferritin,platelets,temperature_c\n"
        "p1,40,F,sepsis,-5,50000,60\n"
        "p2,30,M,lymphoma,1200,150,38.5\n"
    )
    r = run("validate", str(bad))
    assert r.returncode == 1
    for expected in ("ferritin", "platelets", "temperature_c", "trigger", "sepsis", "50000"):
        assert expected in r.stderr, expected
    assert "Traceback" not in r.stderr


def test_score_adds_every_score_with_units_converted(tmp_path):
    data = tmp_path / "c.csv"
    assert run("cohort", "--n", "300", "--seed", "2", "--out", str(data)).returncode == 0
    frame = pd.read_csv(data)
    local = frame.copy()
    local["fibrinogen"] = local["fibrinogen"] / 100  # mg/dL -> g/L
    local["triglycerides"] = local["triglycerides"] / 88.57  # mg/dL -> mmol/L
    local.to_csv(tmp_path / "local.csv", index=False)
    (tmp_path / "units.yaml").write_text("fibrinogen: g/L\ntriglycerides: mmol/L\n")
    r1 = run("score", str(data), "--out", str(tmp_path / "s1.csv"))
    r2 = run(
        "score",
        str(tmp_path / "local.csv"),
        "--units",
        str(tmp_path / "units.yaml"),
        "--out",
        str(tmp_path / "s2.csv"),
    )
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    s1, s2 = pd.read_csv(tmp_path / "s1.csv"), pd.read_csv(tmp_path / "s2.csv")
    for col in ("hscore", "hlh2004", "mas2016", "ms_score", "dic_isth", "hbd_dic", "mals_ferritin"):
        assert col in s1.columns
        pd.testing.assert_series_equal(s1[col], s2[col], check_exact=False, rtol=1e-9)
    assert len(s1) == 300


def test_unknown_unit_is_a_clear_error(tmp_path):
    data = tmp_path / "c.csv"
    assert run("cohort", "--n", "100", "--seed", "2", "--out", str(data)).returncode == 0
    (tmp_path / "units.yaml").write_text("fibrinogen: furlongs\n")
    r = run("score", str(data), "--units", str(tmp_path / "units.yaml"), "--out", str(tmp_path / "s.csv"))
    assert r.returncode != 0
    assert "fibrinogen" in r.stderr and "furlongs" in r.stderr and "Traceback" not in r.stderr


def test_main_job_generates_the_cohort_and_trains_every_model(tmp_path):
    """The README's main job, on a small cohort with tiny tuning budgets (same code path, less time)."""
    configs = tmp_path / "configs"
    configs.mkdir()
    tiny = "tuning:\n  n_trials: 1\n  max_rounds: 60\nn_boot: 50\nfolds: 2\n"
    for task in ("onset", "icu", "il1_benefit"):
        (configs / f"{task}.yaml").write_text(tiny)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = ["main", "--n", "3000", "--data-dir", "data", "--models-dir", "models"]
    args += ["--config-dir", str(configs)]
    r = subprocess.run([MASML, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "data" / "cohort.parquet").exists()
    assert (tmp_path / "data" / "cohort.truth.parquet").exists()
    assert "MAS (present or within 7 days)" in r.stdout
    for task in ("onset", "icu", "il1_benefit"):
        assert (tmp_path / "models" / task / "model.onnx").is_file(), task
    assert "onset: held-out performance" in r.stdout and "ceiling" in r.stdout


def test_printed_comparison_shows_slope_and_ece_with_their_intervals():
    from masml import cli

    rows = pd.DataFrame(
        [
            {"model": "xgboost", "rows": 500, "auroc": 0.9, "auroc_lo": 0.88, "auroc_hi": 0.92,
             "calibration_slope": 1.02, "calibration_slope_lo": 0.91, "calibration_slope_hi": 1.13,
             "ece": 0.021, "ece_lo": 0.012, "ece_hi": 0.034},
            {"model": "hscore", "rows": 500, "auroc": 0.8, "auroc_lo": 0.77, "auroc_hi": 0.83,
             "calibration_slope": float("nan"), "ece": float("nan"), "ece_lo": float("nan"),
             "ece_hi": float("nan")},
        ]
    )  # fmt: skip
    with cli.out.capture() as captured:
        cli._print_comparison("onset", rows)
    text = captured.get()
    assert "1.020 [0.910, 1.130]" in text and "0.021 [0.012, 0.034]" in text
    assert "hscore" in text and "nan" not in text.lower()
