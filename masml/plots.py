"""The held-out evaluation as figures: ROC, precision-recall, calibration and decision curves.

Why figures beside the numbers: a calibration slope of 0.95 hides *where* a model is off (the high-risk
tail matters most at the bedside), and a decision curve shows over which range of threshold
probabilities the model is worth acting on at all. Each figure draws the model beside the comparators
the run evaluated (logistic baseline, clinical scores, the ceiling) on the same held-out patients.

Matplotlib runs headless (Agg); every function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from masml import evaluation

# Predictions that are probabilities (calibration and decision curves make sense only for these);
# clinical scores are points or counts, drawn on ROC and PR only.
PROBABILISTIC = ("model", "logistic_baseline", "ceiling")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def _pr_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    return tp / max(y.sum(), 1), tp / (last_of_tie + 1)


def roc_plot(y, predictions: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """ROC curves; ``predictions`` maps a name to (row mask, score) so scores that apply to a subset
    (the 2016 criteria: sJIA/AOSD) are drawn on their own patients."""
    plt, fig, ax = _figure()
    y = np.asarray(y, float)
    for name, (mask, s) in predictions.items():
        fpr, tpr = _roc_points(y[mask], np.asarray(s, float)[mask])
        ax.step(fpr, tpr, where="post", label=f"{name} ({evaluation.auroc(y[mask], s[mask]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (AUROC)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def pr_plot(y, predictions: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Precision-recall curves, with the prevalence (a random model's precision) as a dotted line."""
    plt, fig, ax = _figure()
    y = np.asarray(y, float)
    for name, (mask, s) in predictions.items():
        recall, precision = _pr_points(y[mask], np.asarray(s, float)[mask])
        ax.step(recall, precision, where="post", label=f"{name} ({evaluation.auprc(y[mask], s[mask]):.3f})")
    ax.axhline(y.mean(), color="grey", lw=0.8, ls=":")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall (AUPRC)")
    ax.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path)


def calibration_plot(y, probabilities: Mapping[str, np.ndarray], path: Path, bins: int = 10) -> Path:
    """Observed event rate against mean predicted risk in quantile bins; the diagonal is perfect."""
    plt, fig, ax = _figure()
    for name, p in probabilities.items():
        curve = evaluation.calibration_curve(y, p, bins=bins)
        ax.plot(curve["mean_predicted"], curve["observed"], marker="o", ms=3, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="predicted risk", ylabel="observed rate", title=f"Calibration ({bins} quantile bins)")
    ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, path)


def decision_curve_plot(
    y, probabilities: Mapping[str, np.ndarray], path: Path, thresholds: np.ndarray | None = None
) -> Path:
    """Net benefit against threshold probability, beside treat-all and treat-none (Vickers & Elkin 2006)."""
    plt, fig, ax = _figure()
    t = np.linspace(0.01, 0.9, 90) if thresholds is None else np.asarray(thresholds, float)
    table = None
    for name, p in probabilities.items():
        table = evaluation.net_benefit(y, p, t)
        ax.plot(table["threshold"], table["net_benefit"], label=name)
    if table is not None:
        ax.plot(table["threshold"], table["treat_all"], color="black", lw=0.8, ls="--", label="treat all")
        ax.axhline(0, color="grey", lw=0.8, ls=":", label="treat none")
    prevalence = float(np.mean(y))
    ax.set_ylim(-0.05 * max(prevalence, 0.05), max(prevalence, 0.05) * 1.1)
    ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve")
    ax.legend(fontsize=7, loc="upper right")
    return _save(plt, fig, path)


def evaluation_plots(
    y,
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    out_dir: str | Path,
    decision_only: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """All four figures for one run; ``predictions`` maps name -> (row mask, score or probability).

    ``decision_only``: probabilities drawn on the decision curve alone, e.g. HScore turned into a
    probability by its published table: the decision a clinician would take with the score today, which
    would only repeat the score's own curve on the ROC and PR plots.
    """
    out = Path(out_dir)
    probabilities = {n: s for n, (mask, s) in predictions.items() if n in PROBABILISTIC and mask.all()}
    return [
        roc_plot(y, predictions, out / "roc.png"),
        pr_plot(y, predictions, out / "precision_recall.png"),
        calibration_plot(y, probabilities, out / "calibration.png"),
        decision_curve_plot(y, {**probabilities, **(decision_only or {})}, out / "decision_curve.png"),
    ]
