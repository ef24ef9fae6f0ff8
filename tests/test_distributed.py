"""masml on a real Dask LocalCluster (2 worker processes): partitioned validation, training with
xgboost.dask, batch scoring through the bundle, and what happens when a worker dies mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_serve_support import TINY, tiny_bundle

from masml import evaluation
from masml.bundle import data_fingerprint, read_bundle
from masml.cohort import simulate, write_cohort
from masml.config import config_from_dict
from masml.distributed.cluster import ClusterError, WorkerLostError, connect, parse_spec
from masml.distributed.data import PartitionedSchemaError, load_partitioned
from masml.distributed.predict import predict_partitioned
from masml.io import load_dataset
from masml.predict import predict_frame
from masml.units import UnitError
from masml.validation import validate

MASML = str(Path(sys.executable).with_name("masml"))
pytestmark = pytest.mark.slow


def write_parts(folder: Path, frames: list[pd.DataFrame], row_group_size: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        pq.write_table(table, folder / f"part-{i:03d}.parquet", row_group_size=row_group_size)
    return folder


@pytest.fixture(scope="module")
def client():
    with connect("local") as c:
        yield c


@pytest.fixture(scope="module")
def cohort():
    return simulate(3000, seed=5)


def test_cluster_spec_is_checked():
    assert parse_spec("local") == ("local", 2)
    assert parse_spec("local:3") == ("local", 3)
    assert parse_spec("tcp://10.0.0.1:8786") == ("tcp://10.0.0.1:8786", None)
    for bad in ("", "locale", "local:0", "local:x", "10.0.0.1:8786", "http://host:8786"):
        with pytest.raises(ClusterError, match="expected 'local'|local:N"):
            parse_spec(bad)


def test_an_unreachable_scheduler_is_a_clear_error():
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at tcp://127.0.0.1:9 "):
        with connect("tcp://127.0.0.1:9", timeout_s=3):
            pass
    assert time.monotonic() - started < 60


def test_partitions_validate_like_one_file(client, cohort, tmp_path):
    data = cohort.data
    folder = write_parts(tmp_path / "ok", [data.iloc[:1000], data.iloc[1000:2200], data.iloc[2200:]], 400)
    loaded = load_partitioned(client, folder, require_labels=("mas_onset",))
    assert len(loaded.pieces) == 3 + 3 + 2  # row groups of 400 rows
    assert loaded.rows == len(data)
    whole = loaded.frame.compute().reset_index(drop=True)
    expected = validate(data, require_labels=("mas_onset",))
    pd.testing.assert_frame_equal(whole, expected.reset_index(drop=True), check_dtype=False)


def test_partition_descriptions_merge_into_the_whole_even_with_an_empty_partition(cohort):
    from masml.card import data_description, description_counts, merge_descriptions

    frame = validate(cohort.data, require_labels=("mas_onset",))
    inputs, parts = ["ferritin", "platelets", "esr"], [frame.iloc[:1200], frame.iloc[:0], frame.iloc[1200:]]
    merged = merge_descriptions([description_counts(p, inputs, "mas_onset") for p in parts])
    whole = data_description(frame, inputs, "mas_onset")
    assert merged["age_median"] == pytest.approx(whole.pop("age_median"), abs=0.05)  # 0.1-year steps
    merged.pop("age_median")
    assert merged.keys() == whole.keys()
    for key in ("rows", "events", "prevalence", "missingness"):
        assert merged[key] == pytest.approx(whole[key])
    for key in ("trigger", "trigger_family", "age_band", "sex"):
        assert sorted(merged[key], key=lambda r: r["level"]) == sorted(whole[key], key=lambda r: r["level"])


def test_local_units_are_converted_on_the_workers_as_on_one_process(client, cohort, tmp_path):
    local = cohort.data.copy()
    local["fibrinogen"] = local["fibrinogen"] / 100.0  # mg/dL -> g/L, as a laboratory would report it
    units = tmp_path / "units.yaml"
    units.write_text("fibrinogen: g/L\n")
    folder = write_parts(tmp_path / "units", [local.iloc[:1700], local.iloc[1700:]])
    loaded = load_partitioned(client, folder, units)
    (tmp_path / "one.parquet").write_bytes((folder / "part-000.parquet").read_bytes())
    expected = load_dataset(tmp_path / "one.parquet", units)
    got = loaded.frame.compute().reset_index(drop=True).iloc[:1700]
    pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_dtype=False)
    assert any("fibrinogen converted from g/L" in n for n in loaded.notes)
    (tmp_path / "bad.yaml").write_text("fibrinogen: furlongs\n")
    with pytest.raises(UnitError, match="fibrinogen"):
        load_partitioned(client, folder, tmp_path / "bad.yaml")


def test_every_problem_of_every_partition_is_reported_with_its_file_row(client, cohort, tmp_path):
    data = cohort.data.copy()
    a, b, c = data.iloc[:1000].copy(), data.iloc[1000:2000].copy(), data.iloc[2000:].copy()
    b["ferritin"] = b["ferritin"].map(lambda v: "" if v != v else repr(float(v))).astype(object)
    b.iloc[849, b.columns.get_loc("ferritin")] = ">2000"  # file row 850, in its third row group
    c.iloc[9, c.columns.get_loc("trigger")] = "leishmania"  # file row 10
    folder = write_parts(tmp_path / "bad", [a, b, c], row_group_size=400)
    with pytest.raises(PartitionedSchemaError) as caught:
        load_partitioned(client, folder)
    err = caught.value
    assert set(err.by_file) == {str(folder / "part-001.parquet"), str(folder / "part-002.parquet")}
    [ferritin] = err.by_file[str(folder / "part-001.parquet")]
    assert (ferritin.column, ferritin.check, ferritin.n_rows) == ("ferritin", "not_numeric", 1)
    assert ferritin.examples[0].row == 850 and ferritin.examples[0].value == ">2000"
    assert ferritin.examples[0].patient_id == b["patient_id"].iloc[849]
    [trigger] = err.by_file[str(folder / "part-002.parquet")]
    assert (trigger.check, trigger.examples[0].row) == ("not_in_vocabulary", 10)
    text = str(err)
    assert "2 problems in 2 of 3 files" in text and "part-001.parquet" in text and "'>2000'" in text


def test_a_patient_id_in_two_partitions_is_reported(client, cohort, tmp_path):
    a, b = cohort.data.iloc[:1500].copy(), cohort.data.iloc[1500:].copy()
    b.iloc[7, b.columns.get_loc("patient_id")] = a["patient_id"].iloc[3]
    folder = write_parts(tmp_path / "dup", [a, b])
    with pytest.raises(PartitionedSchemaError) as caught:
        load_partitioned(client, folder)
    rows = {file: [e.row for e in ps[0].examples] for file, ps in caught.value.by_file.items()}
    assert rows == {str(folder / "part-000.parquet"): [4], str(folder / "part-001.parquet"): [8]}
    assert all(ps[0].check == "duplicate_id" for ps in caught.value.by_file.values())


def test_batch_scoring_matches_one_process_with_a_file_per_partition(client, tmp_path_factory, tmp_path):
    data_path, models = tiny_bundle(tmp_path_factory)
    frame = load_dataset(data_path)
    folder = write_parts(tmp_path / "in", [frame.iloc[:700], frame.iloc[700:1500], frame.iloc[1500:]], 300)
    result = predict_partitioned(client, models / "onset", folder, tmp_path / "out")
    assert result.rows == len(frame) and result.partitions == 3 + 3 + 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"part-{i:05d}.parquet" for i in range(8)]
    assert not list(tmp_path.glob(".out.*"))  # the staging folder is gone
    scored = pd.concat([pd.read_parquet(p) for p in result.files], ignore_index=True)
    expected = predict_frame(models / "onset", frame).drop(columns=["margin"])
    pd.testing.assert_frame_equal(scored, expected, check_exact=True)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        predict_partitioned(client, models / "onset", folder, tmp_path / "out")


def _kill_a_worker_when(client, ready, timeout_s: float = 120) -> dict:
    """Start a watcher that SIGKILLs one worker process as soon as ``ready()`` holds."""
    pids = client.run(os.getpid)
    state = {"killed": None}

    def watch() -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if ready():
                address, pid = sorted(pids.items())[-1]
                os.kill(pid, signal.SIGKILL)
                state["killed"] = address
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return state


def _processing(client, prefix: str) -> bool:
    """Whether a task whose key starts with ``prefix`` is running (xgboost 3.2 names its per-worker
    training tasks ``fn-<uuid>``)."""
    keys = client.run_on_scheduler(
        lambda dask_scheduler: [str(t.key) for t in dask_scheduler.tasks.values() if t.state == "processing"]
    )
    return any(k.startswith(prefix) for k in keys)


def test_batch_scoring_recovers_when_a_worker_dies_mid_job(tmp_path_factory, tmp_path):
    data_path, models = tiny_bundle(tmp_path_factory)
    frame = load_dataset(data_path)
    copies = [frame.assign(patient_id=frame["patient_id"] + f"-{k}") for k in range(40)]
    big = pd.concat(copies, ignore_index=True)  # 80,000 patients in 40 files
    step = len(frame)
    folder = write_parts(tmp_path / "in", [big.iloc[k * step : (k + 1) * step] for k in range(40)])
    out = tmp_path / "out"
    with connect("local") as c:
        staging = lambda: [p for p in tmp_path.glob(".out.*") if len(list(p.iterdir())) >= 2]  # noqa: E731
        state = _kill_a_worker_when(c, lambda: bool(staging()))
        result = predict_partitioned(c, models / "onset", folder, out)
    assert state["killed"], "the worker was never killed: the test did not exercise a failure"
    scored = pd.concat([pd.read_parquet(p) for p in result.files], ignore_index=True)
    assert result.rows == len(big) == len(scored) and scored["patient_id"].is_unique
    expected = predict_frame(models / "onset", big).drop(columns=["margin"])
    pd.testing.assert_frame_equal(scored, expected, check_exact=True)


@pytest.fixture(scope="module")
def cluster_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_cohort")
    c = simulate(6000, seed=2)
    write_cohort(c, root / "cohort", partitions=3)
    write_cohort(c, root / "cohort.parquet")  # the same patients as one file
    (root / "tiny.yaml").write_text(TINY)
    return root


def _train_cli(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    data = [] if "--data" in extra else ["--data", str(root / "cohort")]
    args = [MASML, "train", "onset", *data, "--config", str(root / "tiny.yaml"), "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=900)


def test_train_on_a_local_cluster_end_to_end(cluster_cohort):
    root = cluster_cohort
    r = _train_cli(root, root / "bundle", "--cluster", "local")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest, _ = read_bundle(root / "bundle")
    data = manifest["training_data"]
    assert data["engine"].startswith("dask (2 workers, 3 partitions)")
    assert data["synthetic"] is True and data["rows"] == 6000
    # the same bytes as one process: the fingerprint does not depend on the engine
    parts = sorted((root / "cohort").glob("*.parquet"))
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    assert data["fingerprint"] == data_fingerprint(validate(frame, require_labels=("mas_onset",)))
    card = json.loads((root / "bundle" / "card.json").read_text())
    assert "seeded hash of patient_id" in card["data"]["flow"]["split"]
    assert card["data"]["flow"]["test_rows"] == manifest["metrics"]["test_rows"] == data["test_rows"]
    assert abs(data["test_rows"] / data["rows_used"] - 0.25) < 0.03
    # quality: as good as the same config trained on one process, judged on fresh patients
    one = _train_cli(root, root / "one", "--data", str(root / "cohort.parquet"))
    assert one.returncode == 0, one.stderr[-3000:]
    fresh = simulate(5000, seed=99).data
    y = fresh["mas_onset"].to_numpy()
    auroc = {b: evaluation.auroc(y, predict_frame(root / b, fresh)["risk"]) for b in ("bundle", "one")}
    assert abs(auroc["bundle"] - auroc["one"]) < 0.015, auroc
    assert manifest["explainer"]["parity"]["max_abs_diff_contributions"] <= 1e-4
    # scoring the cohort with the cluster-trained bundle, on the cluster
    r = subprocess.run([MASML, "predict", str(root / "bundle"), "--data", str(root / "cohort"),
                        "--out", str(root / "scored"), "--cluster", "local"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    scored = pd.concat([pd.read_parquet(p) for p in sorted((root / "scored").glob("*.parquet"))])
    assert len(scored) == 6000 and scored["risk"].between(0, 1).all()


def test_icu_trains_on_a_cluster_with_a_partition_holding_no_mas_patient(tmp_path):
    """The ICU model's population is MAS patients only: a partition without one is empty after the
    population step on its worker. Training on a 2-worker cluster still works end to end, the bundle
    passes its parity gates, and the rows used and skipped are the one-process population's."""
    from masml import onnx_export
    from masml.encoding import encode_inputs
    from masml.training import population_rows, select_population
    from pipelines.risk import run_risk_pipeline

    c = simulate(2000, seed=3)
    data, truth = c.data.copy(), c.truth.copy()
    assert (truth["patient_id"] == data["patient_id"]).all()
    mas = (data["mas_onset"] == 1).to_numpy()
    data.loc[data.index[mas][:7], "icu_admission"] = None  # MAS patients without the label: skipped
    # Partition 0 holds only patients without MAS (one row group per file); the rest in two files.
    order = [*data.index[~mas][:600], *data.index[mas], *data.index[~mas][600:]]
    rest = sorted(order[600:])
    parts = [order[:600], rest[: len(rest) // 2], rest[len(rest) // 2 :]]
    folder = write_parts(tmp_path / "cohort", [data.loc[rows] for rows in parts])
    write_parts(tmp_path / "cohort.truth", [truth.loc[rows] for rows in parts])  # laid out as the data
    config = config_from_dict({"tuning": {"n_trials": 1, "max_rounds": 60}, "n_boot": 20, "folds": 3}, "icu")
    files = sorted(folder.glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [1, 1, 1]
    frames = [pd.read_parquet(f) for f in files]
    first = validate(frames[0], require_labels=("icu_admission",))
    assert population_rows(first, config)[1]["rows_used"] == 0  # no MAS patient in partition 0

    logged: list[str] = []
    result = run_risk_pipeline("icu", folder, tmp_path / "bundle", config=config, log=logged.append,
                               track=False, cluster="local:2")  # fmt: skip

    # One process on the same rows: the same population counts.
    whole = validate(pd.concat(frames, ignore_index=True), require_labels=("icu_admission",))
    pop, expected = select_population(whole, config)
    got = result.extra["population"]
    assert got.to_dict() == expected.to_dict()
    assert expected.skipped_label_missing == 7 and expected.rows_used == int(mas.sum()) - 7
    # The bundle: read back (checksums), its manifest's data counts, its parity gates.
    manifest, _ = read_bundle(result.bundle_dir)
    td = manifest["training_data"]
    assert td["engine"].startswith("dask (2 workers, 3 partitions)")
    assert (td["rows"], td["rows_used"]) == (len(whole), expected.rows_used)
    assert td["train_rows"] + td["test_rows"] == expected.rows_used
    assert manifest["metrics"]["test_rows"] == td["test_rows"]
    assert td["fingerprint"] == data_fingerprint(whole) and td["synthetic"] is True
    flow = json.loads((result.bundle_dir / "card.json").read_text())["data"]["flow"]
    keys = ("rows_in", "skipped_outside_population", "skipped_label_missing", "rows_used")
    assert {k: flow[k] for k in keys} == {k: getattr(expected, k) for k in keys}
    assert result.parity["max_abs_diff_risk"] <= 1e-5
    assert manifest["explainer"]["parity"]["max_abs_diff_contributions"] <= 1e-4
    model = result.extra["model"]
    bundle_model = (result.bundle_dir / "model.onnx").read_bytes()
    x = encode_inputs(pop, config.inputs)  # every patient of the population, through the written graph
    gate = onnx_export.parity_gate(bundle_model, model.booster, model.spec, model.calibrator, x)
    assert gate["max_abs_diff_risk"] <= 1e-5
    assert any(f"{expected.rows_used:,} rows used" in m for m in logged)


def test_same_data_config_seed_and_cluster_give_the_same_model(cluster_cohort):
    root = cluster_cohort
    if not (root / "bundle" / "model.onnx").exists():  # run alone: train the first one here
        assert _train_cli(root, root / "bundle", "--cluster", "local").returncode == 0
    again = _train_cli(root, root / "again", "--cluster", "local")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (root / "again" / "model.onnx").read_bytes() == (root / "bundle" / "model.onnx").read_bytes()


def test_a_bad_partition_stops_cluster_training_with_the_file_and_row(cluster_cohort, tmp_path):
    root = cluster_cohort
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted((root / "cohort").glob("*.parquet")):
        frame = pd.read_parquet(p)
        if p.name == "part-00001.parquet":
            frame.loc[4, "platelets"] = -3.0
        frame.to_parquet(bad / p.name, index=False)
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    r = subprocess.run([MASML, "train", "onset", "--data", str(bad), "--config", str(root / "tiny.yaml"),
                        "--out", str(tmp_path / "b"), "--cluster", "local"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 1
    assert "part-00001.parquet" in r.stderr and "platelets [out_of_range]" in r.stderr and "row 5" in r.stderr
    assert not (tmp_path / "b").exists()


def test_ground_truth_laid_out_unlike_the_data_is_refused_before_training(client, tmp_path):
    from masml.distributed.train import train_on_cluster
    from masml.training import TrainingDataError
    from pipelines.risk import held_out_columns

    c = simulate(1500, seed=8)
    write_cohort(c, tmp_path / "cohort", partitions=3)
    for old in (tmp_path / "cohort.truth").iterdir():
        old.unlink()
    write_cohort(c, tmp_path / "elsewhere", partitions=2)  # truth in 2 files, data in 3
    for f in (tmp_path / "elsewhere.truth").iterdir():
        f.rename(tmp_path / "cohort.truth" / f.name)
    config = config_from_dict({"tuning": {"n_trials": 1}}, "onset")
    logged: list[str] = []
    with pytest.raises(TrainingDataError, match="not laid out like the data"):
        train_on_cluster(client, tmp_path / "cohort", None, config, held_out_columns, log=logged.append)
    assert not any("trial" in m for m in logged)  # refused before any training


@pytest.mark.parametrize("parallel_trials", [1, 2])
def test_training_fails_clearly_instead_of_hanging_when_a_worker_dies(cluster_cohort, parallel_trials):
    from masml.distributed.train import train_on_cluster
    from pipelines.risk import held_out_columns

    tuning = {"n_trials": 3, "max_rounds": 5000, "early_stopping_rounds": 5000}
    tuning["parallel_trials"] = parallel_trials  # 2: the worker dies while two trials run at once
    config = config_from_dict({"tuning": tuning, "folds": 2, "n_boot": 20}, "onset")
    outcome: dict = {}
    with connect("local") as c:
        state = _kill_a_worker_when(c, lambda: _processing(c, "fn-"))

        def job() -> None:
            try:
                data = cluster_cohort / "cohort"
                train_on_cluster(c, data, None, config, held_out_columns, log=lambda m: None)
                outcome["result"] = "finished"
            except Exception as err:  # noqa: BLE001 - the test inspects it
                outcome["error"] = err

        worker = threading.Thread(target=job, daemon=True)
        worker.start()
        worker.join(timeout=300)
        assert not worker.is_alive(), "training hung after a worker died"
    assert state["killed"], "no training task was ever seen running: nothing was killed"
    err = outcome.get("error")
    assert isinstance(err, WorkerLostError), outcome
    assert state["killed"] in str(err) and "left the cluster" in str(err)


def test_parallel_trials_overlap_on_worker_groups_and_repeat_exactly(client, cluster_cohort):
    from masml.distributed.train import train_on_cluster, worker_groups
    from pipelines.risk import held_out_columns

    config = config_from_dict({"tuning": {"n_trials": 4, "parallel_trials": 2, "max_rounds": 40},
                               "folds": 2, "n_boot": 20}, "onset")  # fmt: skip
    runs = []
    for _ in range(2):
        logged: list[str] = []
        trained = train_on_cluster(client, cluster_cohort / "cohort", None, config, held_out_columns,
                                   log=logged.append)  # fmt: skip
        runs.append(trained.model)
    first, again = runs
    assert [t["number"] for t in first.trials] == [0, 1, 2, 3]  # the whole budget, told in trial order
    assert all(t["workers"] == 1 for t in first.trials)  # 2 workers in 2 groups of 1
    assert any("2 trials at a time, on worker groups of 1" in m for m in logged)
    for a, b in (first.trials[:2], first.trials[2:]):  # each batch's two trials ran at the same time
        assert max(a["started_s"], b["started_s"]) < min(a["finished_s"], b["finished_s"]), (a, b)
    # the same data, config, seed and cluster: the same trials, the same choice, the same booster
    assert [t["params"] for t in again.trials] == [t["params"] for t in first.trials]
    assert [t["value"] for t in again.trials] == [t["value"] for t in first.trials]
    assert again.best_params == first.best_params and again.n_rounds == first.n_rounds
    assert again.booster.save_raw("ubj") == first.booster.save_raw("ubj")
    # calibration saw every training row once: the validation rows of the folds, not their training rows
    assert len(first.oof_margin) == trained.training_data["train_rows"]
    np.testing.assert_array_equal(again.oof_margin, first.oof_margin)
    with pytest.raises(ClusterError, match=r"'tuning.parallel_trials' is 3: .* the cluster has 2"):
        worker_groups(client, 3)


def test_il1_benefit_trains_on_a_local_cluster_end_to_end(cluster_cohort):
    """`masml train il1_benefit --cluster local`: the nuisances, cross-fitting, learner selection and final
    stage on a 2-worker cluster; the bundle passes its gates, its data flow adds up to the one-process
    population, and on fresh patients its models track the simulator's truth."""
    root = cluster_cohort
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    r = subprocess.run([MASML, "train", "il1_benefit", "--data", str(root / "cohort"), "--config",
                        str(root / "tiny.yaml"), "--out", str(root / "benefit"), "--cluster", "local"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    manifest, _ = read_bundle(root / "benefit")
    data = manifest["training_data"]
    assert data["engine"].startswith("dask (2 workers, 3 partitions)")
    parts = sorted((root / "cohort").glob("*.parquet"))
    whole = validate(pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True),
                     require_labels=("death_28d", "treatment_il1"))  # fmt: skip
    assert data["fingerprint"] == data_fingerprint(whole) and data["synthetic"] is True
    used = whole[(whole["mas_onset"] == 1) & whole["death_28d"].notna() & whole["treatment_il1"].notna()]
    assert data["rows_used"] == len(used) == data["train_rows"] + data["test_rows"]
    assert manifest["metrics"]["test_rows"] == data["test_rows"]
    assert abs(data["test_rows"] / data["rows_used"] - 0.25) < 0.04
    assert manifest["method"]["learner"] in manifest["method"]["candidates"]
    assert manifest["explainer"]["parity"]["tol"] <= 1e-4 and "truth" in manifest["metrics"]
    card = json.loads((root / "benefit" / "card.json").read_text())
    assert "seeded hash of patient_id" in card["data"]["flow"]["split"]
    assert card["data"]["flow"]["test_rows"] == data["test_rows"]
    assert "learner chosen" in r.stderr + r.stdout
    # Fresh MAS patients: the outcome and propensity models follow the true probabilities, and the
    # benefit is no worse than predicting one average effect by more than sampling noise allows.
    fresh = simulate(5000, seed=99)
    mas = (fresh.data["mas_onset"] == 1).to_numpy()
    pred, truth = predict_frame(root / "benefit", fresh.data[mas]), fresh.truth[mas]
    pairs = (("risk_untreated", "true_p_death_untreated"), ("risk_treated", "true_p_death_treated"),
             ("propensity", "true_propensity_il1"))  # fmt: skip
    for output, column in pairs:
        assert np.corrcoef(pred[output], truth[column])[0, 1] > 0.65, output
        # ~500 treated training patients: one process misses the treated mean by 0.053 on these data
        assert abs(pred[output].mean() - truth[column].mean()) < 0.08, output
    true_tau = truth["true_benefit"].to_numpy()
    assert np.sqrt(np.mean((pred["benefit"] - true_tau) ** 2)) / true_tau.std() < 1.3


def test_benefit_final_stages_on_the_cluster_add_up_and_repeat(client):
    """The learners' cluster parts on hand-made cross-fitted rows: the ridge stage from per-partition
    sums equals the one-process fit on all rows, the constant is the mean pseudo-outcome, and a forest
    trained twice on the same layout is the same booster byte for byte."""
    from masml import causal
    from masml.distributed import benefit
    from masml.distributed.cluster import worker_addresses
    from masml.distributed.train import _pinned

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    groups = len(causal.GROUPS)
    made = []
    for n in (300, 0, 250):  # an empty partition too
        t = rng.integers(0, 2, n).astype(float)
        y = rng.integers(0, 2, n).astype(float)
        r0, r1, e = rng.uniform(0.1, 0.9, (3, n))
        cross = pd.DataFrame({"y": y, "t": t, "fold": rng.integers(0, 3, n).astype(np.int8), "r0": r0,
                              "r1": r1, "e": e, "phi": causal.pseudo_outcome(y, t, r0, r1, e, (0.1, 0.9))})
        h = (rng.random((n, groups)) < 0.3).astype(float)
        made.append({"cross": cross, "h": h, "f": rng.normal(size=(n, 3)).astype(np.float32),
                     "sample": rng.random(n)})  # fmt: skip
    workers = sorted(worker_addresses(client))
    where = [workers[i % len(workers)] for i in range(len(made))]
    crossed = [_pinned(client, lambda m: m, m, worker=w) for m, w in zip(made, where, strict=True)]
    sums = benefit._add(client.gather(client.map(benefit._sums, crossed, folds=3, pure=False)))
    c = pd.concat([m["cross"] for m in made], ignore_index=True)
    h = np.concatenate([m["h"] for m in made])
    phi, fold = c["phi"].to_numpy(), c["fold"].to_numpy()
    for k in [0, 1, 2, benefit.ALL]:
        rows = fold != k
        assert sums[k]["n"] == rows.sum() and sums[k]["phi"] == pytest.approx(phi[rows].sum(), abs=1e-9)
        for lam in causal.RIDGE_LAMBDAS:
            here = causal.fit_ridge(h[rows], c["r0"].to_numpy()[rows], phi[rows], lam)
            there = causal.ridge_from_sums(sums[k]["zz"], sums[k]["zphi"], lam)
            np.testing.assert_allclose(there.coef, here.coef, rtol=1e-9, atol=1e-9)
    first = benefit._fit_forests(client, crossed, where, benefit.FORESTS, 1, 0, names)
    again = benefit._fit_forests(client, crossed, where, ("dr",), 1, 0, names)
    assert first["dr"].save_raw("ubj") == again["dr"].save_raw("ubj")
    for kind, booster in first.items():
        assert booster.num_boosted_rounds() == causal.FOREST_ROUNDS and booster.feature_names is None, kind
        assert booster.num_features() == len(names)


def test_benefit_with_more_parallel_trials_than_workers_fails_before_any_work(client, tmp_path):
    from masml.distributed.benefit import train_benefit_on_cluster

    config = config_from_dict({"tuning": {"parallel_trials": 3}}, "il1_benefit")
    logged: list[str] = []
    with pytest.raises(ClusterError, match=r"'tuning.parallel_trials' is 3: .* the cluster has 2"):
        train_benefit_on_cluster(client, tmp_path / "absent", None, config, log=logged.append)
    assert logged == []  # nothing read, nothing validated
