"""The model card in a real browser: headless Chromium renders it, prints it to PDF, and it is not blank;
and every section's numbers, read back from the page, are the run's own.

Chromium comes from Debian's ``chromium`` package; when it is missing the test installs it with apt-get
(CI runs as root on a clean machine). The screenshot is kept in ``test-artifacts/`` for a human to look at.
Why the numbers are checked against the run and not against card.json: card.json is made by the same code
as the page, so agreeing with it proves little; the frame the model was trained on, the comparison table,
the held-out risks and the SHAP importance table are what the card claims to report.
"""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

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
    interval,
    pairs,
    screenshot,
    table,
)

from masml import card
from masml.card import fmt
from masml.schema import TRIGGER_FAMILY

HEADINGS = (
    "Model details",
    "Intended use",
    "Training and evaluation data",
    "Performance on held-out patients",
    "Subgroups",
    "Explanations (SHAP)",
    "Limitations",
    "Monitoring plan",
    "TRIPOD+AI checklist",
    "Sign-off",
)
SUBHEADINGS = (
    "Discrimination",
    "Calibration and accuracy of the probabilities",
    "At the configured thresholds",
)
CI = " [95% CI]"


@pytest.fixture(scope="module")
def card_run(tmp_path_factory):
    """A real card: a tiny onset run on a small cohort, without tracking; its log lines are kept."""
    from masml.cohort import simulate, write_cohort
    from masml.config import config_from_dict
    from pipelines.risk import run_risk_pipeline

    ensure_chromium()
    tmp = tmp_path_factory.mktemp("card")
    data, _ = write_cohort(simulate(2_000, seed=41), tmp / "cohort.parquet")
    tiny = {"tuning": {"n_trials": 1, "max_rounds": 80}, "folds": 2, "n_boot": 50}
    config = config_from_dict(tiny, "onset")
    lines: list[str] = []
    result = run_risk_pipeline("onset", data, tmp / "bundle", config=config, log=lines.append, track=False)
    return SimpleNamespace(result=result, config=config, data=data, log=lines)


@pytest.fixture(scope="module")
def card_files(card_run):
    return card_run.result


@pytest.fixture(scope="module")
def page(card_files) -> str:
    return (card_files.bundle_dir / "card.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def saved(card_files) -> dict:
    return json.loads((card_files.bundle_dir / "card.json").read_text())


@pytest.fixture(scope="module")
def used(card_run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, held-out) frames the run used, rebuilt with the pipeline's own documented steps (load,
    population rule, split grouped by patient and stratified with the config's seed). The held-out labels
    must equal the run's, row for row, so a different split cannot pass for the one the card describes."""
    from masml.io import load_dataset
    from masml.training import select_population, split_holdout

    config = card_run.config
    pop, _ = select_population(load_dataset(card_run.data, require_labels=(config.label,)), config)
    y = pop[config.label].to_numpy(dtype=float)
    train_idx, test_idx = split_holdout(y, pop["patient_id"].astype(str).to_numpy(), config.test_size,
                                        config.seed)  # fmt: skip
    np.testing.assert_array_equal(y[test_idx], card_run.result.extra["y_test"])
    return pop.iloc[train_idx], pop.iloc[test_idx]


def test_card_renders_in_headless_chromium_with_headings_and_figures(card_files):
    bundle = card_files.bundle_dir
    pixels = screenshot(bundle / "card.html", "model_card.png")
    assert pixels.shape == (2400, 1200)
    assert_not_blank(pixels)  # text and figures, not a blank page
    dom = dump_dom(bundle / "card.html")
    for heading in HEADINGS:
        assert f">{heading}</h2>" in dom, heading
    for heading in SUBHEADINGS:
        assert f">{heading}</h3>" in dom, heading
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', dom)
    assert {"roc", "precision recall", "calibration", "decision curve", "SHAP summary"} <= set(images)
    # each figure is a real picture, not a broken data URI
    assert all(w > 100 and h > 100 for w, h in figures(dom).values())


def test_card_pdf_is_printed_with_every_section(card_files):
    pdf = card_files.bundle_dir / "card.pdf"
    assert pdf.is_file(), "the pipeline prints the PDF when Chromium is available"
    data = pdf.read_bytes()
    assert data[:5] == b"%PDF-" and len(data) > 50_000
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 4  # a multi-page document, not an error page
    saved = json.loads((card_files.bundle_dir / "card.json").read_text())
    assert saved["performance"]["model"]["auroc"] == pytest.approx(
        float(card_files.comparison.set_index("model").loc["model", "auroc"])
    )
    assert saved["pdf"] == {"rendered": True, "file": "card.pdf", "reason": None}


def test_a_card_without_its_pdf_says_so_in_the_log_note_and_in_card_json(card_run, monkeypatch, tmp_path):
    """No Chromium: the note the pipelines print starts with WARNING, card.json records why, and a PDF
    left from an earlier card does not pass for this one."""
    line = [m for m in card_run.log if "model card" in m]
    assert len(line) == 1 and "(PDF rendered with headless Chromium)" in line[0]  # the note reaches the log

    monkeypatch.setattr(card, "chromium", lambda: None)
    (tmp_path / "card.pdf").write_bytes(b"%PDF-1.4 an older card")
    paths, note = card.write_card(card_run.result.extra["card"], tmp_path)
    assert note.startswith("WARNING") and "NOT rendered" in note and "Chromium is not installed" in note
    assert [p.name for p in paths] == ["card.json", "card.html"] and not (tmp_path / "card.pdf").exists()
    status = json.loads((tmp_path / "card.json").read_text())["pdf"]
    assert status["rendered"] is False and status["file"] is None
    assert "Chromium is not installed" in status["reason"]
    # the status lives in card.json only: the page is the same, so `masml report` re-renders it exactly
    bundle_page = (card_run.result.bundle_dir / "card.html").read_text()
    assert (tmp_path / "card.html").read_text() == bundle_page
    assert card.render_html(json.loads((tmp_path / "card.json").read_text())) == bundle_page


def test_data_section_describes_the_training_frame_actually_used(used, card_run, page, saved):
    train, test = used
    config, n = card_run.config, len(train)
    assert n == card_run.result.manifest["training_data"]["train_rows"] == saved["data"]["training"]["rows"]
    described = saved["data"]["training"]
    expected = {
        "trigger family": train["trigger"].astype(str).map(TRIGGER_FAMILY).fillna("missing").value_counts(),
        "age band": pd.cut(train["age_years"], [-np.inf, 16, 65, np.inf], right=False,
                           labels=["<16", "16-64", ">=65"]).astype(str).value_counts(),  # fmt: skip
        "sex": train["sex"].astype(str).value_counts(),
    }
    for title, key in (("trigger family", "trigger_family"), ("age band", "age_band"), ("sex", "sex")):
        counts = {str(k): int(v) for k, v in expected[title].items() if v > 0}
        assert len(counts) >= 2, title  # a table with one level would check little
        assert {r["level"]: r["n"] for r in described[key]} == counts, title
        rows = table(page, "data", title)
        assert {r[title]: (r["n"], r["share"]) for r in rows} == {
            level: (fmt(c), fmt(c / n)) for level, c in counts.items()
        }, title
        assert [int(r["n"].replace(",", "")) for r in rows] == sorted(counts.values(), reverse=True)
    missing = {name: float(train[name].isna().mean()) for name in config.inputs}
    assert sum(v > 0 for v in missing.values()) >= 3  # the cohort has missing laboratory values
    assert described["missingness"] == pytest.approx(missing)
    shown = {r["input"]: r["share missing"] for r in table(page, "data", "share missing")}
    assert shown == {name: fmt(v) for name, v in missing.items()}
    facts = pairs(page, "data")
    assert facts["Training rows"] == fmt(n) and facts["Held-out rows"] == fmt(len(test))
    assert facts["Prevalence (training)"] == fmt(float(train[config.label].mean()))
    assert facts["Prevalence (held-out)"] == fmt(float(test[config.label].mean()))
    assert facts["Median age (training)"] == fmt(float(train["age_years"].median()))


def test_performance_tables_print_every_interval_of_the_runs_comparison(card_files, page, saved):
    """Model, baseline, ceiling and each clinical score: every metric with its bootstrap 95% CI."""
    comparison = card_files.comparison
    discrimination = by(table(page, "performance", "AUROC" + CI), "model")
    calibration = by(table(page, "performance", "Brier" + CI), "model")
    assert set(discrimination) == set(comparison["model"])
    assert {"model", "logistic_baseline", "ceiling", "hscore", "hlh2004", "ferritin"} <= set(discrimination)
    for _, row in comparison.iterrows():
        name = row["model"]
        shown = discrimination[name]
        assert shown["n"] == fmt(int(row["rows"])), name
        for metric, title in (("auroc", "AUROC"), ("auprc", "AUPRC"), ("auroc_diff", "Δ AUROC vs ceiling")):
            assert shown[title + CI] == interval(row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"]), name
        if not row["probabilistic"]:  # a clinical score: points or a rule, so no calibration row
            assert name not in calibration, name
            continue
        shown = calibration[name]
        for metric, title in (("brier", "Brier"), ("calibration_slope", "calibration slope"),
                              ("calibration_intercept", "calibration intercept"),
                              ("ece", "ECE")):  # fmt: skip
            assert np.isfinite(row[f"{metric}_lo"]) and "[" in shown[title + CI], (name, metric)
            assert shown[title + CI] == interval(row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"])
        # reference quantities: printed bare (the card's note on intervals says why)
        for metric, title in (("ece_floor", "ECE floor"), ("ece_vs_truth", "ECE vs truth")):
            assert shown[title] == fmt(float(row[metric])), (name, metric)
    assert set(calibration) == {"model", "logistic_baseline", "ceiling"}
    # card.json keeps every interval of the model's row, and the whole comparison
    model = comparison.set_index("model").loc["model"]
    for metric in card.INTERVAL_METRICS:
        for key in (metric, f"{metric}_lo", f"{metric}_hi"):
            assert saved["performance"]["model"][key] == pytest.approx(float(model[key])), key
    assert [r["model"] for r in saved["performance"]["comparison"]] == list(comparison["model"])


def test_calibration_intercept_and_summary_carry_their_intervals(card_files, page, saved):
    """The held-out report's calibration-in-the-large is the comparison's (same bootstrap replicates)
    and is printed with its interval in the summary and the calibration table."""
    report = card_files.test_report["calibration_intercept"]
    model = card_files.comparison.set_index("model").loc["model"]
    assert report["estimate"] == pytest.approx(model["calibration_intercept"])
    assert (report["lo"], report["hi"]) == pytest.approx(
        (model["calibration_intercept_lo"], model["calibration_intercept_hi"])
    )
    assert report["lo"] < report["hi"]
    assert saved["performance"]["calibration"]["calibration_intercept"] == pytest.approx(report)
    expected = interval(report["estimate"], report["lo"], report["hi"])
    summary = pairs(page, "summary")
    assert summary["Calibration intercept" + CI] == expected
    assert summary["Calibration slope" + CI] == interval(
        model["calibration_slope"], model["calibration_slope_lo"], model["calibration_slope_hi"]
    )
    assert summary["AUROC" + CI] == interval(model["auroc"], model["auroc_lo"], model["auroc_hi"])
    calibration = by(table(page, "performance", "Brier" + CI), "model")
    assert calibration["model"]["calibration intercept" + CI] == expected


def test_ece_interval_is_the_runs_bootstrap_and_its_reference_quantities_are_explained(card_run, page, saved):
    """The model's ECE interval, recomputed from the run's held-out labels and risks with the run's
    replicates and seed, is the one in the comparison, the manifest, card.json and the page; the ECE
    floor and ECE vs truth have none, and the card's note on intervals says they are references."""
    from masml import evaluation

    config, result = card_run.config, card_run.result
    y = result.extra["y_test"]
    _, risk = result.extra["curves"]["model"]
    est, lo, hi = evaluation.bootstrap_ci(y, risk, {"ece": evaluation.ece}, n_boot=config.n_boot,
                                          seed=config.seed)["ece"]  # fmt: skip
    assert 0 <= lo <= est <= hi
    model = result.comparison.set_index("model").loc["model"]
    assert (model["ece"], model["ece_lo"], model["ece_hi"]) == pytest.approx((est, lo, hi))
    metrics = result.manifest["metrics"]
    assert (metrics["ece"], metrics["ece_lo"], metrics["ece_hi"]) == pytest.approx((est, lo, hi))
    assert metrics["ece_floor"] == pytest.approx(model["ece_floor"])  # existing keys unchanged
    shown = saved["performance"]["model"]
    assert (shown["ece"], shown["ece_lo"], shown["ece_hi"]) == pytest.approx((est, lo, hi))
    calibration = by(table(page, "performance", "Brier" + CI), "model")
    assert calibration["model"]["ECE" + CI] == interval(est, lo, hi)
    assert "[" not in calibration["model"]["ECE floor"] and "[" not in calibration["model"]["ECE vs truth"]
    notes = saved["performance"]["intervals"]
    assert "reference quantities" in notes["reference"] and "ECE vs truth" in notes["reference"]
    assert "ECE floor" in notes["reference"] and "shifted by their bias" in notes["ece"]
    for note in (notes["reference"], notes["ece"]):
        assert html.escape(note) in page
    assert "ECE has no interval" not in page


def test_threshold_rows_are_recounted_from_the_held_out_risks_with_wilson_intervals(card_run, page, saved):
    """Counts redone from the run's held-out labels and risks; intervals from statsmodels' Wilson."""
    y = card_run.result.extra["y_test"]
    mask, risk = card_run.result.extra["curves"]["model"]
    assert mask.all() and len(risk) == len(y)
    rows = table(page, "performance", "sensitivity" + CI)
    thresholds = list(card_run.config.thresholds)
    assert [r["threshold"] for r in rows] == [fmt(float(t)) for t in thresholds]
    for shown, t in zip(rows, thresholds, strict=True):
        flagged, event = risk >= t, y == 1
        tp, fp = int((flagged & event).sum()), int((flagged & ~event).sum())
        fn, tn = int((~flagged & event).sum()), int((~flagged & ~event).sum())
        for title, hits, total in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                                   ("PPV", tp, tp + fp), ("NPV", tn, tn + fn)):  # fmt: skip
            if total == 0:
                assert shown[title + CI] == "–", (t, title)
                continue
            lo, hi = proportion_confint(hits, total, alpha=0.05, method="wilson")
            assert shown[title + CI] == interval(hits / total, lo, hi), (t, title)
        assert shown["flagged"] == fmt(float(flagged.mean()))
    assert any("[" in r["PPV" + CI] for r in rows)  # at least one threshold flags someone
    for row in saved["performance"]["thresholds"]:
        for rate in ("sensitivity", "specificity", "ppv", "npv"):
            assert f"{rate}_lo" in row and f"{rate}_hi" in row, rate
    assert "Wilson" in saved["performance"]["intervals"]["thresholds"]


def test_shap_top_features_are_the_runs_importance_table(card_files, page, saved):
    importance = card_files.extra["importance"].head(10)
    assert len(importance) == 10
    shown = [(r["feature"], r["mean |SHAP| (log-odds)"]) for r in table(page, "explanations", "feature")]
    assert shown == [(f, fmt(float(v))) for f, v in zip(importance["feature"], importance["mean_abs_shap"],
                                                         strict=True)]  # fmt: skip
    top = saved["explanations"]["top_features"]
    assert [t["feature"] for t in top] == list(importance["feature"])
    assert [t["mean_abs_shap"] for t in top] == pytest.approx(list(importance["mean_abs_shap"]))


def test_card_names_the_little_bootstraps_when_the_test_set_used_them(monkeypatch):
    """A reader of the card must know which resampling gave the intervals: above BLB_MIN_ROWS the
    report records the subsets and the card says so; below it the text is the plain bootstrap's."""
    from scipy.special import expit

    from masml import card, evaluation

    rng = np.random.default_rng(3)
    p = expit(rng.normal(-1, 1.5, 3_000))
    y = (rng.random(p.size) < p).astype(float)
    plain = evaluation.evaluate(y, p, n_boot=200, seed=1)["bootstrap"]
    assert card._boot_text(plain) == "200 replicates, seed 1"
    monkeypatch.setattr(evaluation, "BLB_MIN_ROWS", 1_000)
    little = evaluation.evaluate(y, p, n_boot=200, seed=1)["bootstrap"]
    text = card._boot_text(little)
    assert little["subsets"] == 2 and little["per_subset"] == 100
    assert f"2 subsets of {little['subset_size']:,} patients" in text and "Kleiner 2014" in text
