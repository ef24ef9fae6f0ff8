"""A plain-language summary of a cohort, for the terminal and, later, the model card.

Why a separate module: the same numbers (size, prevalence, trigger mix, outcome rates, how good the
best possible model is) are read by people deciding whether a dataset is fit for training, so they are
computed once, from the validated frame, and printed or serialised elsewhere.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from masml.evaluation import auroc  # re-exported: masml.summary.auroc predates masml.evaluation
from masml.schema import GROUND_TRUTH_PREFIX, NUMERIC_INPUTS, TRIGGER_FAMILY

__all__ = ["auroc", "cohort_summary"]


def cohort_summary(data: pd.DataFrame, truth: pd.DataFrame | None = None) -> dict:
    """Headline figures of a dataset in masml's schema (and of its ground truth, when it has one)."""
    mas = data["mas_onset"] == 1
    out: dict = {
        "patients": len(data),
        "mas_prevalence": float(data["mas_onset"].mean()),
        "age_median": float(data["age_years"].median()),
        "children_share": float((data["age_years"] < 16).mean()),
        "female_share": float((data["sex"] == "F").mean()),
        "trigger_family_share": data["trigger"].map(TRIGGER_FAMILY).value_counts(normalize=True).to_dict(),
        "mas_patients": int(mas.sum()),
        "icu_rate_mas": float(data.loc[mas, "icu_admission"].mean()),
        "il1_treated_rate_mas": float(data.loc[mas, "treatment_il1"].mean()),
        "death_28d_rate_mas": float(data.loc[mas, "death_28d"].mean()),
        "missing_share": data[list(NUMERIC_INPUTS)].isna().mean().round(3).to_dict(),
    }
    if truth is not None:
        g = GROUND_TRUTH_PREFIX
        t = truth.set_index("patient_id").loc[data["patient_id"]]
        m = mas.to_numpy()
        out["ceiling_auroc_onset"] = auroc(data["mas_onset"], t[f"{g}p_mas_onset"])
        out["ceiling_auroc_icu"] = auroc(
            data.loc[mas, "icu_admission"], t[f"{g}p_icu_admission"].to_numpy()[m]
        )
        out["mean_true_benefit"] = float(np.nanmean(t[f"{g}benefit"].to_numpy()[m]))
        out["share_harmed_by_il1"] = float(np.mean(t[f"{g}benefit"].to_numpy()[m] < 0))
    return out
