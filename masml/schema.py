"""The patient schema: masml's public contract for model inputs, labels and ground truth.

Everything downstream (validation, features, ONNX bundles, the service) reads column names, canonical
units and plausibility ranges from here, so a unit or range is decided in exactly one place. Bump
``SCHEMA_VERSION`` whenever a column, unit, range or category changes meaning: bundles record it and
the service refuses inputs for a schema it was not trained on.

Plausibility ranges are an assumption of masml, not clinical reference ranges: they are deliberately
wide so that they reject unit mix-ups and typos (platelets of 50,000 entered per µL, a temperature of
60 °C, a negative ferritin) while accepting every value seen in severe MAS (ferritin above 100,000 ng/mL,
platelets near zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SCHEMA_VERSION = "1.0"

Kind = Literal["id", "category", "binary", "numeric"]


@dataclass(frozen=True)
class Column:
    """One column of the schema; ``low``/``high`` are inclusive bounds in the canonical unit."""

    name: str
    kind: Kind
    description: str
    unit: str | None = None
    low: float | None = None
    high: float | None = None
    categories: tuple[str, ...] | None = None
    required: bool = False  # must be present as a column and never missing


TRIGGERS: tuple[str, ...] = (
    "sjia",
    "aosd",
    "sle",
    "other_autoimmune",
    "viral_ebv",
    "viral_cmv",
    "viral_other",
    "covid19",
    "bacterial_sepsis",
    "parasitic_leishmania",
    "fungal",
    "lymphoma",
    "other_malignancy",
    "drug",
    "unknown",
)

# Families group triggers the way the literature reports outcomes and treatment effects
# (clinical-reference §9-§10): subgroup metrics and guardrails are stated per family.
TRIGGER_FAMILY: dict[str, str] = {
    "sjia": "autoimmune",
    "aosd": "autoimmune",
    "sle": "autoimmune",
    "other_autoimmune": "autoimmune",
    "viral_ebv": "viral",
    "viral_cmv": "viral",
    "viral_other": "viral",
    "covid19": "viral",
    "bacterial_sepsis": "bacterial",
    "parasitic_leishmania": "parasitic_fungal",
    "fungal": "parasitic_fungal",
    "lymphoma": "malignancy",
    "other_malignancy": "malignancy",
    "drug": "drug_unknown",
    "unknown": "drug_unknown",
}
TRIGGER_FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(TRIGGER_FAMILY.values()))

SEXES: tuple[str, ...] = ("F", "M")


def _lab(name: str, unit: str, low: float, high: float, description: str = "") -> Column:
    return Column(name, "numeric", description or name, unit=unit, low=low, high=high)


def _sign(name: str, description: str) -> Column:
    return Column(name, "binary", description, low=0, high=1)


INPUT_COLUMNS: tuple[Column, ...] = (
    Column("age_years", "numeric", "age", unit="years", low=0, high=120, required=True),
    Column("sex", "category", "sex", categories=SEXES, required=True),
    Column("trigger", "category", "suspected trigger", categories=TRIGGERS, required=True),
    _sign("immunosuppressed", "known prior immunosuppression (HIV, long-term immunosuppressants)"),
    _lab("temperature_c", "degC", 30, 44, "maximum temperature"),
    _lab("heart_rate", "beats/min", 20, 300, "heart rate"),
    _lab("mean_arterial_pressure", "mmHg", 10, 200, "mean arterial pressure"),
    _sign("hepatomegaly", "hepatomegaly"),
    _sign("splenomegaly", "splenomegaly"),
    _sign("cns_dysfunction", "central nervous system dysfunction"),
    _sign("hemorrhage", "haemorrhagic manifestations"),
    _sign("active_arthritis", "active arthritis"),
    _sign("bone_marrow_hemophagocytosis", "haemophagocytosis on marrow aspirate; missing when none was done"),
    _lab("ferritin", "ng/mL", 1, 2_000_000),
    _lab("platelets", "10^9/L", 0, 2_000),
    _lab("wbc", "10^9/L", 0, 500, "white blood cell count"),
    _lab("neutrophils", "10^9/L", 0, 300, "absolute neutrophil count"),
    _lab("hemoglobin", "g/dL", 1, 25),
    _lab("fibrinogen", "mg/dL", 5, 2_000),
    _lab("triglycerides", "mg/dL", 5, 20_000),
    _lab("ast", "U/L", 1, 100_000),
    _lab("alt", "U/L", 1, 100_000),
    _lab("ldh", "U/L", 10, 200_000),
    _lab("d_dimer", "mg/L FEU", 0, 1_000),
    _lab("crp", "mg/L", 0, 1_000),
    _lab("esr", "mm/h", 0, 200),
    _lab("scd25", "U/mL", 1, 1_000_000, "soluble IL-2 receptor"),
    _lab("bilirubin", "mg/dL", 0, 100),
    _lab("creatinine", "mg/dL", 0.05, 40),
    _lab("albumin", "g/dL", 0.3, 8),
    _lab("inr", "ratio", 0.5, 25),
    _lab("sodium", "mmol/L", 80, 200),
    _lab("lactate", "mmol/L", 0, 40),
    _lab("ferritin_prev", "ng/mL", 1, 2_000_000, "ferritin 24-72 h before the snapshot"),
    _lab("platelets_prev", "10^9/L", 0, 2_000, "platelets 24-72 h before the snapshot"),
)

ID_COLUMN = Column("patient_id", "id", "patient identifier", required=True)

LABEL_COLUMNS: tuple[Column, ...] = (
    _sign("mas_onset", "MAS present or developing within 7 days of the snapshot"),
    _sign("icu_admission", "ICU admission within 7 days; MAS patients only, empty otherwise"),
    _sign("treatment_il1", "IL-1 blockade started within 48 h of MAS diagnosis; MAS patients only"),
    _sign("death_28d", "death within 28 days; MAS patients only"),
)

# Labels that exist only for MAS patients (mas_onset == 1): a value elsewhere is a data error.
MAS_ONLY_LABELS: tuple[str, ...] = ("icu_admission", "treatment_il1", "death_28d")

# Ground truth from the simulator lives in its own file and every column carries this prefix, so
# that it can never leak into a model as an input (validation refuses any column that has it).
GROUND_TRUTH_PREFIX = "true_"

COLUMNS: dict[str, Column] = {c.name: c for c in (ID_COLUMN, *INPUT_COLUMNS, *LABEL_COLUMNS)}
INPUT_NAMES: tuple[str, ...] = tuple(c.name for c in INPUT_COLUMNS)
LABEL_NAMES: tuple[str, ...] = tuple(c.name for c in LABEL_COLUMNS)
NUMERIC_INPUTS: tuple[str, ...] = tuple(c.name for c in INPUT_COLUMNS if c.kind == "numeric")
BINARY_INPUTS: tuple[str, ...] = tuple(c.name for c in INPUT_COLUMNS if c.kind == "binary")
CATEGORY_INPUTS: tuple[str, ...] = tuple(c.name for c in INPUT_COLUMNS if c.kind == "category")
REQUIRED_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS.values() if c.required)


def trigger_family(trigger: str) -> str:
    """Family of a trigger; raises with the vocabulary when the trigger is unknown."""
    try:
        return TRIGGER_FAMILY[trigger]
    except KeyError:
        raise ValueError(f"trigger {trigger!r} is not in the vocabulary {list(TRIGGERS)}") from None


def age_band(age_years: float) -> str:
    """The age bands masml reports subgroups by (children / adults / older adults)."""
    if age_years < 16:
        return "<16"
    if age_years < 65:
        return "16-64"
    return ">=65"
