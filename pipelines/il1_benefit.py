"""The IL-1 blockade (anakinra) benefit pipeline (issue 4): load, estimate, diagnose, export, track.

Each step is a library call (``masml.causal`` for the estimation and diagnostics, ``masml.onnx_benefit``
for the graph, ``masml.guardrails`` for the cautions); this file decides their order and what is kept.
It follows the risk pipeline's shape (pipelines/risk.py) and reuses its loading, population, split,
tuning, bundle and tracking steps. When the data is a simulated cohort with its ground truth beside it
(``NAME.truth.EXT``), the held-out benefit is also scored against the true benefit (PEHE, policy value).
The bundle also carries ``explainer.onnx``: exact TreeSHAP of the two outcome models (not of the chosen
benefit learner; ``masml.onnx_benefit`` says why), held to shap.TreeExplainer by its parity gate.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from masml import card, causal, causal_plots, guardrails, tracking
from masml.bundle import write_bundle
from masml.card import _clean
from masml.cohort import truth_path_for
from masml.config import Config, ConfigError, load_config
from masml.encoding import encode_inputs, input_spec
from masml.features import feature_names
from masml.io import load_dataset, read_table
from masml.onnx_benefit import (
    EXPLAINED_ARMS,
    OUTPUTS,
    benefit_explainer_parity_gate,
    benefit_explainer_to_onnx,
    benefit_model_to_onnx,
    benefit_parity_gate,
)
from masml.predict import onnx_session, run_rows
from masml.schema import TRIGGER_FAMILY
from masml.training import TrainingDataError, select_population, split_holdout, timeout_warning
from pipelines.risk import one_process_record

TASK = "il1_benefit"
TRUTH_COLUMNS = ("true_benefit", "true_p_death_untreated", "true_p_death_treated", "true_propensity_il1")
ESTIMAND = (
    "benefit = P(death within 28 days without IL-1 blockade) - P(death within 28 days with IL-1 blockade "
    "started within 48 h), per patient; > 0 favours treatment"
)
# What each graph output is (manifest "outputs"; the service's /v1/models shows them). Why benefit says it
# need not equal the difference of the two risks: the risks are the per-arm outcome models' (the T-learner
# pair), benefit is the chosen learner's (masml/causal.py), and only the T-learner makes them agree.
OUTPUT_MEANINGS = {
    "benefit": (
        "the chosen learner's estimate of P(death within 28 days | untreated) - P(death within 28 days | "
        "IL-1 blockade), a difference of probabilities (> 0 favours treatment); it need not equal "
        "risk_untreated - risk_treated, which come from the outcome models"
    ),
    "risk_untreated": (
        "the untreated-arm outcome model's calibrated P(death within 28 days) without IL-1 blockade; "
        "risk_untreated - risk_treated need not equal benefit"
    ),
    "risk_treated": (
        "the treated-arm outcome model's calibrated P(death within 28 days) with IL-1 blockade within 48 h; "
        "risk_untreated - risk_treated need not equal benefit"
    ),
    "propensity": (
        "calibrated P(IL-1 blockade | inputs) in the training data; the outside_overlap guardrail reads it"
    ),
}
ASSUMPTIONS = [
    "Assumption: no unmeasured confounding - treatment was chosen by indication through the model's inputs "
    "only; an unrecorded reason to treat or not biases every estimate",
    "Assumption: overlap - patients flagged 'outside_overlap' had few comparable patients in the other arm",
    "Assumption: consistency and no interference - one patient's treatment does not change another's outcome",
]


@dataclass
class BenefitRunResult:
    bundle_dir: Path
    manifest: dict
    report: dict
    parity: dict
    selection: pd.DataFrame
    run_id: str = ""
    registered_version: str = ""
    champion_message: str = ""
    extra: dict = field(default_factory=dict)


def _truth_for(data_path: Path, frame: pd.DataFrame) -> pd.DataFrame | None:
    path = truth_path_for(data_path)
    if not path.exists():
        return None
    truth = read_table(path)
    if not set(TRUTH_COLUMNS) <= set(truth.columns):
        return None
    truth = truth.set_index(truth["patient_id"].astype(str))[list(TRUTH_COLUMNS)].apply(pd.to_numeric)
    out = truth.reindex(frame["patient_id"].astype(str)).reset_index(drop=True)
    return None if out.isna().any().any() else out


def run_il1_benefit_pipeline(
    data_path: str | Path,
    out_dir: str | Path,
    *,
    units: str | Path | None = None,
    config_path: str | Path | None = None,
    config: Config | None = None,
    log: Callable[[str], None] = print,
    track: bool = True,
    cluster: str | None = None,
) -> BenefitRunResult:
    """Estimate individual benefit of IL-1 blockade, diagnose it, export the bundle, track the run.

    ``cluster`` (``local``, ``local:N`` or ``tcp://SCHEDULER``) trains on partitioned Parquet with the
    rows left on a Dask cluster (``masml.distributed.benefit``); the diagnostics, export, tracking and
    card after training are the same.
    """
    started = time.perf_counter()
    data_path, out_dir = Path(data_path), Path(out_dir)
    config = config or load_config(config_path, TASK)
    if config.task != TASK:
        raise ConfigError(f"config key 'task': the benefit pipeline needs task {TASK!r}, got {config.task!r}")
    if track:
        tracking.check_server()  # a tracking server that is down fails the run now, not after training
    if cluster is None:
        trained = _train_here(data_path, units, config, log)
    else:
        from masml.distributed.benefit import train_benefit_on_cluster
        from masml.distributed.cluster import connect

        with connect(cluster) as client:
            trained = train_benefit_on_cluster(client, data_path, units, config, log)
    return _diagnose_and_export(trained, data_path, out_dir, units, config, log, track, started)


def _train_here(data_path: Path, units, config: Config, log: Callable[[str], None]) -> causal.BenefitTraining:
    """The single-process path: the whole dataset in memory, a grouped split stratified by arm."""
    frame = load_dataset(data_path, units, require_labels=(config.label, causal.TREATMENT))
    pop, population = select_population(frame, config)
    t_all = causal.treatment_values(pop)
    known = ~np.isnan(t_all)
    pop, t = pop.loc[known].reset_index(drop=True), t_all[known]
    y = pop[config.label].to_numpy(dtype=float)
    arms = causal.check_arms(t, y, config.folds)
    groups = pop["patient_id"].astype(str).to_numpy()
    # Stratified by arm: both sides keep the treated share (the learners need both arms on each side).
    train_idx, test_idx = split_holdout(t, groups, config.test_size, config.seed)
    x = encode_inputs(pop, config.inputs)
    xt, yt, tt, gt = x[train_idx], y[train_idx], t[train_idx], groups[train_idx]

    # ---- nuisances (tuned, calibrated, cross-fitted), pseudo-outcomes, learner choice, final stage
    log(
        f"{TASK}: {len(pop):,} MAS patients used ({int(t.sum()):,} treated, {int(y.sum()):,} deaths); "
        f"skipped {population.skipped_outside_population:,} outside the population, "
        f"{population.skipped_label_missing:,} with no {config.label} and {int((~known).sum()):,} with "
        f"no {causal.TREATMENT}"
    )
    nuis, cross = causal.fit_nuisances(xt, yt, tt, gt, config.inputs, config, log=log)
    phi_train = causal.pseudo_outcome(yt, tt, cross["r0"], cross["r1"], cross["e"], config.overlap)
    # One feature spec for every sub-model: the nuisances' (config inputs + score_features); the learners'
    # forests (here and in fit_final), the graph and the explainer all use it.
    selection = causal.select_learner(xt, yt, tt, gt, cross, phi_train, config.inputs, config, nuis.spec)
    for line in causal.selection_lines(selection, TASK):
        log(line)
    model = causal.fit_final(
        selection.chosen, nuis, xt, yt, tt, cross, phi_train, config.inputs, selection.ridge_lambda,
        config.seed,
    )
    test = pop.iloc[test_idx].reset_index(drop=True)
    x_test = x[test_idx]
    pred = model.predict(x_test)
    truth = _truth_for(data_path, pop)
    f_train = model.nuisances.untreated.features(xt)
    return causal.BenefitTraining(
        model=model,
        selection=selection,
        population=population,
        skipped_treatment=int((~known).sum()),
        arms=arms,
        test=test,
        prediction=pred,
        guardrail_status=guardrails.evaluate(guardrails.benefit_guardrails(config.overlap), test, pred),
        truth=truth.iloc[test_idx].reset_index(drop=True) if truth is not None else None,
        x_check=x_test,
        check_rows=np.arange(len(test_idx)),
        train_t=tt,
        train_e=cross["e"],
        phi_train=phi_train,
        balance=causal.balance_table(f_train, feature_names(model.spec), tt, cross["e"], config.overlap),
        **one_process_record(data_path, frame, pop.iloc[train_idx], test, config, len(pop), truth is not None,
                             "stratified by treatment"),  # fmt: skip
    )


def _diagnose_and_export(
    trained: causal.BenefitTraining, data_path: Path, out_dir: Path, units, config: Config,
    log: Callable[[str], None], track: bool, started: float,
) -> BenefitRunResult:  # fmt: skip
    """Held-out diagnostics, the graph and its explainer (each behind its gate), the bundle, the run's
    tracking and the card: the same whichever engine trained the model."""
    model, test, pred = trained.model, trained.test, trained.prediction
    for name in ("untreated", "treated", "propensity"):
        cut_short = timeout_warning(f"{TASK} {name} model", getattr(model.nuisances, name), config.tuning)
        if cut_short:
            log(cut_short)

    # ---- held-out diagnostics (nuisances never saw these patients)
    y_test, t_test = test[config.label].to_numpy(dtype=float), causal.treatment_values(test)
    tau, r0, r1, e = (pred[k] for k in ("benefit", "risk_untreated", "risk_treated", "propensity"))
    phi = causal.pseudo_outcome(y_test, t_test, r0, r1, e, config.overlap)
    phi_train, tt = trained.phi_train, trained.train_t
    selection = trained.selection
    low, high = config.overlap
    inside = (e >= low) & (e <= high)
    overlap_test = causal.overlap_report(e, t_test, config.overlap)
    overlap_train = causal.overlap_report(trained.train_e, tt, config.overlap)
    for where, rep in (("training", overlap_train), ("held-out", overlap_test)):
        log(f"{TASK}: {where}: {rep['n_outside']} of {rep['n']} patients outside overlap {rep['bounds']}")
        if rep["warning"]:
            log(f"{TASK}: WARNING ({where}): {rep['warning']}")
    balance = trained.balance
    report = {
        "ate_aipw": causal.aipw(phi),
        "ate_aipw_trimmed": causal.aipw(phi[inside]),
        "ate_aipw_training_crossfit": causal.aipw(phi_train),
        "overlap": {"training": overlap_train, "test": overlap_test},
        "balance": {
            "max_abs_smd_before": float(np.nanmax(np.abs(balance["smd_before"]))),
            "max_abs_smd_after": float(np.nanmax(np.abs(balance["smd_after"]))),
            "features_above_0_1_after": int(np.sum(np.abs(balance["smd_after"]) > 0.1)),
        },
        "calibration_slope": causal.calibration_slope(tau, phi),
        "calibration_groups": causal.calibration_by_group(tau, phi).to_dict(orient="records"),
        "uplift": causal.uplift_metrics(tau, phi, n_boot=config.n_boot, seed=config.seed),
        "policy_dr_deaths_per_100": causal.policy_value_dr(tau, y_test, t_test, r0, r1, e, config.overlap),
        "selection": {
            "chosen": selection.chosen,
            "criterion": (
                "out-of-fold DR pseudo-outcome loss on the training patients (no ground truth), with the "
                "one-standard-error rule: the simplest learner within one SE of the lowest loss"
            ),
            "lowest_loss": selection.best,
            "ridge_lambda": selection.ridge_lambda,
            "losses": selection.losses.to_dict(orient="records"),
        },
        "arms": trained.arms,
        # 95% CIs beside the numbers above (added keys; the ones above keep their shape): influence-function
        # intervals like the AIPW effect's, Wilson for the share treated (masml/causal.py says why).
        "calibration_slope_ci": causal.calibration_slope_ci(tau, phi),
        "policy_dr_deaths_per_100_ci": causal.policy_value_dr_ci(
            tau, y_test, t_test, r0, r1, e, config.overlap
        ),
    }
    truth = trained.truth
    family = test["trigger"].map(TRIGGER_FAMILY).to_numpy()
    true_tau = truth["true_benefit"].to_numpy() if truth is not None else None
    by_family = causal.benefit_by_group(tau, phi, family, true_tau)
    report["benefit_by_trigger_family"] = by_family.to_dict(orient="records")
    ate = report["ate_aipw"]
    log(f"{TASK}: AIPW average benefit {ate['estimate']:+.4f} [{ate['ci_low']:+.4f}, {ate['ci_high']:+.4f}]")
    if truth is not None:
        report["truth"] = causal.truth_metrics(tau, truth, float(phi_train.mean()))
        tr = report["truth"]
        d = tr["deaths_per_100"]
        log(
            f"{TASK}: vs ground truth: PEHE {tr['pehe']:.4f} = {tr['pehe_ratio']:.2f} x constant; deaths/100 "
            f"model {d['model']:.2f}, treat-all {d['treat_all']:.2f}, treat-none {d['treat_none']:.2f}, "
            f"true-benefit policy {d['true_benefit']:.2f}"
        )

    # ---- export: one graph, checked against the Python path; guardrails as data
    onnx_model = benefit_model_to_onnx(model)
    x_check = trained.x_check
    parity = benefit_parity_gate(onnx_model, model, x_check, seed=config.seed)
    log(f"{TASK}: ONNX parity max |Δ| = {parity['max_abs_diff']:.2e} over {parity['n_rows']:,} rows")
    # ---- explainer: exact SHAP of both outcome models (and their difference), checked against shap
    explainer, explainer_section = benefit_explainer_to_onnx(model)
    sample = np.sort(np.random.default_rng(config.seed).choice(len(x_check), min(len(x_check), 2_000), False))
    ex_parity = benefit_explainer_parity_gate(explainer, onnx_model, model, x_check[sample], seed=config.seed)
    parity["explainer"] = ex_parity
    explainer_section["parity"] = {
        block: {k: v for k, v in ex_parity[block].items() if k != "by_kind"}
        for block in [arm for arm, _ in EXPLAINED_ARMS] + ["difference"]
    } | {"tol": ex_parity["tol"]}
    shap_d, sum_d = ex_parity["max_abs_diff_contributions"], ex_parity["max_abs_diff_additivity"]
    log(f"{TASK}: explainer parity (both outcome models) max |Δshap| = {shap_d:.2e}, additivity {sum_d:.2e}")
    rules = guardrails.benefit_guardrails(config.overlap)
    status = trained.guardrail_status
    fired = {rule: int((status[rule] == guardrails.FIRES).sum()) for rule in status.columns}
    manifest = {
        "task": TASK,
        "model_name": config.registered_model,
        "label": {"name": config.label, "definition": "death within 28 days", "horizon": "28 days"},
        "treatment": {"name": causal.TREATMENT, "definition": "IL-1 blockade (anakinra) within 48 h"},
        "estimand": ESTIMAND,
        "assumptions": ASSUMPTIONS,
        "population": {
            "rule": config.population,
            "description": f"MAS patients (mas_onset = 1) with {causal.TREATMENT} and {config.label} known",
        },
        "inputs": input_spec(config.inputs),
        "outputs": [{"name": name, "meaning": OUTPUT_MEANINGS[name]} for name in OUTPUTS],
        "thresholds": list(config.thresholds),
        "guardrails": rules,
        "method": {
            "learner": selection.chosen,
            "candidates": list(causal.LEARNERS),
            "selection": report["selection"]["criterion"],
            "overlap_bounds": list(config.overlap),
            "design": (
                "risk_untreated / risk_treated: tuned, calibrated xgboost outcome models per arm (T-learner "
                "pair); benefit: the learner chosen without ground truth (dr_ridge = DR-learner with a ridge "
                "final stage on trigger and septic MAS features x untreated risk); benefit equals "
                "risk_untreated - risk_treated only when the T-learner is chosen"
            ),
        },
        "metrics": {
            "test_rows": int(len(test)),
            "ate_aipw": report["ate_aipw"],
            "ate_aipw_trimmed": report["ate_aipw_trimmed"],
            "calibration_slope": report["calibration_slope"],
            "autoc": report["uplift"]["autoc"],
            "qini": report["uplift"]["qini"],
            "policy_dr_deaths_per_100": report["policy_dr_deaths_per_100"],
            "calibration_slope_ci": report["calibration_slope_ci"],
            "policy_dr_deaths_per_100_ci": report["policy_dr_deaths_per_100_ci"],
            "patients_outside_overlap": overlap_test["n_outside"],
            "guardrails_fired_test": fired,
            "benefit_by_trigger_family": report["benefit_by_trigger_family"],
            **({"truth": report["truth"]} if truth is not None else {}),
        },
        "training_data": trained.training_data,
        "owner": config.owner,
        "contact": config.contact,
        "explainer": explainer_section,
    }
    model_bytes = onnx_model.SerializeToString()
    bundle_dir = write_bundle(out_dir, model_bytes, _finite(manifest), explainer.SerializeToString())
    written = json.loads((bundle_dir / "manifest.json").read_text())
    result = BenefitRunResult(bundle_dir, written, report, parity, selection.losses)
    result.extra = {
        "model": model,
        "balance": balance,
        "test": test,
        "x_test": x_check,
        "check_rows": trained.check_rows,
        "phi_test": phi,
        "prediction": pred,
        "guardrail_status": status,
        "population": trained.population,
        "skipped_treatment_missing": trained.skipped_treatment,
        "seconds": time.perf_counter() - started,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drawn = [
            causal_plots.overlap_plot(trained.train_e, tt, config.overlap, tmp / "overlap.png"),
            causal_plots.balance_plot(balance, tmp / "balance.png"),
            causal_plots.benefit_by_trigger_plot(
                tau, test["trigger"].to_numpy(), tmp / "benefit_by_trigger.png"
            ),
            causal_plots.qini_plot(tau, phi, tmp / "qini.png"),
        ]
        result.extra["figures"] = {path.stem: path.read_bytes() for path in drawn}
    if track:
        _track(result, config, trained.log_dataset, model_bytes, balance, log)
    card_data = card.benefit_card_content(
        manifest=written, config=config, population=trained.population, train=trained.train_description,
        test=trained.test_description, split=trained.split, report=_finite(report),
        figures=result.extra["figures"], units_file=str(units) if units else None,
        run={"run_id": result.run_id, "version": result.registered_version,
             "tracking_uri": tracking.tracking_uri() if track else ""},
    )  # fmt: skip
    card_paths, pdf_note = card.write_card(card_data, bundle_dir)
    log(f"{TASK}: model card {bundle_dir / 'card.html'} ({pdf_note})")
    result.extra["card"] = card_data
    if track:
        tracking.log_files(result.run_id, card_paths, "card")
    result.extra["seconds"] = time.perf_counter() - started
    return result


# A JSON-ready copy (numpy scalars as Python numbers, NaN/inf as null): a manifest is strict JSON, and
# e.g. the correlation of a constant benefit with the truth is undefined. The model card's helper.
_finite = _clean


def _graph_benefit(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = onnx_session(model_bytes)
    return np.asarray(run_rows(session, ["benefit"], x)[0], dtype=float)


def _track(result, config, log_dataset, model_bytes, balance, log) -> None:
    import mlflow

    from pipelines.risk import _flat

    with tracking.run(config.mlflow_experiment, f"{TASK}-seed{config.seed}") as active:
        result.run_id = active.info.run_id
        mlflow.log_params({f"config.{k}": v for k, v in _flat(config.to_dict()).items()})
        mlflow.log_param("learner", result.report["selection"]["chosen"])
        for name in ("untreated", "treated", "propensity"):
            m = getattr(result.extra["model"].nuisances, name)
            mlflow.log_params({f"{name}.{k}": v for k, v in m.best_params.items()})
            mlflow.log_param(f"{name}.tuning.trials_run", len(m.trials))
            mlflow.set_tag(f"{name}.tuning.stopped_by_timeout", str(m.stopped_by_timeout).lower())
        log_dataset()
        metrics = {k: v for k, v in result.manifest["metrics"].items() if k != "guardrails_fired_test"}
        mlflow.log_metrics(tracking.flat_metrics("test", metrics))
        mlflow.log_metric("parity_max_abs_diff", result.parity["max_abs_diff"])
        for key in ("contributions", "additivity"):
            mlflow.log_metric(f"explainer_parity.{key}", result.parity["explainer"][f"max_abs_diff_{key}"])
        for _, row in result.selection.iterrows():
            mlflow.log_metric(f"selection.{row['learner']}.dr_loss", float(row["dr_loss"]))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for name, data in result.extra["figures"].items():
                (tmp / f"{name}.png").write_bytes(data)
                mlflow.log_artifact(str(tmp / f"{name}.png"), "plots")
            balance.to_csv(tmp / "balance.csv", index=False)
            result.selection.to_csv(tmp / "selection.csv", index=False)
            (tmp / "report.json").write_text(json.dumps(_finite(result.report), indent=2))
            for name in ("balance.csv", "selection.csv", "report.json"):
                mlflow.log_artifact(str(tmp / name), "evaluation")
        mlflow.log_artifacts(str(result.bundle_dir), "bundle")
        x_test, phi = result.extra["x_test"], result.extra["phi_test"][result.extra["check_rows"]]
        example = onnx_session(model_bytes).run(list(OUTPUTS), {"inputs": x_test[:5]})
        version = tracking.log_onnx_model(
            model_bytes, x_test[:5], dict(zip(OUTPUTS, example, strict=True)), config.registered_model
        )
        result.registered_version = str(version.version)

        # Champion rule without ground truth: lower held-out DR loss (higher score = -loss) wins.
        def score(graph: bytes) -> float:
            return -float(np.mean((phi - _graph_benefit(graph, x_test)) ** 2))

        promoted, message = tracking.promote_if_better(
            config.registered_model, result.registered_version, score(model_bytes), score
        )
        result.champion_message = message
        mlflow.set_tag("champion", str(promoted))
        log(f"{TASK}: MLflow run {result.run_id}, {config.registered_model} v{version.version}: {message}")


__all__ = ["BenefitRunResult", "TrainingDataError", "run_il1_benefit_pipeline"]
