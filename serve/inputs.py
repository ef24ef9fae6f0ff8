"""JSON patients -> the bundle's input matrix, strictly, with every problem reported at once.

Why here and not in masml: the service may not import masml, so it rebuilds ``encode_inputs`` from the
manifest alone (inputs in matrix order, categories as their index, missing as NaN, units converted with
``accepted_units``). A parity test holds the two paths to the same float32 numbers.

Why column-wise: a 1,000-patient batch must be encoded in a few milliseconds, so a column of plain
numbers is checked and converted with numpy in one go; only columns holding something else (unit
objects, nulls mixed with text, ...) take the per-value path that writes the detailed error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from operator import is_
from typing import Any

import numpy as np

from serve.problems import Problems, invalid, problem

ID_FIELD = "patient_id"
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")


def normalise_unit(unit: str, *, keep_case: bool = False) -> str:
    """The matching rule of docs/architecture.md (trim, no spaces, µ/μ -> u, lower case) plus the usual
    ways of writing powers of ten, so ``x10⁹/L`` finds ``10^9/L``."""
    u = unit.strip().translate(_SUPERSCRIPTS)
    u = u.replace("µ", "u").replace("μ", "u").replace("×", "x")
    u = re.sub(r"\s+", "", u)
    if not keep_case:
        u = u.lower()
    u = re.sub(r"(?i)mc(?=g|mol|l\b)", "u", u)
    u = re.sub(r"(?i)^x?10(?:\^|\*\*|\*|e)?([0-9]+)", r"10^\1", u)
    u = re.sub(r"(?i)mm\^?3", "ul" if not keep_case else "uL", u)
    m = re.search(r"(?i)\(?(feu|ddu)\)?", u)
    if m:
        u = (u[: m.start()] + u[m.end() :]).strip() + m.group(1)
    return u


@dataclass(frozen=True)
class Unit:
    unit: str
    factor: float
    offset: float


@dataclass
class InputSpec:
    """One manifest input, compiled for fast checking."""

    name: str
    kind: str  # numeric | binary | category
    unit: str | None
    low: float | None
    high: float | None
    required: bool
    categories: list[str] | None = None
    index: dict[str, int] = field(default_factory=dict)
    loose_units: dict[str, Unit] = field(default_factory=dict)
    exact_units: dict[str, Unit] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    seen_units: dict[str, Unit | None] = field(default_factory=dict)  # unit_for's answers, by spelling

    @classmethod
    def from_manifest(cls, entry: dict) -> InputSpec:
        kind = entry["kind"]
        if kind not in ("numeric", "binary", "category"):
            raise ValueError(f"input {entry.get('name')!r} has unknown kind {kind!r}")
        spec = cls(
            name=str(entry["name"]),
            kind=kind,
            unit=entry.get("unit"),
            low=_num_or_none(entry.get("low")),
            high=_num_or_none(entry.get("high")),
            required=bool(entry.get("required", False)),
            categories=entry.get("categories"),
        )
        if (spec.low is None) != (spec.high is None):  # refused at load, not a TypeError per request
            given, absent = ("low", "high") if spec.high is None else ("high", "low")
            raise ValueError(f"input {spec.name!r} gives a {given} bound without a {absent} one: a valid "
                             "range needs both, or neither")  # fmt: skip
        if kind == "category":
            if not spec.categories:
                raise ValueError(f"category input {spec.name!r} lists no categories")
            spec.index = {str(c): i for i, c in enumerate(spec.categories)}
        if kind == "numeric":
            units = entry.get("accepted_units") or (
                [{"unit": spec.unit, "factor": 1.0, "offset": 0.0}] if spec.unit else []
            )
            for u in units:
                conv = Unit(str(u["unit"]), float(u.get("factor", 1.0)), float(u.get("offset", 0.0)))
                spec.accepted.append(conv.unit)
                for spelling in [u["unit"], *u.get("aliases", [])]:
                    spec.loose_units.setdefault(normalise_unit(spelling), conv)
                for spelling in u.get("exact_aliases", []):
                    spec.exact_units[normalise_unit(spelling, keep_case=True)] = conv
        return spec

    def expected(self) -> str:
        if self.kind == "category":
            return f"one of {self.categories}"
        if self.kind == "binary":
            return "0, 1, true or false"
        units = f' (or {{"value": x, "unit": u}} with u in {self.accepted})' if len(self.accepted) > 1 else ""
        if self.low is None:
            return f"a finite number in {self.unit}{units}"
        return f"a number in {self.unit} between {_fmt(self.low)} and {_fmt(self.high)}{units}"

    def unit_for(self, unit: str) -> Unit | None:
        if unit in self.seen_units:  # clients repeat a handful of spellings; normalising costs regexes
            return self.seen_units[unit]
        found = self.exact_units.get(normalise_unit(unit, keep_case=True)) or self.loose_units.get(
            normalise_unit(unit)
        )
        if len(self.seen_units) < 256:  # bounded: a client sending endless new strings gains nothing
            self.seen_units[unit] = found
        return found


def _num_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def _fmt(v: float | None) -> str:
    return "?" if v is None else (str(int(v)) if float(v).is_integer() else repr(v))


_PLAIN = {int, float, type(None)}
_BINARY = _PLAIN | {bool}
_UNITS = _PLAIN | {dict}  # numbers and unit objects
_BIG = 1e308  # an int beyond this may not convert to a finite float: left to _value


class Encoder:
    """Builds the float64 canonical matrix (kept for guardrails) for one manifest's inputs."""

    def __init__(self, inputs: list[dict]) -> None:
        self.specs = [InputSpec.from_manifest(e) for e in inputs]
        self.names = [s.name for s in self.specs]
        self.allowed = frozenset(self.names) | {ID_FIELD}
        if len(set(self.names)) != len(self.names):
            raise ValueError("the manifest lists an input twice")

    def encode(self, patients: Any, where: str = "patients") -> tuple[np.ndarray, list[Any]]:
        """Canonical float64 [N, K] (NaN = missing) and the patient ids (None where not given)."""
        probs: list[dict] = []
        if not isinstance(patients, list):
            raise invalid(
                where, "type", "must be a list of patient objects", expected="a JSON array of objects"
            )
        n = len(patients)
        if n == 0:
            raise invalid(where, "empty", "the batch is empty", expected="at least one patient")
        rows_ok = set(map(type, patients)) == {dict}
        clean = rows_ok and set().union(*patients) <= self.allowed  # one C-level pass instead of n
        if not clean:
            rows_ok = self._check_rows(patients, where, probs)
        ids = self._ids(patients, where, probs) if rows_ok else []
        if not rows_ok:
            raise Problems(422, "invalid input", probs)
        if n <= 4:  # a few patients: value by value is cheaper than numpy per column
            x = np.array(self._rows(patients, where, probs), dtype=np.float64)
            if probs:
                raise Problems(422, "invalid input", probs)
            return x, ids
        x = np.empty((n, len(self.specs)), dtype=np.float64)
        for j, spec in enumerate(self.specs):
            col = list(map(dict.get, patients, repeat(spec.name, n)))
            x[:, j] = self._column(spec, col, where, probs)
        if probs:
            raise Problems(422, "invalid input", probs)
        return x, ids

    @staticmethod
    def _ids(patients: list[dict], where: str, probs: list[dict]) -> list[Any]:
        """Each patient's ``patient_id`` (None where not given); a bad one is a problem."""
        return checked_ids(list(map(dict.get, patients, repeat(ID_FIELD))), where, probs)

    def _rows(self, patients: list[dict], where: str, probs: list[dict]) -> list[list[float]]:
        """A few patients, value by value: plain well-formed values (a number in range, a known category,
        0/1, an optional value left out) are taken inline, anything else goes through ``_value``, which
        converts units and writes each problem.

        Why inline: this is the one-patient path, where a Python call per input (35 of them) costs more
        than the checks themselves; ``_value`` stays the one place that says what a value means."""
        nan, value, out = math.nan, self._value, []
        for i, p in enumerate(patients):
            row = []
            for spec in self.specs:
                v = p.get(spec.name)
                t = type(v)
                kind = spec.kind
                if v is None and not spec.required:
                    row.append(nan)
                    continue
                if kind == "numeric" and (t is float or t is int) and -_BIG < v < _BIG:
                    c = float(v)
                    low = spec.low
                    if c - c == 0.0 and (low is None or low <= c <= spec.high):  # type: ignore[operator]
                        row.append(c)
                        continue
                elif kind == "category" and t is str and v in spec.index:
                    row.append(float(spec.index[v]))
                    continue
                elif kind == "binary" and (t is bool or t is int or t is float) and (v == 0 or v == 1):
                    row.append(float(v))
                    continue
                row.append(value(spec, v, (where, i, spec.name), probs))
            out.append(row)
        return out

    def _check_rows(self, patients: list, where: str, probs: list[dict]) -> bool:
        ok = True
        for i, p in enumerate(patients):
            if not isinstance(p, dict):
                probs.append(
                    problem(
                        f"{where}[{i}]",
                        "type",
                        "a patient must be a JSON object",
                        value=p,
                        expected="an object of input fields",
                    )
                )
                ok = False
                continue
            for name in sorted(p.keys() - self.allowed, key=str):
                probs.append(
                    problem(
                        f"{where}[{i}].{name}",
                        "unknown_field",
                        f"unknown field {name!r}",
                        expected=f"one of {sorted(self.allowed)}",
                    )
                )
        return ok

    def _column(self, spec: InputSpec, col: list, where: str, probs: list[dict]) -> np.ndarray:
        """Vectorised when the column is clean; otherwise value by value, to name each problem."""
        fast = self._fast(spec, col)
        if fast is not None:
            if spec.kind == "numeric":  # in range, or finite when the input has no range
                self._check_plain(spec, fast, where, probs)
            elif spec.required and np.isnan(fast).any():
                for i in np.flatnonzero(np.isnan(fast)):
                    probs.append(self._missing(spec, f"{where}[{i}].{spec.name}"))
            return fast
        out = np.full(len(col), np.nan)
        for i, v in enumerate(col):
            out[i] = self._value(spec, v, (where, i, spec.name), probs)
        return out

    @staticmethod
    def _fast(spec: InputSpec, col: list) -> np.ndarray | None:
        """The column as float64 if it holds only well-formed values (None = NaN), else None."""
        try:
            if spec.kind == "category":
                lookup = spec.index
                codes = [math.nan if v is None else lookup.get(v, -1) for v in col]
                values = np.array(codes, dtype=np.float64)
                return None if (values < 0).any() else values
            types = set(map(type, col))
            if spec.kind == "binary":
                if not types <= _BINARY:
                    return None
                values = np.array(col, dtype=np.float64)
                return values if np.all(np.isnan(values) | (values == 0) | (values == 1)) else None
            if types <= _PLAIN:
                return np.array(col, dtype=np.float64)
            return Encoder._with_units(spec, col) if spec.kind == "numeric" and types <= _UNITS else None
        except (TypeError, OverflowError):  # unhashable or huge values: the slow path reports them
            return None

    @staticmethod
    def _with_units(spec: InputSpec, col: list) -> np.ndarray | None:
        """A numeric column holding ``{"value": x, "unit": u}`` objects beside plain numbers, converted
        with numpy; None unless every value is well formed, in a known unit, and in range.

        Why all or nothing: a column with any problem goes value by value (``_value``), which names each
        problem in row order; a clean one (the usual case: a lab system sending its own units) is
        converted in a few array operations instead of one Python call per patient."""
        rows = list(compress(count(), map(is_, map(type, col), repeat(dict))))  # C loops, no Python frame
        objs = [col[i] for i in rows]
        values = list(map(dict.get, objs, repeat("value")))
        units = list(map(dict.get, objs, repeat("unit")))
        if (
            set(map(len, objs)) != {2}  # with a number and a string below: exactly "value" and "unit"
            or not set(map(type, values)) <= {int, float}
            or not set(map(type, units)) <= {str}
        ):
            return None
        convs = [(u, spec.unit_for(u)) for u in set(units)]
        if any(c is None for _, c in convs):
            return None
        factor = np.array(list(map({u: c.factor for u, c in convs}.get, units)))  # type: ignore[union-attr]
        offset = np.array(list(map({u: c.offset for u, c in convs}.get, units)))  # type: ignore[union-attr]
        plain = col.copy()
        for i in rows:
            plain[i] = None
        out = np.array(plain, dtype=np.float64)
        converted = np.array(values, dtype=np.float64) * factor + offset  # as _value: x * factor + offset
        if not np.isfinite(converted).all():
            return None
        out[rows] = converted
        missing = np.isnan(out)
        if spec.required and missing.any():
            return None
        present = out[~missing]
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(present).all() and (
                spec.low is None or bool(((present >= spec.low) & (present <= spec.high)).all())
            )
        return out if ok else None

    def _check_plain(self, spec: InputSpec, values: np.ndarray, where: str, probs: list[dict]) -> None:
        missing = np.isnan(values)
        with np.errstate(invalid="ignore"):
            if spec.low is None:
                bad = ~missing & ~np.isfinite(values)  # JSON's 1e999 decodes to inf
            else:
                bad = ~missing & ~((values >= spec.low) & (values <= spec.high))
        if spec.required and missing.any():
            for i in np.flatnonzero(missing):
                probs.append(self._missing(spec, f"{where}[{i}].{spec.name}"))
        if bad.any():
            for i in np.flatnonzero(bad):
                probs.append(self._range(spec, f"{where}[{i}].{spec.name}", float(values[i])))

    def _missing(self, spec: InputSpec, path: str | tuple) -> dict:
        return problem(path, "required", f"{spec.name} is required", expected=spec.expected())

    def _range(self, spec: InputSpec, path: str | tuple, canonical: float, raw: Any = None) -> dict:
        shown = f"{_fmt(canonical)} {spec.unit}" + (f" (sent as {raw})" if raw is not None else "")
        if spec.low is None:
            return problem(path, "out_of_range", f"{shown} is not a finite number",
                           value=canonical if raw is None else raw, expected=spec.expected())  # fmt: skip
        return problem(
            path,
            "out_of_range",
            f"{shown} is outside the valid range {_fmt(spec.low)}–{_fmt(spec.high)} {spec.unit}",
            value=canonical if raw is None else raw,
            expected=f"between {_fmt(spec.low)} and {_fmt(spec.high)} {spec.unit}",
        )

    def _value(self, spec: InputSpec, v: Any, path: tuple[str, int, str], probs: list[dict]) -> float:
        if v is None:
            if spec.required:
                probs.append(self._missing(spec, path))
            return math.nan
        if spec.kind == "category":
            if isinstance(v, str) and v in spec.index:
                return float(spec.index[v])
            probs.append(
                problem(
                    path,
                    "not_in_categories" if isinstance(v, str) else "type",
                    f"{v!r} is not a known {spec.name}",
                    value=v,
                    expected=spec.expected(),
                )
            )
            return math.nan
        if spec.kind == "binary":
            if isinstance(v, bool):
                return float(v)
            if isinstance(v, int | float) and v in (0, 1):
                return float(v)
            probs.append(problem(path, "not_binary", f"{v!r} is not 0/1", value=v, expected=spec.expected()))
            return math.nan
        raw_text = None
        if isinstance(v, dict):
            value, unit = v.get("value"), v.get("unit")
            extra = v.keys() - {"value", "unit"}
            if extra or not isinstance(unit, str) or not _is_number(value):
                probs.append(
                    problem(
                        path,
                        "type",
                        'a value with a unit must be {"value": number, "unit": string} and nothing else',
                        value=v,
                        expected=spec.expected(),
                    )
                )
                return math.nan
            conv = spec.unit_for(unit)
            if conv is None:
                probs.append(
                    problem(
                        path,
                        "unknown_unit",
                        f"unknown unit {unit!r} for {spec.name}",
                        value=unit,
                        expected=f"one of {spec.accepted}",
                    )
                )
                return math.nan
            canonical = _float(value) * conv.factor + conv.offset
            raw_text = f"{value} {conv.unit}"
        elif _is_number(v):
            canonical = _float(v)
        else:
            probs.append(
                problem(path, "type", f"{spec.name} must be a number", value=v, expected=spec.expected())
            )
            return math.nan
        if not math.isfinite(canonical) or (
            spec.low is not None and not (spec.low <= canonical <= spec.high)  # type: ignore[operator]
        ):
            probs.append(self._range(spec, path, canonical, raw_text))
            return math.nan
        return canonical

    def check_matrix(self, x: np.ndarray, where: str) -> None:
        """Open Inference Protocol callers send the matrix itself: check codes and ranges all the same,
        in one vectorised pass (the per-problem messages are only built when something is wrong)."""
        if not hasattr(self, "_bnd"):
            self._bnd = bounds(self.specs, np.float32)  # as float32 as the tensor it checks
        lo, hi, integral, req = self._bnd
        missing = np.isnan(x)
        with np.errstate(invalid="ignore"):
            bad = ~missing & (~np.isfinite(x) | (x < lo) | (x > hi) | (integral & (x != np.floor(x))))
        absent = missing & req
        if not (bad.any() or absent.any()):
            return
        probs: list[dict] = []
        for (i, j), kind in [
            *((ij, "invalid_value") for ij in np.argwhere(bad)[:50]),
            *((ij, "required") for ij in np.argwhere(absent)[:50]),
        ]:
            spec = self.specs[j]
            exp = (
                f"a category index 0..{len(spec.categories or ()) - 1} ({spec.categories})"
                if spec.kind == "category"
                else "0 or 1"
                if spec.kind == "binary"
                else f"between {_fmt(spec.low)} and {_fmt(spec.high)} {spec.unit}"
                if spec.low is not None
                else f"a finite number in {spec.unit}"
            )
            msg = (
                f"{spec.name} is required"
                if kind == "required"
                else (f"{float(x[i, j])!r} is not valid for {spec.name}")
            )
            probs.append(
                problem(
                    f"{where}[{i}][{j}] ({spec.name})",
                    kind,
                    msg,
                    value=None if kind == "required" else float(x[i, j]),
                    expected=exp,
                )
            )
        raise Problems(400, "invalid input tensor", probs)


def bounds(specs: list[InputSpec], dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per input, in matrix order: lowest and highest valid value (a category's codes, 0-1 for a 0/1
    input, ±inf for a number without a range), whether it must be a whole number, whether it is
    required. For the checks that take a whole matrix at once."""
    lo, hi, integral, req = [], [], [], []
    for s in specs:
        if s.kind == "category":
            lo.append(0), hi.append(len(s.categories or ()) - 1), integral.append(True)
        elif s.kind == "binary":
            lo.append(0), hi.append(1), integral.append(True)
        else:
            lo.append(-np.inf if s.low is None else s.low), hi.append(np.inf if s.high is None else s.high)
            integral.append(False)
        req.append(s.required)
    return np.array(lo, dtype), np.array(hi, dtype), np.array(integral), np.array(req)


def checked_ids(ids: list[Any], where: str, probs: list[dict]) -> list[Any]:
    """Patient ids as sent (None where not given): each a string of at most 128 characters or a 64-bit
    integer; a bad one becomes None and a problem in ``probs``. Both ways of reading patients use it.

    Why two paths: ids are almost always short strings, checked for a whole batch in C loops; only
    a batch with another kind of id is walked patient by patient to name the bad ones."""
    if set(map(type, ids)) <= {str, type(None)} and max(map(len, filter(None, ids)), default=0) <= 128:
        return ids
    for i, pid in enumerate(ids):
        if pid is None:
            continue
        if not ((isinstance(pid, str) and len(pid) <= 128) or (type(pid) is int and -(2**63) <= pid < 2**63)):
            ids[i] = None
            probs.append(
                problem(
                    f"{where}[{i}].{ID_FIELD}",
                    "type",
                    "patient_id must be a string or an integer (at most 128 characters)",
                    value=pid,
                )
            )
    return ids


def _float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
