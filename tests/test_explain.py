"""SHAP explanations: they add up to the model's margin, rank what matters, and draw real figures."""

from __future__ import annotations

import numpy as np
import pytest

from masml import explain
from masml.cohort import simulate
from masml.config import config_from_dict
from masml.encoding import encode_inputs
from masml.training import tune_and_fit


@pytest.fixture(scope="module")
def trained():
    cohort = simulate(1_500, seed=31)
    config = config_from_dict({"tuning": {"n_trials": 1, "max_rounds": 60}, "folds": 2}, "onset")
    x = encode_inputs(cohort.data, config.inputs)
    y = cohort.data["mas_onset"].to_numpy(float)
    model = tune_and_fit(x, y, cohort.data["patient_id"].to_numpy(), config.inputs, config)
    return model, cohort.data, x


def test_contributions_add_up_to_the_margin(trained):
    model, frame, x = trained
    expl = explain.shap_explanation(model.booster, model.features(x[:200]), model.feature_names)
    total = np.asarray(expl.base_values) + np.asarray(expl.values).sum(axis=1)
    np.testing.assert_allclose(total, model.predict_margin(x[:200]), atol=1e-4)


def test_explain_patients_reads_canonical_rows_and_ranks_by_size(trained):
    model, frame, _ = trained
    table = explain.explain_patients(model, frame.iloc[:3], top=5)
    assert list(table["patient_id"].unique()) == list(frame["patient_id"].astype(str).iloc[:3])
    for _, one in table.groupby("patient_id", sort=False):
        assert list(one["rank"]) == [1, 2, 3, 4, 5]
        sizes = one["contribution"].abs().to_numpy()
        assert np.all(np.diff(sizes) <= 0)
        assert one["risk"].iloc[0] == pytest.approx(model.predict_risk(
            encode_inputs(frame[frame["patient_id"].astype(str) == one["patient_id"].iloc[0]],
                          model.input_names))[0])  # fmt: skip
    # the features shown are the model's, never a label or a truth column
    assert set(table["feature"]) <= set(model.feature_names)


def test_global_importance_is_sorted_and_plots_are_pngs(trained, tmp_path):
    model, _, x = trained
    expl = explain.shap_explanation(model.booster, model.features(x[:300]), model.feature_names)
    importance = explain.global_importance(expl)
    assert np.all(np.diff(importance["mean_abs_shap"].to_numpy()) <= 0)
    assert len(importance) == len(model.feature_names)
    paths = explain.save_plots(expl, tmp_path, n_dependence=2)
    assert [p.name for p in paths][0] == "shap_summary.png" and len(paths) == 3
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
