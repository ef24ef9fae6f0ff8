"""Tests for masml.scores: every published band edge, hand-worked examples, the missing-input rule.

Expected values are written from the published tables (clinical-reference.md §1-§8), not from the code,
and the arithmetic of each worked example is spelled out next to it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from masml import scores
from masml.schema import INPUT_NAMES
from masml.scores import (
    SCORES,
    add_scores,
    dic_isth,
    dic_isth_missing,
    dic_isth_overt,
    ferritin_esr_ratio,
    ferritin_esr_ratio_met,
    ferritin_esr_ratio_missing,
    hbd_dic,
    hbd_dic_missing,
    hlh2004,
    hlh2004_met,
    hlh2004_missing,
    hscore,
    hscore_met,
    hscore_missing,
    hscore_probability,
    hscore_probability_from_score,
    mals_ferritin,
    mals_ferritin_missing,
    mas2016,
    mas2016_missing,
    ms_score,
    ms_score_met,
    ms_score_missing,
)

NAN = float("nan")


def one_column(name: str, values: list[float]) -> pd.DataFrame:
    """A frame holding one input only, so a score's total is that single item's points."""
    return pd.DataFrame({name: values})


def row(**values: float) -> pd.DataFrame:
    return pd.DataFrame([values])


def listed(series: pd.Series) -> list:
    return series.tolist()


# ---------------------------------------------------------------------------------------------------
# HScore band edges (Fardet 2014 points table)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("immunosuppressed", [0, 1], [0, 18]),
        # <38.4 -> 0; 38.4-39.4 -> 33 (both edges in the middle band); >39.4 -> 49
        ("temperature_c", [38.39, 38.4, 38.41, 39.39, 39.4, 39.41], [0, 33, 33, 33, 33, 49]),
        # <2000 -> 0; 2000-6000 -> 35; >6000 -> 50
        ("ferritin", [1999.9, 2000, 6000, 6000.1], [0, 35, 35, 50]),
        # 1.5 mmol/L = 1.5 x 88.57 = 132.855 mg/dL; 4 mmol/L = 4 x 88.57 = 354.28 mg/dL
        ("triglycerides", [132.85, 132.855, 132.86, 354.27, 354.28, 354.29], [0, 44, 44, 44, 44, 64]),
        # fibrinogen <= 2.5 g/L = 250 mg/dL -> 30
        ("fibrinogen", [249.9, 250, 250.1], [30, 30, 0]),
        # AST >= 30 -> 19
        ("ast", [29.9, 30, 30.1], [0, 19, 19]),
        ("bone_marrow_hemophagocytosis", [0, 1], [0, 35]),
        ("hepatomegaly", [0, 1], [0, 23]),
        ("splenomegaly", [0, 1], [0, 23]),
    ],
)
def test_hscore_single_item_edges(column: str, values: list[float], expected: list[int]) -> None:
    assert listed(hscore(one_column(column, values))) == expected


def test_hscore_triglycerides_converted_from_round_mmol_values_hit_the_published_edges() -> None:
    # A units layer converting 1.5 and 4 mmol/L with the 88.57 factor must land in the middle band,
    # whatever the last bit of the floating-point product.
    mg_dl = [1.5 * 88.57, 4 * 88.57, 1.4999 * 88.57, 4.0001 * 88.57]
    assert listed(hscore(one_column("triglycerides", mg_dl))) == [44, 44, 0, 64]
    # one floating-point step off an edge (conversion noise) is read as on the edge
    noisy = [np.nextafter(132.855, 0.0), np.nextafter(354.28, 1000.0)]
    assert listed(hscore(one_column("triglycerides", noisy))) == [44, 44]


def test_hscore_organomegaly_both_scores_38() -> None:
    frame = pd.DataFrame({"hepatomegaly": [1, 1, 0], "splenomegaly": [1, 0, 0]})
    assert listed(hscore(frame)) == [38, 23, 0]


@pytest.mark.parametrize(
    ("hemoglobin", "wbc", "platelets", "expected"),
    [
        # thresholds are inclusive: Hb <= 9.2, WBC <= 5.0, platelets <= 110
        (9.2, 5.0, 110, 34),  # 3 lineages
        (9.21, 5.0, 110, 24),  # 2 lineages
        (9.2, 5.01, 110, 24),
        (9.2, 5.0, 110.1, 24),
        (9.2, 5.01, 110.1, 0),  # 1 lineage scores 0
        (9.21, 5.01, 110.1, 0),  # 0 lineages
    ],
)
def test_hscore_cytopenia_edges(hemoglobin: float, wbc: float, platelets: float, expected: int) -> None:
    assert hscore(row(hemoglobin=hemoglobin, wbc=wbc, platelets=platelets)).iloc[0] == expected


# ---------------------------------------------------------------------------------------------------
# HScore worked examples and probability (Fardet Table 3)
# ---------------------------------------------------------------------------------------------------


def test_hscore_worked_example_between_the_last_knots() -> None:
    patient = row(
        immunosuppressed=1,  # 18
        temperature_c=39.0,  # 38.4-39.4 -> 33
        hepatomegaly=1,
        splenomegaly=0,  # one organ -> 23
        hemoglobin=8.5,  # <= 9.2: lineage
        wbc=3.0,  # <= 5.0: lineage
        platelets=150,  # > 110: not a lineage -> 2 lineages -> 24
        ferritin=8000,  # > 6000 -> 50
        triglycerides=300,  # 300 / 88.57 = 3.39 mmol/L, in 1.5-4 -> 44
        fibrinogen=200,  # 2.0 g/L <= 2.5 -> 30
        ast=100,  # >= 30 -> 19
        bone_marrow_hemophagocytosis=0,  # 0
    )
    # 18 + 33 + 23 + 24 + 50 + 44 + 30 + 19 + 0 = 241
    assert hscore(patient).iloc[0] == 241
    assert hscore_missing(patient).iloc[0] == 0
    assert hscore_met(patient).iloc[0] == 1
    # 241 lies between knots 240 (99 %) and 250 (">99 %" read as 99.5 %): 0.99 + 0.1 x 0.005 = 0.9905
    assert hscore_probability(patient).iloc[0] == pytest.approx(0.9905)


def test_hscore_worked_example_exactly_on_a_knot() -> None:
    patient = row(immunosuppressed=1, hepatomegaly=1, splenomegaly=1, ferritin=7000, triglycerides=400)
    # 18 (immunosuppressed) + 38 (both organs) + 50 (ferritin > 6000) + 64 (400 mg/dL = 4.52 mmol/L > 4)
    # = 170, a knot of Table 3: 54 %
    assert hscore(patient).iloc[0] == 170
    assert hscore_probability(patient).iloc[0] == pytest.approx(0.54)
    assert hscore_met(patient).iloc[0] == 1  # 170 >= 169


def test_hscore_worked_example_between_knots_below_the_cut_off() -> None:
    patient = row(temperature_c=38.5, splenomegaly=1, ferritin=3000, hemoglobin=7, wbc=2, platelets=50)
    # 33 (38.5 degC) + 23 (spleen) + 35 (ferritin 2000-6000) + 34 (3 lineages) = 125
    # between knots 120 (5 %) and 130 (9 %): 0.05 + 0.5 x 0.04 = 0.07
    assert hscore(patient).iloc[0] == 125
    assert hscore_probability(patient).iloc[0] == pytest.approx(0.07)
    assert hscore_met(patient).iloc[0] == 0


def test_hscore_maximum_is_337() -> None:
    patient = row(
        immunosuppressed=1, temperature_c=40, hepatomegaly=1, splenomegaly=1, hemoglobin=7, wbc=1,
        platelets=20, ferritin=20000, triglycerides=500, fibrinogen=100, ast=200,
        bone_marrow_hemophagocytosis=1,
    )
    # 18 + 49 + 38 + 34 + 50 + 64 + 30 + 19 + 35 = 337
    assert hscore(patient).iloc[0] == scores.HSCORE_MAX == 337
    assert hscore_probability(patient).iloc[0] == pytest.approx(0.995)


def test_hscore_cut_off_169_is_inclusive() -> None:
    at_169 = row(temperature_c=39.0, splenomegaly=1, triglycerides=400, fibrinogen=200, ast=50)
    # 33 (38.4-39.4) + 23 (one organ) + 64 (400 mg/dL = 4.52 mmol/L) + 30 (2.0 g/L) + 19 (AST >= 30) = 169
    assert hscore(at_169).iloc[0] == 169
    assert hscore_met(at_169).iloc[0] == 1
    at_168 = row(ferritin=3000, bone_marrow_hemophagocytosis=1, triglycerides=200, fibrinogen=200,
                 hemoglobin=8, wbc=3)
    # 35 (ferritin 2000-6000) + 35 (marrow) + 44 (200 mg/dL = 2.26 mmol/L) + 30 + 24 (2 lineages) = 168
    assert hscore(at_168).iloc[0] == 168
    assert hscore_met(at_168).iloc[0] == 0


@pytest.mark.parametrize(
    ("score", "probability"),
    [
        (0, 0.005),  # "<1 %" below the first knot, held constant
        (90, 0.005),
        (95, 0.0075),  # halfway 0.5 % -> 1 %
        (100, 0.01),
        (160, 0.40),
        # 169: 0.40 + 0.9 x (0.54 - 0.40) = 0.526; the -4.3 + 0.03 x score logistic would give ~0.68
        (169, 0.526),
        (200, 0.88),
        (245, 0.9925),
        (250, 0.995),
        (337, 0.995),  # ">99 %" held constant
    ],
)
def test_hscore_probability_table(score: float, probability: float) -> None:
    assert hscore_probability_from_score(score) == pytest.approx(probability)


def test_hscore_probability_from_score_keeps_series_index() -> None:
    s = pd.Series([100, 170], index=["a", "b"], name="hscore")
    out = hscore_probability_from_score(s)
    assert list(out.index) == ["a", "b"]
    assert out.tolist() == pytest.approx([0.01, 0.54])


def test_hscore_probability_is_monotone() -> None:
    p = hscore_probability_from_score(np.arange(0, 338))
    assert np.all(np.diff(p) >= 0)


# ---------------------------------------------------------------------------------------------------
# HLH-2004 (Henter 2007)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("temperature_c", [38.49, 38.5, 38.51], [0, 1, 1]),  # fever >= 38.5
        ("splenomegaly", [0, 1], [0, 1]),
        ("ferritin", [499.9, 500, 500.1], [0, 1, 1]),  # >= 500
        ("scd25", [2399, 2400, 2401], [0, 1, 1]),  # >= 2400
        ("triglycerides", [264.9, 265, 265.1], [0, 1, 1]),  # >= 265 mg/dL
        ("fibrinogen", [149.9, 150, 150.1], [1, 1, 0]),  # <= 1.5 g/L = 150 mg/dL
        ("bone_marrow_hemophagocytosis", [0, 1], [0, 1]),
    ],
)
def test_hlh2004_single_criterion_edges(column: str, values: list[float], expected: list[int]) -> None:
    assert listed(hlh2004(one_column(column, values))) == expected


@pytest.mark.parametrize(
    ("hemoglobin", "platelets", "neutrophils", "expected"),
    [
        # strict thresholds: Hb < 9.0 g/dL, platelets < 100, ANC < 1.0; >= 2 of 3 lineages
        (8.99, 99.9, 0.99, 1),
        (8.99, 99.9, 1.0, 1),
        (8.99, 100, 0.99, 1),
        (9.0, 99.9, 0.99, 1),
        (9.0, 100, 0.99, 0),  # one lineage only
        (8.99, 100, 1.0, 0),
        (9.0, 99.9, 1.0, 0),
        (9.0, 100, 1.0, 0),
    ],
)
def test_hlh2004_cytopenia_edges(
    hemoglobin: float, platelets: float, neutrophils: float, expected: int
) -> None:
    frame = row(hemoglobin=hemoglobin, platelets=platelets, neutrophils=neutrophils)
    assert hlh2004(frame).iloc[0] == expected


def test_hlh2004_infant_hemoglobin_threshold() -> None:
    # Hb < 100 g/L counts in infants < 4 weeks; 9.5 g/dL plus thrombocytopenia is 2 lineages there only.
    frame = pd.DataFrame({"age_years": [0.05, 0.1, NAN], "hemoglobin": [9.5] * 3, "platelets": [50] * 3})
    assert listed(hlh2004(frame)) == [1, 0, 0]


def test_hlh2004_triglyceride_or_fibrinogen_is_one_criterion() -> None:
    frame = pd.DataFrame({"triglycerides": [300, 100, 300], "fibrinogen": [100, 100, 300]})
    assert listed(hlh2004(frame)) == [1, 1, 1]
    assert listed(hlh2004(pd.DataFrame({"triglycerides": [100], "fibrinogen": [300]}))) == [0]


def test_hlh2004_worked_example() -> None:
    patient = row(
        temperature_c=38.5,  # fever >= 38.5: met (1)
        splenomegaly=1,  # met (2)
        hemoglobin=8.9,  # < 9.0: lineage
        platelets=99,  # < 100: lineage
        neutrophils=1.5,  # >= 1.0: not -> 2 of 3 lineages: met (3)
        triglycerides=200,  # < 265 ...
        fibrinogen=150,  # ... but <= 150: met (4)
        bone_marrow_hemophagocytosis=0,  # not met
        ferritin=500,  # >= 500: met (5)
        scd25=2399,  # < 2400: not met
    )
    # 5 met; NK activity is not in the schema: unmet and counted as the one missing criterion
    assert hlh2004(patient).iloc[0] == 5
    assert hlh2004_met(patient).iloc[0] == 1
    assert hlh2004_missing(patient).iloc[0] == 1
    four = patient.assign(ferritin=499)
    assert hlh2004(four).iloc[0] == 4
    assert hlh2004_met(four).iloc[0] == 0


# ---------------------------------------------------------------------------------------------------
# 2016 EULAR/ACR/PRINTO (Ravelli 2016)
# ---------------------------------------------------------------------------------------------------

MAS2016_BASE = {"temperature_c": 38.0, "ferritin": 685.0, "platelets": 181.0, "fibrinogen": 360.0}


def test_mas2016_worked_example() -> None:
    # febrile (38.0 >= 38.0), ferritin 685 > 684, platelets 181 <= 181 and fibrinogen 360 <= 360:
    # 2 laboratory criteria -> classified
    assert mas2016(row(**MAS2016_BASE)).iloc[0] == 1
    assert mas2016_missing(row(**MAS2016_BASE)).iloc[0] == 2  # AST and triglycerides not given


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"temperature_c": 37.99}, 0),  # not febrile
        ({"ferritin": 684.0}, 0),  # ferritin must be > 684
        ({"ferritin": 684.1}, 1),
        ({"platelets": 181.1}, 0),  # only 1 lab left
        ({"fibrinogen": 360.1}, 0),
        ({"fibrinogen": 360.1, "ast": 48.0}, 0),  # AST must be > 48
        ({"fibrinogen": 360.1, "ast": 48.1}, 1),
        ({"fibrinogen": 360.1, "triglycerides": 156.0}, 0),  # TG must be > 156
        ({"fibrinogen": 360.1, "triglycerides": 156.1}, 1),
        ({"temperature_c": NAN}, 0),  # fever unknown: not met
    ],
)
def test_mas2016_edges(change: dict, expected: int) -> None:
    assert mas2016(row(**{**MAS2016_BASE, **change})).iloc[0] == expected


# ---------------------------------------------------------------------------------------------------
# MS score (Minoia 2019 Table 4)
# ---------------------------------------------------------------------------------------------------


def test_ms_score_worked_example() -> None:
    patient = row(cns_dysfunction=1, hemorrhage=0, active_arthritis=1, platelets=150, ldh=1000,
                  fibrinogen=200, ferritin=10000)
    # 2.44 x 1 + 1.54 x 0 - 1.30 x 1 - 0.003 x 150 + 0.001 x 1000 - 0.004 x 200 + 0.0001 x 10000
    # = 2.44 - 1.30 - 0.45 + 1.00 - 0.80 + 1.00 = 1.89
    assert ms_score(patient).iloc[0] == pytest.approx(1.89)
    assert ms_score_met(patient).iloc[0] == 1
    assert ms_score_missing(patient).iloc[0] == 0


def test_ms_score_worked_example_below_cut_off() -> None:
    patient = row(cns_dysfunction=0, hemorrhage=0, active_arthritis=1, platelets=300, ldh=500,
                  fibrinogen=400, ferritin=1000)
    # -1.30 - 0.003 x 300 + 0.001 x 500 - 0.004 x 400 + 0.0001 x 1000 = -1.30 - 0.90 + 0.50 - 1.60 + 0.10
    # = -3.20 < -2.1
    assert ms_score(patient).iloc[0] == pytest.approx(-3.2)
    assert ms_score_met(patient).iloc[0] == 0


@pytest.mark.parametrize(
    ("platelets", "score", "met"),
    [
        (699.9, -2.0997, 1),  # -0.003 x 699.9
        (700.0, -2.1, 1),  # -0.003 x 700 = -2.1, exactly on the cut-off (>=)
        (700.1, -2.1003, 0),
    ],
)
def test_ms_score_cut_off_edge(platelets: float, score: float, met: int) -> None:
    # all other terms recorded as 0 so that the flag's data guard is satisfied
    frame = row(cns_dysfunction=0, hemorrhage=0, active_arthritis=0, platelets=platelets, ldh=0,
                fibrinogen=0, ferritin=0)
    assert ms_score(frame).iloc[0] == pytest.approx(score, abs=1e-12)
    assert ms_score_met(frame).iloc[0] == met


def test_ms_score_on_the_cut_off_despite_floating_point() -> None:
    frame = row(cns_dysfunction=0, hemorrhage=0, active_arthritis=0, platelets=760, ldh=0, fibrinogen=205,
                ferritin=10000)
    # -0.003 x 760 - 0.004 x 205 + 0.0001 x 10000 = -2.28 - 0.82 + 1.00 = -2.1 exactly; summed naively in
    # binary floating point this is -2.1000000000000005 and would miss the (inclusive) cut-off
    assert ms_score(frame).iloc[0] == -2.1
    assert ms_score_met(frame).iloc[0] == 1


def test_ms_score_missing_terms_contribute_zero_and_are_counted() -> None:
    # only ferritin recorded: 0.0001 x 5000 = 0.5, six terms missing
    frame = row(ferritin=5000)
    assert ms_score(frame).iloc[0] == pytest.approx(0.5)
    assert ms_score_missing(frame).iloc[0] == 6
    # 0.5 >= -2.1, but platelets, fibrinogen and arthritis (negative terms) are unknown: not claimed
    assert ms_score_met(frame).iloc[0] == 0
    # missing positive terms (CNS, haemorrhage, LDH) do not block the flag: they can only raise the score
    known_negatives = row(active_arthritis=0, platelets=100, fibrinogen=100, ferritin=5000)
    # -0.3 - 0.4 + 0.5 = -0.2 >= -2.1
    assert ms_score(known_negatives).iloc[0] == pytest.approx(-0.2)
    assert ms_score_met(known_negatives).iloc[0] == 1


# ---------------------------------------------------------------------------------------------------
# Ferritin:ESR (Eloseily 2019)
# ---------------------------------------------------------------------------------------------------


def test_ferritin_esr_ratio_and_cut_off() -> None:
    frame = pd.DataFrame({"ferritin": [2150, 2149, 2150, NAN, 2150, 1000], "esr": [100, 100, 0, 10, NAN, 10]})
    ratio = ferritin_esr_ratio(frame)
    # 2150 / 100 = 21.5 (on the cut-off), 2149 / 100 = 21.49; ESR 0 or a missing input -> NaN
    assert ratio.iloc[0] == pytest.approx(21.5)
    assert ratio.iloc[1] == pytest.approx(21.49)
    assert ratio.iloc[2:5].isna().all()
    assert ratio.iloc[5] == pytest.approx(100.0)
    assert scores.FERRITIN_ESR_CUTOFF == 21.5
    assert listed(ferritin_esr_ratio_met(frame)) == [1, 0, 0, 0, 0, 1]
    assert listed(ferritin_esr_ratio_missing(frame)) == [0, 0, 1, 1, 1, 0]


# ---------------------------------------------------------------------------------------------------
# ISTH overt DIC (Taylor 2001) with the documented D-dimer / INR assumptions
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("platelets", [100, 99.9, 50, 49.9], [0, 1, 1, 2]),  # >= 100 / 50-<100 / < 50
        # ULN 0.5 mg/L FEU: < 1.0 -> 0; 1.0-2.0 (inclusive) -> 2; > 2.0 -> 3
        ("d_dimer", [0.99, 1.0, 2.0, 2.01], [0, 2, 2, 3]),
        # INR 1.25 = 3 s, 1.5 = 6 s over a 12 s normal PT: < 3 s -> 0; 3-<6 s -> 1; >= 6 s -> 2
        ("inr", [1.24, 1.25, 1.49, 1.5], [0, 1, 1, 2]),
        ("fibrinogen", [100, 99.9], [0, 1]),  # < 1.0 g/L = 100 mg/dL -> 1
    ],
)
def test_dic_isth_edges(column: str, values: list[float], expected: list[int]) -> None:
    assert listed(dic_isth(one_column(column, values))) == expected


def test_dic_isth_overt_threshold() -> None:
    frame = pd.DataFrame({"platelets": [40, 60, 40], "d_dimer": [3.0, 3.0, 3.0], "inr": [1.0, 1.0, 1.6],
                          "fibrinogen": [300, 300, 80]})
    # 2 + 3 + 0 + 0 = 5 (overt); 1 + 3 + 0 + 0 = 4 (not); 2 + 3 + 2 + 1 = 8 (the maximum)
    assert listed(dic_isth(frame)) == [5, 4, 8]
    assert listed(dic_isth_overt(frame)) == [1, 0, 1]
    assert listed(dic_isth_missing(frame)) == [0, 0, 0]


# ---------------------------------------------------------------------------------------------------
# HBD + DIC (operational definition) and MALS ferritin
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # HBD by bilirubin >= 2.0, DIC by platelets < 100 and INR >= 1.5
        ({"bilirubin": 2.0, "platelets": 99, "inr": 1.5}, 1),
        ({"bilirubin": 1.99, "platelets": 99, "inr": 1.5}, 0),  # no HBD
        ({"bilirubin": 2.0, "platelets": 100, "inr": 1.5}, 0),  # platelets not < 100 (ISTH 0+2 = 2)
        ({"bilirubin": 2.0, "platelets": 99, "inr": 1.49}, 0),  # INR < 1.5 (ISTH 1+1 = 2)
        # HBD by a transaminase >= 80 U/L (2 x ULN 40)
        ({"alt": 80, "platelets": 99, "inr": 1.5}, 1),
        ({"alt": 79.9, "ast": 79.9, "bilirubin": 1.0, "platelets": 99, "inr": 1.5}, 0),
        ({"ast": 80, "platelets": 99, "inr": 1.5}, 1),
        # DIC by ISTH >= 5 alone: platelets 40 (2) + D-dimer 3.0 (3) = 5, INR normal
        ({"ast": 80, "platelets": 40, "d_dimer": 3.0, "inr": 1.0}, 1),
        ({"ast": 80, "platelets": 60, "d_dimer": 3.0, "inr": 1.0}, 0),  # ISTH 4, INR normal
    ],
)
def test_hbd_dic(values: dict, expected: int) -> None:
    assert hbd_dic(row(**values)).iloc[0] == expected


def test_hbd_dic_missing_counts_parts_with_no_data() -> None:
    frame = pd.DataFrame({"bilirubin": [3.0, NAN, NAN], "d_dimer": [NAN, 1.0, NAN]})
    assert listed(hbd_dic_missing(frame)) == [1, 1, 2]


def test_mals_ferritin() -> None:
    frame = one_column("ferritin", [4420, 4420.1, NAN])
    assert listed(mals_ferritin(frame)) == [0, 1, 0]  # strictly > 4420
    assert listed(mals_ferritin_missing(frame)) == [0, 0, 1]


# ---------------------------------------------------------------------------------------------------
# Missing-input rule
# ---------------------------------------------------------------------------------------------------

MAX_MISSING = {
    "hscore_missing": 9,
    "hlh2004_missing": 8,
    "mas2016_missing": 6,
    "ms_score_missing": 7,
    "ferritin_esr_ratio_missing": 1,
    "dic_isth_missing": 4,
    "hbd_dic_missing": 2,
    "mals_ferritin_missing": 1,
}


@pytest.mark.parametrize("frame_kind", ["no_columns", "all_nan"])
def test_no_data_gives_zero_points_and_maximum_missing(frame_kind: str) -> None:
    index = pd.Index([7, 3], name="row")
    if frame_kind == "no_columns":
        frame = pd.DataFrame(index=index)
    else:
        frame = pd.DataFrame({name: [NAN, NAN] for name in INPUT_NAMES}, index=index)
    out = add_scores(frame)
    for name in ("hscore", "hlh2004", "mas2016", "dic_isth", "hbd_dic", "mals_ferritin", "hscore_met",
                 "hlh2004_met", "dic_isth_overt", "ms_score_met", "ferritin_esr_ratio_met"):
        assert listed(out[name]) == [0, 0], name
    assert listed(out["ms_score"]) == [0.0, 0.0]
    assert out["ferritin_esr_ratio"].isna().all()
    assert listed(out["hscore_probability"]) == pytest.approx([0.005, 0.005])
    for name, maximum in MAX_MISSING.items():
        assert listed(out[name]) == [maximum, maximum], name
    assert list(out.index) == [7, 3]


def test_nan_items_score_nothing_and_are_counted() -> None:
    frame = pd.DataFrame({"ferritin": [8000, NAN], "ast": [NAN, 100], "temperature_c": [39.5, NAN]})
    # row 0: 50 (ferritin) + 49 (temperature); row 1: 19 (AST)
    assert listed(hscore(frame)) == [99, 19]
    # 9 items minus the ones present: row 0 has ferritin and temperature, row 1 AST
    assert listed(hscore_missing(frame)) == [7, 8]


def test_multi_component_items_count_as_missing_only_when_all_components_are() -> None:
    frame = pd.DataFrame({
        "hemoglobin": [8.0, 8.0, NAN],
        "wbc": [3.0, NAN, NAN],
        "platelets": [NAN, NAN, NAN],
        "hepatomegaly": [1, NAN, NAN],
        "splenomegaly": [NAN, NAN, NAN],
    })
    # row 0: 2 lineages from Hb and WBC -> 24; hepatomegaly -> 23; cytopenia and organomegaly assessed
    # row 1: 1 lineage -> 0; organomegaly all missing
    # row 2: nothing
    assert listed(hscore(frame)) == [47, 0, 0]
    assert listed(hscore_missing(frame)) == [7, 8, 9]
    # HLH-2004 cytopenia: Hb only is still an assessed criterion; TG/fibrinogen with one part too
    hlh = pd.DataFrame({"hemoglobin": [8.0, NAN], "fibrinogen": [100, NAN]})
    assert listed(hlh2004(hlh)) == [1, 0]  # fibrinogen met; one lineage is not enough
    assert listed(hlh2004_missing(hlh)) == [8 - 2, 8]


def test_missing_binary_sign_is_not_a_zero() -> None:
    frame = one_column("bone_marrow_hemophagocytosis", [0, 1, NAN])
    assert listed(hscore(frame)) == [0, 35, 0]
    assert listed(hscore_missing(frame)) == [8, 8, 9]


def test_nullable_and_boolean_dtypes_are_accepted() -> None:
    frame = pd.DataFrame({
        "ferritin": pd.array([7000, None], dtype="Int64"),
        "splenomegaly": pd.array([True, None], dtype="boolean"),
    })
    assert listed(hscore(frame)) == [50 + 23, 0]
    assert listed(hscore_missing(frame)) == [7, 9]


# ---------------------------------------------------------------------------------------------------
# Independent row-by-row reference: the vectorised code must agree with the tables read literally
# ---------------------------------------------------------------------------------------------------


def _is(x: float) -> bool:
    return not math.isnan(x)


def hscore_reference(r: dict) -> tuple[int, int]:
    points = missing = 0

    def sign(name: str) -> bool | None:
        v = r[name]
        return None if math.isnan(v) else v == 1

    imm = sign("immunosuppressed")
    missing += imm is None
    points += 18 if imm else 0
    t = r["temperature_c"]
    missing += not _is(t)
    points += 0 if not _is(t) or t < 38.4 else (33 if t <= 39.4 else 49)
    organs = [sign("hepatomegaly"), sign("splenomegaly")]
    missing += all(o is None for o in organs)
    points += {0: 0, 1: 23, 2: 38}[sum(bool(o) for o in organs)]
    cyto = [(r["hemoglobin"], 9.2), (r["wbc"], 5.0), (r["platelets"], 110)]
    missing += all(not _is(v) for v, _ in cyto)
    points += {0: 0, 1: 0, 2: 24, 3: 34}[sum(_is(v) and v <= lim for v, lim in cyto)]
    f = r["ferritin"]
    missing += not _is(f)
    points += 0 if not _is(f) or f < 2000 else (35 if f <= 6000 else 50)
    tg = r["triglycerides"]
    missing += not _is(tg)
    points += 0 if not _is(tg) or tg < 132.855 else (44 if tg <= 354.28 else 64)
    fib = r["fibrinogen"]
    missing += not _is(fib)
    points += 30 if _is(fib) and fib <= 250 else 0
    ast = r["ast"]
    missing += not _is(ast)
    points += 19 if _is(ast) and ast >= 30 else 0
    bm = sign("bone_marrow_hemophagocytosis")
    missing += bm is None
    points += 35 if bm else 0
    return points, missing


def dic_reference(r: dict) -> int:
    p, d, inr, fib = r["platelets"], r["d_dimer"], r["inr"], r["fibrinogen"]
    points = 0
    if _is(p):
        points += 2 if p < 50 else (1 if p < 100 else 0)
    if _is(d):
        points += 0 if d < 1.0 else (2 if d <= 2.0 else 3)
    if _is(inr):
        seconds = (inr - 1) * 12
        points += 0 if seconds < 3 else (1 if seconds < 6 else 2)
    if _is(fib):
        points += 1 if fib < 100 else 0
    return points


@pytest.fixture(scope="module")
def random_cohort() -> pd.DataFrame:
    rng = np.random.default_rng(2014)
    n = 3000
    spans = {
        "temperature_c": (36, 41), "hemoglobin": (5, 14), "wbc": (0.5, 15), "platelets": (5, 400),
        "ferritin": (100, 12000), "triglycerides": (50, 600), "fibrinogen": (50, 600), "ast": (10, 300),
        "d_dimer": (0.1, 5), "inr": (0.9, 2.5),
    }
    data = {name: rng.uniform(lo, hi, n).round(2) for name, (lo, hi) in spans.items()}
    for sign in ("immunosuppressed", "hepatomegaly", "splenomegaly", "bone_marrow_hemophagocytosis"):
        data[sign] = rng.integers(0, 2, n).astype(float)
    frame = pd.DataFrame(data)
    return frame.mask(rng.random(frame.shape) < 0.2)  # 20 % missing everywhere


def test_hscore_matches_row_by_row_reference(random_cohort: pd.DataFrame) -> None:
    expected = [hscore_reference(r) for r in random_cohort.to_dict("records")]
    assert listed(hscore(random_cohort)) == [p for p, _ in expected]
    assert listed(hscore_missing(random_cohort)) == [m for _, m in expected]


def test_dic_isth_matches_row_by_row_reference(random_cohort: pd.DataFrame) -> None:
    expected = [dic_reference(r) for r in random_cohort.to_dict("records")]
    assert listed(dic_isth(random_cohort)) == expected


# ---------------------------------------------------------------------------------------------------
# add_scores and the registry
# ---------------------------------------------------------------------------------------------------


def test_add_scores_keeps_rows_and_inputs_unchanged(random_cohort: pd.DataFrame) -> None:
    frame = random_cohort.assign(patient_id=[f"p{i}" for i in range(len(random_cohort))])
    frame.index = pd.Index(np.arange(len(frame))[::-1] * 10)  # non-default index
    before = frame.copy(deep=True)
    out = add_scores(frame)
    pd.testing.assert_frame_equal(frame, before)  # input untouched
    pd.testing.assert_frame_equal(out[list(frame.columns)], before)  # rows, order, values kept
    assert list(out.columns) == list(frame.columns) + list(SCORES)
    assert out is not frame
    pd.testing.assert_series_equal(out["hscore"], hscore(frame), check_names=True)


def test_add_scores_with_duplicated_index() -> None:
    frame = pd.DataFrame({"ferritin": [7000, 100, 5000]}, index=[1, 1, 2])
    out = add_scores(frame)
    assert len(out) == 3
    assert listed(out["hscore"]) == [50, 0, 35]
    assert listed(out["mals_ferritin"]) == [1, 0, 1]


def test_every_score_is_named_aligned_and_numeric() -> None:
    frame = pd.DataFrame({"ferritin": [3000.0, NAN], "esr": [10.0, 20.0]}, index=["x", "y"])
    for name, function in SCORES.items():
        result = function(frame)
        assert result.name == name
        assert list(result.index) == ["x", "y"]
        assert pd.api.types.is_numeric_dtype(result), name


def test_empty_frame() -> None:
    out = add_scores(pd.DataFrame({"ferritin": pd.Series([], dtype=float)}))
    assert len(out) == 0
    assert set(SCORES) <= set(out.columns)
