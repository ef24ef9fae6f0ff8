"""Published clinical scores for MAS / secondary HLH, the baselines masml's models must beat.

A learned model is only worth shipping if it does better than the rules clinicians already use, and
that comparison is only fair if each rule is the published one. So every threshold below is a named
constant next to its citation (clinical-reference.md §1-§8 holds the checked numbers and their
confidence tags), and every choice the literature leaves open is marked ``Assumption:``.

All inputs are in the canonical units of :mod:`masml.schema` (ferritin ng/mL, counts 10^9/L,
haemoglobin g/dL, fibrinogen and triglycerides mg/dL, D-dimer mg/L FEU, ...). Published thresholds
given in other units (g/L, mmol/L) are converted once, here, with the factor cited.

Missing-input rule
------------------
At presentation many inputs are simply not measured (sCD25, NK activity, a marrow aspirate), and a
score has to give a number for every patient, the way a bedside calculator does. So:

* an item whose input is missing (NaN, or the column is absent from the frame altogether) scores no
  points / is "not met", and is counted in the companion ``<score>_missing`` column, so that a low
  score can be told apart from a score that could not be assessed;
* an item built from several components (HScore cytopenias and organomegaly, HLH-2004 cytopenias and
  triglycerides/fibrinogen, the HBD and DIC parts of HBD+DIC) is scored from the components that
  are available, and counts as missing only when ALL of its components are missing; this is how a
  clinician fills a calculator with the results at hand;
* an absent column is treated as missing in every row, never as an error, so the scores run on any
  subset of the schema.

The Ferritin:ESR ratio is a ratio, not a points score: it stays NaN when it cannot be computed. The
MS score is a weighted sum, so a missing term contributes 0; because 0 is not neutral for its negative
terms, ``ms_score_met`` is only claimed when those terms are recorded (see its docstring).

Every function takes the whole frame and returns a Series aligned to its index and named after the
function, computed column-wise with numpy (the scores run on 100,000-row cohorts). ``add_scores``
adds every one of them as a column; it backs ``masml score``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

__all__ = [
    "SCORES",
    "add_scores",
    "dic_isth",
    "dic_isth_missing",
    "dic_isth_overt",
    "ferritin_esr_ratio",
    "ferritin_esr_ratio_met",
    "ferritin_esr_ratio_missing",
    "hbd_dic",
    "hbd_dic_missing",
    "hlh2004",
    "hlh2004_met",
    "hlh2004_missing",
    "hscore",
    "hscore_met",
    "hscore_missing",
    "hscore_probability",
    "hscore_probability_from_score",
    "mals_ferritin",
    "mals_ferritin_missing",
    "mas2016",
    "mas2016_missing",
    "ms_score",
    "ms_score_met",
    "ms_score_missing",
]

# Rounding applied before comparing a derived quantity (a unit conversion, a weighted sum) with a
# published cut-off. Without it, a value that sits exactly on an edge by arithmetic (1.5 mmol/L
# entered as 1.5 x 88.57 mg/dL, a platelet term of -0.003 x 700) can fall on the wrong side through
# binary floating point. Nine decimals is far below any clinically meaningful difference.
_EDGE_DECIMALS = 9

# ---------------------------------------------------------------------------------------------------
# Unit conversions
# ---------------------------------------------------------------------------------------------------

# Triglycerides: 1 mmol/L = 88.57 mg/dL, from the molar mass of triolein (885.7 g/mol, the reference
# triglyceride used by clinical laboratories): 885.7 mg/mmol / 10 dL/L. Hence HScore's 1.5 and
# 4 mmol/L edges are 132.855 and 354.28 mg/dL.
TG_MG_DL_PER_MMOL_L = 88.57
# Fibrinogen: 1 g/L = 100 mg/dL (1000 mg / 10 dL); exact.
FIBRINOGEN_MG_DL_PER_G_L = 100.0

# ---------------------------------------------------------------------------------------------------
# HScore: Fardet L et al., Arthritis Rheumatol 2014;66(9):2613-2620, DOI 10.1002/art.38690.
# Points: the paper's HScore points table (clinical-reference §1 "Points table" [V]).
# Probabilities: Fardet Table 3, as reproduced in Case Rep Rheumatol 2017:5304180 Table 3 (§1 [V]).
# ---------------------------------------------------------------------------------------------------
HSCORE_IMMUNOSUPPRESSION_POINTS = 18  # known underlying immunosuppression: no 0 / yes 18
HSCORE_TEMP_C = (38.4, 39.4)  # <38.4 / 38.4-39.4 (both edges inclusive) / >39.4 degC
HSCORE_TEMP_POINTS = (0, 33, 49)
HSCORE_ORGANOMEGALY_POINTS = (0, 23, 38)  # none / hepatomegaly or splenomegaly / both
HSCORE_HB_G_DL = 9.2  # cytopenia lineage when Hb <= 9.2 g/dL
HSCORE_WBC = 5.0  # ... WBC <= 5.0 x10^9/L
HSCORE_PLATELETS = 110.0  # ... platelets <= 110 x10^9/L
HSCORE_CYTOPENIA_POINTS = (0, 24, 34)  # 0-1 lineage / 2 lineages / 3 lineages
HSCORE_FERRITIN = (2000.0, 6000.0)  # <2000 / 2000-6000 (inclusive) / >6000 ng/mL
HSCORE_FERRITIN_POINTS = (0, 35, 50)
HSCORE_TG_MMOL_L = (1.5, 4.0)  # <1.5 / 1.5-4 (inclusive) / >4 mmol/L = 132.855 / 354.28 mg/dL
HSCORE_TG_POINTS = (0, 44, 64)
HSCORE_FIBRINOGEN_MG_DL = 2.5 * FIBRINOGEN_MG_DL_PER_G_L  # <= 2.5 g/L = 250 mg/dL -> 30
HSCORE_FIBRINOGEN_POINTS = 30
HSCORE_AST = 30.0  # AST >= 30 IU/L -> 19
HSCORE_AST_POINTS = 19
HSCORE_MARROW_POINTS = 35  # haemophagocytosis on bone-marrow aspirate
HSCORE_ITEMS = 9
HSCORE_MAX = 337
# Fardet Table 3 knots: score -> P(reactive HPS). Assumption: the table's "<1 %" at <=90 is read as
# 0.5 % and ">99 %" at >=250 as 99.5 %; probabilities are interpolated linearly between the 10-point
# knots and held constant outside [90, 250].
HSCORE_PROBABILITY_KNOTS = tuple(range(90, 251, 10))  # 90, 100, ..., 240, 250
HSCORE_PROBABILITY_VALUES = (
    0.005, 0.01, 0.03, 0.05, 0.09, 0.16, 0.25, 0.40, 0.54, 0.70, 0.80, 0.88, 0.93, 0.96, 0.98, 0.99, 0.995,
)
HSCORE_CUTOFF = 169  # Fardet 2014: sensitivity 93 %, specificity 86 % (§1 "Recommended cut-off" [V])
HSCORE_CUTOFF_ICU = 168  # Knaak C et al., Crit Care 2020;24:244: ICU adults, sens 100 %, spec 94.1 % [V]

# ---------------------------------------------------------------------------------------------------
# HLH-2004: Henter JI et al., Pediatr Blood Cancer 2007;48:124-131, DOI 10.1002/pbc.21039, Table 2
# (clinical-reference §2 [V]). The original's ">=" / "<=" are followed, not the ">" of some copies.
# ---------------------------------------------------------------------------------------------------
HLH2004_FEVER_C = 38.5  # fever >= 38.5 degC
HLH2004_HB_G_DL = 9.0  # Hb < 90 g/L
HLH2004_HB_INFANT_G_DL = 10.0  # Hb < 100 g/L in infants < 4 weeks
# Assumption: "infants < 4 weeks" is age_years < 28 / 365.25 (the schema carries age in years).
HLH2004_INFANT_AGE_YEARS = 28 / 365.25
HLH2004_PLATELETS = 100.0  # platelets < 100 x10^9/L
HLH2004_NEUTROPHILS = 1.0  # neutrophils < 1.0 x10^9/L
HLH2004_CYTOPENIA_LINEAGES = 2  # cytopenias in >= 2 of 3 lineages
HLH2004_TG_MG_DL = 265.0  # fasting TG >= 3.0 mmol/L, given as >= 265 mg/dL in the table
HLH2004_FIBRINOGEN_MG_DL = 1.5 * FIBRINOGEN_MG_DL_PER_G_L  # fibrinogen <= 1.5 g/L = 150 mg/dL
HLH2004_FERRITIN = 500.0  # ferritin >= 500 ug/L (= ng/mL)
HLH2004_SCD25 = 2400.0  # soluble CD25 >= 2400 U/mL
HLH2004_CRITERIA = 8
HLH2004_CUTOFF = 5  # >= 5 of 8 criteria
HLH2004_CUTOFF_ICU = 4  # Knaak 2020: >= 4 of 8 in ICU adults, sens 95.0 %, spec 93.6 % [V]

# ---------------------------------------------------------------------------------------------------
# 2016 EULAR/ACR/PRINTO classification criteria for MAS in sJIA: Ravelli A et al., Arthritis Rheumatol
# 2016;68(3):566-576, DOI 10.1002/art.39332 (also Ann Rheum Dis 2016;75:481-489, DOI
# 10.1136/annrheumdis-2015-208982); the final criteria set as stated in the abstract (§3 [V]).
# ---------------------------------------------------------------------------------------------------
# Assumption: "febrile" is not given a temperature in the criteria; we use the usual fever threshold
# temperature_c >= 38.0 degC.
MAS2016_FEVER_C = 38.0
MAS2016_FERRITIN = 684.0  # ferritin > 684 ng/mL (required)
MAS2016_PLATELETS = 181.0  # platelets <= 181 x10^9/L
MAS2016_AST = 48.0  # AST > 48 U/L
MAS2016_TG_MG_DL = 156.0  # triglycerides > 156 mg/dL
MAS2016_FIBRINOGEN_MG_DL = 360.0  # fibrinogen <= 360 mg/dL
MAS2016_MIN_LABS = 2  # any 2 of the 4 laboratory criteria
MAS2016_ITEMS = 6  # fever, ferritin, and the 4 laboratory criteria

# ---------------------------------------------------------------------------------------------------
# MS score: Minoia F et al., Ann Rheum Dis 2019;78(10):1357-1362, DOI 10.1136/annrheumdis-2019-215211,
# Table 4 (Bayesian-model-averaged coefficients; no intercept, no probability transform; §4 [V]).
# ---------------------------------------------------------------------------------------------------
MS_SCORE_COEFFICIENTS: dict[str, float] = {
    "cns_dysfunction": 2.44,  # CNS involvement, 1/0
    "hemorrhage": 1.54,  # haemorrhagic manifestations, 1/0
    "active_arthritis": -1.30,  # active arthritis, 1/0
    "platelets": -0.003,  # per 10^9/L
    "ldh": 0.001,  # per U/L
    "fibrinogen": -0.004,  # per mg/dL
    "ferritin": 0.0001,  # per ng/mL
}
MS_SCORE_CUTOFF = -2.1  # MAS when MS >= -2.1 (sensitivity 0.85, specificity 0.95)
# Terms whose absence (scored 0) can only inflate the score; see ms_score_met.
MS_SCORE_NEGATIVE_TERMS: tuple[str, ...] = tuple(c for c, b in MS_SCORE_COEFFICIENTS.items() if b < 0)

# ---------------------------------------------------------------------------------------------------
# Ferritin:ESR ratio: Eloseily EMA et al., ACR Open Rheumatol 2019;1(6):345-349, DOI 10.1002/acr2.11048
# (Youden-optimal cut-off for sJIA-MAS vs active sJIA: sensitivity 82 %, specificity 78 %; §5 [V]).
# ---------------------------------------------------------------------------------------------------
FERRITIN_ESR_CUTOFF = 21.5  # ferritin (ng/mL) / ESR (mm/h) >= 21.5

# ---------------------------------------------------------------------------------------------------
# ISTH overt DIC: Taylor FB Jr et al., Thromb Haemost 2001;86(5):1327-1330 (DOI 10.1055/s-0037-1616068,
# from the journal index, not in clinical-reference), scoring algorithm table (§6 [V]).
# ---------------------------------------------------------------------------------------------------
DIC_PLATELETS = (50.0, 100.0)  # >= 100 -> 0; 50 to < 100 -> 1; < 50 -> 2 (x10^9/L)
# The "moderate / strong increase" of the fibrin marker is left to each laboratory by Taylor 2001.
# Assumption: upper limit of normal for D-dimer 0.5 mg/L FEU, and the mapping of [V2, PMC8607173]:
# < 2 x ULN -> 0, 2-4 x ULN -> 2, > 4 x ULN -> 3, i.e. < 1.0 / 1.0-2.0 / > 2.0 mg/L FEU. Edges: exactly
# 2 x ULN and exactly 4 x ULN both belong to the middle band ("2-4 x ULN" read as inclusive).
DIC_D_DIMER_ULN = 0.5
DIC_D_DIMER = (2 * DIC_D_DIMER_ULN, 4 * DIC_D_DIMER_ULN)
DIC_D_DIMER_POINTS = (0, 2, 3)  # original / ASH scoring (not the 0/1/2 of one secondary table)
# Prolonged PT is scored in seconds above normal: < 3 s -> 0; 3 to < 6 s -> 1; >= 6 s -> 2. The schema
# has the INR only. Assumption: prolongation ~ (INR - 1) x 12 s with a normal PT of 12 s, so the edges
# are INR 1.25 (3 s) and 1.5 (6 s).
DIC_NORMAL_PT_S = 12.0
DIC_INR = (1 + 3 / DIC_NORMAL_PT_S, 1 + 6 / DIC_NORMAL_PT_S)
DIC_FIBRINOGEN_MG_DL = 1.0 * FIBRINOGEN_MG_DL_PER_G_L  # fibrinogen < 1.0 g/L = 100 mg/dL -> 1
DIC_ITEMS = 4
DIC_OVERT = 5  # total >= 5 is compatible with overt DIC

# ---------------------------------------------------------------------------------------------------
# HBD + DIC ("MAS features" in sepsis): Shakoory B et al., Crit Care Med 2016;44(2):275-281,
# DOI 10.1097/CCM.0000000000001402 (§7). The paper took its definitions of hepatobiliary dysfunction
# and DIC from the original anakinra sepsis trial; they are NOT verified (clinical-reference §7 [M]),
# so what follows is an operational definition, not the paper's.
# Assumption (HBD): total bilirubin >= 2.0 mg/dL (the usual hyperbilirubinaemia / organ-dysfunction
# cut-off, 34 umol/L), OR ALT >= 80 U/L, OR AST >= 80 U/L (2 x an upper limit of normal of 40 U/L;
# either transaminase, because AST-predominant rises are typical of MAS).
# Assumption (DIC): ISTH overt DIC (dic_isth >= 5) OR (platelets < 100 x10^9/L AND INR >= 1.5): the
# union, because the trial-era definition was probably thrombocytopenia plus a prolonged PT, which
# the ISTH score without a D-dimer can rarely reach.
# ---------------------------------------------------------------------------------------------------
HBD_BILIRUBIN_MG_DL = 2.0
HBD_TRANSAMINASE_ULN = 40.0
HBD_TRANSAMINASE = 2 * HBD_TRANSAMINASE_ULN
HBD_DIC_PLATELETS = 100.0
HBD_DIC_INR = 1.5
HBD_DIC_ITEMS = 2  # the HBD part and the DIC part

# ---------------------------------------------------------------------------------------------------
# MALS by ferritin: Kyriazopoulou E et al., BMC Med 2017;15:172, DOI 10.1186/s12916-017-0930-5 (28-day
# mortality ~66 % above it), and the PROVIDE trial's MALS definition, Leventogiannis K et al., Cell Rep
# Med 2022;3(11):100817, DOI 10.1016/j.xcrm.2022.100817 (§8 [V]).
# ---------------------------------------------------------------------------------------------------
MALS_FERRITIN = 4420.0  # ferritin > 4420 ng/mL


# ---------------------------------------------------------------------------------------------------
# Column access
# ---------------------------------------------------------------------------------------------------


def _num(df: pd.DataFrame, name: str) -> np.ndarray:
    """Float view of a column, NaN where missing; an absent column is all-NaN rather than a KeyError.

    Nullable, boolean and Arrow-backed dtypes all come out as plain float64, and a stray non-numeric
    entry becomes NaN (missing) instead of breaking a whole cohort's scores.
    """
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _sign(df: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(present, missing) for a 0/1 sign; only the value 1 counts as present."""
    values = _num(df, name)
    return values == 1, np.isnan(values)


def _bands(values: np.ndarray, edges: tuple[float, float], points: tuple[int, int, int]) -> np.ndarray:
    """Three-band item ``< lo / lo..hi (inclusive) / > hi``, the shape of most HScore rows."""
    lo, hi = edges
    return np.select([values > hi, values >= lo], [points[2], points[1]], default=points[0])


def _all_missing(*arrays: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce([np.isnan(a) for a in arrays])


def _any_missing(df: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """True where at least one of ``columns`` is missing."""
    return np.logical_or.reduce([np.isnan(_num(df, c)) for c in columns])


def _total(items: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of item points and count of missing items."""
    points = np.zeros(n, dtype="int64")
    missing = np.zeros(n, dtype="int64")
    for item_points, item_missing in items:
        points += np.asarray(item_points, dtype="int64")
        missing += item_missing
    return points, missing


def _series(values: np.ndarray, df: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series(values, index=df.index, name=name)


def _flag(condition: np.ndarray, df: pd.DataFrame, name: str) -> pd.Series:
    return _series(np.asarray(condition).astype("int64"), df, name)


# ---------------------------------------------------------------------------------------------------
# HScore
# ---------------------------------------------------------------------------------------------------


def _hscore_items(df: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    immunosuppressed, immunosuppressed_na = _sign(df, "immunosuppressed")
    temperature = _num(df, "temperature_c")
    hepatomegaly, hepatomegaly_na = _sign(df, "hepatomegaly")
    splenomegaly, splenomegaly_na = _sign(df, "splenomegaly")
    organs = hepatomegaly.astype("int64") + splenomegaly
    hemoglobin, wbc, platelets = _num(df, "hemoglobin"), _num(df, "wbc"), _num(df, "platelets")
    lineages = (
        (hemoglobin <= HSCORE_HB_G_DL).astype("int64") + (wbc <= HSCORE_WBC) + (platelets <= HSCORE_PLATELETS)
    )
    ferritin = _num(df, "ferritin")
    triglycerides = _num(df, "triglycerides")
    tg_mmol = np.round(triglycerides / TG_MG_DL_PER_MMOL_L, _EDGE_DECIMALS)
    fibrinogen = _num(df, "fibrinogen")
    ast = _num(df, "ast")
    marrow, marrow_na = _sign(df, "bone_marrow_hemophagocytosis")
    return [
        (np.where(immunosuppressed, HSCORE_IMMUNOSUPPRESSION_POINTS, 0), immunosuppressed_na),
        (_bands(temperature, HSCORE_TEMP_C, HSCORE_TEMP_POINTS), np.isnan(temperature)),
        (np.asarray(HSCORE_ORGANOMEGALY_POINTS)[organs], hepatomegaly_na & splenomegaly_na),
        (
            np.asarray(HSCORE_CYTOPENIA_POINTS)[np.maximum(lineages - 1, 0)],
            _all_missing(hemoglobin, wbc, platelets),
        ),
        (_bands(ferritin, HSCORE_FERRITIN, HSCORE_FERRITIN_POINTS), np.isnan(ferritin)),
        (_bands(tg_mmol, HSCORE_TG_MMOL_L, HSCORE_TG_POINTS), np.isnan(triglycerides)),
        (np.where(fibrinogen <= HSCORE_FIBRINOGEN_MG_DL, HSCORE_FIBRINOGEN_POINTS, 0), np.isnan(fibrinogen)),
        (np.where(ast >= HSCORE_AST, HSCORE_AST_POINTS, 0), np.isnan(ast)),
        (np.where(marrow, HSCORE_MARROW_POINTS, 0), marrow_na),
    ]


def hscore(df: pd.DataFrame) -> pd.Series:
    """HScore (0-337) for reactive haemophagocytic syndrome, the most used adult sHLH baseline.

    Source: Fardet 2014 (see the HScore constants). A partial cytopenia or organomegaly item is scored
    from the components present; a missing item scores 0 and is counted by :func:`hscore_missing`.
    """
    points, _ = _total(_hscore_items(df), len(df))
    return _series(points, df, "hscore")


def hscore_missing(df: pd.DataFrame) -> pd.Series:
    """Number of the 9 HScore items that could not be assessed, so that 0 points can be trusted."""
    _, missing = _total(_hscore_items(df), len(df))
    return _series(missing, df, "hscore_missing")


def hscore_met(df: pd.DataFrame) -> pd.Series:
    """1 where HScore >= 169, the paper's recommended cut-off (sens 93 %, spec 86 %)."""
    return _flag(hscore(df).to_numpy() >= HSCORE_CUTOFF, df, "hscore_met")


def hscore_probability_from_score(score: pd.Series | np.ndarray | float) -> pd.Series | np.ndarray | float:
    """Map HScore values to P(reactive HPS) with Fardet Table 3, linearly interpolated.

    The table, not the -4.3 + 0.03*score logistic of one calculator, because that formula contradicts
    the published table (it gives ~68 % at 169 where the table gives ~53 %). Accepts a Series (index and
    name kept), an array or a scalar.
    """
    values = np.interp(
        np.asarray(score, dtype="float64"), HSCORE_PROBABILITY_KNOTS, HSCORE_PROBABILITY_VALUES
    )
    if isinstance(score, pd.Series):
        return pd.Series(values, index=score.index, name=score.name)
    if np.ndim(values) == 0:
        return float(values)
    return values


def hscore_probability(df: pd.DataFrame) -> pd.Series:
    """P(reactive HPS) from the frame's HScore via Fardet Table 3.

    Takes the frame (like every other score, so it fits the ``SCORES`` registry); use
    :func:`hscore_probability_from_score` to convert scores you already have.
    """
    return _series(hscore_probability_from_score(hscore(df).to_numpy()), df, "hscore_probability")


# ---------------------------------------------------------------------------------------------------
# HLH-2004
# ---------------------------------------------------------------------------------------------------


def _hlh2004_items(df: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    temperature = _num(df, "temperature_c")
    splenomegaly, splenomegaly_na = _sign(df, "splenomegaly")
    hemoglobin, platelets = _num(df, "hemoglobin"), _num(df, "platelets")
    neutrophils = _num(df, "neutrophils")
    age = _num(df, "age_years")
    # Unknown age uses the general (non-infant) threshold.
    hb_limit = np.where(age < HLH2004_INFANT_AGE_YEARS, HLH2004_HB_INFANT_G_DL, HLH2004_HB_G_DL)
    lineages = (
        (hemoglobin < hb_limit).astype("int64")
        + (platelets < HLH2004_PLATELETS)
        + (neutrophils < HLH2004_NEUTROPHILS)
    )
    triglycerides, fibrinogen = _num(df, "triglycerides"), _num(df, "fibrinogen")
    # Assumption: criterion 5 accepts haemophagocytosis in marrow, spleen or lymph node; the schema only
    # records the marrow aspirate, so that is what is scored.
    marrow, marrow_na = _sign(df, "bone_marrow_hemophagocytosis")
    ferritin, scd25 = _num(df, "ferritin"), _num(df, "scd25")
    n = len(df)
    return [
        (temperature >= HLH2004_FEVER_C, np.isnan(temperature)),
        (splenomegaly, splenomegaly_na),
        (lineages >= HLH2004_CYTOPENIA_LINEAGES, _all_missing(hemoglobin, platelets, neutrophils)),
        (
            (triglycerides >= HLH2004_TG_MG_DL) | (fibrinogen <= HLH2004_FIBRINOGEN_MG_DL),
            _all_missing(triglycerides, fibrinogen),
        ),
        (marrow, marrow_na),
        # NK-cell activity is not in the schema: never met, always counted as missing.
        (np.zeros(n, dtype=bool), np.ones(n, dtype=bool)),
        (ferritin >= HLH2004_FERRITIN, np.isnan(ferritin)),
        (scd25 >= HLH2004_SCD25, np.isnan(scd25)),
    ]


def hlh2004(df: pd.DataFrame) -> pd.Series:
    """Number of the 8 HLH-2004 criteria met (0-8), the historical diagnostic standard for HLH.

    Source: Henter 2007 (see the HLH-2004 constants). The molecular-diagnosis route is not scored.
    NK activity is not in the schema, so at most 7 can be met here; missing criteria are unmet and
    counted by :func:`hlh2004_missing`, which is why the criteria lose sensitivity early in illness.
    """
    met, _ = _total(_hlh2004_items(df), len(df))
    return _series(met, df, "hlh2004")


def hlh2004_met(df: pd.DataFrame) -> pd.Series:
    """1 where at least 5 of the 8 HLH-2004 criteria are met (the diagnostic rule), else 0."""
    return _flag(hlh2004(df).to_numpy() >= HLH2004_CUTOFF, df, "hlh2004_met")


def hlh2004_missing(df: pd.DataFrame) -> pd.Series:
    """Number of the 8 criteria that could not be assessed (always >= 1: NK activity)."""
    _, missing = _total(_hlh2004_items(df), len(df))
    return _series(missing, df, "hlh2004_missing")


# ---------------------------------------------------------------------------------------------------
# 2016 EULAR/ACR/PRINTO criteria
# ---------------------------------------------------------------------------------------------------


def _mas2016_parts(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    temperature, ferritin = _num(df, "temperature_c"), _num(df, "ferritin")
    platelets, ast = _num(df, "platelets"), _num(df, "ast")
    triglycerides, fibrinogen = _num(df, "triglycerides"), _num(df, "fibrinogen")
    labs = (
        (platelets <= MAS2016_PLATELETS).astype("int64")
        + (ast > MAS2016_AST)
        + (triglycerides > MAS2016_TG_MG_DL)
        + (fibrinogen <= MAS2016_FIBRINOGEN_MG_DL)
    )
    classified = (temperature >= MAS2016_FEVER_C) & (ferritin > MAS2016_FERRITIN) & (labs >= MAS2016_MIN_LABS)
    inputs = (temperature, ferritin, platelets, ast, triglycerides, fibrinogen)
    missing = np.sum([np.isnan(a) for a in inputs], axis=0, dtype="int64")
    return classified, missing


def mas2016(df: pd.DataFrame) -> pd.Series:
    """1 where the 2016 EULAR/ACR/PRINTO classification criteria for MAS are met, else 0.

    The criteria were developed for febrile patients with known or suspected sJIA (and are used in
    AOSD); they are computed for every row so that cohorts can be compared, but are only meaningful
    for sJIA/AOSD rows. The caveat that the abnormalities must not be better explained by another
    condition cannot be checked from the data and is not applied. Source: Ravelli 2016.
    """
    classified, _ = _mas2016_parts(df)
    return _flag(classified, df, "mas2016")


def mas2016_missing(df: pd.DataFrame) -> pd.Series:
    """Number of the 6 inputs (fever, ferritin, 4 labs) missing; a missing one can only lower the result."""
    _, missing = _mas2016_parts(df)
    return _series(missing, df, "mas2016_missing")


# ---------------------------------------------------------------------------------------------------
# MS score
# ---------------------------------------------------------------------------------------------------


def ms_score(df: pd.DataFrame) -> pd.Series:
    """MS score (linear, roughly -8.4 to 41.8) separating sJIA-MAS from active sJIA without MAS.

    Source: Minoia 2019 Table 4. Applies to febrile patients with known or suspected sJIA/AOSD; computed
    for every row. A missing term contributes 0 and is counted by :func:`ms_score_missing`. Note that
    this is not neutral: a missing platelet count or fibrinogen (negative coefficients) leaves the score
    higher than a typical measured value would. The sum is rounded to 9 decimals so that a score on the
    cut-off by arithmetic is not moved off it by floating point.
    """
    total = np.zeros(len(df))
    for column, coefficient in MS_SCORE_COEFFICIENTS.items():
        values = _num(df, column)
        total += np.where(np.isnan(values), 0.0, coefficient * values)
    return _series(np.round(total, _EDGE_DECIMALS), df, "ms_score")


def ms_score_met(df: pd.DataFrame) -> pd.Series:
    """1 where MS score >= -2.1, the paper's cut-off for MAS (sens 0.85, spec 0.95), and the data show it.

    Scoring a missing term as 0 is harmless for the terms with positive coefficients (filling them in
    could only raise the score) but not for those with negative ones: without this guard a row with no
    data at all scores 0 >= -2.1 and would be flagged as MAS. Assumption: the flag is therefore 1 only
    where the score reaches the cut-off AND platelets, fibrinogen and active arthritis (the terms
    ``MS_SCORE_NEGATIVE_TERMS``) are all recorded; otherwise MAS cannot be claimed and, as for every
    other item that cannot be assessed, it is "not met".
    """
    negatives_known = ~_any_missing(df, MS_SCORE_NEGATIVE_TERMS)
    reaches = ms_score(df).to_numpy() >= MS_SCORE_CUTOFF
    return _flag(reaches & negatives_known, df, "ms_score_met")


def ms_score_missing(df: pd.DataFrame) -> pd.Series:
    """Number of the 7 MS-score terms whose input is missing."""
    missing = np.sum([np.isnan(_num(df, c)) for c in MS_SCORE_COEFFICIENTS], axis=0, dtype="int64")
    return _series(missing, df, "ms_score_missing")


# ---------------------------------------------------------------------------------------------------
# Ferritin:ESR ratio
# ---------------------------------------------------------------------------------------------------


def ferritin_esr_ratio(df: pd.DataFrame) -> pd.Series:
    """Ferritin (ng/mL) / ESR (mm/h); rises in MAS because ferritin climbs while fibrinogen use lowers ESR.

    Source: Eloseily 2019 (cut-off 21.5, ``FERRITIN_ESR_CUTOFF``). A ratio, not points: NaN when ferritin
    or ESR is missing, or when ESR is 0 (or negative, which validation rejects), where no finite ratio
    exists.
    """
    ferritin, esr = _num(df, "ferritin"), _num(df, "esr")
    safe_esr = np.where(esr > 0, esr, np.nan)
    return _series(ferritin / safe_esr, df, "ferritin_esr_ratio")


def ferritin_esr_ratio_met(df: pd.DataFrame) -> pd.Series:
    """1 where the ratio is >= 21.5; 0 otherwise, including where it cannot be computed (not met)."""
    ratio = ferritin_esr_ratio(df).to_numpy()
    return _flag(np.round(ratio, _EDGE_DECIMALS) >= FERRITIN_ESR_CUTOFF, df, "ferritin_esr_ratio_met")


def ferritin_esr_ratio_missing(df: pd.DataFrame) -> pd.Series:
    """1 where the ratio could not be computed (ferritin or ESR missing, or ESR 0)."""
    return _flag(np.isnan(ferritin_esr_ratio(df).to_numpy()), df, "ferritin_esr_ratio_missing")


# ---------------------------------------------------------------------------------------------------
# ISTH overt DIC
# ---------------------------------------------------------------------------------------------------


def _dic_isth_items(df: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    platelets, d_dimer = _num(df, "platelets"), _num(df, "d_dimer")
    inr, fibrinogen = _num(df, "inr"), _num(df, "fibrinogen")
    lo_plt, hi_plt = DIC_PLATELETS
    lo_inr, hi_inr = DIC_INR
    return [
        (np.select([platelets < lo_plt, platelets < hi_plt], [2, 1], default=0), np.isnan(platelets)),
        (_bands(d_dimer, DIC_D_DIMER, DIC_D_DIMER_POINTS), np.isnan(d_dimer)),
        (np.select([inr >= hi_inr, inr >= lo_inr], [2, 1], default=0), np.isnan(inr)),
        (np.where(fibrinogen < DIC_FIBRINOGEN_MG_DL, 1, 0), np.isnan(fibrinogen)),
    ]


def dic_isth(df: pd.DataFrame) -> pd.Series:
    """ISTH overt-DIC score (0-8); consumptive coagulopathy is a hallmark of MAS and of its sepsis mimic.

    Source: Taylor 2001. Valid only with an underlying disorder known to cause DIC; computed for every
    row. The D-dimer and PT items use the documented ULN / INR assumptions (see the DIC constants).
    """
    points, _ = _total(_dic_isth_items(df), len(df))
    return _series(points, df, "dic_isth")


def dic_isth_overt(df: pd.DataFrame) -> pd.Series:
    """1 where the ISTH score is >= 5 (compatible with overt DIC), else 0."""
    return _flag(dic_isth(df).to_numpy() >= DIC_OVERT, df, "dic_isth_overt")


def dic_isth_missing(df: pd.DataFrame) -> pd.Series:
    """Number of the 4 ISTH items (platelets, D-dimer, INR, fibrinogen) that could not be assessed."""
    _, missing = _total(_dic_isth_items(df), len(df))
    return _series(missing, df, "dic_isth_missing")


# ---------------------------------------------------------------------------------------------------
# HBD + DIC
# ---------------------------------------------------------------------------------------------------


def _hbd_dic_parts(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    bilirubin, alt, ast = _num(df, "bilirubin"), _num(df, "alt"), _num(df, "ast")
    hbd = (bilirubin >= HBD_BILIRUBIN_MG_DL) | (alt >= HBD_TRANSAMINASE) | (ast >= HBD_TRANSAMINASE)
    platelets, inr = _num(df, "platelets"), _num(df, "inr")
    dic = (dic_isth(df).to_numpy() >= DIC_OVERT) | ((platelets < HBD_DIC_PLATELETS) & (inr >= HBD_DIC_INR))
    hbd_missing = _all_missing(bilirubin, alt, ast)
    dic_missing = _all_missing(platelets, inr, _num(df, "d_dimer"), _num(df, "fibrinogen"))
    return hbd, dic, hbd_missing, dic_missing


def hbd_dic(df: pd.DataFrame) -> pd.Series:
    """1 where hepatobiliary dysfunction and DIC coexist, the sepsis subgroup in which anakinra helped.

    Source: Shakoory 2016 (28-day mortality 34.6 % on anakinra vs 64.7 % on placebo in this subgroup,
    a small post hoc analysis). The lab definitions are masml's operational assumptions, documented at
    the HBD + DIC constants, because the paper's own are unverified.
    """
    hbd, dic, _, _ = _hbd_dic_parts(df)
    return _flag(hbd & dic, df, "hbd_dic")


def hbd_dic_missing(df: pd.DataFrame) -> pd.Series:
    """Number of the 2 parts (HBD: bilirubin/ALT/AST; DIC: platelets/INR/D-dimer/fibrinogen) with no data."""
    _, _, hbd_missing, dic_missing = _hbd_dic_parts(df)
    return _series(hbd_missing.astype("int64") + dic_missing, df, "hbd_dic_missing")


# ---------------------------------------------------------------------------------------------------
# MALS by ferritin
# ---------------------------------------------------------------------------------------------------


def mals_ferritin(df: pd.DataFrame) -> pd.Series:
    """1 where ferritin > 4420 ng/mL: the sepsis MALS phenotype treated with anakinra in PROVIDE."""
    return _flag(_num(df, "ferritin") > MALS_FERRITIN, df, "mals_ferritin")


def mals_ferritin_missing(df: pd.DataFrame) -> pd.Series:
    """1 where ferritin is missing, so that a 0 flag can be told apart from an unmeasured ferritin."""
    return _flag(np.isnan(_num(df, "ferritin")), df, "mals_ferritin_missing")


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

# Output column -> function, in the order ``add_scores`` writes them: each score followed by its
# ``_met`` / ``_missing`` companions. Flat, so a caller can pick columns without knowing the families.
SCORES: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "hscore": hscore,
    "hscore_probability": hscore_probability,
    "hscore_met": hscore_met,
    "hscore_missing": hscore_missing,
    "hlh2004": hlh2004,
    "hlh2004_met": hlh2004_met,
    "hlh2004_missing": hlh2004_missing,
    "mas2016": mas2016,
    "mas2016_missing": mas2016_missing,
    "ms_score": ms_score,
    "ms_score_met": ms_score_met,
    "ms_score_missing": ms_score_missing,
    "ferritin_esr_ratio": ferritin_esr_ratio,
    "ferritin_esr_ratio_met": ferritin_esr_ratio_met,
    "ferritin_esr_ratio_missing": ferritin_esr_ratio_missing,
    "dic_isth": dic_isth,
    "dic_isth_overt": dic_isth_overt,
    "dic_isth_missing": dic_isth_missing,
    "hbd_dic": hbd_dic,
    "hbd_dic_missing": hbd_dic_missing,
    "mals_ferritin": mals_ferritin,
    "mals_ferritin_missing": mals_ferritin_missing,
}


def add_scores(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with every column of ``SCORES`` appended; the input frame is never modified.

    Rows, their order and index, and the input columns are kept as they are. A column of the input that
    already carries a score's name is overwritten in the copy, so re-scoring a scored file is idempotent.
    """
    out = df.copy()
    for name, function in SCORES.items():
        out[name] = function(df).to_numpy()
    return out
