"""The evaluation figures: the curves drawn are the curves measured, and every figure is a real PNG."""

from __future__ import annotations

import numpy as np

from masml import evaluation, plots


def _data(n: int = 2_000, seed: int = 3):
    rng = np.random.default_rng(seed)
    p = rng.beta(1, 3, n)
    y = (rng.random(n) < p).astype(float)
    return y, p


def test_roc_points_integrate_to_the_reported_auroc_even_with_ties():
    y, p = _data()
    for scores in (p, np.round(p * 10)):  # the rounded score has many ties, like a points score
        fpr, tpr = plots._roc_points(y, scores)
        assert np.isclose(np.trapezoid(tpr, fpr), evaluation.auroc(y, scores), rtol=0, atol=1e-12)
        assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


def test_pr_points_end_at_full_recall_and_prevalence():
    y, p = _data()
    recall, precision = plots._pr_points(y, p)
    assert recall[-1] == 1.0
    assert np.isclose(precision[-1], y.mean())
    assert np.all(np.diff(recall) >= 0)


def test_evaluation_plots_write_four_pngs_with_subset_scores(tmp_path):
    y, p = _data()
    everyone = np.ones(y.size, bool)
    subset = np.arange(y.size) % 3 == 0
    predictions = {
        "model": (everyone, p),
        "ceiling": (everyone, np.clip(p + 0.01, 0, 1)),
        "points_score": (subset, np.round(p * 9)),
    }
    paths = plots.evaluation_plots(y, predictions, tmp_path)
    assert [path.name for path in paths] == ["roc.png", "precision_recall.png", "calibration.png",
                                             "decision_curve.png"]  # fmt: skip
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_decision_only_curves_join_the_decision_curve_alone(tmp_path):
    y, p = _data()
    everyone = np.ones(y.size, bool)
    plain = plots.evaluation_plots(y, {"model": (everyone, p)}, tmp_path / "a")
    extra = plots.evaluation_plots(y, {"model": (everyone, p)}, tmp_path / "b",
                                   decision_only={"score_probability": np.clip(p * 0.8, 0, 1)})  # fmt: skip
    same = [a.read_bytes() == b.read_bytes() for a, b in zip(plain, extra, strict=True)]
    assert same == [True, True, True, False]  # only the decision curve gained a line
