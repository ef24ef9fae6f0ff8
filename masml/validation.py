"""Validation of a dataset against the masml schema: every problem, found in one pass, reported clearly.

``validate(df)`` takes a frame as read from disk (CSV columns are all strings, Parquet keeps its
types), parses every value, checks it against ``masml/schema.py`` and either returns the canonical
typed frame or raises ``SchemaValidationError`` listing *all* problems at once. Nothing is coerced,
dropped or imputed without a message: a value that is not a number (``">2000"``, ``"12,5"``, ``"NA"``)
is a problem, not a missing value.

The returned frame:

* columns ``patient_id``, every input in schema order, the labels present in schema order (and the
  ``true_`` columns, unchanged, only when ``allow_ground_truth=True``);
* ``patient_id``, ``sex`` and ``trigger`` as pandas ``str``; numeric and binary columns as ``float64``
  with NaN = missing (binary columns hold only 0.0, 1.0 and NaN);
* ``attrs["validation_notes"]``: list of human-readable notes (optional inputs absent from the file and
  added as all-missing, unit conversions applied, declared units for absent columns);
  ``attrs["absent_columns"]``: the optional inputs that were added as all-missing;
  ``attrs["unit_conversions"]``: the conversions ``masml.units.to_canonical`` applied (may be empty);
  ``attrs["schema_version"]``.

Implemented with vectorised pandas/pyarrow rather than pandera: the checks need the original value
next to the parsed one (to say *what* was wrong and in which unit), and this keeps 100,000 rows well
under a second.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from masml.schema import (
    COLUMNS,
    GROUND_TRUTH_PREFIX,
    ID_COLUMN,
    INPUT_COLUMNS,
    LABEL_COLUMNS,
    LABEL_NAMES,
    MAS_ONLY_LABELS,
    REQUIRED_NAMES,
    SCHEMA_VERSION,
    Column,
)

__all__ = ["CHECKS", "Example", "Problem", "SchemaValidationError", "parse_numeric", "validate"]

MAX_EXAMPLES = 5

# check code → what is wrong, in words (the report's middle part)
CHECKS: dict[str, str] = {
    "missing_column": "column is absent",
    "null_in_required": "empty, but the column is required",
    "not_numeric": "not a number",
    "out_of_range": "outside the plausible range",
    "not_in_vocabulary": "not in the vocabulary",
    "not_binary": "not 0/1",
    "duplicate_id": "patient_id shared with another row",
    "label_outside_mas": "value present although mas_onset is 0",
    "ground_truth_column": "ground-truth column offered as input",
    "unknown_column": "column is not in the schema",
    "duplicate_column": "column name appears more than once",
}
_COLUMN_LEVEL = {"missing_column", "ground_truth_column", "unknown_column", "duplicate_column"}


@dataclass(frozen=True)
class Example:
    """One offending value: ``row`` counts data rows from 1 (CSV line = row + 1)."""

    row: int
    value: object
    patient_id: str | None = None
    in_file: str | None = None  # the value in the declared unit, when the column was converted

    def __str__(self) -> str:
        who = f" [{self.patient_id}]" if self.patient_id is not None else ""
        shown = _show(self.value)
        if self.in_file is not None:
            shown = f"{shown} (= {self.in_file} in the file)"
        return f"row {self.row}{who}: {shown}"


@dataclass(frozen=True)
class Problem:
    """One kind of problem in one column, with how many rows it affects and up to 5 examples."""

    column: str
    check: str  # a key of CHECKS
    n_rows: int
    examples: tuple[Example, ...] = ()
    expected: str = ""
    detail: str = ""  # extra words, e.g. "did you mean 'ferritin'?"

    def __str__(self) -> str:
        what = CHECKS.get(self.check, self.check)
        if self.check in _COLUMN_LEVEL:
            count = f"{what} (affects all {self.n_rows:,} rows)"
        else:
            count = f"{self.n_rows:,} row{'s' if self.n_rows != 1 else ''}: {what}"
        line = f"{self.column} [{self.check}]: {count}"
        if self.detail:
            line += f"; {self.detail}"
        if self.examples:
            line += "; e.g. " + ", ".join(str(e) for e in self.examples)
        if self.expected:
            line += f"; expected {self.expected}"
        return line


class SchemaValidationError(ValueError):
    """The dataset does not match the schema; ``.problems`` lists every problem found."""

    def __init__(self, problems: Iterable[Problem], *, n_rows: int, source: str | None = None):
        self.problems: list[Problem] = list(problems)
        self.n_rows = n_rows
        self.source = source
        super().__init__(self._report())

    def _report(self) -> str:
        where = f" for {self.source}" if self.source else ""
        n = len(self.problems)
        head = (
            f"schema validation failed{where}: {n} problem{'s' if n != 1 else ''} in {self.n_rows:,} rows "
            "(rows count data rows from 1; CSV line = row + 1)"
        )
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])

    def __str__(self) -> str:
        return self._report()


# --------------------------------------------------------------------------------------------- parsing


def parse_numeric(s: pd.Series, *, allow_bool: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a column into ``float64`` without hiding anything.

    Returns ``(values, bad, missing)`` as numpy arrays: ``missing`` marks empty cells (NaN/None/``""``),
    ``bad`` marks present values that are not finite numbers (text such as ``"NA"``, ``">2000"``,
    ``"12,5"``, ``"inf"``; booleans unless ``allow_bool``), and ``values`` is NaN wherever either holds.
    Strings may carry surrounding whitespace; ``allow_bool`` also accepts ``True``/``False`` (and the
    strings ``"True"``/``"False"``/``"true"``/``"false"``) as 1/0.
    """
    n = len(s)
    dtype = s.dtype
    if is_bool_dtype(dtype):
        missing = s.isna().to_numpy(dtype=bool)
        if allow_bool:
            return s.to_numpy(dtype="float64", na_value=np.nan), np.zeros(n, dtype=bool), missing
        return np.full(n, np.nan), ~missing, missing
    if is_numeric_dtype(dtype) and not isinstance(dtype, pd.CategoricalDtype):
        values = s.to_numpy(dtype="float64", na_value=np.nan).copy()
        missing = np.isnan(values)
        bad = np.isinf(values)
        values[bad] = np.nan
        return values, bad, missing
    # text, object (possibly mixed Python values) or categorical: parse the text of every value
    if isinstance(dtype, pd.CategoricalDtype):
        s = s.astype(object)
    text = s.astype("str") if not isinstance(dtype, pd.StringDtype) else s
    missing_s = text.isna() | (text == "")
    missing = missing_s.to_numpy(dtype=bool)
    if allow_bool:
        text = text.replace({"True": "1", "False": "0", "true": "1", "false": "0"})
    present = text.where(~missing_s)  # Python booleans in an object column became "True": not a number
    arr = pa.array(present, from_pandas=True, type=pa.string())
    try:
        parsed = pc.cast(pc.utf8_trim_whitespace(arr), pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed = pd.to_numeric(present, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    values = np.asarray(parsed, dtype="float64").copy()
    bad = ~missing & ~np.isfinite(values)
    values[bad] = np.nan
    values[missing] = np.nan
    return values, bad, missing


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float | np.floating):  # shortest exact repr: never shown as equal to its bound
        x = float(value)
        return str(int(x)) if math.isfinite(x) and x == int(x) and abs(x) < 1e15 else repr(x)
    if isinstance(value, np.generic):
        return repr(value.item())
    return repr(value)


def _num(x: float) -> str:
    """A number for humans: 2000000 not 2e+06, 0.05 not 0.05000000001."""
    if not math.isfinite(x):
        return repr(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.10g}"


def _first_column(df: pd.DataFrame, position: int) -> pd.Series:
    return df.iloc[:, position]


# ------------------------------------------------------------------------------------------- validate


@dataclass
class _Run:
    """State of one validation pass: the raw frame, where each column is, the problems so far."""

    df: pd.DataFrame
    source: str | None
    conversions: dict
    problems: list[Problem] = field(default_factory=list)
    ids: np.ndarray | None = None  # patient ids as text (for examples), when the column exists

    @property
    def n(self) -> int:
        return len(self.df)

    def examples(self, mask: np.ndarray, values: object, in_file: np.ndarray | None = None, unit=None):
        rows = np.flatnonzero(mask)[:MAX_EXAMPLES]
        vals = values.to_numpy(dtype=object) if isinstance(values, pd.Series) else np.asarray(values)
        out = []
        for r in rows:
            pid = None
            if self.ids is not None:
                v = self.ids[r]
                pid = None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            file_text = None
            if in_file is not None:
                file_text = f"{_num(float(in_file[r]))} {unit}"
            out.append(Example(row=int(r) + 1, value=_plain(vals[r]), patient_id=pid, in_file=file_text))
        return tuple(out)

    def add(self, column, check, mask=None, values=None, expected="", detail="", in_file=None, unit=None):
        if mask is None:  # column-level problem
            n_rows, examples = self.n, ()
            if values is not None:
                examples = self.examples(~_isna(values), values)
        else:
            n_rows = int(mask.sum())
            if n_rows == 0:
                return
            examples = self.examples(mask, values, in_file, unit)
        self.problems.append(Problem(column, check, n_rows, examples, expected, detail))


def _plain(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v


def _isna(values: pd.Series) -> np.ndarray:
    return values.isna().to_numpy(dtype=bool)


def _expected_number(col: Column, conversion: dict | None) -> str:
    text = f"a number in {col.unit} between {_num(col.low)} and {_num(col.high)}"
    if conversion and (conversion["factor"] != 1.0 or conversion["offset"] != 0.0):
        lo, hi = (
            (b - conversion["offset"]) / conversion["factor"] for b in (col.low, col.high)
        )
        text += (
            f" (this column was declared in {conversion['unit']} and converted {conversion['formula']}:"
            f" {_num(lo)} to {_num(hi)} {conversion['unit']})"
        )
    return text


def _expected_for(col: Column, conversion: dict | None = None) -> str:
    if col.kind == "numeric":
        return _expected_number(col, conversion)
    if col.kind == "binary":
        return "0 or 1 (empty cell = missing)"
    if col.kind == "category":
        return "one of: " + ", ".join(col.categories or ()) + " (exact spelling, no surrounding spaces)"
    return "a non-empty identifier"


def validate(
    df: pd.DataFrame,
    *,
    require_labels: Iterable[str] = (),
    allow_ground_truth: bool = False,
    source: str | None = None,
) -> pd.DataFrame:
    """The canonical typed frame, or ``SchemaValidationError`` listing every problem (see module doc).

    ``require_labels``: columns (normally labels) that must be present for the caller, e.g. training
    needs ``("mas_onset",)``. ``allow_ground_truth``: keep ``true_*`` columns instead of refusing them
    (for evaluation code only; model inputs may never contain ground truth). ``source``: a file name
    used in the error message.
    """
    require_labels = tuple(require_labels)
    unknown_required = [c for c in require_labels if c not in COLUMNS]
    if unknown_required:
        raise ValueError(f"require_labels names columns not in the schema: {unknown_required}")

    conversions = dict(df.attrs.get("unit_conversions", {}) or {})
    run = _Run(df=df, source=source, conversions=conversions)
    names = [str(c) for c in df.columns]
    first_pos: dict[str, int] = {}
    for i, name in enumerate(names):
        first_pos.setdefault(name, i)

    # ---- column-level checks: duplicates, ground truth, unknown, missing
    counts = pd.Series(names, dtype=object).value_counts(sort=False)
    for name, k in counts.items():
        if k > 1:
            run.add(name, "duplicate_column", expected="each column name exactly once",
                    detail=f"{k} columns are named {name!r}; only the first is checked")
    if "patient_id" in first_pos:
        run.ids = _first_column(df, first_pos["patient_id"]).to_numpy(dtype=object)
    truth_cols = [n for n in first_pos if n.startswith(GROUND_TRUTH_PREFIX)]
    if not allow_ground_truth:
        for name in truth_cols:
            run.add(name, "ground_truth_column", values=_first_column(df, first_pos[name]),
                    expected="no 'true_' columns in model inputs (keep ground truth in its own file)")
    for name in first_pos:
        if name in COLUMNS or name.startswith(GROUND_TRUTH_PREFIX):
            continue
        close = difflib.get_close_matches(name, list(COLUMNS), n=1, cutoff=0.75)
        if not close:
            close = [c for c in COLUMNS if c == name.strip().lower()]
        run.add(name, "unknown_column", values=_first_column(df, first_pos[name]),
                detail=f"did you mean {close[0]!r}?" if close else "",
                expected="only columns of the masml schema (see docs/schema.md)")
    for name in REQUIRED_NAMES:
        if name not in first_pos:
            run.add(name, "missing_column",
                    expected=f"a required column {name!r}: {_expected_for(COLUMNS[name])}")
    for name in require_labels:
        if name not in first_pos and name not in REQUIRED_NAMES:
            run.add(name, "missing_column",
                    expected=f"a column {name!r} (needed by this command): {_expected_for(COLUMNS[name])}")

    # ---- value-level checks, column by column
    out: dict[str, pd.Series | np.ndarray] = {}
    absent: list[str] = []
    index = df.index
    for col in (ID_COLUMN, *INPUT_COLUMNS, *LABEL_COLUMNS):
        if col.name not in first_pos:
            if col.kind in ("numeric", "binary") and col.name not in LABEL_NAMES:
                absent.append(col.name)
                out[col.name] = np.full(run.n, np.nan)
            continue
        raw = _first_column(df, first_pos[col.name])
        parsed = _check_column(run, col, raw)
        out[col.name] = parsed.array if isinstance(parsed, pd.Series) else parsed  # no index alignment

    # ---- cross-column: MAS-only labels must be empty where mas_onset == 0
    notes: list[str] = []
    if "mas_onset" in out:
        no_mas = np.asarray(out["mas_onset"], dtype="float64") == 0
        for name in MAS_ONLY_LABELS:
            if name in out:
                vals = np.asarray(out[name], dtype="float64")
                raw = _first_column(df, first_pos[name])
                run.add(name, "label_outside_mas", no_mas & ~np.isnan(vals), raw,
                        expected=f"empty where mas_onset is 0 ({name} is defined for MAS patients only)")
    else:
        present_mas_only = [n for n in MAS_ONLY_LABELS if n in out]
        if present_mas_only:
            notes.append(
                f"MAS-only labels {', '.join(present_mas_only)} were not checked against mas_onset, "
                "which is absent"
            )

    if run.problems:
        raise SchemaValidationError(run.problems, n_rows=run.n, source=source)

    # ---- the canonical frame
    order = ["patient_id", *(c.name for c in INPUT_COLUMNS), *(n for n in LABEL_NAMES if n in out)]
    frame = pd.DataFrame({name: out[name] for name in order}, index=index)
    for name in order:
        kind = COLUMNS[name].kind
        if kind in ("id", "category"):
            frame[name] = frame[name].astype("str")
        else:
            frame[name] = frame[name].astype("float64")
    if allow_ground_truth:
        for name in truth_cols:
            frame[name] = _first_column(df, first_pos[name]).to_numpy()

    if absent:
        notes.insert(
            0,
            f"{len(absent)} optional input column{'s' if len(absent) != 1 else ''} absent from the file, "
            f"added as all-missing: {', '.join(absent)}",
        )
    for name, conv in conversions.items():
        if name in first_pos and (conv["factor"] != 1.0 or conv["offset"] != 0.0):
            notes.append(f"{name} converted from {conv['unit']} to {conv['canonical']} ({conv['formula']})")
    notes.extend(df.attrs.get("unit_notes", []) or [])
    frame.attrs = {
        "validation_notes": notes,
        "absent_columns": absent,
        "unit_conversions": conversions,
        "schema_version": SCHEMA_VERSION,
    }
    return frame


def _check_column(run: _Run, col: Column, raw: pd.Series) -> np.ndarray | pd.Series:
    """Parse one schema column, record its problems, return its parsed values."""
    name = col.name
    if col.kind in ("id", "category"):
        text = raw.astype("str") if not isinstance(raw.dtype, pd.StringDtype) else raw
        if col.kind == "id" and is_numeric_dtype(raw.dtype) and not is_bool_dtype(raw.dtype):
            text = _integral_ids_as_text(raw)
        missing = (text.isna() | (text == "")).to_numpy(dtype=bool)
        if col.required:
            run.add(name, "null_in_required", missing, raw, expected="a value in every row (required column)")
        if col.kind == "category":
            bad = ~missing & ~text.isin(col.categories or ()).to_numpy(dtype=bool)
            run.add(name, "not_in_vocabulary", bad, raw, expected=_expected_for(col))
        else:
            dup = (text.duplicated(keep=False).to_numpy(dtype=bool)) & ~missing
            run.add(name, "duplicate_id", dup, raw, expected="a unique patient_id in every row")
        return text

    values, bad, missing = parse_numeric(raw, allow_bool=col.kind == "binary")
    if col.kind == "binary":
        not01 = bad | (~np.isnan(values) & (values != 0) & (values != 1))
        run.add(name, "not_binary", not01, raw, expected=_expected_for(col))
        values = np.where(not01, np.nan, values)
        return values

    conv = run.conversions.get(name)
    unit = f"{conv['unit']}, the declared unit" if conv else col.unit
    run.add(name, "not_numeric", bad, raw,
            expected=f"a plain number in {unit} (leave the cell empty when missing; "
            "no text, comparison signs or decimal commas)")
    if col.required:
        run.add(name, "null_in_required", missing, raw, expected="a value in every row (required column)")
    with np.errstate(invalid="ignore"):
        out = ~np.isnan(values) & ((values < col.low) | (values > col.high))
    converted = conv is not None and (conv["factor"] != 1.0 or conv["offset"] != 0.0)
    in_file = (values - conv["offset"]) / conv["factor"] if converted else None
    run.add(name, "out_of_range", out, values, expected=_expected_number(col, conv),
            in_file=in_file, unit=conv["unit"] if converted else None)
    return values


def _integral_ids_as_text(raw: pd.Series) -> pd.Series:
    """Numeric ids (Parquet) as text: 12 and 12.0 both become "12"; other floats keep their repr."""
    values = raw.to_numpy(dtype="float64", na_value=np.nan)
    finite = np.isfinite(values)
    if finite.any() and np.all(values[finite] == np.round(values[finite])):
        return raw.astype("Int64").astype("str").where(finite)
    return raw.astype("str")
