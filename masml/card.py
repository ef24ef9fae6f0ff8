"""The model card: what a clinical governance committee reads to approve or reject a model.

Why a card built from the run, not written by hand: every number in it must be traceable to the run that
produced the bundle, so the card is *data* first (``card.json``, made by :func:`card_content` from the
run's own results) and a document second (``card.html``, one self-contained file with its figures
embedded; ``card.pdf`` printed from it by headless Chromium when the machine has it). ``masml report``
re-renders the HTML and PDF from ``card.json`` alone, so a reviewer can fix wording or layout without
re-running the pipeline.

Structure: Mitchell et al. 2019 (model cards, FAT* '19) for the sections; TRIPOD+AI (Collins et al.,
BMJ 2024;385:e078378) for the reporting checklist at the end, each of its 27 items pointing to the
section that answers it or marked "not reported" / "not applicable" (anchors.md §4).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from masml.schema import TRIGGER_FAMILY, age_band

CARD_FORMAT = 1
CARD_FILES = ("card.json", "card.html", "card.pdf")
PERFORMANCE_FIGURES = ("roc", "precision_recall", "calibration", "decision_curve")
# The metrics ``evaluation.compare`` gives a bootstrap interval (``_lo``/``_hi`` columns): the card prints
# each as "estimate [lo, hi]". The ECE's floor and its error against the truth are reference quantities
# and have none (REFERENCE_NOTE says why).
INTERVAL_METRICS = ("auroc", "auprc", "brier", "calibration_slope", "calibration_intercept", "auroc_diff",
                    "ece")  # fmt: skip
ECE_INTERVAL_NOTE = (
    "the same bootstrap replicates, shifted by their bias (their mean minus the ECE), because the ECE is "
    "biased upwards on a test set of this size and a resample adds noise of its own: the interval is the "
    "range the ECE would take on another test set of this size, not a range for the calibration error of "
    "the whole population (compare it with the ECE floor, not with 0)"
)
REFERENCE_NOTE = (
    "The ECE floor and the ECE vs truth have no interval: they are reference quantities, not estimates "
    "from the held-out outcomes. The floor is the ECE a perfectly calibrated model with these predictions "
    "would show, on average, on this many patients (outcomes simulated from the predictions themselves); "
    "ECE vs truth compares the predictions with the simulator's true probabilities (synthetic data only), "
    "which carry almost none of the outcomes' sampling noise."
)
TRUTH_NOTE = (
    "The comparisons with the simulator's ground truth (PEHE, correlation, and deaths per 100 from the true "
    "death probabilities) have no interval because they are not estimated: they are exact for these "
    "held-out patients, computed from each patient's true probabilities with no outcome sampled and no "
    "outcome model involved, so the uncertainty the intervals above express (which outcomes happened to "
    "occur, what the nuisance models guess) is absent. They exist on synthetic data only, to check the "
    "doubly robust estimates above against the answer."
)
# Proportions at the configured thresholds, each with a Wilson interval from evaluation.threshold_metrics.
THRESHOLD_RATES = (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"),
                   ("npv", "NPV"))  # fmt: skip

INTENDED_USE = {
    "onset": (
        "Estimate, for a hospitalised patient with suspected hyperinflammation, the probability that "
        "macrophage activation syndrome (MAS, secondary HLH) is present or develops within 7 days, to prompt "
        "earlier specialist review, tests (ferritin trend, fibrinogen, bone-marrow aspirate) and monitoring."
    ),
    "icu": (
        "Estimate, for a patient with MAS, the probability of needing intensive care within 7 days, to help "
        "plan the level of care and escalation."
    ),
    "il1_benefit": (
        "Estimate, for a patient with MAS, how much IL-1 blockade (anakinra) changes the risk of death "
        "within 28 days, as one input to a treatment decision taken by the treating team."
    ),
}
USERS = (
    "Clinicians caring for hospitalised patients with suspected hyperinflammation (rheumatology, "
    "haematology, infectious diseases, intensive care), through a hospital application that calls the "
    "masml scoring service; data scientists who retrain and monitor the model."
)
# Clinical cautions that hold whatever the metrics say (clinical-reference.md §3, §9, §10).
CAUTIONS = (
    "A parasitic (visceral leishmaniasis) or fungal trigger must be excluded or treated before any "
    "immunosuppression: Leishmania mimics HLH and the first marrow smear missed it in 6 of 13 children "
    "(Bode 2014; clinical-reference §10).",
    "Lymphoma-associated HLH needs disease-specific therapy (chemotherapy); IL-1 blockade is not first-line "
    "and must not delay it (clinical-reference §10).",
    "Subclinical hyperinflammation and MAS that needs intensive care call for different decisions; a risk "
    "estimate does not say which of the two a patient has.",
    "The score supports, and never replaces, clinical judgement and the diagnostic criteria (HLH-2004, "
    "2016 EULAR/ACR/PRINTO, HScore), which remain the reference.",
)
OUT_OF_SCOPE = (
    "Primary (familial) HLH and neonates: not represented in the training data.",
    "Patients already receiving cytokine-directed therapy (anakinra, tocilizumab, emapalumab, JAK "
    "inhibitors) or HLH-94 etoposide at the time of scoring: such treatment changes the laboratory picture "
    "the model relies on (Eloseily 2019, clinical-reference §5).",
    "Use as a diagnostic test or as the sole basis for starting or withholding treatment.",
    "Populations, triggers or hospitals absent from the training data (listed under Training data).",
)
SHAP_LIMITS = (
    "SHAP values (exact TreeSHAP, Lundberg 2020) say how much each input moved this model's log-odds for "
    "this patient, relative to the model's average. They explain the model, not the disease: a large "
    "contribution means the model leaned on that input, not that the input causes MAS or that changing it "
    "would change the patient's risk. Correlated inputs share credit in ways that depend on the trees."
)
MONITORING = (
    "The scoring service exposes, per model, request counts, latency, errors by kind, per-input "
    "missingness and the distribution of predicted risks (GET /metrics, Prometheus).",
    "Review monthly: missingness of each input against the training data (Training data table), the "
    "mean predicted risk against the observed event rate (calibration-in-the-large), and alert volume at "
    "the configured thresholds.",
    "Retrain or recalibrate when the observed event rate leaves the 95% interval of the mean predicted "
    "risk for two consecutive months, when an input's missingness changes by more than 20 percentage "
    "points, or when laboratory methods or units change. These triggers are masml's proposal, an "
    "assumption to be set by the governance committee.",
    "Withdraw the model if a subgroup shows a credible calibration or discrimination failure, or if a "
    "safety incident is linked to its use.",
)
SIGN_OFF = (
    "Clinical lead",
    "Clinical safety officer",
    "Data protection / information governance",
    "Data science lead",
)


# --------------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------------


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars plain numbers, containers recursively."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


AGE_STEP = 0.1  # years: the resolution of a median merged from partitions (a cluster run)


def description_counts(frame: pd.DataFrame, inputs: Sequence[str], label: str) -> dict:
    """``data_description``'s counts for one part of a dataset: they add up across partitions."""
    y = pd.to_numeric(frame[label], errors="coerce")
    age = frame["age_years"].to_numpy(dtype=float)

    def counts(values: pd.Series) -> dict[str, int]:
        return {str(k): int(v) for k, v in values.fillna("missing").astype(str).value_counts().items()}

    return {
        "rows": int(len(frame)),
        "events": int((y == 1).sum()),
        "trigger": counts(frame["trigger"]),
        "trigger_family": counts(frame["trigger"].map(TRIGGER_FAMILY)),
        "age_band": counts(frame["age_years"].map(age_band)),
        "sex": counts(frame["sex"]),
        "missing": {name: int(frame[name].isna().sum()) for name in inputs},
        "age_steps": np.bincount(np.round(age[~np.isnan(age)] / AGE_STEP).astype(np.int64)).tolist(),
    }


def merge_descriptions(parts: Sequence[dict]) -> dict:
    """Partitions' ``description_counts`` → the ``data_description`` of the whole; the median age is
    the median of ages rounded to 0.1 year (the exact median needs every value in one place)."""
    rows = sum(p["rows"] for p in parts)
    events = sum(p["events"] for p in parts)

    def table(key: str) -> list[dict]:
        total: dict[str, int] = {}
        for p in parts:
            for k, v in p[key].items():
                total[k] = total.get(k, 0) + v
        ordered = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
        return [{"level": k, "n": v, "share": v / rows} for k, v in ordered]

    steps = np.zeros(max((len(p["age_steps"]) for p in parts), default=0), dtype=np.int64)
    for p in parts:  # a partition with no rows has no steps
        steps[: len(p["age_steps"])] += np.asarray(p["age_steps"], dtype=np.int64)
    cum = np.cumsum(steps)
    n_age = int(cum[-1]) if len(cum) else 0
    median = None
    if n_age:
        lo, hi = np.searchsorted(cum, [(n_age - 1) // 2 + 1, n_age // 2 + 1])
        median = float((lo + hi) / 2 * AGE_STEP)
    inputs = list(parts[0]["missing"]) if parts else []
    return {
        "rows": rows,
        "events": events,
        "prevalence": events / rows if rows else None,
        "trigger": table("trigger"),
        "trigger_family": table("trigger_family"),
        "age_band": table("age_band"),
        "age_median": median,
        "sex": table("sex"),
        "missingness": {n: sum(p["missing"][n] for p in parts) / rows if rows else 0.0 for n in inputs},
    }


def data_description(frame: pd.DataFrame, inputs: Sequence[str], label: str) -> dict:
    """Who the model learned from: size, outcome rate, trigger mix, age, sex and missingness per input."""
    described = merge_descriptions([description_counts(frame, inputs, label)])
    described["age_median"] = float(frame["age_years"].median())  # exact, the frame being at hand
    return described


def _described(data: pd.DataFrame | Mapping, config: Any) -> dict:
    """A frame's ``data_description``, or the description itself (a cluster computes it piecewise)."""
    return dict(data) if isinstance(data, Mapping) else data_description(data, config.inputs, config.label)


def _common(*, manifest, config, population, train, test, run, units_file, algorithm, limitations,
            split=None) -> dict:  # fmt: skip
    """The sections every card has, risk or benefit model alike."""
    from masml.schema import COLUMNS

    task = manifest["task"]
    synthetic = bool(manifest["training_data"].get("synthetic"))
    train, test = _described(train, config), _described(test, config)
    present = {t["level"] for t in train["trigger"]}
    absent = [c for c in (COLUMNS["trigger"].categories or ()) if c not in present]
    return {
        "card_format": CARD_FORMAT,
        "title": f"Model card: {manifest['model_name']} ({task})",
        "synthetic_data": synthetic,
        "model": {
            "name": manifest["model_name"],
            "task": task,
            "version": run.get("version") or "not registered (run without tracking)",
            "created_at": manifest["created_at"],
            "masml_version": manifest["versions"]["masml"],
            "versions": manifest["versions"],
            "algorithm": algorithm,
            "best_params": run.get("best_params", {}),
            "bundle_sha256": manifest["model_sha256"],
            "mlflow_run_id": run.get("run_id") or None,
            "tracking_uri": run.get("tracking_uri") or None,
            "owner": config.owner or "not set in the config",
            "contact": config.contact or "not set in the config",
            "licence": "Apache-2.0 (masml code); the trained model inherits the data's terms",
        },
        "intended_use": {
            "summary": INTENDED_USE.get(task, ""),
            "users": USERS,
            "cautions": list(CAUTIONS),
            "out_of_scope": list(OUT_OF_SCOPE),
            "absent_triggers": absent,
        },
        "data": {
            "source": manifest["training_data"]["source"],
            "synthetic_statement": (
                "SYNTHETIC DATA. This model was trained and evaluated on masml's simulated cohort, whose "
                "parameters come from the published literature (docs/clinical-reference). No real patient "
                "was involved. Its performance says nothing about performance in any hospital: retrain and "
                "evaluate on local data before any clinical use."
                if synthetic
                else "Real data supplied by the hospital that ran the pipeline (see source and fingerprint)."
            ),
            "fingerprint": manifest["training_data"]["fingerprint"],
            "dates": "not recorded: masml's schema carries no dates (TRIPOD+AI 5b)",
            "label": manifest["label"],
            "population": manifest["population"],
            "units": f"converted to canonical units with the units file {units_file}"
            if units_file
            else ("supplied in masml's canonical units (docs/schema.md)"),
            "flow": {
                "rows_in": population.rows_in,
                "skipped_outside_population": population.skipped_outside_population,
                "skipped_label_missing": population.skipped_label_missing,
                "rows_used": train["rows"] + test["rows"],
                "events": train["events"] + test["events"],
                "train_rows": train["rows"],
                "test_rows": test["rows"],
                "split": (split or f"held-out {config.test_size:.0%} stratified and grouped by patient_id "
                          f"(seed {config.seed})") + "; tuning and calibration used the training part only",
            },
            "training": train,
            "evaluation": test,
            "inputs": [{"name": i["name"], "unit": i["unit"], "description": i["description"]}
                       for i in manifest["inputs"]],  # fmt: skip
        },
        "limitations": limitations + _limitations(synthetic, absent),
        "ethics": [
            "No personal data is used by masml's default cohort; a hospital retraining on its own data is "
            "the data controller and needs the approvals its jurisdiction requires (TRIPOD+AI 17).",
            "Subgroup performance is reported for trigger family, age band and sex; ethnicity and socio-"
            "economic factors are not in the schema, so fairness across them cannot be assessed here.",
            "A wrong high risk may lead to unnecessary tests or immunosuppression; a wrong low risk may "
            "delay treatment of a life-threatening condition. The cautions above apply to every use.",
        ],
        "monitoring": list(MONITORING),
        "sign_off": list(SIGN_OFF),
    }


def card_content(
    *,
    manifest: Mapping,
    config: Any,
    population: Any,
    train: pd.DataFrame | Mapping,
    test: pd.DataFrame | Mapping,
    comparison: pd.DataFrame,
    report: Mapping,
    subgroups: pd.DataFrame,
    importance: pd.DataFrame,
    figures: Mapping[str, bytes],
    run: Mapping[str, Any],
    units_file: str | None = None,
    split: str | None = None,
) -> dict:
    """A risk model's card: everything it says, as JSON-ready data taken from the run.

    ``train`` and ``test``: the frames, or their ``data_description`` (what a cluster run has)."""
    planned = config.tuning.n_trials
    trials = f"{run.get('trials_run', planned)} trials"
    if run.get("stopped_by_timeout"):
        trials = (f"{run.get('trials_run')} of {planned} planned trials: the tuning.timeout_s cap "
                  f"({config.tuning.timeout_s:g} s) stopped the search, so this model depends on the "
                  "training machine's speed and a re-run may give another")  # fmt: skip
    algorithm = (
        f"XGBoost gradient-boosted trees ({run.get('n_trees', '?')} trees), hyper-parameters tuned "
        f"with optuna (TPE, {trials}, {config.folds}-fold cross-validation grouped by "
        f"patient, early stopping), {config.calibration} calibration fitted on out-of-fold predictions. "
        "Missing values stay missing: the trees learn a default direction for them."
    )
    model_row = comparison.set_index("model").loc["model"]
    warnings = [
        {"group": r["group"], "level": r["level"], "warning": r["warning"]}
        for _, r in subgroups.iterrows()
        if str(r.get("warning") or "")
    ]
    card = _common(
        manifest=manifest, config=config, population=population, train=train, test=test, run=run,
        units_file=units_file, algorithm=algorithm, split=split,
        limitations=[f"Subgroup {w['group']} = {w['level']}: {w['warning']}." for w in warnings],
    )  # fmt: skip
    # Every metric of ``evaluation.compare`` that has a bootstrap interval keeps it beside the estimate.
    metric_keys = [k for m in INTERVAL_METRICS for k in (m, f"{m}_lo", f"{m}_hi")]
    metric_keys += ["ece_floor", "ece_vs_truth"]
    card["performance"] = {
        "test_rows": card["data"]["flow"]["test_rows"],
        "comparison": comparison.to_dict(orient="records"),
        "model": {k: model_row.get(k) for k in metric_keys if k in model_row},
        "calibration": {k: report[k] for k in ("calibration_intercept", "calibration_slope")},
        "thresholds": list(report.get("threshold_metrics", [])),
        "intervals": {
            "metrics": "percentile bootstrap stratified by outcome, paired across models "
            f"({_boot_text(report.get('bootstrap'))})",
            "ece": ECE_INTERVAL_NOTE,
            "reference": REFERENCE_NOTE,
            "thresholds": "Wilson score interval for each proportion (Wilson 1927, J Am Stat Assoc "
            "22:209-212)",
        },
        "threshold_choice": "set in the config (thresholds); masml does not choose them: the decision "
        "curve shows the range of threshold probabilities over which the model adds net benefit",
        "figures": {name: _png_data_uri(figures[name]) for name in PERFORMANCE_FIGURES if name in figures},
    }
    card["subgroups"] = {
        "table": subgroups.to_dict(orient="records"),
        "warnings": warnings,
        "method": "fairlearn MetricFrame per grouping; AUROC with stratified bootstrap 95% CIs; "
        "'small group' under 100 patients or 20 events; 'worse' when the AUROC's upper bound is below "
        "the overall AUROC or observed minus expected risk exceeds 5 percentage points",
    }
    card["explanations"] = {
        "top_features": importance.head(10).to_dict(orient="records"),
        "figure": _png_data_uri(figures["shap_summary"]) if "shap_summary" in figures else None,
        "limits": SHAP_LIMITS,
    }
    card["tripod_ai"] = tripod_ai(card)
    return _clean(card)


def _boot_text(boot: Mapping | None) -> str:
    if not boot:
        return "replicates not recorded"
    if "subset_size" in boot:  # a test set above evaluation.BLB_MIN_ROWS
        return (
            f"{boot.get('n_boot')} replicates as a bag of little bootstraps: {boot['subsets']} subsets of "
            f"{boot['subset_size']:,} patients, each resampled {boot['per_subset']} times at the full size "
            f"(Kleiner 2014, J R Stat Soc B 76:795-816), seed {boot.get('seed')}"
        )
    return f"{boot.get('n_boot')} replicates, seed {boot.get('seed')}"


BENEFIT_FIGURES = ("overlap", "balance", "benefit_by_trigger", "qini")


def benefit_card_content(
    *,
    manifest: Mapping,
    config: Any,
    population: Any,
    train: pd.DataFrame,
    test: pd.DataFrame,
    report: Mapping,
    figures: Mapping[str, bytes],
    run: Mapping[str, Any],
    units_file: str | None = None,
    split: str | None = None,
) -> dict:
    """The benefit model's card: the causal estimand, its assumptions, and how far to trust it.

    ``train`` / ``test``: the patients' frames, or their ``data_description`` (a cluster computes it
    piecewise); ``split``: how the held-out patients were chosen, when not the one-process split."""
    method = manifest.get("method", {})
    algorithm = (
        f"Causal (treatment-effect) model. {method.get('design', '')}. Learner chosen without ground truth: "
        f"{method.get('learner', '?')} among {', '.join(method.get('candidates', []))} "
        f"({method.get('selection', '')})."
    )
    overlap = report["overlap"]["test"]
    card = _common(
        manifest=manifest, config=config, population=population, train=train, test=test, run=run,
        units_file=units_file, algorithm=algorithm, split=split,
        limitations=[
            *manifest.get("assumptions", []),
            f"{overlap['n_outside']} of {overlap['n']} held-out patients lie outside the overlap region "
            f"{overlap['bounds']}: their benefit estimates extrapolate.",
            "No per-patient uncertainty interval is given for the benefit; the average effect, the policy "
            "values, the share treated and the calibration slope have one.",
        ],
    )  # fmt: skip
    card["benefit"] = {
        "estimand": manifest.get("estimand"),
        "assumptions": manifest.get("assumptions", []),
        "treatment": manifest.get("treatment"),
        "ate_aipw": report["ate_aipw"],
        "ate_aipw_trimmed": report["ate_aipw_trimmed"],
        "overlap": report["overlap"],
        "balance": report["balance"],
        "calibration_slope": report["calibration_slope"],
        "calibration_slope_ci": report.get("calibration_slope_ci"),
        "calibration_groups": report["calibration_groups"],
        "uplift": report["uplift"],
        "policy_dr_deaths_per_100": report["policy_dr_deaths_per_100"],
        "policy_dr_deaths_per_100_ci": report.get("policy_dr_deaths_per_100_ci"),
        "truth": report.get("truth"),
        "intervals": {
            "average_effect": "influence-function interval of the AIPW mean, estimate +- 1.96 SE",
            "policies": "each policy's deaths per 100 is the mean of per-patient doubly robust scores: "
            "influence-function interval, estimate +- 1.96 SE, as for the average effect",
            "share_treated": "Wilson score interval for a proportion (Wilson 1927, J Am Stat Assoc "
            "22:209-212)",
            "calibration_slope": "heteroskedasticity-robust (HC1) influence-function interval of the least-"
            "squares slope, estimate +- 1.96 SE (best linear predictor, Chernozhukov et al. 2018)",
            "calibration_groups": "influence-function interval of each group's doubly robust effect",
            "uplift": f"patient bootstrap, percentile ({config.n_boot} replicates, seed {config.seed})",
            **({"truth": TRUTH_NOTE} if report.get("truth") else {}),
        },
        "by_trigger_family": report.get("benefit_by_trigger_family", []),
        "selection": report["selection"],
        "guardrails": manifest.get("guardrails", []),
        "guardrails_fired_test": manifest["metrics"].get("guardrails_fired_test", {}),
        "figures": {name: _png_data_uri(figures[name]) for name in BENEFIT_FIGURES if name in figures},
    }
    card["tripod_ai"] = tripod_ai(card)
    return _clean(card)


def _limitations(synthetic: bool, absent: list[str]) -> list[str]:
    out = []
    if synthetic:
        out.append("Trained and evaluated on simulated patients only; no external validation.")
    out.append("Internal validation only: one held-out split of the same data source.")
    if absent:
        out.append(f"Triggers absent from the training data: {', '.join(absent)}.")
    out.append("Inputs are one snapshot; trends use only the previous ferritin and platelet values.")
    return out


TRIPOD_ITEMS: tuple[tuple[str, str, str], ...] = (
    # (item, topic, section of the card that answers it; "" = not reported, "n/a" = not applicable)
    ("1", "Title", "title"),
    ("2", "Abstract", ""),
    ("3a", "Clinical context and rationale", "intended_use"),
    ("3b", "Target population, care pathway, intended users", "intended_use"),
    ("3c", "Known health inequalities", "ethics"),
    ("4", "Objectives", "intended_use"),
    ("5a", "Data sources and representativeness", "data"),
    ("5b", "Accrual and follow-up dates", ""),
    ("6a", "Setting and centres", "data"),
    ("6b", "Eligibility", "data"),
    ("6c", "Treatments received", "data"),
    ("7", "Data preparation and quality checks", "data"),
    ("8", "Outcome definition and horizon", "data"),
    ("9", "Predictors", "data"),
    ("10", "Sample size", "data"),
    ("11", "Missing data", "data"),
    ("12", "Analysis: partitioning, predictors, model building, performance measures", "model"),
    ("13", "Class imbalance", "model"),
    ("14", "Fairness", "subgroups"),
    ("15", "Model output and thresholds", "performance"),
    ("16", "Development vs evaluation data", "data"),
    ("17", "Ethics approval", "ethics"),
    ("18", "Open science: funding, conflicts, protocol, registration, data and code sharing", ""),
    ("19", "Patient and public involvement", ""),
    ("20", "Participants: flow and characteristics", "data"),
    ("21", "Numbers of participants and events", "data"),
    ("22", "Model specification / access", "model"),
    ("23", "Performance with CIs, subgroups, plots", "performance"),
    ("24", "Updated-model results", "n/a"),
    ("25", "Interpretation incl. fairness", "subgroups"),
    ("26", "Limitations", "limitations"),
    ("27", "Usability: missing inputs at use time, expertise needed", "monitoring"),
)
TRIPOD_NOTES = {
    "2": "a card has no abstract; the summary box at the top stands in for it",
    "5b": "masml's schema records no dates",
    "6a": "synthetic: no centres",
    "6c": "treatment (IL-1 blockade) is recorded; the risk models do not adjust for it",
    "13": "no resampling or weighting; calibration fitted on out-of-fold predictions",
    "17": "the hospital that retrains answers this; the synthetic default needs no approval",
    "18": "code: masml (Apache-2.0); the rest is for the deploying organisation to state",
    "19": "not done by masml; for the deploying organisation",
    "22": "the full model is the ONNX bundle (sha256 above), scorable by any onnxruntime",
    "24": "the model is not an update of an earlier model",
    "27": "missing inputs are passed as missing (never imputed) and handled by the trees",
}


def tripod_ai(card: Mapping) -> list[dict]:
    """The 27 TRIPOD+AI items, each with where the card answers it (or an honest 'not reported')."""
    out = []
    for item, topic, section in TRIPOD_ITEMS:
        if section in ("performance", "subgroups") and section not in card and "benefit" in card:
            section = "benefit"  # the benefit card answers these in its own section
        status = "not applicable" if section == "n/a" else ("reported" if section else "not reported")
        out.append(
            {
                "item": item,
                "topic": topic,
                "status": status,
                "section": section if section not in ("", "n/a") else None,
                "note": TRIPOD_NOTES.get(item, ""),
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#1a1a1a;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:.8rem 1rem;font-weight:600;margin:1rem 0}
.caution{background:#fdecea;border-left:4px solid #c0392b;padding:.4rem .8rem;margin:.3rem 0}
.figs{display:flex;flex-wrap:wrap;gap:.8rem}.figs figure{margin:0;flex:1 1 24rem}.figs img{max-width:100%}
.muted{color:#555;font-size:.9rem}.sign td{height:2.2rem;min-width:10rem}
@media print{body{margin:0;max-width:none}h2{break-after:avoid}figure,table{break-inside:avoid}}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers as the card prints them (tests compare the page with the run's metrics through this)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(est: Any, lo: Any, hi: Any) -> str:
    """"estimate [lo, hi]". The space inside the brackets is a no-break space, so a narrow column (a
    printed page) may put the interval under its estimate but never splits the interval itself."""
    if est is None:
        return "–"
    return f"{fmt(est)} [{fmt(lo)},\u00a0{fmt(hi)}]" if lo is not None else fmt(est)


def _table(
    rows: Sequence[Mapping], columns: Sequence[tuple[str, str]], intervals: Collection[str] = ()
) -> str:
    """An HTML table; a column named in ``intervals`` prints "estimate [lo, hi]" from the row's
    ``KEY_lo``/``KEY_hi`` (one cell, so an estimate is never read without its uncertainty)."""
    head = "".join(f"<th>{_e(title)}</th>" for _, title in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            text = _ci(v, r.get(f"{key}_lo"), r.get(f"{key}_hi")) if key in intervals else fmt(v)
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(fmt(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _list(items: Sequence[str], cls: str = "") -> str:
    if cls:
        return "".join(f'<div class="{cls}">{_e(i)}</div>' for i in items)
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _figure(uri: str, caption: str) -> str:
    return f'<figure><img alt="{_e(caption)}" src="{uri}"><figcaption>{_e(caption)}</figcaption></figure>'


def _present(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The columns at least one row has a value for (no "ECE vs truth" column on real data)."""
    return [(k, t) for k, t in columns if any(r.get(k) is not None for r in rows)]


def _risk_sections(card: Mapping) -> list[str]:
    perf = card["performance"]
    parts: list[str] = []
    rows = perf["comparison"]
    ci = " [95% CI]"
    discrimination = [("model", "model"), ("rows", "n"), ("auroc", "AUROC" + ci), ("auprc", "AUPRC" + ci)]
    discrimination += _present(rows, [("auroc_diff", "Δ AUROC vs ceiling" + ci)])
    # Clinical scores are points or rules, not probabilities: calibration does not apply to them.
    probabilities = [r for r in rows if r.get("probabilistic", True)]
    calibration = [("model", "model"), ("rows", "n"), ("brier", "Brier" + ci),
                   ("calibration_slope", "calibration slope" + ci),
                   ("calibration_intercept", "calibration intercept" + ci), ("ece", "ECE" + ci)]  # fmt: skip
    calibration += _present(probabilities, [("ece_floor", "ECE floor"), ("ece_vs_truth", "ECE vs truth")])
    rates = [("threshold", "threshold")] + [(k, t + ci) for k, t in THRESHOLD_RATES]
    rates.append(("flagged_share", "flagged"))
    intervals = perf.get("intervals", {})
    figs = "".join(
        _figure(uri, name.replace("_", " ")) for name, uri in perf["figures"].items()
    )
    parts.append(
        '<section id="performance"><h2>Performance on held-out patients</h2>'
        "<p>The model beside the logistic-regression baseline, the clinical scores (on the patients each "
        "applies to) and, for simulated data, the ceiling (the true probabilities). Each number is followed "
        "by its 95% CI in brackets, from a stratified bootstrap with every model scored on the same "
        "resampled patients. The ECE floor beside the ECE is the ECE a perfectly calibrated model would "
        "show on this many patients: an ECE whose interval contains its floor cannot be told from noise.</p>"
        + (f"<p class='muted'>Intervals: {_e(intervals['metrics'])}.</p>" if intervals.get("metrics") else "")
        + (f"<p class='muted'>ECE interval: {_e(intervals['ece'])}.</p>" if intervals.get("ece") else "")
        + (f"<p class='muted'>{_e(intervals['reference'])}</p>" if intervals.get("reference") else "")
        + "<h3>Discrimination</h3>"
        + _table(rows, discrimination, INTERVAL_METRICS)
        + "<h3>Calibration and accuracy of the probabilities</h3>"
        + _table(probabilities, calibration, INTERVAL_METRICS)
        + "<p class='muted'>Clinical scores (points or yes/no rules) are not probabilities, so they appear "
        "under discrimination only.</p>"
        + "<h3>At the configured thresholds</h3>"
        + _table(perf["thresholds"], rates, [k for k, _ in THRESHOLD_RATES])
        + "<p class='muted'>A patient is flagged when the risk is at or above the threshold. 95% CIs: "
        f"{_e(intervals.get('thresholds', 'Wilson score interval for each proportion'))}.</p>"
        + f"<p class='muted'>{_e(perf['threshold_choice'])}</p>"
        + f"<div class='figs'>{figs}</div></section>"
    )
    sub = card["subgroups"]
    parts.append(
        '<section id="subgroups"><h2>Subgroups</h2>'
        + _table(
            sub["table"],
            [
                ("group", "grouping"),
                ("level", "group"),
                ("n", "n"),
                ("events", "events"),
                ("auroc", "AUROC"),
                ("auroc_lo", "lo"),
                ("auroc_hi", "hi"),
                ("o_minus_e", "observed − expected"),
                ("warning", "warning"),
            ],
        )
        + f"<p class='muted'>{_e(sub['method'])}</p></section>"
    )
    ex = card["explanations"]
    parts.append(
        '<section id="explanations"><h2>Explanations (SHAP)</h2>'
        + _table(ex["top_features"], [("feature", "feature"), ("mean_abs_shap", "mean |SHAP| (log-odds)")])
        + (
            _figure(ex["figure"], "SHAP summary")
            if ex.get("figure")
            else ""
        )
        + f"<p>{_e(ex['limits'])}</p></section>"
    )
    return parts


def _benefit_sections(card: Mapping) -> list[str]:
    """Estimand and assumptions, overlap and balance, average effect, calibration, ranking, policies."""
    b = card["benefit"]
    ate, trimmed = b["ate_aipw"], b["ate_aipw_trimmed"]
    figs = "".join(_figure(uri, name.replace("_", " ")) for name, uri in b["figures"].items())
    ov = b["overlap"]
    dr_policy = b["policy_dr_deaths_per_100"]
    dr_ci = b.get("policy_dr_deaths_per_100_ci") or {}  # absent from a card.json made before the intervals
    policy = [{"policy": k.replace("_", " "), "deaths_per_100": v,
               "deaths_per_100_lo": (dr_ci.get(k) or {}).get("ci_low"),
               "deaths_per_100_hi": (dr_ci.get(k) or {}).get("ci_high")}
              for k, v in dr_policy.items() if k != "share_treated_by_model"]  # fmt: skip
    share = dr_policy.get("share_treated_by_model")
    share_ci = dr_ci.get("share_treated_by_model") or {}
    slope_ci = b.get("calibration_slope_ci") or {}
    notes = b.get("intervals") or {}
    note_text = "; ".join(f"{title}: {notes[k]}" for k, title in (
        ("average_effect", "average effect"), ("policies", "policies"), ("share_treated", "share treated"),
        ("calibration_slope", "calibration slope"), ("calibration_groups", "calibration groups"),
        ("uplift", "ranking")) if notes.get(k))  # fmt: skip
    family = b["by_trigger_family"]
    family_cols = [(k, k.replace("_", " ")) for k in (family[0].keys() if family else [])]
    truth = b.get("truth") or {}
    uplift = [{"metric": k, "estimate": v["estimate"], "ci_low": v["ci_low"], "ci_high": v["ci_high"]}
              for k, v in b["uplift"].items()]  # fmt: skip
    parts = [
        '<section id="benefit"><h2>Benefit of IL-1 blockade</h2>'
        f"<p><b>Estimand.</b> {_e(b['estimand'])}</p><h3>Assumptions</h3>" + _list(b["assumptions"])
        + "<h3>Average effect on held-out patients</h3>"
        + _kv([("AIPW average benefit [95% CI]", _ci(ate["estimate"], ate["ci_low"], ate["ci_high"])),
               ("Within the overlap region [95% CI]",
                _ci(trimmed["estimate"], trimmed["ci_low"], trimmed["ci_high"])),
               ("Calibration slope of predicted benefit [95% CI]",
                _ci(b["calibration_slope"], slope_ci.get("ci_low"), slope_ci.get("ci_high")))])
        + "<h3>Overlap and balance</h3>"
        + _kv([("Overlap bounds (propensity)", ov["test"]["bounds"]),
               ("Held-out patients outside", f"{ov['test']['n_outside']} of {ov['test']['n']}"),
               ("Training patients outside", f"{ov['training']['n_outside']} of {ov['training']['n']}"),
               ("Warning", ov["test"].get("warning") or "none"),
               ("Max |SMD| before weighting", b["balance"]["max_abs_smd_before"]),
               ("Max |SMD| after weighting", b["balance"]["max_abs_smd_after"])])
        + "<h3>Calibration by predicted-benefit group</h3>"
        + _table(b["calibration_groups"], [("group", "group"), ("n", "n"), ("predicted", "predicted"),
                                           ("observed", "observed (DR)"), ("observed_ci_low", "lo"),
                                           ("observed_ci_high", "hi")])
        + "<h3>Ranking (Qini, RATE/TOC)</h3>"
        + _table(uplift, [("metric", "metric"), ("estimate", "estimate"), ("ci_low", "lo"),
                          ("ci_high", "hi")])
        + "<h3>Policies: deaths per 100 patients (doubly robust estimate)</h3>"
        + _table(policy, [("policy", "policy"), ("deaths_per_100", "deaths per 100 [95% CI]")],
                 ("deaths_per_100",))
        + _kv([("Share of held-out patients the model would treat (predicted benefit > 0) [95% CI]",
                _ci(share, share_ci.get("ci_low"), share_ci.get("ci_high")))])
        + (f"<p class='muted'>95% CIs: {_e(note_text)}.</p>" if note_text else "")
        + (_kv([("PEHE (vs truth)", truth.get("pehe")), ("PEHE ratio vs constant", truth.get("pehe_ratio")),
                ("Correlation with true benefit", truth.get("correlation"))])
           + _table([{"policy": k.replace("_", " "), "deaths_per_100": v}
                     for k, v in truth.get("deaths_per_100", {}).items()],
                    [("policy", "policy (true outcomes)"), ("deaths_per_100", "deaths per 100")])
           + (f"<p class='muted'>{_e(notes['truth'])}</p>" if notes.get("truth") else "")
           if truth else "")
        + "<h3>By trigger family</h3>"
        + _table(family, family_cols)
        + "<h3>Guardrails returned with every prediction</h3>"
        + _table([{"rule": g.get("id"), "message": g.get("message"), "kind": g.get("kind", ""),
                   "fired_held_out": b["guardrails_fired_test"].get(g.get("id"))} for g in b["guardrails"]],
                 [("rule", "rule"), ("message", "message"), ("kind", "kind"),
                  ("fired_held_out", "fired on held-out")])
        + f"<div class='figs'>{figs}</div></section>"
    ]  # fmt: skip
    return parts


def render_html(card: Mapping) -> str:
    """One self-contained HTML page (figures embedded as data URIs, no network fetches)."""
    m, use, data = card["model"], card["intended_use"], card["data"]
    flow, train = data["flow"], data["training"]
    parts = [
        f"<h1>{_e(card['title'])}</h1>",
        f'<p class="muted">Generated by masml {_e(m["masml_version"])} from the training run; '
        "every number below comes from that run.</p>",
    ]
    if card["synthetic_data"]:
        parts.append(f'<div class="banner" id="synthetic">{_e(data["synthetic_statement"])}</div>')
    if "performance" in card:
        best = card["performance"]["model"]
        summary = [
            ("Predicts", data["label"]["definition"]),
            ("Population", data["population"]["description"]),
            ("Held-out patients", flow["test_rows"]),
            *[(f"{title} [95% CI]", _ci(best.get(k), best.get(f"{k}_lo"), best.get(f"{k}_hi")))
              for k, title in (("auroc", "AUROC"), ("calibration_slope", "Calibration slope"),
                               ("calibration_intercept", "Calibration intercept"))],
        ]  # fmt: skip
    else:
        ben = card["benefit"]
        ate = ben["ate_aipw"]
        summary = [
            ("Estimates", ben["estimand"]),
            ("Population", data["population"]["description"]),
            ("Held-out patients", flow["test_rows"]),
            ("Average benefit (AIPW) [95% CI]", _ci(ate["estimate"], ate["ci_low"], ate["ci_high"])),
            ("Held-out patients outside overlap", ben["overlap"]["test"]["n_outside"]),
        ]
    parts.append('<section id="summary"><h2>Summary</h2>' + _kv(summary) + "</section>")
    parts.append(
        '<section id="model"><h2>Model details</h2>'
        + _kv(
            [
                ("Name", m["name"]),
                ("Task", m["task"]),
                ("Version", m["version"]),
                ("Created", m["created_at"]),
                ("Algorithm", m["algorithm"]),
                ("Bundle sha256", m["bundle_sha256"]),
                ("MLflow run", m["mlflow_run_id"]),
                ("Owner", m["owner"]),
                ("Contact", m["contact"]),
                ("Licence", m["licence"]),
                ("Software", ", ".join(f"{k} {v}" for k, v in m["versions"].items())),
            ]
        )
        + "</section>"
    )
    parts.append(
        '<section id="intended_use"><h2>Intended use</h2>'
        f"<p>{_e(use['summary'])}</p><p><b>Users.</b> {_e(use['users'])}</p>"
        "<h3>Clinical cautions</h3>"
        + _list(use["cautions"], "caution")
        + "<h3>Out of scope</h3>"
        + _list(use["out_of_scope"])
        + (
            f"<p><b>Triggers absent from the training data:</b> {_e(', '.join(use['absent_triggers']))}</p>"
            if use["absent_triggers"]
            else ""
        )
        + "</section>"
    )
    miss = sorted(train["missingness"].items(), key=lambda kv: -kv[1])
    parts.append(
        '<section id="data"><h2>Training and evaluation data</h2>'
        + _kv(
            [
                ("Source", data["source"]),
                ("Fingerprint", data["fingerprint"]),
                ("Dates", data["dates"]),
                (
                    "Label",
                    f"{data['label']['name']}: {data['label']['definition']} "
                    f"(horizon {data['label'].get('horizon') or '–'})",
                ),
                ("Population", data["population"]["description"]),
                ("Units", data["units"]),
                ("Rows in the file", flow["rows_in"]),
                ("Skipped: outside the population", flow["skipped_outside_population"]),
                ("Skipped: label missing", flow["skipped_label_missing"]),
                ("Rows used", flow["rows_used"]),
                ("Events", flow["events"]),
                ("Training rows", flow["train_rows"]),
                ("Held-out rows", flow["test_rows"]),
                ("Split", flow["split"]),
                ("Prevalence (training)", train["prevalence"]),
                ("Prevalence (held-out)", data["evaluation"]["prevalence"]),
                ("Median age (training)", train["age_median"]),
            ]
        )
        + "<h3>Trigger mix, age and sex (training)</h3><div class='figs'>"
        + _table(train["trigger_family"], [("level", "trigger family"), ("n", "n"), ("share", "share")])
        + _table(train["age_band"], [("level", "age band"), ("n", "n"), ("share", "share")])
        + _table(train["sex"], [("level", "sex"), ("n", "n"), ("share", "share")])
        + "</div><h3>Missing values per input (training)</h3>"
        + _table(
            [{"input": k, "missing": v} for k, v in miss], [("input", "input"), ("missing", "share missing")]
        )
        + "</section>"
    )
    parts += _risk_sections(card) if "performance" in card else _benefit_sections(card)
    parts.append('<section id="limitations"><h2>Limitations</h2>' + _list(card["limitations"]) + "</section>")
    parts.append(
        '<section id="ethics"><h2>Ethical considerations</h2>' + _list(card["ethics"]) + "</section>"
    )
    parts.append(
        '<section id="monitoring"><h2>Monitoring plan</h2>' + _list(card["monitoring"]) + "</section>"
    )
    parts.append(
        '<section id="tripod"><h2>TRIPOD+AI checklist</h2>'
        + _table(
            card["tripod_ai"],
            [
                ("item", "item"),
                ("topic", "topic"),
                ("status", "status"),
                ("section", "section"),
                ("note", "note"),
            ],
        )
        + "</section>"
    )
    rows = "".join(f"<tr><th>{_e(role)}</th><td></td><td></td><td></td></tr>" for role in card["sign_off"])
    parts.append(
        '<section id="sign_off"><h2>Sign-off</h2><table class="sign"><tr><th>role</th><th>name</th>'
        f"<th>decision (approve / reject)</th><th>date and signature</th></tr>{rows}</table></section>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(card['title'])}</title><style>{_CSS}</style></head><body>"
        + "".join(parts)
        + "</body></html>"
    )


def chromium() -> str | None:
    """Path of a headless-capable Chromium, if the machine has one (Debian's ``chromium`` package)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Flags from the machine notes: without the background-networking ones Chromium keeps trying to reach
# Google's hosts, which this closed network refuses.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def run_chromium(args: Sequence[str], timeout: float = 120) -> None:
    """Run headless Chromium with a throw-away profile; raises RuntimeError with its output on failure."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("Chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HOME": profile}
        )
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-800:]}")


def render_pdf(html_path: str | Path, pdf_path: str | Path) -> None:
    """Print the HTML card to PDF with headless Chromium (raises RuntimeError when it cannot)."""
    pdf_path = Path(pdf_path)
    run_chromium(
        ["--no-pdf-header-footer", f"--print-to-pdf={pdf_path.resolve()}", Path(html_path).resolve().as_uri()]
    )
    if not pdf_path.is_file() or pdf_path.read_bytes()[:5] != b"%PDF-":
        raise RuntimeError(f"chromium did not write a PDF to {pdf_path}")


def write_card(card: Mapping, out_dir: str | Path, pdf: bool = True) -> tuple[list[Path], str]:
    """card.json + card.html (+ card.pdf when Chromium is available); returns (paths, note on the PDF).

    Why the missing PDF is loud: governance often reviews the printed card, and a bundle without it
    looked complete. When the PDF cannot be printed (no Chromium, a crash, a timeout) the note starts
    with "WARNING" (the pipelines print it in their card log line) and card.json says so in ``pdf``:
    ``{"rendered": false, "reason": ...}``. card.json is therefore written last; ``pdf`` is not part of
    the HTML, so ``masml report`` re-renders the same page from it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "card.json", out / "card.html"]
    paths[1].write_text(render_html(card), encoding="utf-8")
    status: dict[str, Any] = {"rendered": False, "file": None, "reason": "not requested (pdf=False)"}
    note = "PDF not requested"
    (out / "card.pdf").unlink(missing_ok=True)  # a PDF left from an earlier card must not pass for this one
    if pdf:
        try:
            render_pdf(paths[1], out / "card.pdf")
            paths.append(out / "card.pdf")
            status = {"rendered": True, "file": "card.pdf", "reason": None}
            note = "PDF rendered with headless Chromium"
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as err:
            (out / "card.pdf").unlink(missing_ok=True)  # nor may a half-written one
            status["reason"] = str(err).strip() or type(err).__name__
            short = " ".join(status["reason"].split())[:300]  # one log line; card.json keeps it all
            note = f"WARNING: card.pdf was NOT rendered ({short}); card.json records why"
    saved = {**card, "pdf": status}
    paths[0].write_text(json.dumps(saved, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return paths, note


def render(card_json: str | Path, out_file: str | Path) -> Path:
    """``masml report``: the card in the format the file name asks for (.html, .pdf or .json)."""
    card = json.loads(Path(card_json).read_text(encoding="utf-8"))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".json":
        out.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    elif suffix in (".html", ".htm"):
        out.write_text(render_html(card), encoding="utf-8")
    elif suffix == ".pdf":
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "card.html"
            page.write_text(render_html(card), encoding="utf-8")
            render_pdf(page, out)
    else:
        raise ValueError(f"--out {str(out)!r}: the file name must end in .html, .pdf or .json")
    return out
