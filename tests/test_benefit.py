"""The IL-1 blockade benefit model (issue 4): estimation pieces, guardrails, bundle, predict, bad inputs.

The pipeline runs on a 3,000-patient cohort with a tiny config (two trials per nuisance model), so the
figures here say nothing about quality; the quality targets are measured on the default 20,000-patient
cohort (see the README). What is checked is behaviour that could break.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint
from test_card_support import (
    assert_not_blank,
    by,
    dump_dom,
    ensure_chromium,
    figures,
    install_chromium,
    interval,
    pairs,
    screenshot,
    table,
)

from masml import causal, guardrails
from masml.cohort import simulate, write_cohort
from masml.config import ConfigError, config_from_dict, load_config
from masml.encoding import encode_inputs
from masml.io import load_dataset
from masml.schema import TRIGGER_FAMILY, TRIGGERS
from masml.training import TrainingDataError
from pipelines.il1_benefit import _finite, run_il1_benefit_pipeline

MASML = str(Path(sys.executable).with_name("masml"))
TINY = "tuning:\n  n_trials: 2\n  max_rounds: 120\nn_boot: 100\nfolds: 3\n"
RULE_IDS = {"parasitic_or_fungal_trigger", "malignancy_trigger", "outside_overlap", "icu_level_severity"}
CARD_HEADINGS = (
    "Summary",
    "Model details",
    "Intended use",
    "Training and evaluation data",
    "Benefit of IL-1 blockade",
    "Limitations",
    "Ethical considerations",
    "Monitoring plan",
    "TRIPOD+AI checklist",
    "Sign-off",
)
CARD_SUBHEADINGS = (
    "Assumptions",
    "Average effect on held-out patients",
    "Overlap and balance",
    "Calibration by predicted-benefit group",
    "Ranking (Qini, RATE/TOC)",
    "Policies: deaths per 100 patients (doubly robust estimate)",
    "By trigger family",
    "Guardrails returned with every prediction",
)
CARD_FIGURES = {"overlap", "balance", "benefit by trigger", "qini"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benefit")
    data, _ = write_cohort(simulate(3_000, seed=21), tmp / "cohort.parquet")
    config = tmp / "tiny.yaml"
    config.write_text(TINY)
    return {"tmp": tmp, "data": data, "config": config, "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def run(workspace):
    # The card's PDF needs Chromium: install it when missing (and possible), and remember whether the run
    # had it, so the card test knows whether card.pdf must have reached the MLflow run.
    workspace["chromium_missing"] = install_chromium()
    os.environ["MLFLOW_TRACKING_URI"] = workspace["uri"]
    try:
        return run_il1_benefit_pipeline(
            workspace["data"],
            workspace["tmp"] / "bundle",
            config_path=workspace["config"],
            log=lambda m: None,
        )
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


# --------------------------------------------------------------------------------------------------
# Estimation pieces on data with a known answer
# --------------------------------------------------------------------------------------------------


def _known_effect(n: int = 40_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=n)
    e = 0.2 + 0.6 * x  # confounded: sicker (higher x) patients are treated more
    r0 = 0.2 + 0.5 * x
    r1 = r0 * (1 - 0.6 * x)  # benefit grows with x
    t = (rng.uniform(size=n) < e).astype(float)
    y = (rng.uniform(size=n) < np.where(t == 1, r1, r0)).astype(float)
    return x, e, r0, r1, t, y


def test_aipw_recovers_the_true_average_effect_where_the_naive_difference_does_not():
    x, e, r0, r1, t, y = _known_effect()
    phi = causal.pseudo_outcome(y, t, r0, r1, e, (0.1, 0.9))
    ate = causal.aipw(phi)
    truth = float(np.mean(r0 - r1))
    assert ate["ci_low"] <= truth <= ate["ci_high"]
    naive = y[t == 0].mean() - y[t == 1].mean()
    assert abs(naive - truth) > 3 * ate["se"]  # confounding by indication biases the naive comparison


def test_uplift_metrics_reward_a_correct_ranking_and_not_a_reversed_one():
    x, e, r0, r1, t, y = _known_effect(20_000)
    phi = causal.pseudo_outcome(y, t, r0, r1, e, (0.1, 0.9))
    good = causal.uplift_metrics(r0 - r1, phi, n_boot=50)
    bad = causal.uplift_metrics(-(r0 - r1), phi, n_boot=50)
    assert good["autoc"]["ci_low"] > 0 > bad["autoc"]["ci_high"]
    assert good["qini"]["estimate"] > 0 > bad["qini"]["estimate"]
    groups = causal.calibration_by_group(r0 - r1, phi)
    assert list(groups["group"]) == [1, 2, 3, 4, 5]
    assert groups["observed"].iloc[-1] > groups["observed"].iloc[0]
    assert 0.7 < causal.calibration_slope(r0 - r1, phi) < 1.3


def test_policy_value_and_calibration_slope_intervals():
    """Policy values: means of doubly robust scores with aipw's influence-function interval; share
    treated: Wilson (statsmodels); calibration slope: the HC1 robust interval of least squares
    (statsmodels), covering the true slope of 1 when the nuisances are right."""
    import statsmodels.api as sm
    from statsmodels.stats.proportion import proportion_confint

    x, e, r0, r1, t, y = _known_effect(20_000)
    bounds = (0.1, 0.9)
    tau = r0 - r1 - 0.1  # treat where the benefit exceeds 0.1: some patients, not all
    point = causal.policy_value_dr(tau, y, t, r0, r1, e, bounds)
    ci = causal.policy_value_dr_ci(tau, y, t, r0, r1, e, bounds)
    assert set(ci) == set(point)  # the same keys, each with its interval
    ec = np.clip(e, *bounds)
    y1, y0 = r1 + t * (y - r1) / ec, r0 + (1 - t) * (y - r0) / (1 - ec)
    d = tau > 0
    assert 0.2 < d.mean() < 0.8
    for name, scores, true in (("model", np.where(d, y1, y0), np.where(d, r1, r0)),
                               ("treat_all", y1, r1), ("treat_none", y0, r0)):  # fmt: skip
        s, half = 100 * scores, 1.96 * 100 * scores.std(ddof=1) / np.sqrt(len(scores))
        assert ci[name]["estimate"] == pytest.approx(point[name])
        assert (ci[name]["ci_low"], ci[name]["ci_high"]) == pytest.approx((s.mean() - half, s.mean() + half))
        assert ci[name]["ci_low"] < 100 * true.mean() < ci[name]["ci_high"], name
    share = ci["share_treated_by_model"]
    assert share["estimate"] == pytest.approx(point["share_treated_by_model"])
    assert (share["treated"], share["n"]) == (int(d.sum()), len(d))
    lo, hi = proportion_confint(int(d.sum()), len(d), alpha=0.05, method="wilson")
    assert (share["ci_low"], share["ci_high"]) == pytest.approx((lo, hi))

    phi = causal.pseudo_outcome(y, t, r0, r1, e, bounds)
    slope = causal.calibration_slope_ci(r0 - r1, phi)
    fit = sm.OLS(phi, sm.add_constant(r0 - r1)).fit(cov_type="HC1")
    assert slope["estimate"] == causal.calibration_slope(r0 - r1, phi)
    assert slope["estimate"] == pytest.approx(fit.params[1])
    assert slope["se"] == pytest.approx(fit.bse[1])
    assert slope["ci_low"] < 1 < slope["ci_high"]
    flat = causal.calibration_slope_ci(np.full(100, 0.05), phi[:100])  # the constant learner: no slope
    assert np.isnan(flat["estimate"]) and np.isnan(flat["ci_low"]) and np.isnan(flat["ci_high"])


def test_truth_metrics_rate_the_constant_at_one_and_the_truth_at_zero():
    rng = np.random.default_rng(1)
    p0 = rng.uniform(0.1, 0.6, 500)
    p1 = p0 * rng.uniform(0.5, 1.3, 500)
    truth = pd.DataFrame({"true_benefit": p0 - p1, "true_p_death_untreated": p0, "true_p_death_treated": p1})
    const = causal.truth_metrics(np.full(500, (p0 - p1).mean()), truth, 0.0)
    assert const["pehe_ratio"] == pytest.approx(1.0)
    oracle = causal.truth_metrics(p0 - p1, truth, 0.0)
    assert oracle["pehe"] == 0 and oracle["policy_gap_to_true_benefit"] == 0
    d = oracle["deaths_per_100"]
    assert d["true_benefit"] <= min(d["treat_all"], d["treat_none"])


def test_one_se_rule_prefers_the_simpler_learner_unless_the_gain_is_clear():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, 2_000) ** 2
    tiny_gain = {
        "constant": noise + 0.001 + np.tile([0.3, -0.3], 1_000),  # mean gain 0.001, SE ~0.007
        "dr_ridge": noise,
        "dr_forest": noise + np.abs(rng.normal(0, 0.5, 2_000)),
    }
    losses, chosen, best = causal.one_se_choice(tiny_gain)
    assert (chosen, best) == ("constant", "dr_ridge")  # a 0.001 gain is inside one SE
    clear_gain = {"constant": noise + 0.5, "dr_ridge": noise}
    assert causal.one_se_choice(clear_gain)[1] == "dr_ridge"
    assert list(losses["learner"]) == ["constant", "dr_ridge", "dr_forest"]


def test_overlap_report_counts_and_warns():
    e = np.r_[np.full(80, 0.5), np.full(15, 0.05), np.full(5, 0.95)]
    t = np.r_[np.zeros(50), np.ones(50)]
    rep = causal.overlap_report(e, t, (0.1, 0.9))
    assert (rep["n_below"], rep["n_above"], rep["n_outside"]) == (15, 5, 20)
    assert "poor overlap" in rep["warning"] and "20 of 100" in rep["warning"]
    assert causal.overlap_report(np.full(100, 0.5), t, (0.1, 0.9))["warning"] == ""


def test_weighting_removes_the_imbalance_it_was_built_to_remove():
    x, e, r0, r1, t, y = _known_effect()
    table = causal.balance_table(x[:, None].astype(np.float32), ["x"], t, e, (0.01, 0.99))
    assert abs(table["smd_before"].iloc[0]) > 0.3
    assert abs(table["smd_after"].iloc[0]) < 0.05


def test_septic_mas_flag_is_exact_at_the_ferritin_cut_off():
    names = list(causal.MODIFIER_INPUTS)
    sepsis = float(TRIGGERS.index("bacterial_sepsis"))
    cut = np.float32(causal.MALS_FERRITIN)
    rows = [
        [sepsis, v, np.nan, np.nan, np.nan, np.nan, np.nan] for v in (cut, np.nextafter(cut, np.float32(1e9)))
    ]
    rows.append([float(TRIGGERS.index("sjia")), 50_000, np.nan, np.nan, np.nan, np.nan, np.nan])
    h = causal.modifier_matrix(np.array(rows, np.float32), names)
    assert list(h[:, -1]) == [0.0, 1.0, 0.0]  # > 4420 only, and only in bacterial sepsis
    assert h[2, TRIGGERS.index("sjia")] == 1.0


# --------------------------------------------------------------------------------------------------
# Guardrails: the rules as data, and the reference evaluator
# --------------------------------------------------------------------------------------------------


def test_guardrails_fire_on_every_patient_they_apply_to(workspace):
    frame = load_dataset(workspace["data"])
    rng = np.random.default_rng(0)
    propensity = rng.uniform(0, 1, len(frame))
    rules = guardrails.benefit_guardrails([0.1, 0.9])
    status = guardrails.evaluate(rules, frame, {"propensity": propensity})
    trig = frame["trigger"].astype(str)
    expected = {
        "parasitic_or_fungal_trigger": trig.isin(["parasitic_leishmania", "fungal"]).to_numpy(),
        "malignancy_trigger": trig.isin(["lymphoma", "other_malignancy"]).to_numpy(),
        "outside_overlap": (propensity < 0.1) | (propensity > 0.9),
        "icu_level_severity": (
            (frame["cns_dysfunction"] == 1)
            | (frame["hemorrhage"] == 1)
            | (frame["platelets"] < 20)
            | (frame["albumin"] < 2.0)
            | (frame["mean_arterial_pressure"] < 65)
            | (frame["lactate"] > 4)
        ).to_numpy(),
    }
    for rule, mask in expected.items():
        assert mask.sum() > 0, rule  # the cohort has patients each rule applies to
        np.testing.assert_array_equal(status[rule].to_numpy() == guardrails.FIRES, mask, err_msg=rule)


def test_guardrail_conditions_on_missing_values_are_false_and_required_fields_make_unknown():
    frame = pd.DataFrame(
        {
            "trigger": ["fungal", None, "sjia"],
            "cns_dysfunction": [np.nan, np.nan, 0.0],
            "hemorrhage": [np.nan, np.nan, 0.0],
            "platelets": [np.nan, 19.0, 20.0],
            "albumin": [np.nan, np.nan, 2.0],
            "mean_arterial_pressure": [np.nan, np.nan, 65.0],
            "lactate": [np.nan, np.nan, 4.0],
        }
    )
    status = guardrails.evaluate(
        guardrails.benefit_guardrails([0.1, 0.9]), frame, {"propensity": [0.5, np.nan, 0.1]}
    )
    assert list(status["parasitic_or_fungal_trigger"]) == ["fires", "unknown", "clear"]
    assert list(status["outside_overlap"]) == ["clear", "unknown", "clear"]  # 0.1 is inside [0.1, 0.9]
    # row 0: none of the six fields measured -> unknown (requires_any); row 2 on the cut-offs: not met
    assert list(status["icu_level_severity"]) == ["unknown", "fires", "clear"]
    assert guardrails.summary_column(status).tolist() == [
        "parasitic_or_fungal_trigger;icu_level_severity?",
        "icu_level_severity;parasitic_or_fungal_trigger?;malignancy_trigger?;outside_overlap?",
        "",
    ]


def test_guardrail_rules_follow_the_documented_format():
    doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    for rule in guardrails.benefit_guardrails([0.1, 0.9]):
        assert {"id", "message", "source", "kind"} <= set(rule) and ("any" in rule or "all" in rule)
        for cond in rule.get("any", rule.get("all")):
            assert set(cond) == {"field", "op", "value"} and cond["op"] in guardrails.OPS
            assert f"`{cond['op']}`" in doc
    with pytest.raises(ValueError, match="op"):
        guardrails.evaluate(
            [{"id": "x", "any": [{"field": "a", "op": "~", "value": 1}]}], pd.DataFrame({"a": [1]})
        )


# --------------------------------------------------------------------------------------------------
# The pipeline: bundle, parity, predict, tracking, determinism
# --------------------------------------------------------------------------------------------------


def test_bundle_manifest_carries_outputs_guardrails_and_method(run):
    m = run.manifest
    assert m["task"] == "il1_benefit" and m["model_name"] == "masml-il1-benefit"
    assert [o["name"] for o in m["outputs"]] == ["benefit", "risk_untreated", "risk_treated", "propensity"]
    assert {r["id"] for r in m["guardrails"]} == RULE_IDS
    assert any("unmeasured confounding" in a for a in m["assumptions"])
    assert m["method"]["learner"] in causal.LEARNERS
    assert set(run.selection["learner"]) == set(causal.LEARNERS)
    assert run.selection["dr_loss"].notna().all()
    for key in ("ate_aipw", "ate_aipw_trimmed", "autoc", "qini", "truth", "benefit_by_trigger_family"):
        assert key in m["metrics"], key
    ate = m["metrics"]["ate_aipw"]
    assert ate["ci_low"] < ate["estimate"] < ate["ci_high"]
    assert m["training_data"]["synthetic"] is True


def test_export_passed_the_parity_gate_on_missing_and_threshold_rows(run):
    assert run.parity["max_abs_diff"] <= 1e-5
    assert run.parity["by_kind"]["missing"] > 0 and run.parity["by_kind"]["threshold"] > 0


def test_bundle_carries_the_outcome_models_explainer(run):
    """explainer.onnx (sha256 checked by read_bundle) is the outcome models' explainer rebuilt from the
    run's model, byte for byte, and passed its gate on both models and on the difference block."""
    from masml.bundle import read_bundle
    from masml.onnx_benefit import benefit_explainer_to_onnx

    manifest, _ = read_bundle(run.bundle_dir)
    ex = manifest["explainer"]
    model = run.extra["model"]
    graph, section = benefit_explainer_to_onnx(model)
    assert (run.bundle_dir / ex["file"]).read_bytes() == graph.SerializeToString()
    assert {k: v for k, v in ex.items() if k not in ("sha256", "parity")} == json.loads(json.dumps(section))
    gate = run.parity["explainer"]
    for arm in ("untreated", "treated"):
        assert (
            gate[arm]["max_abs_diff_contributions"] <= 1e-4 and gate[arm]["max_abs_diff_additivity"] <= 1e-4
        )
        assert gate[arm]["n_missing_rows"] > 0 and gate[arm]["max_abs_diff_margin_vs_model"] == 0.0
    assert (
        gate["difference"]["max_abs_diff_margin"] == 0.0
        and gate["difference"]["max_abs_diff_additivity"] <= 1e-4
    )
    assert f"not the chosen benefit learner ({model.learner})" in ex["explains"]


def test_benefit_explainer_gate_fails_on_a_tampered_table(run):
    """One outcome model's TreeSHAP table changed by 1 % in a few entries: the export gate refuses it,
    naming the block; the untampered graph passes the same gate."""
    import onnx
    from onnx import numpy_helper

    from masml.onnx_benefit import (
        benefit_explainer_parity_gate,
        benefit_explainer_to_onnx,
        benefit_model_to_onnx,
    )
    from masml.shap_export import ExplainerParityError

    model = run.extra["model"]
    scorer = benefit_model_to_onnx(model)
    good, _ = benefit_explainer_to_onnx(model)
    x = run.extra["x_test"][:100]
    benefit_explainer_parity_gate(good, scorer, model, x, threshold_rows=200)
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    for k, init in enumerate(bad.graph.initializer):
        if init.name == "treated_shap_table":
            table = numpy_helper.to_array(init).copy()
            table[::7] *= np.float32(1.01)
            bad.graph.initializer[k].CopyFrom(numpy_helper.from_array(table, init.name))
    with pytest.raises(ExplainerParityError, match="explainer parity failed on treated_contributions") as err:
        benefit_explainer_parity_gate(bad, scorer, model, x, threshold_rows=200)
    assert err.value.report["untreated"]["max_abs_diff_contributions"] <= 1e-4  # the untouched block passed


def test_score_features_reach_every_sub_model_and_both_export_gates(tmp_path):
    """score_features: [hscore] for il1_benefit: the outcome and propensity models, every learner's
    final stage and both graphs use one feature spec with hscore in it, and both export gates pass.

    The final stages used to be fitted on the inputs' features without the scores while the nuisances
    had them, so the graph computed too few features (the parity gate failed with an IndexError). The
    pipeline chooses one learner; the other final stages are refitted here on its held-out rows (a
    structural check of the export, not of estimation quality)."""
    from masml.features import feature_names, feature_spec
    from masml.onnx_benefit import (
        benefit_explainer_parity_gate,
        benefit_explainer_to_onnx,
        benefit_model_to_onnx,
        benefit_parity_gate,
    )

    data, _ = write_cohort(simulate(1_500, seed=21), tmp_path / "cohort.parquet")
    config = config_from_dict(
        {"tuning": {"n_trials": 1, "max_rounds": 60}, "n_boot": 20, "folds": 3, "score_features": ["hscore"]},
        "il1_benefit",
    )
    run = run_il1_benefit_pipeline(data, tmp_path / "bundle", config=config, log=lambda m: None, track=False)
    model = run.extra["model"]
    spec = model.spec
    assert feature_names(spec)[-1] == "hscore"
    assert spec == feature_spec(config.inputs, ["hscore"])
    nuis = model.nuisances
    for name in ("untreated", "treated", "propensity"):
        sub = getattr(nuis, name)
        assert sub.spec == spec and sub.booster.num_features() == len(spec), name
    assert run.parity["max_abs_diff"] <= 1e-5
    ex = run.parity["explainer"]
    assert ex["max_abs_diff_contributions"] <= 1e-4 and ex["max_abs_diff_additivity"] <= 1e-4
    assert run.manifest["explainer"]["feature_names"] == feature_names(spec)
    assert (run.bundle_dir / "model.onnx").read_bytes() == benefit_model_to_onnx(model).SerializeToString()
    assert run.extra["balance"]["feature"].tolist() == feature_names(spec)

    # Every learner's final stage on the same spec, through both gates.
    test, x = run.extra["test"], run.extra["x_test"]
    y, t = test[config.label].to_numpy(float), causal.treatment_values(test)
    pred = run.extra["prediction"]
    cross = {"r0": pred["risk_untreated"], "r1": pred["risk_treated"], "e": pred["propensity"]}
    for learner in causal.LEARNERS:
        refit = causal.fit_final(
            learner, nuis, x, y, t, cross, run.extra["phi_test"], config.inputs, 10.0, config.seed
        )
        assert refit.spec == spec
        for forest in (refit.dr_forest, refit.x_tau0, refit.x_tau1):
            assert forest is None or forest.num_features() == len(spec), learner
        graph = benefit_model_to_onnx(refit)
        assert benefit_parity_gate(graph, refit, x)["max_abs_diff"] <= 1e-5, learner
    explainer, _ = benefit_explainer_to_onnx(refit)  # explains the outcome models: one learner is enough
    benefit_explainer_parity_gate(explainer, graph, refit, x, threshold_rows=200)

    # A benefit model whose spec differs from its nuisances' cannot be built (fit_final never does).
    with pytest.raises(ValueError, match=r"differ from those its nuisance models were trained on.*hscore"):
        causal.BenefitModel(
            nuisances=nuis, learner="constant", input_names=list(config.inputs),
            spec=feature_spec(config.inputs),
        )  # fmt: skip


def test_predict_writes_benefit_risks_and_guardrails_from_the_bundle(run, workspace):
    out = workspace["tmp"] / "pred.csv"
    r = subprocess.run(
        [MASML, "predict", str(run.bundle_dir), "--data", str(workspace["data"]), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(out, keep_default_na=False, na_values=[""])
    for col in ("benefit", "risk_untreated", "risk_treated", "propensity", "guardrails"):
        assert col in pred.columns, col
    frame = load_dataset(workspace["data"])
    model = run.extra["model"]
    expected = model.predict(encode_inputs(frame, model.input_names))
    for name in ("benefit", "risk_untreated", "risk_treated"):
        assert np.max(np.abs(pred[name].to_numpy() - expected[name])) <= 1e-5, name
    assert pred["risk_untreated"].between(0, 1).all() and pred["risk_treated"].between(0, 1).all()
    lymphoma = (frame["trigger"] == "lymphoma").to_numpy()
    assert pred.loc[lymphoma, "guardrails"].astype(str).str.contains("malignancy_trigger").all()
    assert (
        not pred.loc[~lymphoma & (frame["trigger"] != "other_malignancy").to_numpy(), "guardrails"]
        .astype(str)
        .str.contains("malignancy_trigger")
        .any()
    )


def test_run_is_tracked_with_plots_and_the_model_registered(run, workspace):
    from mlflow import MlflowClient

    client = MlflowClient(workspace["uri"])
    tracked = client.get_run(run.run_id).data
    assert tracked.params["learner"] == run.manifest["method"]["learner"]
    for name in ("untreated", "treated", "propensity"):  # how each nuisance model's search went
        assert tracked.params[f"{name}.tuning.trials_run"] == "2"  # TINY's n_trials, well inside the cap
        assert tracked.tags[f"{name}.tuning.stopped_by_timeout"] == "false"
    plots = {Path(a.path).name for a in client.list_artifacts(run.run_id, "plots")}
    assert {"overlap.png", "balance.png", "benefit_by_trigger.png", "qini.png"} <= plots
    champion = client.get_model_version_by_alias("masml-il1-benefit", "champion")
    assert str(champion.version) == run.registered_version


def test_benefit_card_carries_the_estimand_assumptions_overlap_policies_and_guardrails(
    run, workspace, tmp_path
):
    from mlflow import MlflowClient

    from masml.card import fmt

    card = json.loads((run.bundle_dir / "card.json").read_text())
    page = (run.bundle_dir / "card.html").read_text()
    ate = run.report["ate_aipw"]
    assert card["benefit"]["ate_aipw"]["estimate"] == pytest.approx(ate["estimate"])
    assert fmt(float(ate["estimate"])) in page and fmt(float(ate["ci_low"])) in page
    outside = run.manifest["metrics"]["patients_outside_overlap"]
    assert card["benefit"]["overlap"]["test"]["n_outside"] == outside
    for assumption in run.manifest["assumptions"]:
        assert assumption in card["limitations"]
    assert {g["id"] for g in card["benefit"]["guardrails"]} == RULE_IDS
    for rule in RULE_IDS:
        assert rule in page
    assert set(card["benefit"]["figures"]) == {"overlap", "balance", "benefit_by_trigger", "qini"}
    assert "performance" not in card and {i["section"] for i in card["tripod_ai"]} >= {"benefit", "data"}
    assert 'id="synthetic"' in page and ">Benefit of IL-1 blockade</h2>" in page
    client = MlflowClient(workspace["uri"])
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "card")}
    assert {"card/card.json", "card/card.html"} <= artifacts
    # the printed card reaches the run with the other two; without Chromium, card.json says why it is absent
    if workspace["chromium_missing"]:
        assert card["pdf"]["rendered"] is False and card["pdf"]["reason"]
        assert "card/card.pdf" not in artifacts
    else:
        assert card["pdf"] == {"rendered": True, "file": "card.pdf", "reason": None}
        assert "card/card.pdf" in artifacts
        logged = Path(client.download_artifacts(run.run_id, "card/card.pdf", str(tmp_path)))
        assert logged.read_bytes()[:5] == b"%PDF-"
        assert logged.read_bytes() == (run.bundle_dir / "card.pdf").read_bytes()


def test_benefit_card_numbers_are_the_runs_report(run, workspace):
    """Qini/RATE, policy values, calibration and held-out data, read back from the page's tables and
    compared with the run's report and the held-out frame it used (not with card.json, made by the same
    code as the page)."""
    from masml.card import fmt

    page = (run.bundle_dir / "card.html").read_text()
    saved = json.loads((run.bundle_dir / "card.json").read_text())
    report = run.report
    uplift = by(table(page, "benefit", "metric"), "metric")
    assert set(uplift) == set(report["uplift"]) == {"autoc", "qini", "auuc"}
    for name, value in report["uplift"].items():
        shown = uplift[name]
        assert (shown["estimate"], shown["lo"], shown["hi"]) == tuple(
            fmt(float(value[k])) for k in ("estimate", "ci_low", "ci_high")
        ), name
        assert saved["benefit"]["uplift"][name] == pytest.approx(value)
    dr = report["policy_dr_deaths_per_100"]
    assert set(report["policy_dr_deaths_per_100_ci"]) == set(dr)
    slope_ci = _finite(report["calibration_slope_ci"])  # strict JSON there: an undefined slope is null
    for where in (run.manifest["metrics"], saved["benefit"]):  # in the manifest and the card too
        assert where["calibration_slope_ci"] == pytest.approx(slope_ci)
        for name, ci in report["policy_dr_deaths_per_100_ci"].items():
            assert where["policy_dr_deaths_per_100_ci"][name] == pytest.approx(ci), name
    # Recomputed from the run's held-out predictions, outcomes and treatments, without masml.causal:
    # doubly robust scores of death if treated (y1) and if untreated (y0), estimate +- 1.96 SD / sqrt(n).
    config = load_config(workspace["config"], "il1_benefit")
    test, pred = run.extra["test"], run.extra["prediction"]
    y, t = test[config.label].to_numpy(float), test[causal.TREATMENT].to_numpy(float)
    ec = np.clip(pred["propensity"], *config.overlap)
    y1 = pred["risk_treated"] + t * (y - pred["risk_treated"]) / ec
    y0 = pred["risk_untreated"] + (1 - t) * (y - pred["risk_untreated"]) / (1 - ec)
    treat = pred["benefit"] > 0  # the model's policy: treat if predicted benefit > 0
    expected = {}
    for name, scores in (("model", np.where(treat, y1, y0)), ("treat_all", y1), ("treat_none", y0)):
        s = 100 * scores
        half = 1.96 * s.std(ddof=1) / np.sqrt(len(s))
        assert dr[name] == pytest.approx(s.mean()), name
        expected[name.replace("_", " ")] = interval(dr[name], s.mean() - half, s.mean() + half)
    policies = {r["policy"]: r["deaths per 100 [95% CI]"] for r in table(page, "benefit", "policy")}
    assert policies == expected
    assert all("[" in v for v in policies.values())
    facts = pairs(page, "benefit")
    share = float(np.mean(treat))
    assert dr["share_treated_by_model"] == pytest.approx(share)
    lo, hi = proportion_confint(int(treat.sum()), len(treat), alpha=0.05, method="wilson")
    assert facts["Share of held-out patients the model would treat (predicted benefit > 0) [95% CI]"] == (
        interval(share, lo, hi)
    )
    # Calibration slope (BLP): least squares of the DR score (y0 - y1) on predicted benefit, HC1 robust SE.
    phi = y0 - y1
    np.testing.assert_allclose(phi, run.extra["phi_test"], rtol=0, atol=1e-12)
    slope_shown = facts["Calibration slope of predicted benefit [95% CI]"]
    if np.ptp(pred["benefit"]) > 0:
        import statsmodels.api as sm

        fit = sm.OLS(phi, sm.add_constant(pred["benefit"])).fit(cov_type="HC1")
        b, se = float(fit.params[1]), float(fit.bse[1])
        assert report["calibration_slope"] == pytest.approx(b)
        assert slope_shown == interval(b, b - 1.96 * se, b + 1.96 * se) and "[" in slope_shown
    else:  # the constant learner: no spread of predicted benefit, so no slope
        assert report["calibration_slope"] is None or np.isnan(report["calibration_slope"])
        assert slope_shown == "–"
    # The ground-truth policy values are exact for these patients, not estimates: no interval, and the
    # card says why.
    true_policies = {r["policy (true outcomes)"]: r["deaths per 100"]
                     for r in table(page, "benefit", "policy (true outcomes)")}  # fmt: skip
    truth = report["truth"]["deaths_per_100"]
    assert true_policies == {k.replace("_", " "): fmt(float(v)) for k, v in truth.items()}
    notes = saved["benefit"]["intervals"]
    assert "no interval because they are not estimated" in notes["truth"]
    assert f"{config.n_boot} replicates, seed {config.seed}" in notes["uplift"]
    for note in (notes["truth"], notes["policies"], notes["share_treated"], notes["calibration_slope"]):
        assert html.escape(note) in page
    for title, key in (("AIPW average benefit [95% CI]", "ate_aipw"),
                       ("Within the overlap region [95% CI]", "ate_aipw_trimmed")):  # fmt: skip
        ate = report[key]
        assert facts[title] == interval(ate["estimate"], ate["ci_low"], ate["ci_high"]), title
    # the held-out data the card describes is the frame the run evaluated on
    described = saved["data"]["evaluation"]
    assert described["rows"] == len(test) == run.manifest["training_data"]["test_rows"]
    families = test["trigger"].astype(str).map(lambda t: TRIGGER_FAMILY.get(t, "missing"))
    assert {r["level"]: r["n"] for r in described["trigger_family"]} == families.value_counts().to_dict()
    assert described["missingness"] == pytest.approx({n: float(test[n].isna().mean()) for n in config.inputs})
    data = pairs(page, "data")
    assert data["Held-out rows"] == fmt(len(test))
    assert data["Prevalence (held-out)"] == fmt(float(test[config.label].mean()))


def test_benefit_card_renders_in_headless_chromium_with_headings_and_figures(run):
    ensure_chromium()
    page = run.bundle_dir / "card.html"
    pixels = screenshot(page, "benefit_card.png")
    assert pixels.shape == (2400, 1200)
    assert_not_blank(pixels)
    dom = dump_dom(page)
    for heading in CARD_HEADINGS:
        assert f">{heading}</h2>" in dom, heading
    for heading in CARD_SUBHEADINGS:
        assert f">{heading}</h3>" in dom, heading
    assert ">Performance on held-out patients</h2>" not in dom  # a benefit card, not a risk card
    assert 'id="synthetic"' in dom
    shown = figures(dom)
    assert set(shown) == CARD_FIGURES
    assert all(w > 100 and h > 100 for w, h in shown.values()), shown


def test_same_data_config_and_seed_give_an_identical_graph(run, workspace, tmp_path):
    again = run_il1_benefit_pipeline(
        workspace["data"],
        tmp_path / "again",
        config_path=workspace["config"],
        log=lambda m: None,
        track=False,
    )
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (run.bundle_dir / "model.onnx").read_bytes()
    again_explainer = (tmp_path / "again" / "explainer.onnx").read_bytes()
    assert again_explainer == (run.bundle_dir / "explainer.onnx").read_bytes()
    assert again.manifest["metrics"] == run.manifest["metrics"]


# --------------------------------------------------------------------------------------------------
# Bad inputs and configs
# --------------------------------------------------------------------------------------------------


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("column", ["treatment_il1", "death_28d"])
def test_missing_treatment_or_outcome_column_is_refused_by_name(workspace, tmp_path, column):
    frame = pd.read_parquet(workspace["data"]).drop(columns=[column])
    config = load_config(workspace["config"], "il1_benefit")
    with pytest.raises(Exception, match=column):
        run_il1_benefit_pipeline(
            _write(frame, tmp_path / "d.parquet"), tmp_path / "m", config=config, track=False
        )
    assert not (tmp_path / "m").exists()


def test_non_binary_treatment_is_refused_with_column_and_value(workspace, tmp_path):
    frame = pd.read_parquet(workspace["data"])
    frame.loc[frame.index[frame["mas_onset"] == 1][:3], "treatment_il1"] = 2.0
    config = load_config(workspace["config"], "il1_benefit")
    with pytest.raises(Exception, match=r"treatment_il1(.|\n)*2"):
        run_il1_benefit_pipeline(
            _write(frame, tmp_path / "d.parquet"), tmp_path / "m", config=config, track=False
        )
    # the library check, for frames that did not come through validation
    with pytest.raises(TrainingDataError, match=r"treatment_il1.*0/1.*\['2', 'yes'\]"):
        causal.treatment_values(pd.DataFrame({"treatment_il1": [0, 1, 2, "yes", None]}))


def test_no_treated_patients_is_a_clear_error(workspace, tmp_path):
    frame = pd.read_parquet(workspace["data"])
    frame.loc[frame["treatment_il1"] == 1, "treatment_il1"] = 0.0
    config = load_config(workspace["config"], "il1_benefit")
    with pytest.raises(TrainingDataError, match=r"no treated patients \(treatment_il1 == 1\)"):
        run_il1_benefit_pipeline(
            _write(frame, tmp_path / "d.parquet"), tmp_path / "m", config=config, track=False
        )


def test_an_arm_without_deaths_is_a_clear_error():
    t = np.r_[np.zeros(50), np.ones(50)]
    y = np.r_[np.tile([0.0, 1.0], 25), np.zeros(50)]
    with pytest.raises(TrainingDataError, match=r"treated arm .* 0 deaths"):
        causal.check_arms(t, y, folds=3)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"overlap": [0.9, 0.1]}, "overlap"),
        ({"overlap": [0.0, 0.9]}, r"overlap\[0\]"),
        ({"overlap": 0.1}, "overlap"),
        ({"treatment": "treatment_il1"}, "unknown config key 'treatment'"),
        ({"task": "icu"}, "'icu' but 'il1_benefit'"),
    ],
)
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, "il1_benefit")


def test_shipped_yaml_is_the_in_code_default():
    path = Path(__file__).parents[1] / "configs" / "il1_benefit.yaml"
    assert load_config(path) == load_config(None, "il1_benefit")


def test_pipeline_refuses_a_config_for_another_task(workspace, tmp_path):
    with pytest.raises(ConfigError, match="il1_benefit"):
        run_il1_benefit_pipeline(
            workspace["data"], tmp_path / "m", config=load_config(None, "icu"), track=False
        )


def test_cli_train_reports_a_bad_config_without_a_traceback(workspace, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY + "overlap: [0.5, 0.4]\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": workspace["uri"]}
    args = [
        "train",
        "il1_benefit",
        "--data",
        str(workspace["data"]),
        "--config",
        str(bad),
        "--out",
        str(tmp_path / "m"),
    ]
    r = subprocess.run([MASML, *args], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert "overlap" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def test_manifest_round_trips_as_strict_json(run):
    text = (run.bundle_dir / "manifest.json").read_text()
    assert "NaN" not in text and json.loads(text)["guardrails"] == run.manifest["guardrails"]


def test_manifest_values_are_made_strict_json():
    from pipelines.il1_benefit import _finite

    got = _finite({"a": np.nan, "b": [np.float32(1.5), np.int64(2), np.inf], "c": np.bool_(True)})
    assert got == {"a": None, "b": [1.5, 2, None], "c": True}
    json.dumps(got, allow_nan=False)
