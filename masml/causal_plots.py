"""Figures of the benefit model: overlap, covariate balance, benefit by trigger, Qini curve.

Why these four: overlap and balance show whether the causal comparison is believable at all (patients
treated and untreated must look alike after weighting); the benefit distribution by trigger shows the
heterogeneity the model found beside the literature's expectations (clinical-reference §10); the Qini
curve shows how many deaths per patient treating the top-ranked share would avert, against random
treatment. Drawn headless through ``masml.plots``' figure helpers; each function returns its PNG path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from masml.causal import toc_curve
from masml.plots import _figure, _save


def overlap_plot(e: np.ndarray, t: np.ndarray, bounds, path: Path) -> Path:
    """Propensity histograms by arm, with the overlap bounds."""
    plt, fig, ax = _figure()
    bins = np.linspace(0, 1, 41)
    ax.hist(e[t == 0], bins=bins, alpha=0.6, label=f"untreated (n={int(np.sum(t == 0))})", density=True)
    ax.hist(e[t == 1], bins=bins, alpha=0.6, label=f"IL-1 blockade (n={int(np.sum(t == 1))})", density=True)
    for b in bounds:
        ax.axvline(b, color="black", ls=":", lw=1)
    ax.set(xlabel="propensity P(IL-1 blockade | x)", ylabel="density", title="Overlap of propensities")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def balance_plot(table: pd.DataFrame, path: Path, top: int = 30) -> Path:
    """|SMD| before vs after inverse-propensity weighting, worst features first (0.1 = usual threshold)."""
    plt, fig, ax = _figure()
    t = table.assign(worst=table["smd_before"].abs()).sort_values("worst", ascending=False).head(top)
    y = np.arange(len(t))[::-1]
    ax.scatter(t["smd_before"].abs(), y, label="before weighting", marker="o")
    ax.scatter(t["smd_after"].abs(), y, label="after weighting", marker="x")
    ax.axvline(0.1, color="grey", ls=":", lw=1)
    ax.set_yticks(y, t["feature"], fontsize=6)
    ax.set(xlabel="|standardised mean difference|", title="Covariate balance")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def benefit_by_trigger_plot(benefit: np.ndarray, trigger: np.ndarray, path: Path) -> Path:
    """Predicted benefit per trigger (box plots), triggers ordered by median benefit."""
    plt, fig, ax = _figure()
    frame = pd.DataFrame({"benefit": benefit, "trigger": pd.Series(trigger).astype(str).to_numpy()})
    order = frame.groupby("trigger")["benefit"].median().sort_values().index.tolist()
    ax.boxplot(
        [frame.loc[frame["trigger"] == k, "benefit"] for k in order],
        showfliers=False,
        orientation="horizontal",
    )
    ax.set_yticks(np.arange(1, len(order) + 1), order, fontsize=7)
    ax.axvline(0, color="grey", ls=":", lw=1)
    ax.set(xlabel="predicted benefit (risk untreated - risk treated)", title="Benefit by trigger")
    return _save(plt, fig, path)


def qini_plot(tau: np.ndarray, phi: np.ndarray, path: Path) -> Path:
    """Qini gain (deaths averted per patient, doubly robust) treating the top u by predicted benefit."""
    plt, fig, ax = _figure()
    u, _, gain = toc_curve(tau, phi)
    ax.plot(np.r_[0, u], np.r_[0, gain], label="model ranking")
    ax.plot([0, 1], [0, float(np.mean(phi))], color="grey", ls=":", label="random order")
    ax.set(xlabel="share treated (highest predicted benefit first)", ylabel="deaths averted per patient",
           title="Qini curve (held-out, doubly robust)")  # fmt: skip
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
