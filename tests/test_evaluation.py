"""Held-out evaluation: every metric against an independent reference or a hand-computed answer."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from masml import evaluation as ev
from masml import summary


def _draw(n: int, seed: int, mean: float = -1.5, sd: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from the predicted probabilities themselves: a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    p = expit(rng.normal(mean, sd, n))
    return (rng.random(n) < p).astype("int64"), p


@pytest.fixture(scope="module")
def calibrated():
    return _draw(200_000, seed=1)


# A 10-patient table small enough to count by hand (3 events).
Y_SMALL = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
P_SMALL = np.array([0.9, 0.6, 0.15, 0.7, 0.3, 0.25, 0.1, 0.05, 0.05, 0.02])


# ------------------------------------------------------------------------------------ discrimination


def test_auroc_and_auprc_match_sklearn_including_ties():
    y, p = _draw(3000, seed=2)
    rng = np.random.default_rng(3)
    points = rng.integers(0, 8, y.size) + 3 * y  # a points score: integers, massive ties
    for score in (p, np.round(p, 1), points, np.zeros(y.size)):
        assert ev.auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        assert ev.auprc(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)
    assert ev.auroc(y, np.zeros(y.size)) == 0.5  # all tied: no discrimination


def test_single_class_gives_nan_not_an_exception():
    p = np.linspace(0.1, 0.9, 20)
    for y in (np.zeros(20), np.ones(20)):
        assert math.isnan(ev.auroc(y, p))
        assert all(math.isnan(v) for v in ev.calibration_intercept_slope(y, p))
    assert math.isnan(ev.auprc(np.zeros(20), p))
    assert ev.brier(np.zeros(20), p) == pytest.approx(np.mean(p**2))


def test_summary_auroc_is_the_evaluation_auroc():
    assert summary.auroc is ev.auroc


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1, 1, 0], [0.1, np.nan, np.nan, 0.3], "2 of 4 are NaN"),
        ([0, 1, 2, 0], [0.1, 0.2, 0.3, 0.4], "must be 0/1"),
        ([0, 1, np.nan, 0], [0.1, 0.2, 0.3, 0.4], "1 missing label"),
        ([0, 1, 1], [0.1, 0.2], "but y has 3"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs_are_named(y, p, message):
    with pytest.raises(ValueError, match=message):
        ev.auroc(y, p)


def test_probability_metrics_refuse_points_scores():
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        ev.brier([0, 1], [3.0, 240.0])


# ------------------------------------------------------------------------------------ calibration


def test_calibration_ideal_on_outcomes_drawn_from_p(calibrated):
    y, p = calibrated
    intercept, slope = ev.calibration_intercept_slope(y, p)
    assert abs(intercept) < 0.02
    assert abs(slope - 1) < 0.03


def test_calibration_slope_matches_unpenalised_logistic_regression():
    y, p = _draw(5000, seed=4)
    x = logit(p).reshape(-1, 1)
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, y)
    assert ev.calibration_slope(y, p) == pytest.approx(lr.coef_[0, 0], abs=1e-5)
    # Calibration-in-the-large solves sum(y - expit(a + logit p)) = 0 (offset model), not lr.intercept_.
    a = brentq(lambda a: np.sum(y - expit(a + logit(p))), -5, 5, xtol=1e-12)
    assert ev.calibration_intercept(y, p) == pytest.approx(a, abs=1e-8)


def test_overconfident_predictions_have_slope_below_one(calibrated):
    y, p = calibrated
    too_extreme = expit(2 * logit(p))  # pushed away from 0.5
    assert ev.calibration_slope(y, too_extreme) == pytest.approx(0.5, abs=0.03)
    too_modest = expit(0.5 * logit(p))
    assert ev.calibration_slope(y, too_modest) > 1.5


def test_underestimated_risk_has_positive_intercept(calibrated):
    y, p = calibrated
    assert ev.calibration_intercept(y, expit(logit(p) - 1)) == pytest.approx(1.0, abs=0.03)
    assert ev.calibration_intercept(y, expit(logit(p) + 1)) < -0.9


def test_calibration_clips_zero_and_one():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    p = np.array([0.0, 0.2, 1.0, 0.7, 0.4, 0.6, 0.3, 0.5])
    intercept, slope = ev.calibration_intercept_slope(y, p)
    assert math.isfinite(intercept) and math.isfinite(slope)


def test_ece_small_when_calibrated_large_when_not(calibrated):
    y, p = calibrated
    assert ev.ece(y, p) < 0.01
    assert ev.ece(y, 0.5 * p) > 0.05
    assert ev.ece(y, expit(2 * logit(p))) > 0.03


def test_calibration_curve_uses_equal_frequency_bins(calibrated):
    y, p = calibrated
    curve = ev.calibration_curve(y, p, bins=10)
    assert list(curve.columns[:4]) == ["bin", "mean_predicted", "observed", "n"]
    assert len(curve) == 10 and curve["n"].sum() == y.size
    assert curve["n"].min() >= 0.099 * y.size and curve["n"].max() <= 0.101 * y.size
    assert np.all(np.diff(curve["mean_predicted"]) > 0)
    # Tied predictions share a bin: 3 distinct values cannot make 10 bins.
    tied = ev.calibration_curve([0, 1, 0, 1, 1, 0], [0.2, 0.2, 0.5, 0.5, 0.8, 0.8], bins=10)
    assert tied["n"].tolist() == [2, 2, 2]
    assert tied["observed"].tolist() == [0.5, 0.5, 0.5]


# ------------------------------------------------------------------------------------ clinical utility


def test_threshold_metrics_by_hand():
    t = ev.threshold_metrics(Y_SMALL, P_SMALL, [0.1, 0.5, 0.95]).set_index("threshold")
    # p >= 0.1 flags 0.9, 0.6, 0.15 (events) and 0.7, 0.3, 0.25, 0.1 (non-events): a tie is flagged.
    assert t.loc[0.1, ["tp", "fp", "tn", "fn"]].tolist() == [3, 4, 3, 0]
    # p >= 0.5 flags 0.9, 0.6 (events) and 0.7: TP 2, FP 1, TN 6, FN 1.
    row = t.loc[0.5]
    assert row[["tp", "fp", "tn", "fn"]].tolist() == [2, 1, 6, 1]
    assert row["sensitivity"] == pytest.approx(2 / 3)
    assert row["specificity"] == pytest.approx(6 / 7)
    assert row["ppv"] == pytest.approx(2 / 3)
    assert row["npv"] == pytest.approx(6 / 7)
    assert row["flagged_share"] == pytest.approx(0.3)
    nobody = t.loc[0.95]
    assert math.isnan(nobody["ppv"]) and nobody["sensitivity"] == 0 and nobody["specificity"] == 1
    assert nobody["npv"] == pytest.approx(0.7) and nobody["flagged_share"] == 0


Z95 = float(norm.ppf(0.975))


def _score_test_roots(x: int, n: int) -> tuple[float, float]:
    """Wilson's interval by its definition: the proportions pi a score test at 95% does not reject, i.e.
    the roots of (x/n - pi)^2 = z^2 pi (1 - pi) / n, a quadratic in pi (solved here by numpy.roots)."""
    share, z2 = x / n, Z95**2
    roots = np.roots([1 + z2 / n, -(2 * share + z2 / n), share**2])
    return float(roots.real.min()), float(roots.real.max())


def test_wilson_interval_known_values_and_its_definition():
    from statsmodels.stats.proportion import proportion_confint

    # 8/10: the textbook example, [0.490, 0.943] (Wald would give [0.552, 1.048], outside [0, 1]).
    lo, hi = ev.wilson_interval(8, 10)
    assert (round(float(lo), 3), round(float(hi), 3)) == (0.490, 0.943)
    assert (float(lo), float(hi)) == pytest.approx(_score_test_roots(8, 10), abs=1e-12)
    assert (float(lo), float(hi)) == pytest.approx(proportion_confint(8, 10, method="wilson"), abs=1e-12)
    # 0/5: the lower bound is exactly 0 and the upper one z^2 / (n + z^2) (a root of the quadratic),
    # where Wald's interval would collapse to [0, 0].
    lo, hi = ev.wilson_interval(0, 5)
    assert float(lo) == 0.0 and float(hi) == pytest.approx(Z95**2 / (5 + Z95**2), abs=1e-12)
    lo, hi = ev.wilson_interval(5, 5)  # mirror image: n/n
    assert float(hi) == 1.0 and float(lo) == pytest.approx(5 / (5 + Z95**2), abs=1e-12)
    # Every case of a small table agrees with the definition, and a 90% interval is narrower.
    for x, n in [(1, 3), (2, 7), (13, 29), (81, 263)]:
        assert tuple(float(v) for v in ev.wilson_interval(x, n)) == pytest.approx(_score_test_roots(x, n))
        lo90, hi90 = ev.wilson_interval(x, n, alpha=0.1)
        lo95, hi95 = ev.wilson_interval(x, n)
        assert lo95 < lo90 < x / n < hi90 < hi95
    with pytest.raises(ValueError, match="successes <= n"):
        ev.wilson_interval(6, 5)


def test_wilson_interval_of_an_empty_denominator_is_nan_not_an_error():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero RuntimeWarning either
        lo, hi = ev.wilson_interval(0, 0)
        both = ev.wilson_interval(np.array([0, 3]), np.array([0, 4]))
    assert math.isnan(lo) and math.isnan(hi)
    assert math.isnan(both[0][0]) and math.isnan(both[1][0])
    assert (both[0][1], both[1][1]) == pytest.approx(_score_test_roots(3, 4))


def test_threshold_metrics_carry_wilson_intervals_and_keep_their_columns():
    t = ev.threshold_metrics(Y_SMALL, P_SMALL, [0.1, 0.5, 0.95])
    # The public columns are unchanged, in their order; the intervals come after them.
    rates = ["sensitivity", "specificity", "ppv", "npv"]
    original = ["threshold", "tp", "fp", "tn", "fn", *rates, "flagged_share"]
    assert list(t.columns) == original + [f"{r}_{b}" for r in rates for b in ("lo", "hi")]
    t = t.set_index("threshold")
    # p >= 0.5: TP 2, FP 1, TN 6, FN 1 (counted by hand in test_threshold_metrics_by_hand).
    row = t.loc[0.5]
    for rate, (x, n) in {"sensitivity": (2, 3), "specificity": (6, 7), "ppv": (2, 3), "npv": (6, 7)}.items():
        assert (row[f"{rate}_lo"], row[f"{rate}_hi"]) == pytest.approx(_score_test_roots(x, n)), rate
        assert row[f"{rate}_lo"] < row[rate] < row[f"{rate}_hi"]
    # p >= 0.95 flags nobody: PPV and its interval are undefined; sensitivity 0/3 still has an interval.
    nobody = t.loc[0.95]
    assert math.isnan(nobody["ppv_lo"]) and math.isnan(nobody["ppv_hi"])
    assert nobody["sensitivity_lo"] == 0 and nobody["sensitivity_hi"] == pytest.approx(Z95**2 / (3 + Z95**2))
    # p >= 0.1 catches every event: sensitivity 3/3, its upper bound exactly 1.
    assert t.loc[0.1, "sensitivity_hi"] == 1.0 and t.loc[0.1, "sensitivity_lo"] == pytest.approx(
        3 / (3 + Z95**2)
    )
    # evaluate() passes its alpha on, and the report stays strict JSON (NaN bounds become null).
    y, p = _draw(400, seed=15)
    narrow = ev.evaluate(y, p, thresholds=[0.2, 0.999], n_boot=20, alpha=0.1)["threshold_metrics"]
    assert narrow[1]["ppv_lo"] is None and narrow[1]["ppv"] is None
    json.dumps(narrow, allow_nan=False)
    expected = ev.wilson_interval(narrow[0]["tp"], narrow[0]["tp"] + narrow[0]["fn"], alpha=0.1)
    assert (narrow[0]["sensitivity_lo"], narrow[0]["sensitivity_hi"]) == pytest.approx(expected)


def test_net_benefit_by_hand():
    nb = ev.net_benefit(Y_SMALL, P_SMALL, [0.1, 0.5]).set_index("threshold")
    # pt = 0.1: TP 3, FP 4, n 10 -> 3/10 - 4/10 * (0.1/0.9); treat all: 0.3 - 0.7 * (1/9).
    assert nb.loc[0.1, "net_benefit"] == pytest.approx(0.3 - 0.4 / 9)
    assert nb.loc[0.1, "treat_all"] == pytest.approx(0.3 - 0.7 / 9)
    # pt = 0.5: TP 2, FP 1 -> 0.2 - 0.1 * 1; treat all: 0.3 - 0.7.
    assert nb.loc[0.5, "net_benefit"] == pytest.approx(0.1)
    assert nb.loc[0.5, "treat_all"] == pytest.approx(-0.4)
    assert (nb["treat_none"] == 0).all()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ev.net_benefit(Y_SMALL, P_SMALL, [0.0, 0.5])


# ------------------------------------------------------------------------------------ bootstrap


def _binormal(n: int, d: float, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores N(0,1) for non-events and N(d,1) for events: true AUROC = Phi(d / sqrt 2)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype("int64")
    return y, rng.normal(d * y, 1.0), float(norm.cdf(d / math.sqrt(2)))


def test_bootstrap_ci_contains_true_auroc_and_is_deterministic():
    y, s, true_auc = _binormal(2000, d=1.0, seed=5)
    a = ev.bootstrap_ci(y, s, {"auroc": ev.auroc, "auprc": ev.auprc}, n_boot=500, seed=7)
    est, lo, hi = a["auroc"]
    assert est == ev.auroc(y, s)
    assert lo < true_auc < hi and 0.02 < hi - lo < 0.1
    assert ev.bootstrap_ci(y, s, {"auroc": ev.auroc, "auprc": ev.auprc}, n_boot=500, seed=7) == a
    assert ev.bootstrap_ci(y, s, {"auroc": ev.auroc}, n_boot=500, seed=8)["auroc"] != a["auroc"]


def test_vectorised_bootstrap_equals_replicate_by_replicate():
    """The fast kernels and a plain per-replicate loop see the same resamples and agree."""
    y, p = _draw(600, seed=6)
    fns = {
        "auroc": ev.auroc,
        "auprc": ev.auprc,
        "brier": ev.brier,
        "log_loss": ev.log_loss,
        "intercept": ev.calibration_intercept,
        "slope": ev.calibration_slope,
    }
    fast = ev.bootstrap_ci(y, np.round(p, 2), fns, n_boot=60, seed=3)
    slow_fns = {k: (lambda a, b, f=f: f(a, b)) for k, f in fns.items()}  # wrapped: defeats the kernels
    slow = ev.bootstrap_ci(y, np.round(p, 2), slow_fns, n_boot=60, seed=3)
    for k in fns:
        assert fast[k] == pytest.approx(slow[k], abs=1e-9), k


def test_bootstrap_is_stratified_so_rare_events_never_vanish():
    y = np.zeros(300, dtype="int64")
    y[:3] = 1
    s = np.random.default_rng(0).random(300)
    ci = ev.bootstrap_ci(y, s, {"auroc": ev.auroc, "events": lambda a, b: a.sum()}, n_boot=300, seed=0)
    assert ci["events"] == (3, 3, 3)  # every replicate keeps exactly the observed events
    assert all(math.isfinite(v) for v in ci["auroc"])


def test_ece_bootstrap_kernel_is_ece_of_each_resample():
    """The vectorised ECE re-cuts its quantile bins on every replicate: it equals ece() of each resample,
    with tied predictions and with other bin counts (passed as functools.partial, as compare does)."""
    y, p = _draw(700, seed=13)
    y = y.astype(float)
    for preds, bins in ((p, 10), (np.round(p, 2), 10), (p, 7)):
        fast_fn = ev.ece if bins == 10 else partial(ev.ece, bins=bins)
        fast = ev._replicates(y, {"m": preds}, {"ece": fast_fn}, 40, 5)[("m", "ece")]
        slow_fn = lambda a, b, k=bins: ev.ece(a, b, k)  # noqa: E731  (wrapped: defeats the kernel)
        slow = ev._replicates(y, {"m": preds}, {"ece": slow_fn}, 40, 5)[("m", "ece")]
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
        est = ev.ece(y, preds, bins)
        assert ev.bootstrap_ci(y, preds, {"ece": fast_fn}, n_boot=40, seed=5)["ece"] == pytest.approx(
            (est, *ev.ece_interval(slow, est))
        )


def test_ece_interval_contains_the_ece_narrows_with_more_rows_and_repeats_with_its_seed():
    # Calibrated models, where the ECE's upward bias matters most: the plain percentile interval of the
    # replicates misses the ECE itself on some of these test sets; the shifted one contains it on all.
    missed = 0
    for seed in range(20, 26):
        y, p = _draw(1500, seed)
        row = ev.compare(y, {"model": p}, n_boot=200, seed=0).loc["model"]
        assert 0 <= row["ece_lo"] <= row["ece"] <= row["ece_hi"], seed
        reps = ev._replicates(y.astype(float), {"m": p}, {"ece": ev.ece}, 200, 0)[("m", "ece")]
        lo, hi = np.quantile(reps, [0.025, 0.975])
        missed += not lo <= row["ece"] <= hi
    assert missed >= 1

    widths = []
    for n, seed in ((600, 1), (6000, 2)):
        y, p = _draw(n, seed)
        row = ev.compare(y, {"model": p}, n_boot=200, seed=0).loc["model"]
        assert row["ece_lo"] <= row["ece"] <= row["ece_hi"]
        widths.append(row["ece_hi"] - row["ece_lo"])
    assert widths[1] < 0.6 * widths[0]  # ten times the patients: about a third of the width

    y, p = _draw(2000, seed=4)
    worse = expit(logit(p) + 0.8)  # over-estimates risk: an ECE well above what noise explains
    preds = {"model": p, "worse": worse, "points": np.round(10 * logit(p)) + 50}
    table = ev.compare(y, preds, n_boot=200, seed=3)
    assert list(table.columns[-2:]) == ["ece_lo", "ece_hi"]  # appended: earlier columns keep their order
    assert table.loc["worse", "ece_lo"] > ev.ece_if_calibrated(worse)  # credibly above its noise floor
    assert table.loc["points", ["ece", "ece_lo", "ece_hi"]].isna().all()  # a score has no ECE
    again = ev.compare(y, preds, n_boot=200, seed=3)
    assert again[["ece_lo", "ece_hi"]].equals(table[["ece_lo", "ece_hi"]])
    other = ev.compare(y, preds, n_boot=200, seed=4)
    assert other.loc["model", "ece_lo"] != table.loc["model", "ece_lo"]
    # Same seed and patients: evaluate's interval is compare's.
    report = ev.evaluate(y, p, n_boot=200, seed=3)
    expected = tuple(table.loc["model", ["ece_lo", "ece_hi"]])
    assert (report["ece_lo"], report["ece_hi"]) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ reports


def test_evaluate_is_json_serialisable_and_complete():
    y, p = _draw(2000, seed=9)
    report = ev.evaluate(y, p, n_boot=200, seed=1)
    text = json.dumps(report, allow_nan=False)  # strict JSON: no NaN, no numpy types
    assert json.loads(text) == report
    assert report["n"] == 2000 and report["events"] == int(y.sum())
    for k in ("auroc", "auprc", "brier", "calibration_intercept", "calibration_slope"):
        r = report[k]
        assert r["lo"] <= r["estimate"] <= r["hi"], k
    assert report["auroc"]["estimate"] == ev.auroc(y, p)
    assert len(report["calibration_curve"]) == 10
    assert [r["threshold"] for r in report["threshold_metrics"]] == list(ev.DEFAULT_THRESHOLDS)
    assert len(report["net_benefit"]) == len(ev.DEFAULT_NB_THRESHOLDS)
    assert report["warnings"] == []
    assert 0 <= report["ece_lo"] <= report["ece"] <= report["ece_hi"]  # beside ece, which stays a number
    # An undefined metric becomes null, with a warning, and the report is still strict JSON.
    single = ev.evaluate(np.zeros(200), p[:200], n_boot=50)
    json.dumps(single, allow_nan=False)
    assert single["auroc"] == {"estimate": None, "lo": None, "hi": None}
    assert "only one outcome class" in single["warnings"][0]


def test_compare_pairs_the_bootstrap_and_handles_scores():
    y, ceiling = _draw(3000, seed=11)
    rng = np.random.default_rng(12)
    model = expit(logit(ceiling) + rng.normal(0, 0.8, y.size))  # noisier than the truth
    points = np.round(10 * logit(ceiling)) + 50  # a points score: same ranking, not a probability
    rule = (ceiling > 0.3).astype("int64")  # a 0/1 rule: a score, even though it lies in [0, 1]
    preds = {"ceiling": ceiling, "model": model, "points": points, "rule": rule}
    table = ev.compare(y, preds, reference="ceiling", n_boot=400, seed=2)

    assert list(table.index) == ["ceiling", "model", "points", "rule"]
    assert table["probabilistic"].tolist() == [True, True, False, False]
    assert table.loc[["points", "rule"], ["brier", "calibration_slope", "ece"]].isna().all().all()
    assert table.loc["points", "auroc"] == pytest.approx(ev.auroc(y, points))

    # The reference's gap to itself is exactly 0 on every replicate.
    assert table.loc["ceiling", ["auroc_diff", "auroc_diff_lo", "auroc_diff_hi"]].tolist() == [0, 0, 0]
    gap = table.loc["model"]
    assert gap["auroc_diff"] == pytest.approx(gap["auroc"] - table.loc["ceiling", "auroc"])
    assert gap["auroc_diff_hi"] < 0  # the noisy model is credibly worse than the truth
    # Pairing cancels the noise both share: the gap's interval is far narrower than the two intervals
    # combined as if they were independent.
    w_model = gap["auroc_hi"] - gap["auroc_lo"]
    w_ceiling = table.loc["ceiling", "auroc_hi"] - table.loc["ceiling", "auroc_lo"]
    assert gap["auroc_diff_hi"] - gap["auroc_diff_lo"] < 0.8 * math.hypot(w_model, w_ceiling)

    # Same seed, same patients: compare and evaluate give the same intervals for a model.
    report = ev.evaluate(y, model, n_boot=400, seed=2)
    assert gap["auroc_lo"] == pytest.approx(report["auroc"]["lo"])
    assert gap["calibration_slope_hi"] == pytest.approx(report["calibration_slope"]["hi"])

    explicit = ev.compare(y, {"m": model, "rule": rule}, probabilistic={"m", "rule"}, n_boot=50)
    assert explicit["probabilistic"].all() and math.isfinite(explicit.loc["rule", "brier"])
    with pytest.raises(ValueError, match="probabilities"):
        ev.compare(y, preds, probabilistic={"points"}, n_boot=10)
    with pytest.raises(ValueError, match="reference"):
        ev.compare(y, preds, reference="truth", n_boot=10)
    with pytest.raises(ValueError, match=r"predictions\['model'\]: 1 of 3000 are NaN"):
        ev.compare(y, {"model": np.r_[np.nan, model[1:]]}, n_boot=10)


def test_subgroup_report_flags_small_degraded_and_single_class_groups():
    rng = np.random.default_rng(13)
    y, p = _draw(6000, seed=14, mean=-1.0)
    group = np.array(["fine"] * 3000 + ["shuffled"] * 1500 + ["shifted"] * 1440 + ["tiny"] * 60, dtype=object)
    q = p.copy()
    shuffled = group == "shuffled"
    q[shuffled] = rng.permutation(p[shuffled])  # same mean, no discrimination
    shifted = group == "shifted"
    q[shifted] = np.clip(p[shifted] + 0.15, 0, 1)  # over-predicts risk by 15 points
    y[-5:] = 0  # keep "tiny" below 10 events
    lonely = np.where(np.arange(y.size) < 20, "no_events", "rest").astype(object)
    y_lonely = y.copy()
    y_lonely[:20] = 0

    report = ev.subgroup_report(y, q, {"arm": group}, seed=1)
    assert report.iloc[0][["group", "level", "n"]].tolist() == ["overall", "all", 6000]
    by = report.set_index("level")
    assert by.loc["fine", "warning"] == ""
    assert by.loc["shuffled", "warning"] == "worse"  # AUROC upper bound below the overall AUROC
    assert by.loc["shuffled", "auroc_hi"] < by.loc["all", "auroc"]
    assert by.loc["shifted", "warning"] == "worse"  # O - E outside +-0.05
    assert by.loc["shifted", "o_minus_e"] == pytest.approx(-0.15, abs=0.02)
    assert "small group" in by.loc["tiny", "warning"]
    assert by.loc["fine", "n"] == 3000 and by.loc["fine", "events"] == int(y[:3000].sum())

    single = ev.subgroup_report(y_lonely, q, {"lonely": lonely}).set_index("level")
    assert math.isnan(single.loc["no_events", "auroc"])
    assert single.loc["no_events", "warning"].startswith("single class; small group")


def test_standard_groups_from_a_schema_frame():
    data = pd.DataFrame(
        {"trigger": ["sjia", "covid19", "lymphoma"], "age_years": [8.0, 40.0, 70.0], "sex": ["F", "M", "F"]}
    )
    groups = ev.standard_groups(data)
    assert list(groups["trigger_family"]) == ["autoimmune", "viral", "malignancy"]
    assert list(groups["age_band"]) == ["<16", "16-64", ">=65"]
    assert list(groups["sex"]) == ["F", "M", "F"]
    y, p = np.array([1, 0, 1]), np.array([0.8, 0.3, 0.4])
    report = ev.subgroup_report(y, p, groups, n_boot=20)
    assert set(report["group"]) == {"overall", "trigger_family", "age_band", "sex"}
    assert report["warning"].str.contains("small group").all()


def test_ece_if_calibrated_is_the_noise_floor_the_true_probabilities_show():
    """Drawing outcomes from p many times, the mean observed ECE of p itself matches the floor."""
    rng = np.random.default_rng(40)
    p = rng.beta(2, 2, 1_500)
    floor = ev.ece_if_calibrated(p, n_sim=300, seed=1)
    observed = np.mean([ev.ece((rng.random(p.size) < p).astype(float), p) for _ in range(300)])
    assert abs(floor - observed) < 0.003
    assert 0.02 < floor < 0.04  # ~0.8 * sqrt(0.2 / 150) for 10 bins of 150
    big = rng.beta(2, 2, 60_000)
    assert ev.ece_if_calibrated(big, n_sim=20) < floor / 4  # shrinks like 1/sqrt(n)


def test_ece_vs_truth_measures_miscalibration_without_outcome_noise():
    rng = np.random.default_rng(41)
    truth = rng.uniform(0.05, 0.85, 2_000)
    assert ev.ece_vs_truth(truth, truth) == 0.0
    assert ev.ece_vs_truth(truth + 0.1, truth) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="true probabilities: 1 of 2000 are NaN"):
        ev.ece_vs_truth(truth, np.r_[truth[:-1], np.nan])


def test_quantiles_of_repeats_equal_numpy_on_the_repeated_values_bit_for_bit():
    """The ECE kernel cuts its bins from draw counts without building the resample: same edges as
    np.quantile of the repeated values, ties and single draws included."""
    rng = np.random.default_rng(3)
    qs = np.linspace(0, 1, 11)[1:-1]
    for m, ties in ((1, False), (7, False), (50, True), (400, False)):
        v = np.sort(np.round(rng.random(m), 1) if ties else rng.random(m))
        counts = rng.integers(0, 4, size=(30, m))
        counts[:, rng.integers(0, m)] += 1  # every replicate draws someone
        got = ev._quantiles_of_repeats(v, counts, qs)
        want = np.stack([np.quantile(np.repeat(v, c), qs) for c in counts])
        assert np.array_equal(got, want), m


def _blb_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(-1, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(float)
    return y, expit(1.1 * z + 0.05)  # a slightly over-confident model


def test_little_bootstraps_give_the_plain_bootstraps_intervals(monkeypatch):
    """Above BLB_MIN_ROWS the bag of little bootstraps replaces the plain bootstrap: its intervals must be
    the plain bootstrap's (position and width), for every metric and for the paired AUROC difference."""
    y, p = _blb_case(30_000, seed=11)
    other = np.clip(p + np.random.default_rng(1).normal(0, 0.05, p.size), 0, 1)  # ranks differently
    fns = {**ev._CI_METRICS, "ece": ev.ece}
    plain = ev.bootstrap_ci(y, p, fns, n_boot=400, seed=2)
    plain_cmp = ev.compare(y, {"m": p, "o": other}, reference="o", n_boot=400, seed=2)
    monkeypatch.setattr(ev, "BLB_MIN_ROWS", 10_000)
    plan = ev.bootstrap_plan(y.size, 400)
    assert (plan["subsets"], plan["per_subset"]) == (4, 100)
    assert plan["subset_size"] == math.ceil(30_000**0.7)
    little = ev.bootstrap_ci(y, p, fns, n_boot=400, seed=2)
    for k in fns:
        est, lo, hi = plain[k]
        est2, lo2, hi2 = little[k]
        assert est2 == est, k
        assert lo2 < est < hi2, k
        assert abs(lo2 - lo) < 0.2 * (hi - lo) and abs(hi2 - hi) < 0.2 * (hi - lo), (k, plain[k], little[k])
    cmp = ev.compare(y, {"m": p, "o": other}, reference="o", n_boot=400, seed=2)
    width = plain_cmp.loc["m", "auroc_diff_hi"] - plain_cmp.loc["m", "auroc_diff_lo"]
    for bound in ("auroc_diff_lo", "auroc_diff_hi", "ece_lo", "ece_hi", "calibration_slope_lo"):
        assert np.isfinite(cmp.loc["m", bound]), bound
    assert abs(cmp.loc["m", "auroc_diff_lo"] - plain_cmp.loc["m", "auroc_diff_lo"]) < 0.2 * width
    assert ev.bootstrap_ci(y, p, fns, n_boot=400, seed=2) == little  # deterministic for its seed
    report = ev.evaluate(y, p, n_boot=400, seed=2)
    assert report["bootstrap"]["method"].startswith("bag of little bootstraps")
    assert report["bootstrap"]["subset_size"] == plan["subset_size"]


def test_one_little_bootstrap_is_still_centred_on_the_estimate(monkeypatch):
    """n_boot < 200 gives a single subset: its interval, too, is the spread around the all-patient
    estimate, not around the subset's own value (which carries the noise of its b patients)."""
    y, p = _blb_case(30_000, seed=11)
    plain = ev.bootstrap_ci(y, p, {"auroc": ev.auroc}, n_boot=100, seed=2)["auroc"]
    monkeypatch.setattr(ev, "BLB_MIN_ROWS", 10_000)
    assert ev.bootstrap_plan(y.size, 100)["subsets"] == 1
    est, lo, hi = ev.bootstrap_ci(y, p, {"auroc": ev.auroc}, n_boot=100, seed=2)["auroc"]
    assert est == plain[0] and lo < est < hi
    width = plain[2] - plain[1]
    assert abs(lo - plain[1]) < 0.25 * width and abs(hi - plain[2]) < 0.25 * width, (plain, (lo, hi))


def test_little_bootstraps_call_plain_metric_functions_on_full_size_resamples(monkeypatch):
    """A metric without a vectorised kernel sees each replicate as patients repeated by their draw
    counts: n patients, the observed number of events."""
    monkeypatch.setattr(ev, "BLB_MIN_ROWS", 1_000)
    y, p = _blb_case(5_000, seed=4)
    reps = ev._replicates(y, {"m": p}, {"n": lambda a, b: a.size, "events": lambda a, b: a.sum()}, 200, 0)
    assert reps[("m", "n")].shape == (2, 100)
    assert (reps[("m", "n")] == y.size).all() and (reps[("m", "events")] == y.sum()).all()


def test_noise_floor_drawn_in_blocks_is_the_one_shot_simulation(monkeypatch):
    """ece_if_calibrated draws its outcomes in bounded blocks; the answer is the one-shot draw's."""
    p = expit(np.random.default_rng(8).normal(-1, 1.2, 3_000))
    b = ev._quantile_bins(p, 10)
    onehot = np.eye(b.max() + 1)[b]
    n_k = onehot.sum(axis=0)
    draws = (np.random.default_rng(5).random((90, p.size)) < p).astype(float)
    want = np.mean(np.abs(draws @ onehot / n_k - onehot.T @ p / n_k) @ (n_k / n_k.sum()))
    monkeypatch.setattr(ev, "_BLOCK_CELLS", 7 * p.size)  # 13 blocks, the last one short
    assert ev.ece_if_calibrated(p, n_sim=90, seed=5) == pytest.approx(want, rel=1e-12)
