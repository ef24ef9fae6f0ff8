"""Held-out evaluation of a risk model: discrimination, calibration, clinical utility, subgroups.

Why one module: the ML model, the logistic baseline, the published clinical scores and the ceiling (the
simulator's true probabilities) must be measured by exactly the same code on exactly the same patients,
or a comparison between them means nothing. Every number here is computed with numpy/scipy only (no
sklearn import; fairlearn is imported lazily by :func:`subgroup_report`), so the module also works in the
base install that :mod:`masml.summary` needs.

What is measured, and why
-------------------------
* **Discrimination**: AUROC (Mann-Whitney U with mid-ranks for ties) and AUPRC (average precision, the
  step-wise area of scikit-learn's ``average_precision_score``; more informative than AUROC when events
  are rare, as MAS is among hyperinflammatory patients).
* **Overall accuracy of the probabilities**: Brier score and log loss.
* **Calibration** (Van Calster B, McLernon DJ, van Smeden M, Wynants L, Steyerberg EW. Calibration: the
  Achilles heel of predictive analytics. *BMC Med* 2019;17:230; Steyerberg EW. *Clinical Prediction
  Models*, 2nd ed., Springer 2019, ch. 15): the calibration *intercept* (calibration-in-the-large:
  logistic regression of y with logit(p) as an offset, coefficient fixed at 1; 0 is ideal, > 0 means
  the model under-estimates risk) and the calibration *slope* (coefficient of logit(p) in a logistic
  regression of y on logit(p); 1 is ideal, < 1 means predictions are too extreme, as from an overfitted
  model). Predictions are clipped to [1e-6, 1 - 1e-6] before the logit so a reported 0 or 1 does not
  make the fit infinite. The expected calibration error (ECE) and the calibration curve use
  equal-frequency (quantile) bins, so every bin holds about the same number of patients and no bin is
  empty where predictions are dense.
* **Clinical utility**: sensitivity/specificity/PPV/NPV at fixed risk thresholds, and decision-curve
  analysis (Vickers AJ, Elkin EB. Decision curve analysis: a novel method for evaluating prediction
  models. *Med Decis Making* 2006;26:565-574): net benefit = TP/n - FP/n * pt / (1 - pt).
* **Uncertainty**: percentile bootstrap, *stratified by outcome* (events and non-events are resampled
  separately), so every replicate keeps the observed prevalence and both classes. The bootstrap is
  vectorised: each replicate is represented by how many times it draws each patient (a count matrix),
  and AUROC, AUPRC, Brier, log loss and the calibration fits are computed for all replicates at once
  from those counts. Comparisons between models are *paired*: every model is scored on the same
  replicates. Sensitivity, specificity, PPV and NPV are plain proportions of a count, so they get the
  Wilson score interval (Wilson EB. Probable inference, the law of succession, and statistical
  inference. *J Am Stat Assoc* 1927;22:209-212) instead of a bootstrap: it is exact to compute, stays
  inside [0, 1], and keeps close to its nominal 95% coverage for the small counts that a high threshold
  or a small test set leaves (the Wald interval p +- 1.96 SE collapses to a point at 0/n or n/n).
  The ECE is bootstrapped on the same replicates (its quantile bins are re-cut on each), but its
  interval is shifted (:func:`ece_interval`): ECE is biased upwards on a finite test set and a resample
  adds its own noise on top, so its plain percentile interval can miss the ECE it is meant to surround.
  Above :data:`BLB_MIN_ROWS` patients the same replicates come from the *bag of little bootstraps*
  (Kleiner A, Talwalkar A, Sarkar P, Jordan MI. A scalable bootstrap for massive data. *J R Stat Soc B*
  2014;76:795-816): a bootstrap over millions of held-out patients (a network's retraining) would
  otherwise cost replicates x patients, minutes per model, for intervals a few thousandths wide.

Conventions
-----------
* ``y`` is 0/1 (bool or numeric; anything else, including a missing label, is a ``ValueError``).
* A prediction that is NaN is a ``ValueError`` naming how many: a model that cannot score a patient must
  be dealt with before evaluation (dropping those patients silently would flatter the model).
* A patient is *flagged* at threshold t when ``p >= t``.
* When ``y`` has a single class, AUROC, AUPRC and the calibration fits are NaN (not an exception), and
  :func:`evaluate` says why in its ``warnings`` list.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from functools import partial

import numpy as np
import pandas as pd
from scipy.special import expit, logit
from scipy.stats import norm, rankdata

from masml.schema import TRIGGER_FAMILY, age_band

__all__ = [
    "CALIBRATION_CLIP",
    "DEFAULT_NB_THRESHOLDS",
    "DEFAULT_THRESHOLDS",
    "auprc",
    "auroc",
    "bootstrap_ci",
    "bootstrap_plan",
    "brier",
    "calibration_curve",
    "calibration_intercept",
    "calibration_intercept_slope",
    "calibration_slope",
    "compare",
    "ece",
    "ece_if_calibrated",
    "ece_interval",
    "ece_vs_truth",
    "evaluate",
    "log_loss",
    "net_benefit",
    "standard_groups",
    "subgroup_report",
    "threshold_metrics",
    "wilson_interval",
]

# Van Calster et al. 2019 / Steyerberg: predictions are clipped before the logit so that a reported
# probability of exactly 0 or 1 does not make the calibration fit infinite.
CALIBRATION_CLIP = 1e-6
# Log loss clips harder (the convention of scikit-learn < 1.6): a confident wrong prediction is
# penalised heavily but finitely.
LOG_LOSS_CLIP = 1e-15

# Assumption: the risk thresholds reported by default span "rule out" (5%) to "treat" (50%) for MAS
# onset; each pipeline passes its own when its label calls for others.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
# Assumption: decision curves are drawn for threshold probabilities 1%-50%: no clinician would
# require more than even odds of MAS (or of ICU need) before acting, and above that net benefit is noise.
DEFAULT_NB_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 51))

# Subgroup rule defaults (see subgroup_report).
SUBGROUP_MIN_N = 100
SUBGROUP_MIN_EVENTS = 10
SUBGROUP_MAX_ABS_O_MINUS_E = 0.05

# Bootstrap replicates are processed in blocks of at most this many (replicate x patient) cells, so the
# memory stays bounded (~16 MB per array) whatever the size of the test set.
_BLOCK_CELLS = 2_000_000

# The bag of little bootstraps (Kleiner et al. 2014, module docstring), used above BLB_MIN_ROWS patients:
# s subsets of b = n ** BLB_EXPONENT patients (drawn without replacement within each outcome class, in
# proportion), each resampled ``n_boot // s`` times *at the full size n* (multinomial counts on its b
# patients), so every replicate has the spread of a size-n resample; each subset's percentile bounds,
# taken relative to its replicates' mean, are averaged and placed around the all-patient estimate
# (``_percentile``). Cost: n_boot x b cells instead of n_boot x n (n = 1.25 million: ~67x
# fewer). b = n^0.7 and r = 100 replicates per subset are the paper's recommended settings (their
# sections 4-5: b = n^0.7 matched the bootstrap's interval width within a few per cent, r near 100
# sufficed); s = n_boot / 100 (at most 10, at least 1) keeps the total at n_boot. Assumption: the cut
# at 50,000 rows, where the plain bootstrap of a pipeline's three-model comparison takes ~40 s on a
# 2-core machine (bench/bench_evaluation.py: 16 s at 20,000 rows, linear in rows) and the little
# bootstraps still matched its intervals in tests/test_evaluation.py (30,000 rows); below it the plain
# bootstrap runs, unchanged.
BLB_MIN_ROWS = 50_000
BLB_EXPONENT = 0.7
BLB_REPLICATES_PER_SUBSET = 100
BLB_MAX_SUBSETS = 10
_NEWTON_MAX_ITER = 100
_NEWTON_MAX_STEP = 5.0
_NEWTON_TOL = 1e-10


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _as_1d_float(x, name: str) -> np.ndarray:
    """x as a 1-D float64 array; a missing value (None, NaN, pandas NA) becomes NaN."""
    try:
        if isinstance(x, pd.Series | pd.Index | pd.DataFrame):
            arr = x.to_numpy(dtype="float64", na_value=np.nan)
        else:
            arr = np.asarray(x).astype("float64")
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric") from None
    arr = np.squeeze(arr) if arr.ndim > 1 else arr
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {np.shape(x)}")
    return arr


def _check_y(y) -> np.ndarray:
    """y as a float array of 0/1; ValueError for anything else (a missing label included)."""
    arr = _as_1d_float(y, "y (0/1 labels)")
    if arr.size == 0:
        raise ValueError("y is empty: there is nothing to evaluate")
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise ValueError(f"y has {n_nan} missing label(s) out of {arr.size}; labels must be 0/1")
    bad = ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        examples = sorted(set(arr[bad].tolist()))[:5]
        raise ValueError(f"y must be 0/1; {int(bad.sum())} value(s) are not, e.g. {examples}")
    return arr


def _check_p(p, n: int, name: str = "predictions") -> np.ndarray:
    """p as a float array of length n; ValueError naming how many values are NaN or infinite."""
    arr = _as_1d_float(p, name)
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} values, but y has {n}")
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise ValueError(
            f"{name}: {n_nan} of {n} are NaN; a model that cannot score a patient must be handled "
            "before evaluation (dropping those patients silently would flatter it)"
        )
    n_inf = int(np.isinf(arr).sum())
    if n_inf:
        raise ValueError(f"{name}: {n_inf} of {n} are infinite")
    return arr


def _check_probability(p: np.ndarray, name: str = "predictions") -> None:
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(
            f"{name} must be probabilities in [0, 1] (got values in [{p.min():.4g}, {p.max():.4g}]); "
            "a points score supports AUROC/AUPRC and threshold metrics only"
        )


def _yp(y, p, probability: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = _check_y(y)
    p = _check_p(p, y.size)
    if probability:
        _check_probability(p)
    return y, p


def _check_thresholds(thresholds, *, open_unit: bool) -> np.ndarray:
    t = np.atleast_1d(np.asarray(thresholds, dtype="float64"))
    if t.ndim != 1 or t.size == 0 or not np.isfinite(t).all():
        raise ValueError(f"thresholds must be a non-empty list of finite numbers, got {thresholds!r}")
    if open_unit and ((t <= 0) | (t >= 1)).any():
        raise ValueError(f"threshold probabilities must lie strictly between 0 and 1, got {t.tolist()}")
    return t


# --------------------------------------------------------------------------------------------------
# Weighted (bootstrap-count) kernels: W is (B, n) counts of how often each patient is drawn. The
# plain metric on data `y, p` is the same kernel with W = ones((1, n)), so point estimates and
# bootstrap replicates are computed by one piece of code.
# --------------------------------------------------------------------------------------------------


def _auroc_w(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return np.full(W.shape[0], np.nan)
    s_pos, s_neg = s[pos], s[neg]
    order = np.argsort(s_neg, kind="stable")
    s_neg_sorted = s_neg[order]
    w_neg = W[:, neg][:, order]
    w_pos = W[:, pos]
    cum = np.zeros((W.shape[0], s_neg.size + 1))
    np.cumsum(w_neg, axis=1, out=cum[:, 1:])
    lo = np.searchsorted(s_neg_sorted, s_pos, side="left")
    hi = np.searchsorted(s_neg_sorted, s_pos, side="right")
    below, upto = cum[:, lo], cum[:, hi]
    # Each event beats the non-events scored lower and ties half of those scored equal.
    wins = np.einsum("bi,bi->b", w_pos, below + upto) * 0.5
    return wins / (w_pos.sum(axis=1) * cum[:, -1])


def _auprc_w(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    if not (y == 1).any():
        return np.full(W.shape[0], np.nan)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    w = W[:, order]
    y_sorted = y[order]
    tp_step, all_step = w * y_sorted, w  # events / patients at each distinct threshold
    if starts.size < s.size:  # ties: one threshold per distinct score
        tp_step, all_step = np.add.reduceat(tp_step, starts, axis=1), np.add.reduceat(w, starts, axis=1)
    tp, flagged = np.cumsum(tp_step, axis=1), np.cumsum(all_step, axis=1)
    precision = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
    # Average precision: sum over distinct thresholds of (recall increment) x (precision there).
    return np.einsum("bk,bk->b", tp_step, precision) / tp[:, -1]


def _brier_w(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    return W @ (y - p) ** 2 / W.sum(axis=1)


def _log_loss_w(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    q = np.clip(p, LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
    return W @ -(y * np.log(q) + (1 - y) * np.log1p(-q)) / W.sum(axis=1)


def _calibration_x(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(p, CALIBRATION_CLIP, 1 - CALIBRATION_CLIP))


def _intercept_w(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Calibration-in-the-large: the a solving sum w (y - expit(a + logit p)) = 0, by Newton."""
    if not (y == 1).any() or not (y == 0).any():
        return np.full(W.shape[0], np.nan)
    x = _calibration_x(p)
    # Replicates start from the full-sample answer (one cheap fit), which saves Newton iterations.
    start = _intercept_w(y, p, _ones(y.size))[0] if W.shape[0] > 1 else 0.0
    a = np.full(W.shape[0], start if np.isfinite(start) else 0.0)
    done = np.zeros(W.shape[0], dtype=bool)
    wy = W @ y
    for _ in range(_NEWTON_MAX_ITER):
        mu = expit(a[:, None] + x)
        wmu = W * mu
        grad = wy - wmu.sum(axis=1)
        hess = np.einsum("bi,bi->b", wmu, 1 - mu)
        step = np.divide(grad, hess, out=np.zeros_like(grad), where=hess > 0)
        step = np.clip(step, -_NEWTON_MAX_STEP, _NEWTON_MAX_STEP)
        step[done] = 0.0
        a += step
        done |= np.abs(step) < _NEWTON_TOL * (1 + np.abs(a))
        if done.all():
            break
    a[~done] = np.nan
    return a


def _intercept_slope_w(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression y ~ a + b logit(p) for every replicate at once (Newton-Raphson)."""
    B = W.shape[0]
    if not (y == 1).any() or not (y == 0).any():
        return np.full(B, np.nan), np.full(B, np.nan)
    x = _calibration_x(p)
    # Start at perfect calibration (0, 1); replicates start from the full-sample fit, which is close.
    a0, b0 = _intercept_slope_w(y, p, _ones(y.size)) if B > 1 else (np.zeros(1), np.ones(1))
    if not (np.isfinite(a0[0]) and np.isfinite(b0[0])):
        a0, b0 = np.zeros(1), np.ones(1)
    a, b = np.full(B, a0[0]), np.full(B, b0[0])
    done = np.zeros(B, dtype=bool)
    wy, wxy = W @ y, W @ (x * y)
    failed = np.zeros(B, dtype=bool)
    for _ in range(_NEWTON_MAX_ITER):
        mu = expit(a[:, None] + b[:, None] * x)
        wmu = W * mu
        v = wmu - wmu * mu  # w mu (1 - mu)
        g0 = wy - wmu.sum(axis=1)
        g1 = wxy - wmu @ x
        h00, h01, h11 = v.sum(axis=1), v @ x, v @ (x * x)
        det = h00 * h11 - h01 * h01
        ok = det > 1e-12 * np.maximum(h00 * h11, 1e-300)
        failed |= ~ok & ~done  # singular information: logit(p) (nearly) constant, or all weight lost
        done |= failed
        safe = np.where(ok, det, 1.0)
        da = np.where(done, 0.0, (h11 * g0 - h01 * g1) / safe)
        db = np.where(done, 0.0, (h00 * g1 - h01 * g0) / safe)
        size = np.maximum(np.abs(da), np.abs(db))
        scale = np.minimum(1.0, _NEWTON_MAX_STEP / np.maximum(size, 1e-300))  # damp huge first steps
        a += da * scale
        b += db * scale
        done |= size < _NEWTON_TOL * (1 + np.abs(a) + np.abs(b))
        if done.all():
            break
    # Not converged (perfect separation, or logit(p) constant): the MLE does not exist.
    bad = failed | ~done
    a[bad], b[bad] = np.nan, np.nan
    return a, b


def _slope_w(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    return _intercept_slope_w(y, p, W)[1]


def _ece_w(y: np.ndarray, p: np.ndarray, W: np.ndarray, bins: int = 10) -> np.ndarray:
    """:func:`ece` of every replicate at once: the quantile bins are re-cut on each replicate (its
    sorted resampled predictions give the same ``np.quantile`` edges as ``ece(y[idx], p[idx])``), and
    ECE = sum over bins |sum of w (p - y)| / sum of w, which is sum_k (n_k/n)|mean p_k - rate_k|."""
    B = W.shape[0]
    order = np.argsort(p, kind="stable")
    counts = np.rint(W[:, order]).astype(np.int64)
    qs = np.linspace(0, 1, int(bins) + 1)[1:-1]
    edges = _quantiles_of_repeats(p[order], counts, qs) if qs.size else np.empty((B, 0))
    # Bin = number of edges at or below p (``_quantile_bins``: searchsorted(edges, p, side="right")).
    raw = np.zeros(W.shape, dtype=np.int64)
    for k in range(edges.shape[1]):
        raw += edges[:, k : k + 1] <= p[None, :]
    flat = (raw + int(bins) * np.arange(B)[:, None]).ravel()
    sums = np.bincount(flat, weights=(W * (p - y)).ravel(), minlength=B * int(bins)).reshape(B, int(bins))
    return np.abs(sums).sum(axis=1) / W.sum(axis=1)


def _quantiles_of_repeats(v: np.ndarray, counts: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """``np.quantile(np.repeat(v, c), qs)`` for every row ``c`` of ``counts`` (``v`` sorted), bit for bit.

    Why not build the repeats: a replicate of a little bootstrap has n draws on only b patients, so the
    repeated values would be replicates x n numbers (1 GB for 100 replicates of 1.25 million). This
    finds the two order statistics numpy's default ("linear") method interpolates between by a search in
    the running counts, and interpolates exactly as numpy does (its ``_lerp``).
    """
    B = counts.shape[0]
    total = counts.sum(axis=1)
    if (total < 1).any():
        raise ValueError("a replicate with no draws has no quantiles")
    h = (total[:, None] - 1) * qs[None, :]  # numpy's virtual index for "linear": (n - 1) q
    below = np.floor(h)
    gamma = h - below
    lo = below.astype(np.int64)
    hi = np.minimum(lo + 1, total[:, None] - 1)
    # Row-wise searchsorted in one call: shift every row's running counts past the previous row's.
    shift = (np.arange(B, dtype=np.int64) * (int(total.max()) + 1))[:, None]
    ends = (np.cumsum(counts, axis=1) + shift).ravel()
    first = np.arange(B, dtype=np.int64)[:, None] * counts.shape[1]
    a = v[np.searchsorted(ends, lo + shift, side="right") - first]
    b = v[np.searchsorted(ends, hi + shift, side="right") - first]
    diff = b - a
    out = a + diff * gamma
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), out)


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n))


# --------------------------------------------------------------------------------------------------
# Point metrics
# --------------------------------------------------------------------------------------------------


def auroc(y, score) -> float:
    """Area under the ROC curve: the probability that a random event outranks a random non-event.

    Mann-Whitney U with mid-ranks, so a tie counts one half (as in ``sklearn.metrics.roc_auc_score``).
    Any real-valued score works (points scores included). NaN when y has a single class.
    """
    y = _check_y(y)
    s = _check_p(score, y.size, "score")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(y, score) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation).

    Equals ``sklearn.metrics.average_precision_score``: sum over distinct score thresholds of the recall
    gained there times the precision there. Its no-skill value is the prevalence, not 0.5. NaN when
    there are no events.
    """
    y, s = _yp(y, score)
    return float(_auprc_w(y, s, _ones(y.size))[0])


def brier(y, p) -> float:
    """Brier score: mean squared difference between outcome and predicted probability (lower is better)."""
    y, p = _yp(y, p, probability=True)
    return float(np.mean((y - p) ** 2))


def log_loss(y, p) -> float:
    """Mean negative log-likelihood of the outcomes (natural log); p clipped to [1e-15, 1 - 1e-15]."""
    y, p = _yp(y, p, probability=True)
    return float(_log_loss_w(y, p, _ones(y.size))[0])


def calibration_intercept_slope(y, p) -> tuple[float, float]:
    """(calibration intercept, calibration slope), as defined by Van Calster et al. 2019 (BMC Med 17:230).

    * intercept: calibration-in-the-large, the intercept of a logistic regression of y with logit(p) as
      an offset (slope fixed at 1). 0 is ideal; > 0 means the model predicts too little risk on average.
    * slope: the coefficient of logit(p) in a logistic regression of y on logit(p) (with its own free
      intercept). 1 is ideal; < 1 means the predictions are too extreme (overfitting), > 1 too modest.

    p is clipped to [1e-6, 1 - 1e-6] before the logit. Both are NaN when y has a single class or the
    fit does not exist (perfect separation, or every p identical for the slope).
    """
    y, p = _yp(y, p, probability=True)
    W = _ones(y.size)
    return float(_intercept_w(y, p, W)[0]), float(_intercept_slope_w(y, p, W)[1][0])


def calibration_intercept(y, p) -> float:
    """Calibration-in-the-large (see :func:`calibration_intercept_slope`); a metric for bootstraps."""
    y, p = _yp(y, p, probability=True)
    return float(_intercept_w(y, p, _ones(y.size))[0])


def calibration_slope(y, p) -> float:
    """Calibration slope (see :func:`calibration_intercept_slope`); a metric for bootstraps."""
    y, p = _yp(y, p, probability=True)
    return float(_slope_w(y, p, _ones(y.size))[0])


def _quantile_bins(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bin of each prediction, numbered 0.. over the non-empty bins.

    Edges are the 1/bins, ..., (bins-1)/bins quantiles of p; a prediction equal to an edge goes to the
    upper bin, so tied predictions always share a bin (heavy ties therefore give fewer bins).
    """
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    edges = np.quantile(p, np.linspace(0, 1, int(bins) + 1)[1:-1])
    raw = np.searchsorted(edges, p, side="right")
    return np.unique(raw, return_inverse=True)[1]


def calibration_curve(y, p, bins: int = 10) -> pd.DataFrame:
    """Observed event rate against mean predicted risk in equal-frequency (quantile) bins of p.

    One row per non-empty bin: ``bin`` (0-based, in increasing risk), ``mean_predicted``, ``observed``
    (event rate), ``n``, and the range of predictions in the bin (``p_min``, ``p_max``).
    """
    y, p = _yp(y, p, probability=True)
    b = _quantile_bins(p, bins)
    k = int(b.max()) + 1
    n = np.bincount(b, minlength=k)
    return pd.DataFrame(
        {
            "bin": np.arange(k),
            "mean_predicted": np.bincount(b, weights=p, minlength=k) / n,
            "observed": np.bincount(b, weights=y, minlength=k) / n,
            "n": n.astype("int64"),
            "p_min": pd.Series(p).groupby(b).min().to_numpy(),
            "p_max": pd.Series(p).groupby(b).max().to_numpy(),
        }
    )


def ece(y, p, bins: int = 10) -> float:
    """Expected calibration error with equal-frequency (quantile) bins: sum_k (n_k/n)|mean p_k - rate_k|.

    Quantile bins (not equal-width) because predicted risks of MAS pile up near 0: equal-width bins would
    put most patients in the first bin and leave the rest nearly empty. ECE is biased upwards in small
    samples (each bin's observed rate is noisy), so compare models on the same test set only.
    """
    curve = calibration_curve(y, p, bins)
    w = curve["n"].to_numpy() / curve["n"].sum()
    return float(np.sum(w * np.abs(curve["mean_predicted"] - curve["observed"]).to_numpy()))


def ece_if_calibrated(p, bins: int = 10, n_sim: int = 200, seed: int = 0) -> float:
    """The ECE a *perfectly calibrated* model with these predictions would show, on average, on a test
    set of this size: outcomes are drawn from ``p`` itself ``n_sim`` times.

    Why: ECE on observed outcomes cannot reach 0 even for the true probabilities, because each bin's
    event rate is a noisy estimate (about 0.8 * sqrt(p(1-p)/n_k) per bin). On 1,500 patients in 10 bins
    that floor is near 0.03, above a 0.02 target. Reporting the floor beside the ECE tells a reader how
    much of it is the model and how much is the test set's size. Needs no ground truth.
    """
    p = _as_1d_float(p, "predictions")
    p = _check_p(p, p.size)
    _check_probability(p)
    b = _quantile_bins(p, bins)
    k = int(b.max()) + 1
    n_k = np.bincount(b, minlength=k).astype(float)
    mean_p = np.bincount(b, weights=p, minlength=k) / n_k
    rng = np.random.default_rng(seed)
    onehot = np.zeros((p.size, k))
    onehot[np.arange(p.size), b] = 1.0
    # Drawn in blocks of rows (the generator's stream is the same as one (n_sim, n) draw), so that 1.25
    # million held-out patients do not need 2 GB of draws at once.
    block = max(1, min(int(n_sim), _BLOCK_CELLS // p.size))
    observed = (
        np.vstack(
            [(rng.random((min(block, n_sim - i), p.size)) < p) @ onehot for i in range(0, int(n_sim), block)]
        )
        / n_k
    )
    return float(np.mean(np.abs(observed - mean_p) @ (n_k / n_k.sum())))


def ece_vs_truth(p, p_true, bins: int = 10) -> float:
    """Calibration error against the true probabilities (simulated data only): the same quantile bins of
    ``p`` as :func:`ece`, comparing mean prediction with mean *true probability* instead of the observed
    rate, so it carries almost none of the outcomes' sampling noise."""
    p = _as_1d_float(p, "predictions")
    p = _check_p(p, p.size)
    t = _check_p(p_true, p.size, "true probabilities")
    _check_probability(p)
    b = _quantile_bins(p, bins)
    n_k = np.bincount(b).astype(float)
    gap = np.abs(np.bincount(b, weights=p) - np.bincount(b, weights=t)) / n_k
    return float(gap @ (n_k / n_k.sum()))


def _confusion(y: np.ndarray, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """TP, FP, TN, FN at each threshold (flag = score >= t), in O((n + T) log n)."""
    order = np.sort(s)
    pos_sorted = np.sort(s[y == 1])
    n_pos, n = pos_sorted.size, s.size
    flagged = n - np.searchsorted(order, t, side="left")
    tp = n_pos - np.searchsorted(pos_sorted, t, side="left")
    fp = flagged - tp
    fn = n_pos - tp
    tn = (n - n_pos) - fp
    return tp, fp, tn, fn


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype("float64"), b.astype("float64")
    return np.divide(a, b, out=np.full_like(a, np.nan), where=b > 0)


def wilson_interval(successes, n, alpha: float = 0.05) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Wilson score interval for a binomial proportion ``successes / n``: (lower, upper).

    Wilson EB. Probable inference, the law of succession, and statistical inference. *J Am Stat Assoc*
    1927;22:209-212. The interval is the set of proportions pi that a score test does not reject,
    i.e. the roots of ``(x/n - pi)^2 = z^2 pi (1 - pi) / n`` with ``z`` the 1 - alpha/2 normal quantile:

        centre = (x/n + z^2/(2n)) / (1 + z^2/n),  half-width = z / (1 + z^2/n) * sqrt(x/n (1 - x/n) / n
        + z^2 / (4 n^2)).

    Why Wilson and not Wald (x/n +- z SE): at 0/n or n/n Wald's interval has zero width, and for the
    small counts a high threshold leaves its coverage falls far below 95%; Wilson's stays inside [0, 1]
    and close to nominal (Brown, Cai & DasGupta, *Stat Sci* 2001;16:101-133). An empty denominator
    (``n == 0``, e.g. PPV when nobody is flagged) gives NaN for both bounds, not an error: the
    proportion itself is undefined there. Works element-wise on arrays (arrays out); two scalars in give
    two floats out.
    """
    _check_alpha(alpha)
    x = np.asarray(successes, dtype="float64")
    m = np.asarray(n, dtype="float64")
    if np.any(m < 0) or np.any(x < 0) or np.any(x > m):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    z2 = float(norm.ppf(1 - alpha / 2)) ** 2
    empty = m <= 0
    m_safe = np.where(empty, 1.0, m)
    share = x / m_safe
    denom = 1 + z2 / m_safe
    centre = (share + z2 / (2 * m_safe)) / denom
    half = np.sqrt(z2) / denom * np.sqrt(share * (1 - share) / m_safe + z2 / (4 * m_safe**2))
    # At 0/n and n/n one bound is exactly 0 or 1; rounding would otherwise leave it at +-1e-17.
    lo = np.where(x == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(x == m, 1.0, np.clip(centre + half, 0.0, 1.0))
    lo, hi = np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def threshold_metrics(y, p, thresholds, *, alpha: float = 0.05) -> pd.DataFrame:
    """Counts and rates at each threshold, a patient being flagged when ``p >= threshold``.

    Columns: threshold, tp, fp, tn, fn, sensitivity, specificity, ppv, npv, flagged_share, then a
    1 - alpha Wilson score interval for each of the four rates (:func:`wilson_interval`):
    sensitivity_lo, sensitivity_hi, specificity_lo, specificity_hi, ppv_lo, ppv_hi, npv_lo, npv_hi.
    The intervals are appended after the original columns, whose names and order stay as they were
    (the table is logged to MLflow and written into bundles and cards, which readers parse). A rate
    whose denominator is empty (e.g. PPV when nobody is flagged) is NaN, and so is its interval. Works
    for points scores too (pass score cut-offs, e.g. HScore 169).
    """
    y, s = _yp(y, p)
    t = _check_thresholds(thresholds, open_unit=False)
    tp, fp, tn, fn = _confusion(y, s, t)
    table = pd.DataFrame(
        {
            "threshold": t,
            "tp": tp.astype("int64"),
            "fp": fp.astype("int64"),
            "tn": tn.astype("int64"),
            "fn": fn.astype("int64"),
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn),
            "flagged_share": (tp + fp) / y.size,
        }
    )
    for name, hits, total in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
    ):
        table[f"{name}_lo"], table[f"{name}_hi"] = wilson_interval(hits, total, alpha)
    return table


def net_benefit(y, p, thresholds) -> pd.DataFrame:
    """Decision-curve analysis (Vickers & Elkin 2006, Med Decis Making 26:565).

    At threshold probability pt (the risk at which a clinician is indifferent between acting and not,
    so one false positive costs pt/(1-pt) true positives), acting on everyone with ``p >= pt`` has net
    benefit ``TP/n - FP/n * pt/(1 - pt)``. Columns: threshold, net_benefit (the model), treat_all
    (everyone flagged: prevalence - (1 - prevalence) * pt/(1-pt)), treat_none (always 0). A model is
    useful at pt only where it beats both strategies.
    """
    y, p = _yp(y, p, probability=True)
    t = _check_thresholds(thresholds, open_unit=True)
    tp, fp, _, _ = _confusion(y, p, t)
    n, odds = y.size, t / (1 - t)
    prevalence = y.mean()
    return pd.DataFrame(
        {
            "threshold": t,
            "net_benefit": tp / n - fp / n * odds,
            "treat_all": prevalence - (1 - prevalence) * odds,
            "treat_none": np.zeros_like(t),
        }
    )


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------

# Metrics with a vectorised kernel; any other callable is bootstrapped replicate by replicate.
_KERNELS: dict[Callable, tuple[Callable, bool]] = {
    auroc: (_auroc_w, False),
    auprc: (_auprc_w, False),
    brier: (_brier_w, True),
    log_loss: (_log_loss_w, True),
    calibration_intercept: (_intercept_w, True),
    calibration_slope: (_slope_w, True),
    ece: (_ece_w, True),
}


def _is_ece(fn: Callable) -> bool:
    """``ece`` itself, or ``functools.partial(ece, bins=k)`` (how :func:`compare` passes its bins)."""
    return fn is ece or (isinstance(fn, partial) and fn.func is ece and not fn.args
                         and set(fn.keywords) <= {"bins"})  # fmt: skip


def _kernel(fn: Callable) -> Callable | None:
    """The vectorised (y, p, W) kernel of a metric, or None (then it is called once per replicate)."""
    if isinstance(fn, partial) and _is_ece(fn):
        return partial(_ece_w, **fn.keywords)
    entry = _KERNELS.get(fn)
    return None if entry is None else entry[0]


def bootstrap_plan(n: int, n_boot: int) -> dict:
    """How ``n`` patients are resampled: the plain bootstrap, or (n > :data:`BLB_MIN_ROWS`) the bag of
    little bootstraps with its subsets, subset size and replicates per subset. Reports and cards print it,
    so a reader knows which method gave an interval."""
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if n <= BLB_MIN_ROWS:
        return {"method": "percentile, stratified by outcome"}
    subsets = max(1, min(BLB_MAX_SUBSETS, int(n_boot) // BLB_REPLICATES_PER_SUBSET))
    return {
        "method": "bag of little bootstraps (Kleiner 2014), percentile, stratified by outcome",
        "subsets": subsets,
        "subset_size": math.ceil(n**BLB_EXPONENT),
        "per_subset": int(n_boot) // subsets,
    }


def _resample_blocks(
    y: np.ndarray, n_boot: int, seed: int
) -> Iterator[tuple[int, np.ndarray | None, np.ndarray]]:
    """Stratified resamples, a block of replicates at a time: (subset number, the subset's patients or
    None for all of them, draws). Events and non-events are resampled separately.

    Plain bootstrap: draws are (block, n) patient indices. Little bootstraps: draws are (block, b)
    counts of how often each of the subset's b patients is drawn, n draws in all (each class keeps its
    size). Deterministic given (y, n_boot, seed); every model compared on the same y sees the same draws.
    """
    plan = bootstrap_plan(y.size, n_boot)
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(y == 1), np.flatnonzero(y == 0)]
    strata = [s for s in strata if s.size]
    n = y.size
    if "subset_size" not in plan:
        block = max(1, min(int(n_boot), _BLOCK_CELLS // n))
        done = 0
        while done < n_boot:
            b = min(block, n_boot - done)
            yield 0, None, np.hstack([s[rng.integers(0, s.size, size=(b, s.size))] for s in strata])
            done += b
        return
    size, per = plan["subset_size"], plan["per_subset"]
    # Each class gets its share of the subset (at least 2 patients, at most all of them).
    shares = [min(s.size, max(2, round(size * s.size / n))) for s in strata]
    block = max(1, min(per, _BLOCK_CELLS // sum(shares)))
    for g in range(plan["subsets"]):
        rows = [np.sort(rng.choice(s, k, replace=False)) for s, k in zip(strata, shares, strict=True)]
        done = 0
        while done < per:
            b = min(block, per - done)
            counts = [
                rng.multinomial(s.size, np.full(k, 1.0 / k), size=b)
                for s, k in zip(strata, shares, strict=True)
            ]
            yield g, np.concatenate(rows), np.hstack(counts).astype("float64")
            done += b


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    b = idx.shape[0]
    flat = (idx + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype("float64")


def _replicates(
    y: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    metric_fns: Mapping[str, Callable],
    n_boot: int,
    seed: int,
) -> dict[tuple[str, str], np.ndarray]:
    """Bootstrap replicates of every (model, metric), all models on the same resampled patients.

    Each value is the plain bootstrap's [n_boot] replicates, or the little bootstraps' [subsets,
    replicates per subset] (2-D even for one subset: its intervals are taken row by row, relative to
    each row's mean, :func:`_percentile`).
    """
    groups: dict[tuple[str, str], dict[int, list[np.ndarray]]] = {
        (m, k): {} for m in predictions for k in metric_fns
    }
    for g, rows, draws in _resample_blocks(y, n_boot, seed):
        ys = y if rows is None else y[rows]
        W = None if rows is None else draws
        for m, p in predictions.items():
            ps = p if rows is None else p[rows]
            for k, fn in metric_fns.items():
                kernel = _kernel(fn)
                if kernel is not None:
                    if W is None:
                        W = _counts(draws, y.size)
                    vals = kernel(ys, ps, W)
                elif rows is None:
                    vals = np.array([_call(fn, y[i], p[i]) for i in draws])
                else:
                    picks = (np.repeat(np.arange(ys.size), c.astype(np.int64)) for c in draws)
                    vals = np.array([_call(fn, ys[i], ps[i]) for i in picks])
                groups[(m, k)].setdefault(g, []).append(vals)
    if "subset_size" not in bootstrap_plan(y.size, n_boot):
        return {key: np.concatenate(v[0]) for key, v in groups.items()}
    return {key: np.stack([np.concatenate(v[g]) for g in sorted(v)]) for key, v in groups.items()}


def _call(fn: Callable, y: np.ndarray, p: np.ndarray) -> float:
    value = fn(y, p)
    return float("nan") if value is None else float(value)


def _percentile(values: np.ndarray, alpha: float, estimate: float | None = None) -> tuple[float, float]:
    """The percentile interval of replicates.

    Little bootstraps (2-D: one row of replicates per subset, even a single one): each subset's
    percentile bounds are taken relative to its replicates' mean, averaged over the subsets, and placed
    around ``estimate`` (the metric on all patients). Why not average the bounds themselves: the
    little bootstraps estimate the *spread* of the metric at size n, but each subset's replicates
    centre on that subset's own value, which carries the noise of b = n^0.7 patients. With 10 subsets
    of 250,000 rows the averaged centre was off by about one interval half-width (0.8125-0.8158 around
    an AUROC of 0.8161; relative to the mean, 0.8145-0.8178 against the plain bootstrap's
    0.8145-0.8178); with a single subset of 120,000 rows, 0.807-0.813 around 0.816.
    """
    values = np.asarray(values, dtype="float64")
    if values.ndim == 2:
        if estimate is None or not math.isfinite(estimate):
            return float("nan"), float("nan")
        spreads = []
        for row in values:
            lo, hi = _percentile(row, alpha)
            centre = row[np.isfinite(row)].mean() if np.isfinite(lo) else float("nan")
            spreads.append((lo - centre, hi - centre))
        lo, hi = _averaged(spreads)
        return estimate + lo, estimate + hi
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _averaged(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean of the subsets' intervals, over those that exist (a subset where a metric was undefined in
    every replicate gives none)."""
    found = np.array([i for i in intervals if np.isfinite(i).all()], dtype="float64").reshape(-1, 2)
    if not found.size:
        return float("nan"), float("nan")
    return float(found[:, 0].mean()), float(found[:, 1].mean())


def ece_interval(replicates, estimate: float, alpha: float = 0.05) -> tuple[float, float]:
    """The ECE's 1 - alpha bootstrap interval: the percentile interval of the replicates shifted so that
    their mean equals the ECE itself, and never below 0.

    Why shifted: the ECE sums absolute gaps, so it is biased upwards on a finite test set (the floor of
    :func:`ece_if_calibrated`), and a bootstrap resample adds its own noise on top: the replicates run
    higher than the ECE they were drawn from (the bootstrap estimate of the bias is their mean minus the
    ECE). Their plain percentile interval then misses the ECE itself: in simulations of a perfectly
    calibrated model on 600 and 1,500 test patients (300 test sets each, 500 replicates) it did so in
    12-14% of test sets, and it covered the ECE expected at that test-set size in 92-93% of them.
    Shifted by the bootstrap bias, the interval always contained the ECE and covered that expectation in
    94-99.7% of test sets for calibrated and mildly mis-calibrated models (predictions 1.15 times too
    extreme on the logit scale), 90-95% for predictions 1.3 times too extreme (calibration slope near
    0.77); it is conservative for a calibrated model, where the resample's extra noise widens it.
    What it is an interval for: the ECE this model would show on another test set of this size. It is
    *not* an interval for the calibration error of an infinite population (for a calibrated model that
    is 0, which such an interval rarely reaches); the ECE floor, the same expectation for a perfectly
    calibrated model, is the yardstick for that. The basic ("pivotal") bootstrap, 2 ECE - quantiles,
    corrects the location but covered that expectation in only 59-80% of the same simulations.
    """
    _check_alpha(alpha)
    values = np.asarray(replicates, dtype="float64")
    if values.ndim == 2:  # little bootstraps: each subset's interval, averaged
        return _averaged([ece_interval(row, estimate, alpha) for row in values])
    finite = values[np.isfinite(values)]
    if finite.size == 0 or not math.isfinite(estimate):
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite - (finite.mean() - estimate), [alpha / 2, 1 - alpha / 2])
    return max(float(lo), 0.0), max(float(hi), 0.0)


def _interval(fn: Callable, estimate: float, replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    """A metric's bootstrap interval from its replicates: percentile, or shifted for the ECE."""
    if _is_ece(fn):
        return ece_interval(replicates, estimate, alpha)
    return _percentile(replicates, alpha, estimate)


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def bootstrap_ci(
    y, p, metric_fns: Mapping[str, Callable], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float, float]]:
    """{name: (point estimate, lower, upper)}: percentile bootstrap, stratified by outcome.

    Each ``metric_fns`` value is a function ``(y, p) -> float``. The point estimate is the metric on
    the data as given; the interval is the alpha/2 and 1-alpha/2 quantiles of the metric over
    ``n_boot`` replicates that resample events and non-events separately (so each keeps both classes
    and the observed prevalence). Replicates where a metric is undefined (NaN, e.g. a calibration fit
    that does not converge) are left out of its quantiles; if all are, the interval is NaN.

    This module's ``auroc``, ``auprc``, ``brier``, ``log_loss``, ``calibration_intercept``,
    ``calibration_slope`` and ``ece`` (also as ``functools.partial(ece, bins=k)``) are computed for all
    replicates at once (fast); any other function is called once per replicate. The ECE's interval is
    the shifted one of :func:`ece_interval`, every other metric's the plain percentile interval.
    Deterministic for a given seed.
    """
    _check_alpha(alpha)
    y = _check_y(y)
    p = _check_p(p, y.size)
    points = {k: _call(fn, y, p) for k, fn in metric_fns.items()}
    reps = _replicates(y, {"model": p}, metric_fns, n_boot, seed)
    return {
        k: (points[k], *_interval(fn, points[k], reps[("model", k)], alpha)) for k, fn in metric_fns.items()
    }


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def _jsonable(obj):
    """Plain Python containers and floats; NaN/inf become None (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, pd.DataFrame):
        return [_jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, list | tuple | np.ndarray):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


_CI_METRICS: dict[str, Callable] = {
    "auroc": auroc,
    "auprc": auprc,
    "brier": brier,
    "calibration_intercept": calibration_intercept,
    "calibration_slope": calibration_slope,
}


def _class_warnings(y: np.ndarray) -> list[str]:
    events = int(y.sum())
    if events == 0 or events == y.size:
        return [
            f"only one outcome class ({events} events in {y.size}): AUROC, AUPRC and the calibration "
            "intercept/slope are undefined (reported as null)"
        ]
    return []


def evaluate(
    y,
    p,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    nb_thresholds: Iterable[float] = DEFAULT_NB_THRESHOLDS,
    bins: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """One probability model's full held-out report, as plain JSON-ready Python (NaN becomes None).

    Keys: n, events, prevalence, mean_predicted, auroc/auprc/brier/calibration_intercept/
    calibration_slope (each ``{"estimate", "lo", "hi"}``), log_loss, ece, calibration_curve,
    threshold_metrics (with 1 - alpha Wilson intervals for its rates), net_benefit (lists of row dicts),
    bootstrap (method, n_boot, seed, alpha), warnings (list of strings; empty when nothing is wrong),
    then ece_lo and ece_hi (the ECE's bootstrap interval, :func:`ece_interval`; plain numbers beside
    ``ece``, which stays a number, added after the keys above). It is logged to MLflow and written into
    bundle manifests and model cards, so it never contains numpy types.
    """
    _check_alpha(alpha)
    y, p = _yp(y, p, probability=True)
    cis = bootstrap_ci(y, p, {**_CI_METRICS, "ece": _ece_metric(bins)}, n_boot=n_boot, seed=seed, alpha=alpha)
    ece_ci = cis.pop("ece")
    report: dict = {
        "n": int(y.size),
        "events": int(y.sum()),
        "prevalence": float(y.mean()),
        "mean_predicted": float(p.mean()),
    }
    for k, (est, lo, hi) in cis.items():
        report[k] = {"estimate": est, "lo": lo, "hi": hi}
    report["log_loss"] = log_loss(y, p)
    report["ece"] = ece(y, p, bins)
    report["calibration_curve"] = calibration_curve(y, p, bins)
    report["threshold_metrics"] = threshold_metrics(y, p, list(thresholds), alpha=alpha)
    report["net_benefit"] = net_benefit(y, p, list(nb_thresholds))
    plan = bootstrap_plan(y.size, n_boot)
    report["bootstrap"] = {
        "method": plan["method"],
        "n_boot": int(n_boot),
        "seed": int(seed),
        "alpha": float(alpha),
    }
    if "subset_size" in plan:
        report["bootstrap"] |= {k: plan[k] for k in ("subsets", "subset_size", "per_subset")}
    report["warnings"] = _class_warnings(y)
    report["ece_lo"], report["ece_hi"] = ece_ci[1], ece_ci[2]
    return _jsonable(report)


def _ece_metric(bins: int) -> Callable:
    """``ece`` with these bins, in a form the bootstrap recognises (vectorised, shifted interval)."""
    return ece if bins == 10 else partial(ece, bins=bins)


def _is_probability_like(p: np.ndarray) -> bool:
    return bool(p.min() >= 0 and p.max() <= 1 and np.unique(p).size > 2)


def compare(
    y,
    predictions: Mapping[str, object],
    reference: str | None = None,
    *,
    probabilistic: Collection[str] | None = None,
    bins: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Models side by side on the same patients: one row per model (index = its name).

    Columns: ``probabilistic``; auroc, auroc_lo, auroc_hi; auprc (+ lo/hi); brier (+ lo/hi);
    calibration_slope (+ lo/hi); calibration_intercept (+ lo/hi); ece; then (with ``reference``) the
    auroc_diff columns below; then ece_lo, ece_hi, appended last so that the earlier columns keep their
    order (the table is logged to MLflow and printed in model cards). All intervals come from the same
    stratified bootstrap replicates (same seed and patients for every model); the ECE's is shifted by its
    bootstrap bias (:func:`ece_interval`). Scores have no ECE, so their ece_lo/ece_hi are NaN.

    Which entries are probabilities: pass ``probabilistic`` (the names of the entries that are
    probabilities; every other entry is a score). When it is None, an entry counts as a probability
    when all its values lie in [0, 1] and it takes more than two distinct values, so a 0/1 rule (HLH-2004
    met, MAS 2016 classification) is treated as a score. Scores (HScore points, MS score, a 0/1 rule) get
    AUROC and AUPRC only; their Brier and calibration columns are NaN.

    With ``reference`` (e.g. ``"ceiling"``, the true probabilities, or ``"logistic"``), each model also
    gets ``auroc_diff`` = AUROC(model) - AUROC(reference) with a *paired* bootstrap interval
    (``auroc_diff_lo``/``_hi``): the difference is computed on each replicate, so the patient-to-patient
    noise both models share cancels. Negative means worse than the reference.
    """
    _check_alpha(alpha)
    y = _check_y(y)
    if not predictions:
        raise ValueError("predictions is empty")
    preds = {str(k): _check_p(v, y.size, f"predictions[{k!r}]") for k, v in predictions.items()}
    if reference is not None and reference not in preds:
        raise ValueError(f"reference {reference!r} is not one of the predictions {list(preds)}")
    if probabilistic is None:
        prob = {k for k, v in preds.items() if _is_probability_like(v)}
    else:
        prob = set(probabilistic)
        unknown = prob - set(preds)
        if unknown:
            raise ValueError(f"probabilistic names {sorted(unknown)} are not among the predictions")
        for k in prob:
            _check_probability(preds[k], f"predictions[{k!r}]")

    discrimination = {"auroc": auroc, "auprc": auprc}
    calibration = {k: v for k, v in _CI_METRICS.items() if k not in discrimination}
    ece_fn = _ece_metric(bins)
    calibration["ece"] = ece_fn
    reps = _replicates(y, preds, discrimination, n_boot, seed)
    prob_preds = {k: v for k, v in preds.items() if k in prob}
    if prob_preds:
        reps |= _replicates(y, prob_preds, calibration, n_boot, seed)

    rows = []
    for name, p in preds.items():
        row: dict = {"model": name, "probabilistic": name in prob}
        for metric, fn in _CI_METRICS.items():
            if metric in discrimination or name in prob:
                row[metric] = _call(fn, y, p)
                row[f"{metric}_lo"], row[f"{metric}_hi"] = _percentile(
                    reps[(name, metric)], alpha, row[metric]
                )
            else:
                row[metric] = row[f"{metric}_lo"] = row[f"{metric}_hi"] = float("nan")
        row["ece"] = ece(y, p, bins) if name in prob else float("nan")
        if reference is not None:
            row["auroc_diff"] = row["auroc"] - _call(auroc, y, preds[reference])
            diff = reps[(name, "auroc")] - reps[(reference, "auroc")]
            row["auroc_diff_lo"], row["auroc_diff_hi"] = _percentile(diff, alpha, row["auroc_diff"])
        row["ece_lo"] = row["ece_hi"] = float("nan")
        if name in prob:
            row["ece_lo"], row["ece_hi"] = ece_interval(reps[(name, "ece")], row["ece"], alpha)
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def standard_groups(data: pd.DataFrame) -> dict[str, np.ndarray]:
    """The subgroups masml reports by: trigger family, age band (<16, 16-64, >=65) and sex.

    Built from a frame in masml's schema (``trigger``, ``age_years``, ``sex``); a column that is absent
    is skipped. Uses :data:`masml.schema.TRIGGER_FAMILY` and :func:`masml.schema.age_band`, so the
    groups are the ones the literature reports outcomes by.
    """
    groups: dict[str, np.ndarray] = {}
    if "trigger" in data:
        groups["trigger_family"] = data["trigger"].map(TRIGGER_FAMILY).to_numpy(dtype=object)
    if "age_years" in data:
        age = pd.to_numeric(data["age_years"], errors="coerce")
        groups["age_band"] = np.array([None if np.isnan(a) else age_band(a) for a in age], dtype=object)
    if "sex" in data:
        groups["sex"] = data["sex"].to_numpy(dtype=object)
    return groups


def subgroup_report(
    y,
    p,
    groups: Mapping[str, object],
    *,
    min_n: int = SUBGROUP_MIN_N,
    min_events: int = SUBGROUP_MIN_EVENTS,
    max_abs_o_minus_e: float = SUBGROUP_MAX_ABS_O_MINUS_E,
    seed: int = 0,
    n_boot: int = 200,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per-subgroup discrimination and calibration-in-the-large, with a plain-language warning.

    ``groups`` maps a grouping name (e.g. ``"trigger_family"``, ``"age_band"``, ``"sex"``; see
    :func:`standard_groups`) to one label per patient; each grouping is evaluated on its own with
    fairlearn's ``MetricFrame``. A missing label (None/NaN) becomes the level ``"missing"``.

    One row per (group, level), after a first row ``group="overall", level="all"``. Columns: n, events,
    prevalence, auroc, auroc_lo, auroc_hi (stratified percentile bootstrap within the level, ``n_boot``
    replicates), observed (event rate), expected (mean p), o_minus_e (observed - expected: > 0 means
    the model under-estimates risk in that level), warning.

    Warning rule (several are joined by "; ", empty when none applies):

    * ``"single class"``: the level has only events or only non-events, so AUROC is NaN;
    * ``"small group"``: n < ``min_n`` or events < ``min_events``: too few for any of its numbers to be
      trusted, whatever they say;
    * ``"worse"``: the level's AUROC upper bound is below the overall AUROC (discrimination is
      credibly worse there), or ``|o_minus_e|`` > ``max_abs_o_minus_e`` (0.05 = 5 percentage points
      of absolute risk: systematically mis-calibrated for that level).
    """
    from fairlearn.metrics import MetricFrame

    y, p = _yp(y, p, probability=True)
    if not groups:
        raise ValueError("groups is empty: give at least one grouping, e.g. standard_groups(data)")

    def auroc_ci(yt, yp) -> tuple[float, float, float]:
        return bootstrap_ci(yt, yp, {"auroc": auroc}, n_boot=n_boot, seed=seed, alpha=alpha)["auroc"]

    metrics = {
        "n": lambda yt, yp: len(yt),
        "events": lambda yt, yp: int(np.sum(yt)),
        "auroc_ci": auroc_ci,
        "observed": lambda yt, yp: float(np.mean(yt)),
        "expected": lambda yt, yp: float(np.mean(yp)),
    }
    rows: list[dict] = []
    overall_auroc = float("nan")
    for gname, labels in groups.items():
        lab = pd.Series(np.asarray(labels, dtype=object)).astype(object)
        if lab.size != y.size:
            raise ValueError(f"groups[{gname!r}] has {lab.size} labels, but y has {y.size} values")
        lab = lab.where(lab.notna(), "missing").astype(str)
        with warnings.catch_warnings():
            # MetricFrame eagerly tabulates between-group min/max/differences, which warn on the NaN
            # AUROC of a single-class group; masml reports its own rule instead (the warning column).
            warnings.simplefilter("ignore", RuntimeWarning)
            mf = MetricFrame(metrics=metrics, y_true=y, y_pred=p, sensitive_features={gname: lab.to_numpy()})
        if not rows:
            rows.append(_subgroup_row("overall", "all", mf.overall.to_dict()))
            overall_auroc = rows[0]["auroc"]
        for level, values in mf.by_group.iterrows():
            rows.append(_subgroup_row(gname, str(level), values.to_dict()))
    rows[0]["warning"] = _subgroup_warning(rows[0], float("nan"), min_n, min_events, math.inf)
    for row in rows[1:]:
        row["warning"] = _subgroup_warning(row, overall_auroc, min_n, min_events, max_abs_o_minus_e)
    return pd.DataFrame(rows)


def _subgroup_row(group: str, level: str, values: dict) -> dict:
    est, lo, hi = values["auroc_ci"]
    n, events = int(values["n"]), int(values["events"])
    return {
        "group": group,
        "level": level,
        "n": n,
        "events": events,
        "prevalence": events / n,
        "auroc": est,
        "auroc_lo": lo,
        "auroc_hi": hi,
        "observed": values["observed"],
        "expected": values["expected"],
        "o_minus_e": values["observed"] - values["expected"],
    }


def _subgroup_warning(row: dict, overall: float, min_n: int, min_events: int, tol: float) -> str:
    out = []
    if row["events"] in (0, row["n"]):
        out.append("single class")
    if row["n"] < min_n or row["events"] < min_events:
        out.append("small group")
    worse_auroc = np.isfinite(row["auroc_hi"]) and np.isfinite(overall) and row["auroc_hi"] < overall
    if worse_auroc or abs(row["o_minus_e"]) > tol:
        out.append("worse")
    return "; ".join(out)
