"""The synthetic cohort: deterministic, inside the schema, faithful to what it cites, with exact truth.

The large-sample checks share one module-scoped cohort so the suite stays fast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from masml import cohort as sim
from masml.schema import COLUMNS, INPUT_NAMES, LABEL_NAMES, MAS_ONLY_LABELS, TRIGGERS
from masml.summary import auroc

N_BIG = 200_000


@pytest.fixture(scope="module")
def big():
    return sim.simulate(N_BIG, seed=11)


@pytest.fixture(scope="module")
def unselected():
    """No entry criterion: the generators' own distributions, to compare with the cited medians."""
    return sim.simulate(N_BIG, seed=12, entry_ferritin=None)


def _binned_calibration(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[tuple[float, float, float]]:
    """(mean predicted, observed rate, tolerance) per quantile bin; tolerance = 4 binomial SEs + 0.003."""
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        mean_p = p[m].mean()
        se = np.sqrt(max(mean_p * (1 - mean_p), 1e-6) / m.sum())
        out.append((mean_p, y[m].mean(), 4 * se + 0.003))
    return out


# ---------------------------------------------------------------- determinism and shape


def test_same_seed_same_cohort_and_different_seed_differs():
    a, b, c = sim.simulate(3_000, seed=5), sim.simulate(3_000, seed=5), sim.simulate(3_000, seed=6)
    pd.testing.assert_frame_equal(a.data, b.data)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    assert not np.allclose(a.data["ferritin"], c.data["ferritin"])


def test_first_rows_do_not_depend_on_n():
    small, large = sim.simulate(500, seed=3), sim.simulate(5_000, seed=3)
    pd.testing.assert_frame_equal(small.data, large.data.iloc[:500])


def test_rejects_non_positive_n():
    with pytest.raises(ValueError, match="positive"):
        sim.simulate(0)


def test_columns_follow_the_schema_and_truth_is_kept_apart(big):
    assert list(big.data.columns) == ["patient_id", *INPUT_NAMES, *LABEL_NAMES]
    assert big.data["patient_id"].is_unique
    assert all(c.startswith("true_") for c in big.truth.columns if c != "patient_id")
    assert not set(big.truth.columns) & set(big.data.columns) - {"patient_id"}
    assert (big.truth["patient_id"] == big.data["patient_id"]).all()


def test_every_value_inside_the_schema_ranges_and_vocabularies(big, unselected):
    for frame in (big.data, unselected.data):
        for name in INPUT_NAMES:
            col = COLUMNS[name]
            values = frame[name]
            if col.kind == "category":
                assert set(values.unique()) <= set(col.categories), name
                continue
            v = values.dropna().to_numpy(float)
            assert v.min() >= col.low and v.max() <= col.high, (name, v.min(), v.max())
    assert (big.data["neutrophils"].dropna() <= big.data.loc[big.data["neutrophils"].notna(), "wbc"]).all()


def test_entry_criterion_and_mas_only_labels(big):
    d = big.data
    assert (d["ferritin"] >= sim.ENTRY_FERRITIN).all()
    mimic = d["mas_onset"] == 0
    for label in MAS_ONLY_LABELS:
        assert d.loc[mimic, label].isna().all(), label
        assert d.loc[~mimic, label].isin([0, 1]).all(), label
    assert d["mas_onset"].isin([0, 1]).all()


def test_labs_missing_stay_missing_and_core_labs_are_present(big):
    d = big.data
    for always in ("ferritin", "platelets", "wbc", "hemoglobin", "ast", "crp", "temperature_c"):
        assert d[always].notna().all(), always
    assert d["scd25"].isna().mean() > 0.8  # "sCD25 mostly missing" (issue; ref B)
    assert 0.2 < d["fibrinogen"].isna().mean() < 0.5
    assert 0.5 < d["triglycerides"].isna().mean() < 0.8
    assert 0.5 < d["bone_marrow_hemophagocytosis"].isna().mean() < 0.8  # aspirate in a minority


# ---------------------------------------------------------------- ground truth is calibrated


def test_true_onset_probability_is_calibrated(big):
    p, y = big.truth["true_p_mas_onset"].to_numpy(), big.data["mas_onset"].to_numpy()
    for mean_p, rate, tol in _binned_calibration(p, y):
        assert abs(mean_p - rate) <= tol, (mean_p, rate)
    assert 0.90 < auroc(y, p) < 0.99  # hard enough to be credible, informative enough to learn


def test_true_icu_and_death_probabilities_are_calibrated(big):
    mas = big.data["mas_onset"].to_numpy() == 1
    d, t = big.data[mas], big.truth[mas]
    checks = [(t["true_p_icu_admission"], d["icu_admission"]), (t["true_propensity_il1"], d["treatment_il1"])]
    treated = d["treatment_il1"] == 1
    checks.append((t.loc[treated, "true_p_death_treated"], d.loc[treated, "death_28d"]))
    checks.append((t.loc[~treated, "true_p_death_untreated"], d.loc[~treated, "death_28d"]))
    for p, y in checks:
        for mean_p, rate, tol in _binned_calibration(p.to_numpy(), y.to_numpy(), bins=5):
            assert abs(mean_p - rate) <= tol, (p.name, mean_p, rate)


def test_potential_outcomes_are_consistent_with_the_observed_outcome(big):
    mas = big.data["mas_onset"] == 1
    d, t = big.data[mas], big.truth[mas]
    observed = np.where(d["treatment_il1"] == 1, t["true_death_treated"], t["true_death_untreated"])
    assert np.array_equal(observed, d["death_28d"].to_numpy())
    np.testing.assert_allclose(t["true_benefit"], t["true_p_death_untreated"] - t["true_p_death_treated"])


def test_posterior_is_a_function_of_the_observed_inputs_only(big):
    """Recomputing from the written inputs (labels and truth dropped, rows shuffled) gives the same."""
    inputs = big.data[["patient_id", *INPUT_NAMES]].iloc[:5_000].sample(frac=1.0, random_state=0)
    again = sim.mas_posterior(inputs)
    expected = big.truth.set_index("patient_id").loc[inputs["patient_id"], "true_p_mas_onset"]
    np.testing.assert_allclose(again, expected.to_numpy(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- faithful to what the code cites


def test_lab_medians_match_the_cited_generators(unselected):
    """Every (trigger, lab) median of overt MAS and of mimics matches its parameter table entry."""
    d, stage = unselected.data, unselected.truth["true_mas_stage"]
    checked = 0
    for trigger in TRIGGERS:
        for cls, who in ((1, stage == "overt"), (0, stage == "mimic")):
            rows = d[(d["trigger"] == trigger) & who]
            if len(rows) < 3_000:
                continue
            for c in sim.COORDS[: sim.N_CURRENT]:
                if c.name == "neutrophil_fraction":
                    observed = (rows["neutrophils"] / rows["wbc"]).median()
                else:
                    observed = rows[c.name].median()
                cited, spread = sim._median_spread(cls, trigger, c.name)
                n_obs = int(rows[c.name if c.name != "neutrophil_fraction" else "neutrophils"].notna().sum())
                tol = 4 * 1.2533 * spread / np.sqrt(n_obs) + 0.005  # 4 SEs of a sample median
                if c.linear:
                    assert abs(observed - cited) <= tol, (trigger, cls, c.name, observed, cited)
                else:
                    assert abs(np.log(observed / cited)) <= tol, (trigger, cls, c.name, observed, cited)
                checked += 1
    assert checked > 300


def test_prevalence_trigger_mix_signs_and_missingness_match_the_tables(unselected):
    d, stage = unselected.data, unselected.truth["true_mas_stage"]
    assert abs(d["mas_onset"].mean() - sim.P_MAS) < 0.005
    mas_mix = d.loc[d["mas_onset"] == 1, "trigger"].value_counts(normalize=True)
    for trigger, share in sim.TRIGGER_MIX_MAS.items():
        assert abs(mas_mix.get(trigger, 0) - share) < 0.006, trigger
    overt_share = (stage == "overt").sum() / (d["mas_onset"] == 1).sum()
    assert abs(overt_share - sim.MAS_STAGES[0][1]) < 0.01
    sjia_overt = d[(d["trigger"] == "sjia") & (stage == "overt")]
    sjia_mimic = d[(d["trigger"] == "sjia") & (stage == "mimic")]
    # Minoia 2014 sJIA-MAS: hepatomegaly 70 %, splenomegaly 58 %, CNS 35 %, haemorrhage 20 %.
    for sign in ("hepatomegaly", "splenomegaly", "cns_dysfunction", "hemorrhage"):
        p_mas, p_mimic = sim.SIGNS[sign]["autoinflammatory"]
        assert abs(sjia_overt[sign].mean() - p_mas) < 0.03, sign
        assert abs(sjia_mimic[sign].mean() - p_mimic) < 0.03, sign
    adult_overt = d[d["trigger"].isin(["lymphoma", "viral_ebv"]) & (stage == "overt")]
    assert abs(adult_overt["splenomegaly"].mean() - 0.70) < 0.03  # Liu 70.8 %
    assert abs(adult_overt["scd25"].isna().mean() - sim.P_MISSING["scd25"][0][2]) < 0.03
    aspirated = adult_overt["bone_marrow_hemophagocytosis"].dropna()
    assert abs(aspirated.mean() - sim.P_HEMOPHAGOCYTOSIS[0]) < 0.03  # 60 % when sampled (Minoia 2014)


def test_untreated_mortality_per_trigger_matches_the_cited_rates(big):
    mas = big.data["mas_onset"] == 1
    frame = pd.DataFrame(
        {"trigger": big.data.loc[mas, "trigger"], "p0": big.truth.loc[mas, "true_p_death_untreated"]}
    )
    means = frame.groupby("trigger")["p0"].mean()
    for trigger, cited in sim.MORTALITY_UNTREATED.items():
        assert abs(means[trigger] - cited) < 0.03, (trigger, means[trigger], cited)


def test_icu_need_is_near_the_cited_baselines(big):
    d = big.data[big.data["mas_onset"] == 1]
    sjia = d.loc[d["trigger"] == "sjia", "icu_admission"].mean()
    adult = d.loc[d["trigger"] != "sjia", "icu_admission"].mean()
    assert 0.25 < sjia < 0.45  # about one-third of sJIA-MAS (Minoia 2014)
    assert 0.40 < adult < 0.65  # 0.45-0.6 in adult sHLH (ref C, assumption)


def test_il1_effect_varies_as_the_literature_says(big):
    mas = big.data["mas_onset"] == 1
    d, b = big.data[mas], big.truth.loc[mas, "true_benefit"]
    features = sim.sepsis_with_mas_features(d)
    assert (b[d["trigger"].isin(["sjia", "aosd"])] > 0).all()
    assert (b[d["trigger"].isin(["parasitic_leishmania", "lymphoma"])] <= 0).all()
    assert (b[features] > 0).all()
    plain_sepsis = (d["trigger"] == "bacterial_sepsis").to_numpy() & ~features
    assert np.allclose(b[plain_sepsis], 0.0)
    assert b[d["trigger"].isin(["sjia", "aosd"])].mean() > b[d["trigger"].isin(["viral_ebv"])].mean()


def test_treatment_is_confounded_by_indication(big):
    """Autoimmune MAS is treated far more than lymphoma MAS; propensities stay inside (0, 1)."""
    d = big.data[big.data["mas_onset"] == 1]
    rate = d.groupby("trigger")["treatment_il1"].mean()
    assert rate["sjia"] > 0.6 and rate["lymphoma"] < 0.25
    e = big.truth.loc[big.data["mas_onset"] == 1, "true_propensity_il1"]
    assert e.min() > 0.01 and e.max() < 0.99


def test_trends_rise_before_mas_and_stay_flat_in_mimics(unselected):
    d, stage = unselected.data, unselected.truth["true_mas_stage"]
    log_rise = np.log(d["ferritin"] / d["ferritin_prev"])
    assert abs(log_rise[stage == "overt"].median() - sim.TREND_DELTA["ferritin_prev"]["mas"][0]) < 0.05
    assert abs(log_rise[stage == "mimic"].median() - sim.TREND_DELTA["ferritin_prev"]["mimic"][0]) < 0.05
    fall = np.log(d["platelets"] / d["platelets_prev"])
    assert fall[stage == "overt"].median() < -0.4
