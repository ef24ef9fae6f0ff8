"""Local laboratory units → masml's canonical units (the units written in ``masml/schema.py``).

A dataset declares the units its laboratory reports in a YAML *units file*: a flat mapping from a schema
column to a unit, e.g.::

    fibrinogen: g/L
    triglycerides: mmol/L
    creatinine: umol/L

Columns that are not declared are assumed to be in the canonical unit already and are never touched.
Each analyte has its own table of accepted units: a conversion is ``canonical = value × factor + offset``
and every non-trivial factor cites where it comes from. A unit that is not in the analyte's table is an
error naming the analyte, the unit given and the units accepted; a few units are *refused* on purpose,
with the reason (for example sCD25 in pg/mL, whose relation to U/mL depends on the assay).

Spellings: ``µ`` (micro sign), ``μ`` (Greek mu), ``u`` and ``mc`` are the same prefix; spaces are
ignored; ``x10^9/L``, ``10^9/L``, ``10*9/L``, ``10E9/L`` and ``×10⁹/L`` are the same; ``mm3`` = ``µL``; and
matching is case-insensitive, except where case carries meaning: ``G/L`` (giga-cells per litre) for cell
counts is matched exactly, so ``g/L`` (grams) is not silently accepted as a cell count.

Trend columns follow their analyte: ``ferritin_prev`` takes ferritin's declared unit and
``platelets_prev`` takes platelets', unless the units file declares them separately.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from masml.schema import COLUMNS

__all__ = [
    "Conversion",
    "UnitError",
    "UNIT_TABLE",
    "TREND_FOLLOWS",
    "accepted_units",
    "conversion_for",
    "load_units",
    "resolve_units",
    "to_canonical",
]


class UnitError(ValueError):
    """A units file or a declared unit that masml cannot use (the message says what it accepts)."""


@dataclass(frozen=True)
class Conversion:
    """``canonical = value × factor + offset`` from ``unit`` to the column's canonical unit."""

    unit: str  # the spelling shown in messages and docs
    factor: float = 1.0
    offset: float = 0.0
    formula: str = "identity"  # human-readable, e.g. "× 100" or "(°F − 32) × 5/9"
    source: str = ""  # where the factor comes from ("" for identities and pure SI prefix changes)
    aliases: tuple[str, ...] = ()  # other spellings (matched case-insensitively after normalisation)
    exact_aliases: tuple[str, ...] = ()  # spellings whose case carries meaning (e.g. "G/L")

    @property
    def is_identity(self) -> bool:
        return self.factor == 1.0 and self.offset == 0.0

    def apply(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype="float64")
        if self.is_identity:
            return values.copy()
        return values * self.factor + self.offset

    def invert(self, values: np.ndarray | float) -> np.ndarray | float:
        """Canonical values back in this unit (for messages: 'the file said 60 g/L')."""
        return (np.asarray(values, dtype="float64") - self.offset) / self.factor


def _same(unit: str, *aliases: str, exact: tuple[str, ...] = ()) -> Conversion:
    """A spelling of the canonical unit itself, or a unit numerically identical to it."""
    return Conversion(unit, aliases=aliases, exact_aliases=exact)


def _scale(unit: str, factor: float, formula: str, source: str = "", *aliases: str) -> Conversion:
    return Conversion(unit, factor=factor, formula=formula, source=source, aliases=aliases)


_SI = "SI prefix change (exact)"

# Cell counts: 10^9/L is the canonical unit; 10^3/µL is numerically identical (10^3 per 10^-6 L).
_COUNTS: tuple[Conversion, ...] = (
    _same("10^9/L", "x10^9/L", "10^9 /L", "10^9 cells/L", "giga/L", exact=("G/L", "Gpt/L")),
    _same("10^3/µL", "x10^3/µL", "10^3/mm3", "x10^3/mm3", "K/µL", "10^3 cells/µL", "thousand/µL"),
    _scale("/µL", 0.001, "÷ 1000", "10^9/L = 10^3/µL, so per-µL counts ÷ 1000 (exact)", "cells/µL", "/mm3",
           "cells/mm3"),
)

_FERRITIN: tuple[Conversion, ...] = (
    _same("ng/mL", "µg/L"),
    _scale("µg/dL", 10.0, "× 10", _SI),
    _scale(
        "pmol/L",
        1 / 2.247,
        "÷ 2.247 (≈ × 0.445)",
        "the SI conversion used by clinical laboratories, 1 ng/mL = 2.247 pmol/L (i.e. a nominal molar "
        "mass of 445 kDa; apoferritin is ~440-480 kDa). Laboratories that report pmol/L compute it from "
        "their mass-calibrated (WHO ferritin standard) result with this same factor, so dividing by it "
        "recovers the measured ng/mL exactly (factor as tabulated e.g. in PMC3934467, Table 1).",
    ),
)

UNIT_TABLE: dict[str, tuple[Conversion, ...]] = {
    "age_years": (
        _same("years", "year", "yr", "yrs", "y"),
        _scale("months", 1 / 12, "÷ 12", "12 months per year (exact)", "month", "mo", "mos"),
    ),
    "temperature_c": (
        _same("degC", "°C", "C", "celsius", "deg C", "ºC"),
        Conversion(
            "degF",
            factor=5 / 9,
            offset=-32 * 5 / 9,
            formula="(°F − 32) × 5/9",
            source="definition of the Fahrenheit scale (exact)",
            aliases=("°F", "F", "fahrenheit", "deg F", "ºF"),
        ),
    ),
    "heart_rate": (_same("beats/min", "bpm", "/min", "1/min", "beats per minute", "min^-1"),),
    "mean_arterial_pressure": (
        _same("mmHg", "mm Hg", "torr"),
        _scale("kPa", 7.500_62, "× 7.50062", "1 mmHg = 133.322 Pa (conventional millimetre of mercury)"),
    ),
    "ferritin": _FERRITIN,
    "ferritin_prev": _FERRITIN,
    "platelets": _COUNTS,
    "platelets_prev": _COUNTS,
    "wbc": _COUNTS,
    "neutrophils": _COUNTS,
    "hemoglobin": (
        _same("g/dL", "g/100mL", "g%"),
        _scale("g/L", 0.1, "÷ 10", _SI),
        _scale(
            "mmol/L",
            1.611_45,
            "× 1.611",
            "haemoglobin monomer (one haem + one globin chain), molar mass 16,114.5 g/mol (the ICSH "
            "reference value, tetramer 64,458 g/mol): 1 g/dL = 0.6206 mmol/L (cf. PMC3934467, Table 1)",
        ),
    ),
    "fibrinogen": (
        _same("mg/dL", "mg/100mL"),
        _scale("g/L", 100.0, "× 100", _SI),
        _scale("mg/L", 0.1, "÷ 10", _SI),
        _scale("µmol/L", 34.0, "× 34", "fibrinogen molar mass ≈ 340 kDa: 1 µmol/L = 340 mg/L = 34 mg/dL"),
    ),
    "triglycerides": (
        _same("mg/dL"),
        _scale(
            "mmol/L",
            88.57,
            "× 88.57",
            "triolein molar mass 885.7 g/mol, the factor commonly used by lipid laboratories",
        ),
        _scale("g/L", 100.0, "× 100", _SI),
    ),
    "ast": (
        _same("U/L", "IU/L"),
        _scale("µkat/L", 60.0, "× 60", "1 U = 1 µmol/min = 16.67 nkat, so 1 µkat/L = 60 U/L (exact)"),
    ),
    "alt": (
        _same("U/L", "IU/L"),
        _scale("µkat/L", 60.0, "× 60", "1 U = 1 µmol/min = 16.67 nkat, so 1 µkat/L = 60 U/L (exact)"),
    ),
    "ldh": (
        _same("U/L", "IU/L"),
        _scale("µkat/L", 60.0, "× 60", "1 U = 1 µmol/min = 16.67 nkat, so 1 µkat/L = 60 U/L (exact)"),
    ),
    "d_dimer": (
        _same("mg/L FEU", "µg/mL FEU"),
        _scale("ng/mL FEU", 0.001, "÷ 1000", _SI, "µg/L FEU"),
        _scale(
            "mg/L DDU",
            2.0,
            "× 2",
            "ASSUMPTION: FEU ≈ 2 × DDU. The ratio is nominal and assay-dependent (FEU results are "
            "'slightly over double' DDU results; Favaloro & Thachil, Clin Chem Lab Med 2020;58:1191-9)",
            "µg/mL DDU",
        ),
        _scale(
            "ng/mL DDU",
            0.002,
            "× 2 ÷ 1000",
            "ASSUMPTION: FEU ≈ 2 × DDU (see mg/L DDU)",
            "µg/L DDU",
        ),
    ),
    "crp": (
        _same("mg/L", "µg/mL"),
        _scale("mg/dL", 10.0, "× 10", _SI),
    ),
    "esr": (_same("mm/h", "mm/hr", "mm/hour"),),
    "scd25": (_same("U/mL", "kU/L"),),
    "bilirubin": (
        _same("mg/dL"),
        _scale("µmol/L", 1 / 17.1, "÷ 17.1", "bilirubin molar mass 584.66 g/mol: 1 mg/dL = 17.1 µmol/L"),
        _scale("mg/L", 0.1, "÷ 10", _SI),
    ),
    "creatinine": (
        _same("mg/dL"),
        _scale(
            "µmol/L",
            1 / 88.42,
            "÷ 88.42",
            "creatinine molar mass 113.12 g/mol: 1 mg/dL = 88.42 µmol/L (KDIGO 2012 rounds to 88.4)",
        ),
        _scale("mmol/L", 1000 / 88.42, "× 1000 ÷ 88.42", "as µmol/L (113.12 g/mol)"),
        _scale("mg/L", 0.1, "÷ 10", _SI),
    ),
    "albumin": (
        _same("g/dL", "g/100mL"),
        _scale("g/L", 0.1, "÷ 10", _SI),
    ),
    "inr": (_same("ratio", "INR"),),
    "sodium": (_same("mmol/L", "mEq/L"),),
    "lactate": (
        _same("mmol/L", "mEq/L"),
        _scale(
            "mg/dL", 1 / 9.008, "÷ 9.008 (≈ 9.01)", "lactate molar mass 90.08 g/mol: 1 mmol/L = 9.008 mg/dL"
        ),
    ),
}

# Units refused on purpose, with the reason (keys are normalised spellings, see _normalise).
_DDIMER_NO_BASIS = (
    "a D-dimer result must say whether it is in FEU (fibrinogen-equivalent units) or DDU (D-dimer units): "
    "the two differ about two-fold (Favaloro & Thachil 2020); write e.g. 'mg/L FEU' or 'ng/mL DDU'"
)
_SCD25_MASS = (
    "sCD25 (soluble IL-2 receptor) in mass units cannot be converted to U/mL: the relation depends on the "
    "assay's calibrator (e.g. Immulite vs ELISA kits differ several-fold); convert with your assay's "
    "documented factor and declare U/mL"
)
REFUSED: dict[str, dict[str, str]] = {
    "d_dimer": {u: _DDIMER_NO_BASIS for u in ("mg/l", "ug/ml", "ng/ml", "ug/l")},
    "scd25": {u: _SCD25_MASS for u in ("pg/ml", "ng/ml", "ng/l", "pg/l", "ug/l")},
}

# Trend columns take their analyte's declared unit unless declared themselves.
TREND_FOLLOWS: dict[str, str] = {"ferritin_prev": "ferritin", "platelets_prev": "platelets"}


_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")


def _normalise(unit: str, *, keep_case: bool = False) -> str:
    """One spelling per unit: micro signs → u, no spaces, one way to write powers of ten."""
    u = unit.strip().translate(_SUPERSCRIPTS)
    u = u.replace("µ", "u").replace("μ", "u").replace("×", "x")
    u = re.sub(r"\s+", "", u)
    if not keep_case:
        u = u.lower()
    u = re.sub(r"(?i)mc(?=g|mol|l\b)", "u", u)  # mcg, mcmol, mcL
    u = re.sub(r"(?i)^x?10(?:\^|\*\*|\*|e)?([0-9]+)", r"10^\1", u)  # x10^9, 10*9, 10e9, 10⁹
    u = re.sub(r"(?i)mm\^?3", "ul" if not keep_case else "uL", u)
    # D-dimer basis may be written anywhere ("mg FEU/L", "FEU mg/L", "mg/L (FEU)"): move it to the end.
    m = re.search(r"(?i)\(?(feu|ddu)\)?", u)
    if m:
        u = (u[: m.start()] + u[m.end() :]).strip() + m.group(1)
    return u


def _lookup_tables() -> dict[str, tuple[dict[str, Conversion], dict[str, Conversion]]]:
    """Per column: (case-insensitive spellings, case-sensitive spellings) → Conversion."""
    out: dict[str, tuple[dict[str, Conversion], dict[str, Conversion]]] = {}
    for column, conversions in UNIT_TABLE.items():
        loose: dict[str, Conversion] = {}
        exact: dict[str, Conversion] = {}
        for conv in conversions:
            for spelling in (conv.unit, *conv.aliases):
                key = _normalise(spelling)
                if key in loose and loose[key] is not conv:  # pragma: no cover - table bug
                    raise AssertionError(f"ambiguous unit spelling {spelling!r} for {column}")
                loose[key] = conv
            for spelling in conv.exact_aliases:
                exact[_normalise(spelling, keep_case=True)] = conv
        for key in exact:  # an exact spelling must not also be reachable case-insensitively
            if _normalise(key) in loose:  # pragma: no cover - table bug
                raise AssertionError(f"{key!r} for {column} is both exact and case-insensitive")
        out[column] = (loose, exact)
    return out


_LOOKUP = _lookup_tables()

# Every numeric schema column has a unit table whose first entry is its canonical unit.
for _name, _col in COLUMNS.items():
    if _col.kind == "numeric" and (
        _name not in UNIT_TABLE or _normalise(UNIT_TABLE[_name][0].unit) != _normalise(_col.unit or "")
    ):  # pragma: no cover - table bug
        raise AssertionError(f"unit table for {_name} must start with the schema unit {_col.unit!r}")


def accepted_units(column: str) -> list[str]:
    """The units masml accepts for a numeric column, canonical first (display spellings)."""
    convs = UNIT_TABLE[column]
    return [c.unit for c in convs] + [a for c in convs for a in c.exact_aliases]


def conversion_for(column: str, unit: str) -> Conversion:
    """The conversion of ``unit`` for ``column``; raises ``UnitError`` naming what is accepted."""
    col = COLUMNS.get(column)
    if col is None:
        raise UnitError(f"{column!r} is not a column of the masml schema, so it cannot have a unit")
    if col.kind != "numeric":
        raise UnitError(
            f"{column!r} is a {col.kind} column ({col.description}); only numeric columns have units"
        )
    accepted = _accepted_text(column)
    if not isinstance(unit, str):
        raise UnitError(f"the unit for {column!r} must be text, got {unit!r}; accepted: {accepted}")
    if not unit.strip():
        raise UnitError(f"no unit given for {column!r}; accepted: {accepted}")
    loose, exact = _LOOKUP[column]
    conv = exact.get(_normalise(unit, keep_case=True)) or loose.get(_normalise(unit))
    if conv is not None:
        return conv
    reason = REFUSED.get(column, {}).get(_normalise(unit))
    if reason:
        raise UnitError(f"unit {unit!r} for {column!r} is refused: {reason}. Accepted: {accepted}")
    raise UnitError(f"unknown unit {unit!r} for {column!r}; accepted units for {column}: {accepted}")


def _accepted_text(column: str) -> str:
    convs = UNIT_TABLE[column]
    parts = []
    for i, c in enumerate(convs):
        spellings = [c.unit, *c.exact_aliases, *c.aliases]
        shown = " = ".join(dict.fromkeys(spellings))
        parts.append(f"{shown} (canonical)" if i == 0 else shown)
    return "; ".join(parts)


def load_units(units: str | Path | Mapping[str, str]) -> dict[str, str]:
    """A units declaration as a plain ``{column: unit}`` dict, from a YAML file path or a mapping."""
    if isinstance(units, Mapping):
        mapping: object = dict(units)
        where = "units mapping"
    else:
        path = Path(units)
        where = f"units file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UnitError(f"{where} does not exist") from None
        except OSError as err:
            raise UnitError(f"cannot read {where}: {err}") from None
        try:
            mapping = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UnitError(f"{where} is not valid YAML: {err}") from None
        if mapping is None:
            mapping = {}
    if not isinstance(mapping, dict):
        raise UnitError(
            f"{where} must be a mapping of column: unit (e.g. 'fibrinogen: g/L'), "
            f"got {type(mapping).__name__}"
        )
    out: dict[str, str] = {}
    for key, value in mapping.items():
        out[str(key)] = value  # values are checked by resolve_units, which reports them all together
    return out


def resolve_units(units: str | Path | Mapping[str, str]) -> dict[str, Conversion]:
    """Every declared column → its Conversion; all problems are reported in one ``UnitError``."""
    declared = load_units(units)
    where = f"units file {units}" if not isinstance(units, Mapping) else "units mapping"
    problems: list[str] = []
    resolved: dict[str, Conversion] = {}
    for column, unit in declared.items():
        try:
            resolved[column] = conversion_for(column, unit)
        except UnitError as err:
            problems.append(str(err))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UnitError(f"{where}: {len(problems)} problem(s):\n{lines}")
    for trend, analyte in TREND_FOLLOWS.items():
        if trend not in resolved and analyte in resolved:
            resolved[trend] = resolved[analyte]
    return resolved


def to_canonical(df: pd.DataFrame, units: str | Path | Mapping[str, str] | None) -> pd.DataFrame:
    """A copy of ``df`` with every declared column converted to its canonical unit.

    Missing values stay missing and undeclared columns are not touched. Values that are not numbers
    (``">2000"``, ``"12,5"``, ``"NA"``) are left exactly as they were, so that validation reports them;
    they are never turned into missing values here. The conversions applied are recorded in
    ``out.attrs["unit_conversions"]`` (column → unit, canonical unit, factor, offset, formula), which
    validation uses to say "converted from g/L" in its messages; declared columns absent from ``df`` are
    listed in ``out.attrs["unit_notes"]``.
    """
    from masml.validation import parse_numeric  # validation does not import units: no cycle

    resolved = resolve_units(units) if units is not None else {}
    out = df.copy()
    conversions: dict[str, dict] = {}
    notes: list[str] = []
    present = {str(c) for c in df.columns}
    for column, conv in resolved.items():
        if column not in present:
            if column not in TREND_FOLLOWS:  # trend columns inherit silently only when present
                notes.append(f"units file declares {column!r} ({conv.unit}) but the data has no such column")
            continue
        raw = df[column]
        if isinstance(raw, pd.DataFrame):  # duplicated column name: validation reports it
            continue
        values, bad, _missing = parse_numeric(raw)
        converted = conv.apply(values)
        if bad.any():
            mixed = converted.astype(object)
            mixed[bad] = raw.to_numpy(dtype=object)[bad]  # keep unparseable originals for the report
            out[column] = pd.Series(mixed, index=df.index, dtype=object)
        else:
            out[column] = pd.Series(converted, index=df.index, dtype="float64")
        canonical = COLUMNS[column].unit
        conversions[column] = {
            "unit": conv.unit,
            "canonical": canonical,
            "factor": conv.factor,
            "offset": conv.offset,
            "formula": conv.formula,
        }
    out.attrs = {**df.attrs, "unit_conversions": conversions, "unit_notes": notes}
    return out
