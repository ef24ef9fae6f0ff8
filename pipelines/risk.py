"""The risk pipeline shared by MAS onset and ICU need: load, train, evaluate, explain, export, track.

Each step is a library call; this file only decides their order and what is kept. It runs on any
dataset in masml's schema. When the data is a simulated cohort with its ground truth beside it
(``NAME.truth.EXT``), the true probabilities are evaluated too: the ceiling the model is judged against.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from masml import card, evaluation, explain, onnx_export, plots, scores, shap_export, tracking
from masml.bundle import data_fingerprint, write_bundle
from masml.cohort import TRUTH_COLUMN, truth_path_for
from masml.config import Config, load_config
from masml.encoding import encode_inputs, input_spec
from masml.io import load_dataset, read_table
from masml.predict import onnx_session, run_rows
from masml.schema import TRIGGER_FAMILY, age_band
from masml.training import (
    RiskTraining,
    baseline_sample,
    fit_logistic_baseline,
    select_population,
    split_holdout,
    timeout_warning,
    tune_and_fit,
)

LABEL_DEFINITION = {
    "mas_onset": ("MAS present or developing within 7 days of the snapshot", "7 days"),
    "icu_admission": ("ICU admission within 7 days; defined for MAS patients", "7 days"),
}
POPULATION_TEXT = {
    "all": "hospitalised patients with suspected hyperinflammation (every row with the label)",
    "mas_only": "patients with MAS (mas_onset = 1) whose label is known",
}
# Clinical scores shown beside the model (higher = more likely MAS); the 2016 criteria and the MS score
# are defined for sJIA/AOSD only and are evaluated on those patients (``SCORE_APPLIES``).
BASELINE_SCORES: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "hscore": scores.hscore,
    "hlh2004": scores.hlh2004,
    "mas2016": scores.mas2016,
    "ms_score": scores.ms_score,
    "ferritin": lambda df: df["ferritin"],
}
SCORE_APPLIES = {"mas2016": ("sjia", "aosd"), "ms_score": ("sjia", "aosd")}


@dataclass
class RiskRunResult:
    bundle_dir: Path
    manifest: dict
    comparison: pd.DataFrame
    test_report: dict
    parity: dict
    run_id: str = ""
    registered_version: str = ""
    champion_message: str = ""
    extra: dict = field(default_factory=dict)


def _truth_for(data_path: Path, frame: pd.DataFrame, label: str) -> np.ndarray | None:
    path = truth_path_for(data_path)
    column = TRUTH_COLUMN.get(label)
    if column is None or not path.exists():
        return None
    truth = read_table(path)
    if column not in truth.columns:
        return None
    values = pd.to_numeric(truth.set_index("patient_id")[column], errors="raise")
    return values.reindex(frame["patient_id"].astype(str)).to_numpy(dtype=float)


def held_out_columns(test: pd.DataFrame, label: str) -> pd.DataFrame:
    """What the evaluation needs of each held-out patient besides the model's risk: the label, the
    subgroup columns and every clinical score (NaN where a score does not apply). A cluster computes it
    on each partition, so only these few columns, never the data, reach the process that evaluates."""
    out = pd.DataFrame(
        {
            "y": pd.to_numeric(test[label]).to_numpy(dtype=float),
            "trigger": test["trigger"].to_numpy(),
            "age_years": test["age_years"].to_numpy(dtype=float),
            "sex": test["sex"].to_numpy(),
        }
    )
    for name, fn in BASELINE_SCORES.items():
        values = fn(test).to_numpy(dtype=float)
        if name in SCORE_APPLIES:
            values = np.where(test["trigger"].isin(SCORE_APPLIES[name]).to_numpy(), values, np.nan)
        out[f"score.{name}"] = values
    # HScore as the probability its published table gives (Fardet 2014): today's decision rule.
    out["hscore_probability"] = scores.hscore_probability(test).to_numpy(dtype=float)
    return out


def run_risk_pipeline(
    task: str,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    units: str | Path | None = None,
    config_path: str | Path | None = None,
    config: Config | None = None,
    log: Callable[[str], None] = print,
    track: bool = True,
    cluster: str | None = None,
) -> RiskRunResult:
    """Train, evaluate, explain and export one risk model; track the run in MLflow.

    ``cluster`` (``local``, ``local:N`` or ``tcp://SCHEDULER``) trains with ``xgboost.dask`` on
    partitioned Parquet; everything after training (evaluation, export, tracking, card) is the same.
    """
    data_path, out_dir = Path(data_path), Path(out_dir)
    config = config or load_config(config_path, task)
    if track:
        tracking.check_server()  # a tracking server that is down fails the run now, not after training
    if cluster is None:
        trained = _train_here(data_path, units, config, log)
    else:
        from masml.distributed.cluster import connect
        from masml.distributed.train import train_on_cluster

        with connect(cluster) as client:
            trained = train_on_cluster(client, data_path, units, config, held_out_columns, log)
    return _evaluate_and_export(task, trained, data_path, out_dir, units, config, log, track)


def _train_here(data_path: Path, units, config: Config, log) -> RiskTraining:
    """The single-process path: the whole dataset in memory, an exactly stratified grouped split."""
    frame = load_dataset(data_path, units, require_labels=(config.label,))
    pop, population = select_population(frame, config)
    log(
        f"{config.task}: {population.rows_used:,} rows used ({population.events:,} events); skipped "
        f"{population.skipped_outside_population:,} outside the population and "
        f"{population.skipped_label_missing:,} with no label"
    )
    y = pop[config.label].to_numpy(dtype=float)
    groups = pop["patient_id"].astype(str).to_numpy()
    train_idx, test_idx = split_holdout(y, groups, config.test_size, config.seed)
    x = encode_inputs(pop, config.inputs)
    model = tune_and_fit(
        x[train_idx],
        y[train_idx],
        groups[train_idx],
        config.inputs,
        config,
        on_trial=lambda t: log(f"  trial {t['number']}: CV log loss {t['value']:.4f}"),
    )
    fit_idx = baseline_sample(train_idx, config.seed)
    baseline = fit_logistic_baseline(
        x[fit_idx], y[fit_idx], config.inputs, seed=config.seed, score_features=config.score_features
    )
    test = pop.iloc[test_idx].reset_index(drop=True)
    x_test = x[test_idx]
    held = held_out_columns(test, config.label)
    held["risk"] = model.predict_risk(x_test)
    held["baseline"] = baseline.predict_risk(x_test)
    truth = _truth_for(data_path, pop, config.label)
    if truth is not None:
        held["ceiling"] = truth[test_idx]
    return RiskTraining(
        model=model,
        population=population,
        held_out=held,
        x_check=x_test,
        y_check=y[test_idx],
        **one_process_record(data_path, frame, pop.iloc[train_idx], test, config, population.rows_used,
                             truth is not None, "stratified"),  # fmt: skip
    )


def one_process_record(data_path: Path, frame: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame,
                       config: Config, rows_used: int, synthetic: bool, stratified: str) -> dict:  # fmt: skip
    """The fields a one-process model's record shares, risk or benefit model: the data descriptions,
    the training data, the split (``stratified`` says by what) and the dataset logger."""
    source = str(data_path.name)
    return {
        "train_description": card.data_description(train, config.inputs, config.label),
        "test_description": card.data_description(test, config.inputs, config.label),
        "training_data": {
            "source": source,
            "fingerprint": data_fingerprint(frame),
            "rows": int(len(frame)),
            "rows_used": int(rows_used),
            "train_rows": int(len(train)),
            "test_rows": int(len(test)),
            "synthetic": synthetic,
        },
        "split": f"held-out {config.test_size:.0%} {stratified} and grouped by patient_id "
        f"(seed {config.seed})",
        "log_dataset": lambda: tracking.log_dataset(frame, source, config.label, "training"),
    }


def _evaluate_and_export(task, trained: RiskTraining, data_path, out_dir, units, config, log, track):
    """Evaluate beside the baselines and the ceiling, explain, export, track, write the card."""
    model, held = trained.model, trained.held_out
    cut_short = timeout_warning(task, model, config.tuning)
    if cut_short:
        log(cut_short)
    y_test, risk = held["y"].to_numpy(dtype=float), held["risk"].to_numpy(dtype=float)
    x_check = trained.x_check
    boot = {"n_boot": config.n_boot, "seed": config.seed}
    report = evaluation.evaluate(y_test, risk, thresholds=config.thresholds, **boot)
    predictions = {"model": risk, "logistic_baseline": held["baseline"].to_numpy(dtype=float)}
    ceiling = held["ceiling"].to_numpy(dtype=float) if "ceiling" in held else None
    if ceiling is not None and not np.isnan(ceiling).any():
        predictions["ceiling"] = ceiling
    comparison = evaluation.compare(
        y_test,
        predictions,
        reference="ceiling" if "ceiling" in predictions else None,
        **boot,
    ).reset_index()
    comparison["rows"] = len(y_test)
    # How much of each ECE is the test set's size, and (synthetic data) the error against the truth.
    comparison["ece_floor"] = [evaluation.ece_if_calibrated(predictions[m], seed=config.seed)
                               for m in comparison["model"]]  # fmt: skip
    if "ceiling" in predictions:
        comparison["ece_vs_truth"] = [evaluation.ece_vs_truth(predictions[m], predictions["ceiling"])
                                      for m in comparison["model"]]  # fmt: skip
    score_rows = []
    curves = {name: (np.ones(len(y_test), bool), values) for name, values in predictions.items()}
    for name in BASELINE_SCORES:
        values = held[f"score.{name}"].to_numpy(dtype=float)
        mask = ~np.isnan(values)
        if mask.sum() >= 20 and len(np.unique(y_test[mask])) == 2:
            row = evaluation.compare(y_test[mask], {name: values[mask]}, **boot).reset_index()
            row["rows"] = int(mask.sum())
            score_rows.append(row)
            curves[name] = (mask, values)
    if score_rows:
        comparison = pd.concat([comparison, *score_rows], ignore_index=True)
    subgroups = {
        "trigger_family": held["trigger"].map(TRIGGER_FAMILY).to_numpy(),
        "age_band": held["age_years"].map(age_band).to_numpy(),
        "sex": held["sex"].to_numpy(),
    }
    subgroup_table = evaluation.subgroup_report(y_test, risk, subgroups, seed=config.seed)
    for _, row in subgroup_table[subgroup_table["warning"].astype(str) != ""].iterrows():
        log(f"{task}: subgroup {row['group']}={row['level']}: {row['warning']}")

    # ---- explanations (a sample of held-out rows keeps the run fast)
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(len(x_check), size=min(len(x_check), 2_000), replace=False))
    expl = explain.shap_explanation(model.booster, model.features(x_check[sample]), model.feature_names)
    importance = explain.global_importance(expl)
    with tempfile.TemporaryDirectory() as tmp:
        hscore_p = {"hscore_probability": held["hscore_probability"].to_numpy(dtype=float)}
        drawn = plots.evaluation_plots(y_test, curves, Path(tmp) / "plots", decision_only=hscore_p)
        drawn += explain.save_plots(expl, tmp)
        figures = {path.stem: path.read_bytes() for path in drawn}

    # ---- export: the whole scoring path in one graph, checked against the Python path
    onnx_model = onnx_export.risk_model_to_onnx(
        model.booster, model.spec, len(config.inputs), model.calibrator, input_names=list(config.inputs)
    )
    parity = onnx_export.parity_gate(onnx_model, model.booster, model.spec, model.calibrator, x_check)
    log(f"{task}: ONNX parity max |Δrisk| = {parity['max_abs_diff_risk']:.2e} over {parity['n_rows']:,} rows")
    # ---- explainer: exact SHAP of the margin as a second graph, checked against shap.TreeExplainer
    explainer, explainer_section = shap_export.explainer_to_onnx(model.booster, model.spec, config.inputs)
    ex_parity = shap_export.explainer_parity_gate(
        explainer, model.booster, model.spec, x_check[sample], model=onnx_model
    )
    parity["explainer"] = ex_parity
    explainer_section["parity"] = {k: v for k, v in ex_parity.items() if k != "by_kind"}
    log(f"{task}: explainer parity max |Δshap| = {ex_parity['max_abs_diff_contributions']:.2e}, additivity "
        f"{ex_parity['max_abs_diff_additivity']:.2e} over {ex_parity['n_rows']:,} rows")  # fmt: skip
    model_row = comparison.set_index("model").loc["model"]
    label_text, horizon = LABEL_DEFINITION.get(config.label, (config.label, ""))
    manifest = {
        "task": task,
        "model_name": config.registered_model,
        "label": {"name": config.label, "definition": label_text, "horizon": horizon},
        "population": {"rule": config.population, "description": POPULATION_TEXT[config.population]},
        "inputs": input_spec(config.inputs),
        "outputs": [
            {"name": "risk", "meaning": f"calibrated probability of {config.label} (0-1)"},
            {"name": "margin", "meaning": "model log-odds before calibration (explanations add up to it)"},
        ],
        "thresholds": list(config.thresholds),
        "calibration": model.calibrator.kind,
        "metrics": {
            "test_rows": int(len(held)),
            "auroc": report["auroc"],
            "auprc": report["auprc"],
            "brier": report["brier"],
            "calibration_slope": report["calibration_slope"],
            "calibration_intercept": report["calibration_intercept"],
            "ece": report["ece"],
            "ece_lo": report["ece_lo"],
            "ece_hi": report["ece_hi"],
            "ece_floor": float(model_row["ece_floor"]),
            **({"ece_vs_truth": float(model_row["ece_vs_truth"])} if "ece_vs_truth" in model_row else {}),
        },
        "training_data": trained.training_data,
        "owner": config.owner,
        "contact": config.contact,
        "explainer": explainer_section,
    }
    model_bytes = onnx_model.SerializeToString()
    bundle_dir = write_bundle(out_dir, model_bytes, manifest, explainer.SerializeToString())
    written = json.loads((bundle_dir / "manifest.json").read_text())
    result = RiskRunResult(bundle_dir, written, comparison, report, parity)
    result.extra = {
        "importance": importance,
        "subgroups": subgroup_table,
        "population": trained.population,
        "model": model,
        "curves": curves,
        "y_test": y_test,
        "figures": figures,
    }
    if track:
        _track(result, config, trained, model_bytes, subgroup_table, log)
    card_data = card.card_content(
        manifest=written, config=config, population=trained.population, train=trained.train_description,
        test=trained.test_description, split=trained.split, comparison=comparison, report=report,
        subgroups=subgroup_table, importance=importance,
        figures=figures, units_file=str(units) if units else None,
        run={"run_id": result.run_id, "version": result.registered_version, "n_trees": model.n_rounds,
             "best_params": model.best_params, "tracking_uri": tracking.tracking_uri() if track else "",
             "trials_run": len(model.trials), "stopped_by_timeout": model.stopped_by_timeout},
    )  # fmt: skip
    card_paths, pdf_note = card.write_card(card_data, bundle_dir)
    log(f"{task}: model card {bundle_dir / 'card.html'} ({pdf_note})")
    result.extra["card"] = card_data
    if track:
        tracking.log_files(result.run_id, card_paths, "card")
    return result


def _track(result, config, trained: RiskTraining, model_bytes, subgroup_table, log) -> None:
    import mlflow

    model, x_check, y_check = trained.model, trained.x_check, trained.y_check
    with tracking.run(config.mlflow_experiment, f"{config.task}-seed{config.seed}") as active:
        result.run_id = active.info.run_id
        mlflow.log_params({f"config.{k}": v for k, v in _flat(config.to_dict()).items()})
        mlflow.log_params({f"best.{k}": v for k, v in model.best_params.items()})
        mlflow.log_param("n_rounds", model.n_rounds)
        mlflow.log_param("tuning.trials_run", len(model.trials))
        mlflow.set_tag("tuning.stopped_by_timeout", str(model.stopped_by_timeout).lower())
        trained.log_dataset()
        mlflow.log_metrics(tracking.flat_metrics("test", result.manifest["metrics"]))
        mlflow.log_metric("cv_logloss", model.cv_logloss)
        mlflow.log_metric("parity_max_abs_diff", result.parity["max_abs_diff_risk"])
        for key in ("contributions", "base_value", "additivity", "input_attribution"):
            mlflow.log_metric(f"explainer_parity.{key}", result.parity["explainer"][f"max_abs_diff_{key}"])
        for _, row in result.comparison.iterrows():
            if np.isfinite(row.get("auroc", np.nan)):
                mlflow.log_metric(f"compare.{row['model']}.auroc", float(row["auroc"]))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for name, data in result.extra["figures"].items():
                (tmp / f"{name}.png").write_bytes(data)
                mlflow.log_artifact(str(tmp / f"{name}.png"), "shap" if name.startswith("shap") else "plots")
            result.comparison.to_csv(tmp / "comparison.csv", index=False)
            subgroup_table.to_csv(tmp / "subgroups.csv", index=False)
            result.extra["importance"].to_csv(tmp / "shap_importance.csv", index=False)
            (tmp / "trials.json").write_text(json.dumps(model.trials, indent=2, default=float))
            (tmp / "evaluation.json").write_text(json.dumps(result.test_report, indent=2, default=float))
            for name in ("comparison.csv", "subgroups.csv", "shap_importance.csv", "trials.json"):
                mlflow.log_artifact(str(tmp / name), "evaluation")
            mlflow.log_artifact(str(tmp / "evaluation.json"), "evaluation")
        mlflow.log_artifacts(str(result.bundle_dir), "bundle")
        example = onnx_session(model_bytes).run(None, {"inputs": x_check[:5]})
        outputs = dict(zip(("risk", "margin"), example, strict=True))
        version = tracking.log_onnx_model(model_bytes, x_check[:5], outputs, config.registered_model)
        result.registered_version = str(version.version)
        # like for like: the new graph and the champion's on the same held-out rows
        new_auroc = evaluation.auroc(y_check, _graph_risk(model_bytes, x_check))
        promoted, message = tracking.promote_if_better(
            config.registered_model,
            result.registered_version,
            new_auroc,
            lambda champion: evaluation.auroc(y_check, _graph_risk(champion, x_check)),
        )
        result.champion_message = message
        mlflow.set_tag("champion", str(promoted))
        name = config.registered_model
        log(f"{config.task}: MLflow run {result.run_id}, {name} v{version.version}: {message}")


def _graph_risk(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = onnx_session(model_bytes)
    return np.asarray(run_rows(session, ["risk"], x)[0], dtype=float)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out
