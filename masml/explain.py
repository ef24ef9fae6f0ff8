"""SHAP explanations of the tree model's margin (log-odds), for the run and for one patient.

Why path-dependent TreeSHAP on the margin: it is exact, needs no background data, and its values add up
to the model's log-odds (base value + contributions = margin). It explains the model, not the disease:
a large contribution says the model leaned on that input for this patient, not that the input causes
MAS. Calibration is a monotone map applied afterwards, so the ranking of contributions is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def shap_explanation(booster, features: np.ndarray, feature_names: Sequence[str]):
    """shap.Explanation of the margin for each row of the feature matrix."""
    import shap

    explainer = shap.TreeExplainer(booster)
    expl = explainer(pd.DataFrame(features, columns=list(feature_names)))
    expl.feature_names = list(feature_names)
    return expl


def global_importance(expl) -> pd.DataFrame:
    """Mean |SHAP| per feature, largest first: how much the model leans on each input overall."""
    values = np.abs(np.asarray(expl.values)).mean(axis=0)
    table = pd.DataFrame({"feature": expl.feature_names, "mean_abs_shap": values})
    return table.sort_values("mean_abs_shap", ascending=False, ignore_index=True)


def explain_patient(expl, row: int, top: int = 10) -> pd.DataFrame:
    """One patient's largest contributions (feature, value, contribution in log-odds)."""
    contrib = np.asarray(expl.values[row])
    table = pd.DataFrame(
        {"feature": expl.feature_names, "value": np.asarray(expl.data[row], float), "contribution": contrib}
    )
    order = np.argsort(-np.abs(contrib))[:top]
    return table.iloc[order].reset_index(drop=True)


def explain_patients(model, frame: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """Why the model gave each of these patients their risk: their ``top`` largest contributions.

    ``model`` is a trained risk model (``masml.training.TrainedRiskModel``); ``frame`` holds patients
    in masml's canonical schema (validated, canonical units). One row per (patient, feature), largest
    |contribution| first, with the patient's base value, margin (log-odds) and calibrated risk repeated
    so each row reads on its own: base_value + sum of *all* contributions = margin.
    """
    from masml.encoding import encode_inputs

    x = encode_inputs(frame, model.input_names)
    expl = shap_explanation(model.booster, model.features(x), model.feature_names)
    margin = np.asarray(model.predict_margin(x), float)
    risk = np.asarray(model.calibrator.apply(margin), float)
    ids = frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame else np.arange(len(frame))
    tables = []
    for i in range(len(frame)):
        table = explain_patient(expl, i, top)
        table.insert(0, "patient_id", ids[i])
        table["rank"] = np.arange(1, len(table) + 1)
        table["base_value"] = float(np.asarray(expl.base_values)[i])
        table["margin"] = margin[i]
        table["risk"] = risk[i]
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def save_plots(expl, out_dir: str | Path, n_dependence: int = 3) -> list[Path]:
    """Beeswarm summary and dependence plots of the top features, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    shap.plots.beeswarm(expl, max_display=15, show=False)
    paths.append(out / "shap_summary.png")
    plt.gcf().savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close("all")
    for name in global_importance(expl)["feature"].head(n_dependence):
        shap.plots.scatter(expl[:, name], show=False)
        safe = name.replace("=", "_").replace("/", "_")
        paths.append(out / f"shap_dependence_{safe}.png")
        plt.gcf().savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close("all")
    return paths
