"""The synthetic cohort: masml's embedded default data, with a known best possible answer.

No real patient data ships with masml, so every model is trained and judged on this simulator. It stands
in for real data, so its parameters come from ../shared/docs/clinical-reference.md (cited as "ref §N"),
and every number that is not published says ``Assumption``.

Why it is built this way (the ground truth must be exact, not estimated):

* **MAS onset.** Each patient has a latent class (MAS present or developing within 7 days, or a mimic:
  sepsis without MAS, sJIA/AOSD flare, lymphoma without HLH, ...). Given the class and the trigger, the
  labs are drawn from a multivariate *logit-normal*: a Gaussian vector ``u`` mapped to each lab by
  ``x = lo + (hi - lo) * sigmoid(u)``. Near the lower end this is the log-normal the reference proposes
  (ref "B. Laboratory generators": median and sigma_log kept), and the bounded support keeps every value
  inside the schema's plausibility range. Missingness is drawn per block of tests with a probability that
  depends on the class (informative, as in real data). Because the map from ``u`` to labs is the same for
  both classes, its Jacobian cancels in the likelihood ratio, and P(MAS | observed inputs) is computed
  *exactly* by Bayes' rule from Gaussian marginals of the observed coordinates. Entry into the cohort
  (ferritin >= 500 ng/mL, ref "A. Cohort structure") is a class-independent function of an always
  observed input, so it leaves that posterior unchanged.
* **ICU, treatment, death.** For MAS patients these are drawn from known logistic functions of the
  observed columns only (a term whose input is missing contributes nothing), so the true probability is
  the function itself: the Bayes-optimal answer given exactly what a model sees. Treatment with IL-1
  blockade is assigned by indication through observed columns only (no unmeasured confounding, by
  construction). Both potential 28-day outcomes are drawn with one shared uniform, so ``true_benefit`` is
  the individual risk difference P(death | untreated) - P(death | treated).

Ground truth is returned in a separate frame whose columns all start with ``true_``: validation refuses
them as model inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, logsumexp
from scipy.stats import beta

from masml import scores
from masml.schema import GROUND_TRUTH_PREFIX, INPUT_NAMES, LABEL_NAMES, TRIGGERS

# --------------------------------------------------------------------------------------------------
# Population: class prior and trigger mix
# --------------------------------------------------------------------------------------------------

# Assumption: the cohort is enriched for MAS (ref A.1: "oversample sHLH to 15-30 %"); the true
# prevalence among hyperferritinaemic inpatients is far lower (1.5 % in ICU, Lachmann 2020; ref §9).
# 0.27 before the ferritin entry criterion gives ~30 % after it (mimics are more often below 500).
P_MAS = 0.27
ENTRY_FERRITIN = 500.0  # ng/mL; ref A.1 entry population "ferritin >= 500 ng/mL"

# Trigger mix within MAS. Adults (1 - SJIA_SHARE_MAS) follow ref A.2 (infection 0.45 = EBV 0.30,
# CMV/other herpes 0.10, bacterial sepsis 0.40, Leishmania 0.03, fungal/other 0.17; malignancy 0.35, of
# which lymphoma 0.85; autoimmune 0.12 = AOSD 0.45 / SLE 0.35 / other 0.20; drug or idiopathic 0.08).
# Assumption: 12 % of the MAS cohort are children with sJIA (paediatric module, ref A.3); the
# fungal/other 0.17 share of infections is split fungal 0.09 / other viral 0.045 / COVID-19 0.035;
# drug/idiopathic 0.08 is split drug 0.03 / unknown 0.05.
SJIA_SHARE_MAS = 0.12
_ADULT_MAS_MIX = {
    "viral_ebv": 0.45 * 0.30,
    "viral_cmv": 0.45 * 0.10,
    "bacterial_sepsis": 0.45 * 0.40,
    "parasitic_leishmania": 0.45 * 0.03,
    "fungal": 0.45 * 0.09,
    "viral_other": 0.45 * 0.045,
    "covid19": 0.45 * 0.035,
    "lymphoma": 0.35 * 0.85,
    "other_malignancy": 0.35 * 0.15,
    "aosd": 0.12 * 0.45,
    "sle": 0.12 * 0.35,
    "other_autoimmune": 0.12 * 0.20,
    "drug": 0.03,
    "unknown": 0.05,
}
TRIGGER_MIX_MAS = {"sjia": SJIA_SHARE_MAS, **{k: v * (1 - SJIA_SHARE_MAS) for k, v in _ADULT_MAS_MIX.items()}}

# Assumption: mimics are the conditions ref A.4 lists (sepsis without MALS, sJIA/AOSD flare without MAS,
# lymphoma without HLH, other hyperferritinaemic inpatients); sepsis is the commonest cause of
# hyperferritinaemia without HLH (Lachmann 2020, ref §9 / A.4). Shares are assumptions.
TRIGGER_MIX_MIMIC = {
    "bacterial_sepsis": 0.35,
    "viral_ebv": 0.04,
    "viral_cmv": 0.03,
    "viral_other": 0.06,
    "covid19": 0.07,
    "sjia": 0.10,
    "aosd": 0.06,
    "sle": 0.05,
    "other_autoimmune": 0.03,
    "lymphoma": 0.08,
    "other_malignancy": 0.04,
    "parasitic_leishmania": 0.005,
    "fungal": 0.02,
    "drug": 0.02,
    "unknown": 0.045,
}

# Profiles share a covariance and most medians: autoinflammatory (sJIA/AOSD: high WBC, platelets, ESR in
# flares), sepsis-like, and other adult triggers.
PROFILE = {t: "adult" for t in TRIGGERS} | {
    "sjia": "autoinflammatory",
    "aosd": "autoinflammatory",
    "bacterial_sepsis": "sepsis",
    "fungal": "sepsis",
}
PROFILES = ("autoinflammatory", "sepsis", "adult")

# --------------------------------------------------------------------------------------------------
# Laboratory and vital-sign generators (ref "B. Laboratory generators")
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coord:
    """One Gaussian coordinate u and its lab: x = lo + (hi - lo) * sigmoid(u).

    ``spread`` is sigma on the log scale when ``linear`` is False (the reference's sigma_log) and an SD in
    the lab's own unit when True; both are turned into sigma_u by the map's local slope at the median.
    """

    name: str
    lo: float
    hi: float
    linear: bool = False


COORDS: tuple[Coord, ...] = (
    Coord("temperature_c", 34.0, 43.0, linear=True),  # Assumption: support 34-43 degC
    Coord("heart_rate", 30.0, 250.0),
    Coord("mean_arterial_pressure", 20.0, 180.0, linear=True),
    Coord("ferritin", 1.0, 2_000_000.0),
    Coord("platelets", 0.0, 1_500.0),
    Coord("wbc", 0.0, 200.0),
    Coord("neutrophil_fraction", 0.0, 1.0, linear=True),  # neutrophils = wbc * fraction (never > wbc)
    Coord("hemoglobin", 2.0, 22.0, linear=True),
    Coord("fibrinogen", 10.0, 1_500.0),
    Coord("triglycerides", 10.0, 5_000.0),
    Coord("ast", 1.0, 50_000.0),
    Coord("alt", 1.0, 50_000.0),
    Coord("ldh", 50.0, 100_000.0),
    Coord("d_dimer", 0.0, 80.0),  # Assumption: assays report up to ~80 mg/L FEU
    Coord("crp", 0.0, 700.0),
    Coord("esr", 0.0, 150.0),  # Westergren readings rarely exceed ~140 mm/h
    Coord("scd25", 50.0, 500_000.0),
    Coord("bilirubin", 0.05, 60.0),
    Coord("creatinine", 0.05, 25.0),
    Coord("albumin", 0.5, 6.5, linear=True),
    Coord("inr", 0.6, 15.0),
    Coord("sodium", 100.0, 180.0, linear=True),
    Coord("lactate", 0.1, 30.0),
    Coord("ferritin_prev", 1.0, 2_000_000.0),
    Coord("platelets_prev", 0.0, 1_500.0),
)
COORD_INDEX = {c.name: i for i, c in enumerate(COORDS)}
N_CURRENT = len(COORDS) - 2  # the last two coordinates are the trend values

# (median, spread) per class for the adult profile; ``_PROFILE_OVERRIDES`` and ``_TRIGGER_OVERRIDES``
# change single entries. Sources per row; "A" = assumption.
_ADULT = {
    #                     MAS                 mimic
    "temperature_c": ((39.5, 0.6), (38.8, 0.7)),  # A; fever in 96-98 % of MAS (ref B)
    "heart_rate": ((115, 0.15), (105, 0.15)),  # A
    "mean_arterial_pressure": ((72, 12), (78, 12)),  # A
    "ferritin": ((12_000, 1.2), (1_200, 1.0)),  # ref B: Birndt, Int J Hematol 2015, Lachmann; sigma A
    "platelets": ((40, 0.8), (115, 0.7)),  # ref B: ICU medians 30 vs 113
    "wbc": ((3.5, 0.6), (8.0, 0.5)),  # ref B (MAS 3.5); mimic A
    "neutrophil_fraction": ((0.70, 0.12), (0.70, 0.12)),  # A; gives ANC ~2.5 vs ~7.7 (ref B, S)
    "hemoglobin": ((8.5, 1.3), (10.5, 1.8)),  # ref B, A (anchored on HScore 9.2 / HLH-2004 9.0)
    "fibrinogen": ((180, 0.4), (450, 0.35)),  # ref B, A (anchored on cut-offs)
    "triglycerides": ((255, 0.4), (127, 0.5)),  # ref B: Int J Hematol 2015 medians; sigma A
    "ast": ((120, 0.8), (35, 0.6)),  # ref B, A
    "alt": ((90, 0.9), (30, 0.7)),  # A
    "ldh": ((1_100, 0.6), (350, 0.4)),  # ref B, A
    "d_dimer": ((8.0, 0.8), (3.0, 0.8)),  # ref B, A
    "crp": ((50, 1.0), (60, 1.0)),  # ref B (MAS 50); non-septic mimic A
    "esr": ((25, 0.6), (50, 0.5)),  # A; ESR falls in MAS as fibrinogen is consumed (ref §5 mechanism)
    "scd25": ((10_000, 0.8), (2_500, 0.7)),  # ref B, A
    "bilirubin": ((2.0, 0.8), (0.9, 0.7)),  # A
    "creatinine": ((1.2, 0.5), (1.0, 0.5)),  # A
    "albumin": ((2.7, 0.5), (3.1, 0.5)),  # A; low albumin prognostic (Birndt, ref §9)
    "inr": ((1.4, 0.2), (1.2, 0.15)),  # A
    "sodium": ((134, 5), (136, 4)),  # A
    "lactate": ((2.5, 0.5), (1.8, 0.5)),  # A
}
_PROFILE_OVERRIDES: dict[str, dict[str, tuple[tuple[float, float] | None, tuple[float, float] | None]]] = {
    "autoinflammatory": {
        "ferritin": ((3_500, 1.15), (1_120, 0.97)),  # ref B: Ruscitti 2018 (AOSD), sigma from IQR [D]
        "platelets": ((130, 0.5), (400, 0.35)),  # ref B: sJIA values A, anchored on the 181 cut-off
        "wbc": ((8.0, 0.5), (16.0, 0.4)),  # ref B: sJIA/AOSD flare 15-18; MAS value A
        "fibrinogen": ((200, 0.4), (550, 0.3)),  # ref B (active sJIA 550); MAS A
        "d_dimer": ((8.0, 0.8), (2.0, 0.8)),  # ref B (sJIA 2)
        "esr": ((40, 0.5), (70, 0.37)),  # ref §9 Ruscitti: active AOSD ESR ~70 (SD 26); MAS fall A
        "crp": ((50, 1.0), (50, 1.0)),  # ref B: AOSD CRP 51 / 45 (Ruscitti)
        "scd25": ((4_000, 0.8), (2_000, 0.7)),  # ref B: autoimmune MAS lowest (Liu 2023); mimic A
    },
    "sepsis": {
        "crp": ((120, 0.8), (150, 0.7)),  # ref B: bacterial sepsis 150 (A); MAS value A
        "wbc": ((5.0, 0.7), (12.0, 0.5)),  # ref B: sepsis 12; MAS A
        "lactate": ((3.0, 0.5), (2.5, 0.5)),  # A
        "mean_arterial_pressure": ((68, 12), (70, 12)),  # A
    },
}
_TRIGGER_OVERRIDES = {
    "sjia": {"creatinine": ((0.5, 0.4), (0.4, 0.4))},  # A: children
    "lymphoma": {"ldh": ((1_600, 0.6), (600, 0.6))},  # A
    "other_malignancy": {"ldh": ((1_400, 0.6), (500, 0.6))},  # A
    "sle": {"scd25": ((4_000, 0.8), (2_000, 0.7))},  # ref B: autoimmune lowest (Liu 2023)
    "other_autoimmune": {"scd25": ((4_000, 0.8), (2_000, 0.7))},
}

# Correlations between the current coordinates (ref B "Correlations", A where not listed there).
_CORRELATIONS = {
    ("ferritin", "ast"): 0.4,  # ref B
    ("ferritin", "ldh"): 0.5,  # ref B
    ("ferritin", "triglycerides"): 0.3,  # ref B
    ("platelets", "fibrinogen"): 0.4,  # ref B
    ("ferritin", "platelets"): -0.4,  # ref B
    ("fibrinogen", "esr"): 0.6,  # ref B
    ("ast", "alt"): 0.8,  # A; ALT then has to follow AST's links for the matrix to stay valid:
    ("alt", "ferritin"): 0.3,  # A
    ("alt", "ldh"): 0.4,  # A
    ("alt", "bilirubin"): 0.25,  # A
    ("ast", "ldh"): 0.5,  # A
    ("ast", "bilirubin"): 0.3,  # A
    ("d_dimer", "platelets"): -0.3,  # A
    ("d_dimer", "fibrinogen"): -0.2,  # A
    ("inr", "fibrinogen"): -0.3,  # A
    ("inr", "bilirubin"): 0.3,  # A
    ("crp", "albumin"): -0.3,  # A
    ("crp", "neutrophil_fraction"): 0.3,  # A
    ("wbc", "platelets"): 0.3,  # A
    ("hemoglobin", "platelets"): 0.2,  # A
    ("lactate", "mean_arterial_pressure"): -0.4,  # A
    ("heart_rate", "temperature_c"): 0.3,  # A
    ("heart_rate", "lactate"): 0.3,  # A
    ("creatinine", "lactate"): 0.3,  # A
    ("ferritin", "scd25"): 0.3,  # A
}

# Trends (ferritin_prev, platelets_prev 24-72 h earlier): u_prev = u_now - delta, delta ~ N(mean, sd).
# ref B "Dynamics": ferritin rises and platelets fall before MAS onset (Minoia 2014); suggested kinetics
# over 2-5 days log-ferritin +1.5, log-platelets -0.8 (A). Assumption: the snapshot sits part-way, so the
# MAS shift is +1.0 / -0.5 on the log scale; mimics move little.
TREND_DELTA = {
    "ferritin_prev": {"mas": (1.0, 0.5), "mimic": (0.1, 0.5)},
    "platelets_prev": {"mas": (-0.5, 0.35), "mimic": (-0.05, 0.3)},
}

# Missingness by block of tests: P(not measured | class, profile) (all Assumptions anchored on ref B
# "Missingness": sCD25 mostly missing, triglycerides and fibrinogen often not measured). Ferritin, the
# full blood count, liver and kidney chemistry, CRP and vital signs are always measured.
MISSING_BLOCKS: dict[str, tuple[str, ...]] = {
    "differential": ("neutrophil_fraction",),
    "ldh": ("ldh",),
    "coagulation": ("fibrinogen", "d_dimer", "inr"),
    "triglycerides": ("triglycerides",),
    "esr": ("esr",),
    "scd25": ("scd25",),
    "lactate": ("lactate",),
    "trend": ("ferritin_prev", "platelets_prev"),
}
#                          MAS: autoinfl sepsis adult   mimic: autoinfl sepsis adult
P_MISSING = {
    "differential": ((0.10, 0.10, 0.10), (0.10, 0.10, 0.10)),
    "ldh": ((0.05, 0.08, 0.05), (0.20, 0.25, 0.20)),
    "coagulation": ((0.15, 0.10, 0.15), (0.45, 0.30, 0.40)),
    "triglycerides": ((0.35, 0.50, 0.35), (0.65, 0.80, 0.70)),
    "esr": ((0.25, 0.70, 0.55), (0.20, 0.70, 0.50)),
    "scd25": ((0.75, 0.85, 0.70), (0.92, 0.97, 0.93)),
    "lactate": ((0.70, 0.15, 0.50), (0.80, 0.15, 0.60)),
    "trend": ((0.40, 0.45, 0.45), (0.40, 0.45, 0.45)),
}

# Clinical signs: P(sign | class, profile) (MAS, mimic) per profile.
SIGNS = {
    # ref §9 Minoia 2014 (sJIA-MAS 58 %), RMD Open 2016; adults 0.70 (Liu 70.8 %, China 72.9 %); mimic A
    "splenomegaly": {"autoinflammatory": (0.58, 0.45), "sepsis": (0.70, 0.30), "adult": (0.70, 0.35)},
    # ref §9: sJIA-MAS 70-75 % vs non-MAS 48.5 % (RMD Open); adults 24.7 % (China) ~0.30; mimic A
    "hepatomegaly": {"autoinflammatory": (0.72, 0.49), "sepsis": (0.30, 0.20), "adult": (0.30, 0.20)},
    # ref §9: sJIA-MAS 35 % (Minoia 2014) vs 24 % (RMD Open); adults A
    "cns_dysfunction": {"autoinflammatory": (0.35, 0.24), "sepsis": (0.25, 0.12), "adult": (0.25, 0.08)},
    # ref §9: sJIA-MAS 20 % (Minoia 2014) vs 12 % (RMD Open); adults A
    "hemorrhage": {"autoinflammatory": (0.20, 0.12), "sepsis": (0.20, 0.08), "adult": (0.18, 0.05)},
    # ref §9 RMD Open 2016: active arthritis 60.9 % vs 51.5 %; others A
    "active_arthritis": {"autoinflammatory": (0.61, 0.52), "sepsis": (0.02, 0.02), "adult": (0.05, 0.05)},
}
# SLE and other autoimmune disease sit in the adult profile but have arthritis more often (A).
ARTHRITIS_AUTOIMMUNE = (0.30, 0.35)

# Known prior immunosuppression: base rate per trigger (A), odds x1.8 in MAS (A; it carries 18 HScore
# points, Fardet 2014, ref §1).
IMMUNOSUPPRESSED_BASE = {t: 0.08 for t in TRIGGERS} | {
    "sle": 0.55,
    "other_autoimmune": 0.45,
    "aosd": 0.25,
    "sjia": 0.20,
    "lymphoma": 0.25,
    "other_malignancy": 0.35,
    "fungal": 0.60,
    "viral_cmv": 0.50,
}
IMMUNOSUPPRESSED_MAS_ODDS = 1.8

# Bone-marrow aspirate: done in 60 % of MAS vs 20 % of mimics (A; ref B: ~70 % of suspected cases, 78 % of
# sJIA-MAS); haemophagocytosis seen in 60 % of MAS aspirates (ref §9, Minoia 2014) and 40 % of mimics
# (ref B: 0.3-0.6, low specificity).
P_ASPIRATE = (0.60, 0.20)
P_HEMOPHAGOCYTOSIS = (0.60, 0.40)

# MAS is a trajectory, not a snapshot (ref B "Dynamics"; Minoia 2014: labs move > 50 % from the pre-MAS
# visit to onset), and the label counts MAS "present or developing within 7 days". Assumption: 55 % of
# MAS patients are overt at the snapshot; the rest are still developing, and everything about them that
# MAS changes (labs, trends, signs, the work-up) sits a fraction 0.35 of the way from a mimic of the same
# trigger to overt MAS. This is what keeps early detection hard, as it is at the bedside.
# Components: (name, weight within MAS, position s between mimic (0) and overt MAS (1)).
MAS_STAGES = (("overt", 0.55, 1.0), ("developing", 0.45, 0.35))
COMPONENT_S = np.array([0.0, *(s for _, _, s in MAS_STAGES)])  # component 0 is the mimic

# --------------------------------------------------------------------------------------------------
# Outcomes for MAS patients (ref "C. Outcome models")
# --------------------------------------------------------------------------------------------------

# Untreated 28-day mortality by trigger (intercepts are set so that the cohort's mean untreated risk
# matches these; see tests/test_cohort.py). ref C: sJIA-MAS 0.08, AOSD-MAS ~0.15, infection-associated
# adult sHLH 0.35, EBV-HLH 0.45, malignancy-associated 0.60, sepsis with ferritin > 4420 0.66 / HBD+DIC
# 0.65 (carried by the severity terms). Assumptions: SLE / other autoimmune 0.15, bacterial sepsis
# overall 0.45, Leishmania under antiparasitic treatment 0.12 (ref §10: 11/13 remission on L-AmB),
# fungal 0.50, drug 0.20, unknown 0.40.
MORTALITY_UNTREATED = {
    "sjia": 0.08,
    "aosd": 0.15,
    "sle": 0.15,
    "other_autoimmune": 0.15,
    "viral_ebv": 0.45,
    "viral_cmv": 0.35,
    "viral_other": 0.35,
    "covid19": 0.35,
    "bacterial_sepsis": 0.45,
    "parasitic_leishmania": 0.12,
    "fungal": 0.50,
    "lymphoma": 0.60,
    "other_malignancy": 0.60,
    "drug": 0.20,
    "unknown": 0.40,
}

# Hazard ratio of IL-1 blockade on 28-day death, applied as S_treated = S_untreated ** HR (ref C table).
HR_IL1 = {
    "sjia": 0.45,  # ref C: autoimmune/autoinflammatory 0.45 (0.3-0.7); magnitude A
    "aosd": 0.45,
    "sle": 0.60,  # ref C: "SLE weaker" -> A
    "other_autoimmune": 0.60,
    # ref C suggests 0.8 for EBV/CMV-HLH (A); weakened to 0.9 (A) because EBV-HLH usually needs
    # etoposide/rituximab and anakinra alone is probably insufficient (ref §10 [M]).
    "viral_ebv": 0.90,
    "viral_cmv": 0.90,
    "viral_other": 0.90,  # A
    "covid19": 0.80,  # A
    "bacterial_sepsis": 1.00,  # ref C: sepsis without MAS features 1.0 (negative parent trial)
    "parasitic_leishmania": 1.40,  # ref C: 1.3-1.5, harm via immunosuppression (Bode 2014) -> A
    "fungal": 1.30,  # A: opportunistic fungal deaths on anakinra (Phoenix series, ref §10)
    "lymphoma": 1.30,  # ref C: anakinra instead of chemotherapy 1.2-1.5 -> A
    "other_malignancy": 1.20,  # A
    "drug": 0.70,  # A
    "unknown": 0.80,  # A
}
# Sepsis with MAS features: HBD + DIC (Shakoory 2016, HR 0.28 shrunk for n = 43) or ferritin > 4420
# (PROVIDE 2022, ImmunoSep 2025) -> 0.5 (ref C).
HR_IL1_SEPSIS_MAS_FEATURES = 0.50


@dataclass
class Cohort:
    """A simulated cohort: model inputs + labels, and the ground truth kept apart."""

    data: pd.DataFrame  # patient_id, every schema input, the four labels
    truth: pd.DataFrame  # patient_id and the ``true_*`` columns
    seed: int
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Parameter assembly
# --------------------------------------------------------------------------------------------------


def _slope(c: Coord, x: float) -> float:
    """du/dx of u = logit((x - lo) / (hi - lo)) at x."""
    return 1.0 / (x - c.lo) + 1.0 / (c.hi - x)


def to_u(c: Coord, x: np.ndarray | float) -> np.ndarray:
    return np.log((np.asarray(x, dtype=float) - c.lo) / (c.hi - np.asarray(x, dtype=float)))


def from_u(c: Coord, u: np.ndarray) -> np.ndarray:
    return c.lo + (c.hi - c.lo) * expit(u)


def _median_spread(cls: int, trigger: str, name: str) -> tuple[float, float]:
    """(median, spread) of a current lab for class ``cls`` (1 = MAS) and a trigger."""
    pair = _ADULT[name]
    pair = _PROFILE_OVERRIDES.get(PROFILE[trigger], {}).get(name, pair)
    pair = _TRIGGER_OVERRIDES.get(trigger, {}).get(name, pair)
    return pair[0] if cls == 1 else pair[1]  # type: ignore[return-value]


def _sigma_u(c: Coord, median: float, spread: float) -> float:
    # spread is an SD in x for linear coordinates, a sigma of log(x) otherwise.
    return spread * _slope(c, median) * (1.0 if c.linear else median)


def _correlation() -> np.ndarray:
    r = np.eye(N_CURRENT)
    for (a, b), rho in _CORRELATIONS.items():
        i, j = COORD_INDEX[a], COORD_INDEX[b]
        r[i, j] = r[j, i] = rho
    if np.linalg.eigvalsh(r).min() <= 0.05:
        raise AssertionError("simulator correlation matrix is not safely positive definite")
    return r


_R = _correlation()


def _mean_cov(cls: int, trigger: str) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mean and covariance of all coordinates (current + trend) for a class and trigger."""
    cur = COORDS[:N_CURRENT]
    med_sd = [_median_spread(cls, trigger, c.name) for c in cur]
    mu = np.array([to_u(c, m) for c, (m, _) in zip(cur, med_sd, strict=True)], dtype=float)
    sd = np.array([_sigma_u(c, m, s) for c, (m, s) in zip(cur, med_sd, strict=True)])
    cov_cur = _R * np.outer(sd, sd)
    # Trend coordinates: u_prev = u_now - delta, delta independent of everything else.
    d = len(COORDS)
    a = np.zeros((d, N_CURRENT))
    a[:N_CURRENT] = np.eye(N_CURRENT)
    delta_mu, delta_var = np.zeros(d), np.zeros(d)
    klass = "mas" if cls == 1 else "mimic"
    for prev, base in (("ferritin_prev", "ferritin"), ("platelets_prev", "platelets")):
        k = COORD_INDEX[prev]
        a[k, COORD_INDEX[base]] = 1.0
        m, s = TREND_DELTA[prev][klass]
        delta_mu[k], delta_var[k] = m, s**2
    mean = a @ mu - delta_mu
    cov = a @ cov_cur @ a.T + np.diag(delta_var)
    return mean, cov


def _build_params() -> dict:
    """Gaussian mean, covariance and Cholesky factor per (component, trigger); MAS stages interpolate
    between the mimic's and overt MAS's parameters (a convex mix of covariances stays valid)."""
    d, n_t = len(COORDS), len(TRIGGERS)
    means = np.zeros((len(COMPONENT_S), n_t, d))
    covs = np.zeros((len(COMPONENT_S), n_t, d, d))
    for t_i, t in enumerate(TRIGGERS):
        (m0, c0), (m1, c1) = _mean_cov(0, t), _mean_cov(1, t)
        for k, s in enumerate(COMPONENT_S):
            means[k, t_i], covs[k, t_i] = m0 + s * (m1 - m0), c0 + s * (c1 - c0)
    mix = np.array([[TRIGGER_MIX_MIMIC[t] for t in TRIGGERS], [TRIGGER_MIX_MAS[t] for t in TRIGGERS]])
    if not np.allclose(mix.sum(axis=1), 1.0):
        raise AssertionError("trigger mixes must sum to 1")
    if not np.isclose(sum(w for _, w, _ in MAS_STAGES), 1.0):
        raise AssertionError("MAS stage weights must sum to 1")
    return {"means": means, "covs": covs, "chols": np.linalg.cholesky(covs), "mix": mix}


PARAMS = _build_params()
TRIGGER_INDEX = {t: i for i, t in enumerate(TRIGGERS)}
_PROFILE_OF_TRIGGER = np.array([PROFILES.index(PROFILE[t]) for t in TRIGGERS])


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _between(s: np.ndarray, p_mas: np.ndarray | float, p_mimic: np.ndarray | float) -> np.ndarray:
    """A probability a fraction s of the way from the mimic's to overt MAS's."""
    return p_mimic + s * (np.asarray(p_mas) - p_mimic)


def _sign_probs(sign: str, trig: np.ndarray, s: np.ndarray) -> np.ndarray:
    pairs = {t: SIGNS[sign][PROFILE[t]] for t in TRIGGERS}
    if sign == "active_arthritis":
        pairs |= {"sle": ARTHRITIS_AUTOIMMUNE, "other_autoimmune": ARTHRITIS_AUTOIMMUNE}
    p_mas = np.array([pairs[t][0] for t in TRIGGERS])[trig]
    p_mimic = np.array([pairs[t][1] for t in TRIGGERS])[trig]
    return _between(s, p_mas, p_mimic)


def _immuno_probs(trig: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Immunosuppression precedes the illness, so it depends on the class, not the stage."""
    base = np.array([IMMUNOSUPPRESSED_BASE[t] for t in TRIGGERS])[trig]
    odds = base / (1 - base) * np.where(cls == 1, IMMUNOSUPPRESSED_MAS_ODDS, 1.0)
    return odds / (1 + odds)


def _missing_probs(block: str, trig: np.ndarray, s: np.ndarray) -> np.ndarray:
    table = np.array(P_MISSING[block])  # (MAS, mimic) x profile
    prof = _PROFILE_OF_TRIGGER[trig]
    return _between(s, table[0][prof], table[1][prof])


# Columns of the per-patient uniform draws: one independent uniform per random decision, drawn up front
# so that adding a decision never shifts the others' streams.
U_AGE, U_SEX, U_IMMUNO, U_SIGNS, U_ASPIRATE, U_HEMO = 0, 1, 2, 3, 8, 9
U_MISSING = 10  # one per missingness block (8)
U_ICU, U_TREAT, U_DEATH = 18, 19, 20
N_UNIFORMS = 21


def _draw_latent(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Class, stage, trigger and the Gaussian coordinates, before entry selection."""
    cls = (rng.random(n) < P_MAS).astype(np.int8)
    stage_weights = np.array([w for _, w, _ in MAS_STAGES])
    comp = np.where(cls == 1, 1 + rng.choice(len(MAS_STAGES), size=n, p=stage_weights), 0)
    trig = np.empty(n, dtype=np.int64)
    for c in (0, 1):
        m = cls == c
        trig[m] = rng.choice(len(TRIGGERS), size=int(m.sum()), p=PARAMS["mix"][c])
    u = np.empty((n, len(COORDS)))
    z = rng.standard_normal((n, len(COORDS)))
    for k in range(len(COMPONENT_S)):
        for t_i in range(len(TRIGGERS)):
            m = (comp == k) & (trig == t_i)
            if m.any():
                u[m] = PARAMS["means"][k, t_i] + z[m] @ PARAMS["chols"][k, t_i].T
    return {"cls": cls, "comp": comp, "trig": trig, "u": u, "uniform": rng.random((n, N_UNIFORMS))}


def _to_frame(lat: dict[str, np.ndarray], ids: np.ndarray) -> pd.DataFrame:
    """Turn latent draws into schema columns (uniforms drawn up front keep the stream deterministic)."""
    cls, trig, u, uni = lat["cls"], lat["trig"], lat["u"], lat["uniform"]
    s = COMPONENT_S[lat["comp"]]
    n = len(cls)
    trig_names = np.asarray(TRIGGERS, dtype=object)[trig]
    is_sjia = trig == TRIGGER_INDEX["sjia"]
    # Age: children with sJIA 1-16 y (A, onset mostly in early childhood); adults 16-95 y with a mean
    # near 50 (Birndt 2020 median 50, range 17-87; ref §9). Independent of class given trigger (A).
    child = 1 + 15 * beta.ppf(uni[:, U_AGE], 1.6, 2.4)
    adult = 16 + 79 * beta.ppf(uni[:, U_AGE], 3.0, 3.8)
    age = np.where(is_sjia, child, adult)
    # Sex: adults 63.5 % male (Birndt 2020); SLE and AOSD mostly female, sJIA balanced (A).
    p_male = np.full(n, 0.635)
    for t, p in {"sle": 0.12, "aosd": 0.35, "other_autoimmune": 0.35, "sjia": 0.45}.items():
        p_male[trig == TRIGGER_INDEX[t]] = p
    sex = np.where(uni[:, U_SEX] < p_male, "M", "F")

    frame: dict[str, object] = {"patient_id": ids, "age_years": np.round(age, 1), "sex": sex}
    frame["trigger"] = trig_names
    frame["immunosuppressed"] = (uni[:, U_IMMUNO] < _immuno_probs(trig, cls)).astype(float)
    for k, sign in enumerate(SIGNS):
        frame[sign] = (uni[:, U_SIGNS + k] < _sign_probs(sign, trig, s)).astype(float)
    aspirate = uni[:, U_ASPIRATE] < _between(s, *P_ASPIRATE)
    hemo = (uni[:, U_HEMO] < _between(s, *P_HEMOPHAGOCYTOSIS)).astype(float)
    frame["bone_marrow_hemophagocytosis"] = np.where(aspirate, hemo, np.nan)

    x = np.column_stack([from_u(c, u[:, i]) for i, c in enumerate(COORDS)])
    for b, block in enumerate(MISSING_BLOCKS):
        miss = uni[:, U_MISSING + b] < _missing_probs(block, trig, s)
        for name in MISSING_BLOCKS[block]:
            x[miss, COORD_INDEX[name]] = np.nan
    for c in COORDS:
        if c.name == "neutrophil_fraction":
            continue
        frame[c.name] = x[:, COORD_INDEX[c.name]]
    frame["neutrophils"] = frame["wbc"] * x[:, COORD_INDEX["neutrophil_fraction"]]
    df = pd.DataFrame(frame)
    df["mas_onset"] = cls.astype(float)
    return df[["patient_id", *INPUT_NAMES, "mas_onset"]]


# --------------------------------------------------------------------------------------------------
# Ground truth for MAS onset: the exact posterior given the observed inputs
# --------------------------------------------------------------------------------------------------


def _bernoulli_ll(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.where(x == 1, np.log(p), np.log1p(-p))


def _coordinates(df: pd.DataFrame) -> np.ndarray:
    """The Gaussian coordinates of the observed labs (NaN where a lab is missing)."""
    u = np.empty((len(df), len(COORDS)))
    for i, c in enumerate(COORDS):
        if c.name == "neutrophil_fraction":
            x = df["neutrophils"].to_numpy(float) / df["wbc"].to_numpy(float)
        else:
            x = df[c.name].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            u[:, i] = to_u(c, x)
    return u


def _gaussian_ll(u: np.ndarray, trig: np.ndarray) -> np.ndarray:
    """log density of each row's observed coordinates under every component, shape (n, components).

    Rows are grouped by (missingness pattern, trigger): the marginal of a Gaussian over the observed
    coordinates is the Gaussian of the observed sub-vector and sub-matrix, so missing labs are integrated
    out exactly. The density is of the coordinates, not of the labs: the Jacobian of the map is the same
    for every component and cancels in the posterior.
    """
    observed = ~np.isnan(u)
    code = observed @ (1 << np.arange(u.shape[1], dtype=np.int64))
    key = code * len(TRIGGERS) + trig
    out = np.zeros((len(u), len(COMPONENT_S)))
    uniq, inverse = np.unique(key, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    for g, k in enumerate(uniq):
        rows = order[bounds[g] : bounds[g + 1]]
        t_i, obs = int(k % len(TRIGGERS)), observed[rows[0]]
        x = u[np.ix_(rows, np.flatnonzero(obs))]
        for comp in range(len(COMPONENT_S)):
            mean = PARAMS["means"][comp, t_i][obs]
            chol = np.linalg.cholesky(PARAMS["covs"][comp, t_i][np.ix_(obs, obs)])
            z = np.linalg.solve(chol, (x - mean).T)
            out[rows, comp] = -0.5 * np.sum(z * z, axis=0) - np.log(np.diag(chol)).sum()
    return out


def mas_posterior(df: pd.DataFrame) -> np.ndarray:
    """Exact P(MAS present or developing | the observed model inputs) for simulated patients.

    Computed from the inputs alone (no latent state), which is what makes it the Bayes-optimal ceiling
    for any onset model trained on these columns: the likelihood of everything observed under the mimic
    and under each MAS stage, mixed by the stage weights, then Bayes' rule with the trigger's prior. Age
    and sex are drawn independently of the class given the trigger, so they carry no evidence.
    """
    trig_f = df["trigger"].map(TRIGGER_INDEX).to_numpy(dtype=float)
    if np.isnan(trig_f).any():
        raise ValueError("mas_posterior needs triggers from the schema vocabulary")
    trig = trig_f.astype(np.int64)
    n = len(df)
    ll = _gaussian_ll(_coordinates(df), trig)
    hemo = df["bone_marrow_hemophagocytosis"].to_numpy(float)
    aspirate = ~np.isnan(hemo)
    for comp, s_val in enumerate(COMPONENT_S):
        s = np.full(n, s_val)
        for sign in SIGNS:
            ll[:, comp] += _bernoulli_ll(df[sign].to_numpy(), _sign_probs(sign, trig, s))
        ll[:, comp] += _bernoulli_ll(aspirate.astype(int), _between(s, *P_ASPIRATE))
        ll[:, comp] += np.where(aspirate, _bernoulli_ll(hemo, _between(s, *P_HEMOPHAGOCYTOSIS)), 0.0)
        for block, cols in MISSING_BLOCKS.items():
            first = "neutrophils" if cols[0] == "neutrophil_fraction" else cols[0]
            missing = df[first].isna().to_numpy().astype(int)
            ll[:, comp] += _bernoulli_ll(missing, _missing_probs(block, trig, s))
    immuno = df["immunosuppressed"].to_numpy()
    mix = PARAMS["mix"]
    log_mimic = np.log((1 - P_MAS) * mix[0][trig]) + ll[:, 0]
    log_mimic += _bernoulli_ll(immuno, _immuno_probs(trig, np.zeros(n, np.int8)))
    stage_w = np.log([w for _, w, _ in MAS_STAGES])
    log_mas = np.log(P_MAS * mix[1][trig]) + logsumexp(ll[:, 1:] + stage_w, axis=1)
    log_mas += _bernoulli_ll(immuno, _immuno_probs(trig, np.ones(n, np.int8)))
    return expit(log_mas - log_mimic)


# --------------------------------------------------------------------------------------------------
# Outcomes of MAS patients: known functions of the observed columns
# --------------------------------------------------------------------------------------------------


def _obs(df: pd.DataFrame, col: str) -> np.ndarray:
    return df[col].to_numpy(float)


def _term(values: np.ndarray, fn) -> np.ndarray:
    """A model term that contributes nothing when its input is missing (Assumption: an unmeasured lab
    carries no outcome information of its own)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isnan(values), 0.0, fn(values))


def _is(df: pd.DataFrame, *triggers: str) -> np.ndarray:
    return df["trigger"].isin(triggers).to_numpy()


def icu_probability(df: pd.DataFrame) -> np.ndarray:
    """P(ICU within 7 days | inputs) for a MAS patient.

    Baselines: ~1/3 of sJIA-MAS need ICU (Minoia 2014, ref §9), 0.45-0.6 of adult sHLH (ref C, A).
    Drivers (ref C, Birndt 2020): low platelets, CNS involvement, haemorrhage, organ failure (kidney,
    circulation, lactate), overt DIC (ISTH >= 5), high LDH, low albumin. Coefficients are Assumptions;
    the shock interaction (lactate > 4 with MAP < 65) gives the model a non-additive signal to find.
    """
    lactate, map_ = _obs(df, "lactate"), _obs(df, "mean_arterial_pressure")
    z = np.where(_is(df, "sjia", "aosd"), -0.05, -0.13)  # set so the cohort hits the baselines above
    z = z + 0.9 * _obs(df, "cns_dysfunction") + 0.6 * _obs(df, "hemorrhage")
    z = z + 0.6 * (scores.dic_isth(df).to_numpy() >= 5)
    z = z - 0.45 * _term(_obs(df, "platelets"), lambda v: np.clip(np.log(np.maximum(v, 1) / 40), -3, 3))
    z = z + 0.5 * _term(_obs(df, "ldh"), lambda v: np.log(v / 1100))
    z = z - 0.7 * _term(_obs(df, "albumin"), lambda v: v - 2.7)
    z = z + 0.6 * _term(_obs(df, "creatinine"), lambda v: np.log(v / 1.2))
    z = z + 0.4 * _term(lactate, lambda v: np.log(v / 2.5))
    z = z + 0.8 * ((lactate > 4) & (map_ < 65))
    z = z + 0.4 * _term(_obs(df, "bilirubin"), lambda v: np.log(v / 2.0))
    z = z + 0.012 * _term(_obs(df, "heart_rate"), lambda v: v - 115)
    z = z - 0.025 * _term(map_, lambda v: v - 72)
    z = z + 0.3 * (_obs(df, "age_years") >= 65)
    return expit(z)


def sepsis_with_mas_features(df: pd.DataFrame) -> np.ndarray:
    """Bacterial sepsis with HBD + DIC (Shakoory 2016) or ferritin > 4420 (PROVIDE 2022): the septic
    phenotype in which IL-1 blockade helped (ref §7-8)."""
    features = (scores.hbd_dic(df).to_numpy() == 1) | (scores.mals_ferritin(df).to_numpy() == 1)
    return _is(df, "bacterial_sepsis") & features


# Intercepts (logit) that make the cohort's mean untreated risk per trigger match MORTALITY_UNTREATED,
# found by `calibrate_mortality_intercepts()` on 400,000 simulated patients (checked in the tests).
MORTALITY_INTERCEPT = {
    "sjia": -2.84,
    "aosd": -2.13,
    "sle": -2.22,
    "other_autoimmune": -2.22,
    "viral_ebv": -0.56,
    "viral_cmv": -1.03,
    "viral_other": -1.04,
    "covid19": -1.03,
    "bacterial_sepsis": -1.38,
    "parasitic_leishmania": -2.60,
    "fungal": -0.50,
    "lymphoma": 0.00,
    "other_malignancy": 0.04,
    "drug": -1.89,
    "unknown": -0.80,
}


def _death_logit_without_intercept(df: pd.DataFrame) -> np.ndarray:
    """Severity terms of untreated 28-day death (ref §9-10; coefficients Assumptions): platelets < 20 and
    albumin < 2.0 g/dL (Birndt 2020), LDH >= 1000 and fibrinogen < 150 (adult HLH, China 2015), sCD25
    (Blood Adv 2023: the strongest prognostic factor), age, circulation, lactate, liver; in sepsis the
    MAS-like phenotype raises mortality to ~0.65 (Shakoory 2016, Kyriazopoulou 2017)."""
    age = _obs(df, "age_years")
    z = np.where(_is(df, "sjia"), 0.0, 0.02 * (age - 50))
    z = z + 0.8 * (_obs(df, "platelets") < 20) + 0.6 * (_obs(df, "albumin") < 2.0)
    z = z + 0.5 * (_obs(df, "ldh") >= 1000) + 0.5 * (_obs(df, "fibrinogen") < 150)
    z = z + 0.5 * _obs(df, "cns_dysfunction")
    z = z + 0.35 * _term(_obs(df, "lactate"), lambda v: np.log(v / 2.5))
    z = z - 0.02 * _term(_obs(df, "mean_arterial_pressure"), lambda v: v - 72)
    z = z + 0.3 * _term(_obs(df, "bilirubin"), lambda v: np.log(v / 2.0))
    z = z + 0.3 * _term(_obs(df, "scd25"), lambda v: np.log(v / 10_000))
    z = z + 0.9 * sepsis_with_mas_features(df)
    return z


def death_risk_untreated(df: pd.DataFrame) -> np.ndarray:
    intercept = df["trigger"].map(MORTALITY_INTERCEPT).to_numpy(float)
    return expit(intercept + _death_logit_without_intercept(df))


def il1_hazard_ratio(df: pd.DataFrame) -> np.ndarray:
    hr = df["trigger"].map(HR_IL1).to_numpy(float)
    return np.where(sepsis_with_mas_features(df), HR_IL1_SEPSIS_MAS_FEATURES, hr)


def death_risk_treated(df: pd.DataFrame) -> np.ndarray:
    """Proportional hazards over 28 days: S_treated = S_untreated ** HR (ref C: HR applied
    multiplicatively). Timing is not simulated: treatment means 'within 48 h' (schema)."""
    return 1.0 - (1.0 - death_risk_untreated(df)) ** il1_hazard_ratio(df)


def il1_propensity(df: pd.DataFrame) -> np.ndarray:
    """P(IL-1 blockade within 48 h | inputs): confounding by indication through observed columns only.

    Assumptions shaped by ref §10: rheumatologists reach for anakinra in sJIA/AOSD MAS; lymphoma gets
    chemotherapy; suspected infection makes clinicians wary; sicker patients (CNS, bleeding, very low
    platelets, very high ferritin) are treated more; septic MAS features prompt treatment (PROVIDE).
    """
    family = {
        "sjia": 1.6, "aosd": 1.6, "sle": 0.9, "other_autoimmune": 0.9,
        "lymphoma": -1.3, "other_malignancy": -1.3, "parasitic_leishmania": -0.4, "fungal": -0.9,
        "viral_ebv": -0.3, "viral_cmv": -0.3, "viral_other": -0.2, "covid19": 0.0,
        "bacterial_sepsis": -0.2, "drug": 0.2, "unknown": 0.0,
    }  # fmt: skip
    z = -0.6 + df["trigger"].map(family).to_numpy(float)
    z = z + 1.1 * sepsis_with_mas_features(df)
    z = z + 0.5 * _obs(df, "cns_dysfunction") + 0.3 * _obs(df, "hemorrhage")
    z = z + 0.4 * (_obs(df, "platelets") < 50)
    z = z + 0.3 * _term(_obs(df, "ferritin"), lambda v: np.log(v / 12_000))
    z = z - 0.015 * np.where(_is(df, "sjia"), 0.0, _obs(df, "age_years") - 50)
    return expit(z)


def calibrate_mortality_intercepts(n: int = 400_000, seed: int = 2024) -> dict[str, float]:
    """Re-derive MORTALITY_INTERCEPT: per trigger, the intercept whose mean untreated risk over the
    simulated MAS patients equals MORTALITY_UNTREATED (bisection). Run after changing the simulator."""
    df = simulate(n, seed=seed).data
    df = df[df["mas_onset"] == 1]
    rest = _death_logit_without_intercept(df)
    out = {}
    for t in TRIGGERS:
        m = (df["trigger"] == t).to_numpy()
        lo, hi = -8.0, 8.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expit(mid + rest[m]).mean() < MORTALITY_UNTREATED[t] else (lo, mid)
        out[t] = round((lo + hi) / 2, 2)
    return out


# --------------------------------------------------------------------------------------------------
# The cohort
# --------------------------------------------------------------------------------------------------

BATCH = 20_000  # latent draws per batch; fixed so a cohort's first rows do not depend on n


def simulate(
    n: int,
    seed: int = 0,
    *,
    entry_ferritin: float | None = ENTRY_FERRITIN,
    on_progress: Callable[[int], None] | None = None,
) -> Cohort:
    """Simulate ``n`` hospitalised patients with hyperinflammation; deterministic for (n, seed).

    ``entry_ferritin`` is the cohort's entry criterion (None admits everyone: used by tests that check
    the generators against their cited medians before selection).
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of patients, got {n}")
    rng = np.random.default_rng(seed)
    parts, uniforms, comps, have = [], [], [], 0
    while have < n:
        lat = _draw_latent(rng, BATCH)
        frame = _to_frame(lat, np.zeros(BATCH, dtype=object))
        keep = (
            np.ones(BATCH, bool)
            if entry_ferritin is None
            else (frame["ferritin"] >= entry_ferritin).to_numpy()
        )
        parts.append(frame[keep])
        uniforms.append(lat["uniform"][keep])
        comps.append(lat["comp"][keep])
        have += int(keep.sum())
        if on_progress is not None:
            on_progress(have)
    df = pd.concat(parts, ignore_index=True).iloc[:n].copy()
    uni = np.concatenate(uniforms)[:n]
    stage_names = np.array(["mimic", *(name for name, _, _ in MAS_STAGES)], dtype=object)
    stage = stage_names[np.concatenate(comps)[:n]]
    df["patient_id"] = [f"S{seed}-{i:07d}" for i in range(n)]

    mas = df["mas_onset"].to_numpy() == 1
    p_icu = icu_probability(df)
    p_treat = il1_propensity(df)
    p0, p1 = death_risk_untreated(df), death_risk_treated(df)
    treated = uni[:, U_TREAT] < p_treat
    death0 = uni[:, U_DEATH] < p0  # one shared uniform: coupled potential outcomes
    death1 = uni[:, U_DEATH] < p1

    def mas_only(values: np.ndarray) -> np.ndarray:
        return np.where(mas, values.astype(float), np.nan)

    df["icu_admission"] = mas_only(uni[:, U_ICU] < p_icu)
    df["treatment_il1"] = mas_only(treated)
    df["death_28d"] = mas_only(np.where(treated, death1, death0))
    data = df[["patient_id", *INPUT_NAMES, *LABEL_NAMES]].reset_index(drop=True)
    g = GROUND_TRUTH_PREFIX
    truth = pd.DataFrame(
        {
            "patient_id": data["patient_id"],
            f"{g}mas_stage": stage,  # latent: mimic / overt / developing
            f"{g}p_mas_onset": mas_posterior(data),
            f"{g}p_icu_admission": mas_only(p_icu),
            f"{g}propensity_il1": mas_only(p_treat),
            f"{g}p_death_untreated": mas_only(p0),
            f"{g}p_death_treated": mas_only(p1),
            f"{g}benefit": mas_only(p0 - p1),
            f"{g}hr_il1": mas_only(il1_hazard_ratio(df)),
            f"{g}death_untreated": mas_only(death0),
            f"{g}death_treated": mas_only(death1),
        }
    )
    params = {"n": n, "seed": seed, "entry_ferritin": entry_ferritin, "p_mas_before_entry": P_MAS}
    return Cohort(data=data, truth=truth, seed=seed, params=params)


# The ground-truth column that is the ceiling of each risk model's label (the Bayes-optimal probability).
TRUTH_COLUMN = {"mas_onset": "true_p_mas_onset", "icu_admission": "true_p_icu_admission"}


def truth_path_for(path: str | Path) -> Path:
    """Where a cohort's ground truth is written: beside the data, ``NAME.truth.EXT``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.truth{path.suffix}")


def write_cohort(cohort: Cohort, path: str | Path, partitions: int = 1) -> tuple[Path, Path]:
    """Write the model inputs + labels to ``path`` and the ground truth to a separate file beside it.

    A ``path`` without extension is a folder of ``partitions`` Parquet files (``part-00000.parquet``,
    ...: what a cluster reads), its ground truth a folder ``NAME.truth`` laid out row for row alike.
    """
    from masml.io import write_table

    path = Path(path)
    truth_path = truth_path_for(path)
    if path.suffix:
        if partitions != 1:
            raise ValueError(f"{path}: {partitions} partitions need a folder (a path without extension)")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(cohort.data, path)
        write_table(cohort.truth, truth_path)
        return path, truth_path
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    for folder in (path, truth_path):
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists and is not empty; choose a new folder")
    bounds = np.linspace(0, len(cohort.data), partitions + 1).round().astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        write_table(cohort.data.iloc[lo:hi], path / f"part-{i:05d}.parquet")
        write_table(cohort.truth.iloc[lo:hi], truth_path / f"part-{i:05d}.parquet")
    return path, truth_path
