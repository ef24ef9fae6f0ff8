"""A clean batch of JSON patients straight to the input matrix: typed decoding, vectorised checks.

Why a second path beside ``inputs.Encoder``: decoding a 1,000-patient body into dicts and then
checking 35 columns value by value costs ~8 ms (bench body, 961 KB: decode 3.4 ms, pulling the
columns out of the dicts 1.3 ms, checking their types 1.05 ms, converting and range checks the rest).
Decoded into a msgspec struct built from the manifest, the types are checked in C while parsing
(2.3 ms), and the numbers come out as one float64 block in a single numpy call: ~4.1 ms for the
same body, decoding included.

Why it only ever says yes or "not clean": any body this path does not fully accept (an unknown
field, a unit object, a string where a number belongs, a value out of range, an unknown category, a
missing required input, an odd patient_id, an empty batch, not JSON at all) makes it return None, and
the caller decodes the same bytes again on the detailed path, which lists every problem with its
field path. So errors are worded in one place only, and a clean batch is read to the same float64
numbers by both paths (a parity test holds them to that). A unit object on the first patient fails
the typed decode within microseconds, so lab systems that send their own units lose almost nothing.
"""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter
from typing import Any

import msgspec
import numpy as np

from serve.inputs import ID_FIELD, InputSpec

_astuple = msgspec.structs.astuple


class CleanBatch:
    """For one manifest's inputs: a typed decoder per request shape, and the vectorised checks."""

    def __init__(self, specs: list[InputSpec]) -> None:
        self.width = len(specs)
        num = [j for j, s in enumerate(specs) if s.kind != "category"]
        cat = [j for j, s in enumerate(specs) if s.kind == "category"]
        # Python names f0, f1, ... renamed to the JSON names: any manifest name is a valid field
        names = [specs[j].name for j in num + cat] + [ID_FIELD]
        types: list[Any] = [float | None if specs[j].kind == "numeric" else bool | float | None for j in num]
        types += [str | None] * len(cat) + [str | int | None]
        self.patient = msgspec.defstruct(
            "Patient",
            [(f"f{i}", t, None) for i, t in enumerate(types)],
            rename={f"f{i}": n for i, n in enumerate(names)},
            forbid_unknown_fields=True,
        )
        self.num_cols, self.cat_cols = np.array(num, dtype=np.intp), cat
        self._numbers = itemgetter(slice(0, len(num)))  # a patient tuple's numeric and binary values
        self._cats = [itemgetter(len(num) + i) for i in range(len(cat))]
        self._id = itemgetter(len(names) - 1)
        # per numeric/binary column: valid range (no range: any finite number), 0/1 only, required
        self.low = np.array([-np.inf if specs[j].low is None else specs[j].low for j in num])
        self.high = np.array([np.inf if specs[j].high is None else specs[j].high for j in num])
        binary = [specs[j].kind == "binary" for j in num]
        self.binary = np.array(binary, dtype=bool)
        self.low[self.binary], self.high[self.binary] = 0.0, 1.0
        self.required = np.array([specs[j].required for j in num], dtype=bool)
        # category name -> code; None (null or left out) -> NaN; anything else -> the -1 below
        self.codes = [{**{str(c): float(i) for i, c in enumerate(specs[j].categories or [])}, None: np.nan}
                      for j in cat]  # fmt: skip
        self.cat_required = [specs[j].required for j in cat]
        self._decoders: dict[tuple[str, ...], msgspec.json.Decoder] = {}

    def decoder(self, fields: tuple[str, ...]) -> msgspec.json.Decoder:
        """The decoder of a body ``{fields[0]: [patients], fields[1:]...}``; each other field decoded as
        plain JSON, or ``UNSET`` when left out, for the endpoint to check as before."""
        dec = self._decoders.get(fields)
        if dec is None:
            types: list[Any] = [list[self.patient], *[Any] * (len(fields) - 1)]  # type: ignore[name-defined]
            body = msgspec.defstruct(
                "Body",
                [(f"f{i}", t, msgspec.UNSET) for i, t in enumerate(types)],
                rename={f"f{i}": name for i, name in enumerate(fields)},
                forbid_unknown_fields=True,
            )
            dec = self._decoders[fields] = msgspec.json.Decoder(body)
        return dec

    def read(self, raw: bytes, fields: tuple[str, ...]) -> tuple[dict, np.ndarray, list] | None:
        """For a body ``{fields[0]: [patients], fields[1:]...}``: the other fields given (as plain
        JSON), the canonical float64 [N, K] matrix and the patient ids; or None if the body is anything
        but a clean batch (see the module docstring)."""
        try:
            values = _astuple(self.decoder(fields).decode(raw))
        except msgspec.DecodeError:
            return None
        if values[0] is msgspec.UNSET:
            return None  # no patients at all: the detailed path says which field is required
        encoded = self.encode(values[0])
        if encoded is None:
            return None
        given = {k: v for k, v in zip(fields[1:], values[1:], strict=True) if v is not msgspec.UNSET}
        return given, *encoded

    def encode(self, patients: list) -> tuple[np.ndarray, list] | None:
        n = len(patients)
        if n == 0:
            return None
        rows = list(map(_astuple, patients))
        num = np.array(list(map(self._numbers, rows)), dtype=np.float64)  # None -> NaN
        missing = np.isnan(num)
        with np.errstate(invalid="ignore"):
            ok = missing | ((num >= self.low) & (num <= self.high) & np.isfinite(num))
            ok &= ~self.binary | missing | (num == 0.0) | (num == 1.0)
        if not ok.all() or (missing & self.required).any():
            return None
        x = np.empty((n, self.width), dtype=np.float64)
        x[:, self.num_cols] = num
        cats = zip(self.cat_cols, self._cats, self.codes, self.cat_required, strict=True)
        for j, get, codes, required in cats:
            col = np.array(list(map(codes.get, map(get, rows), repeat(-1.0))), dtype=np.float64)
            if (col < 0).any() or (required and np.isnan(col).any()):
                return None
            x[:, j] = col
        ids = list(map(self._id, rows))
        if set(map(type, ids)) <= {str, type(None)}:  # the usual ids: checked in C loops
            if max(map(len, filter(None, ids)), default=0) > 128:
                return None
        elif not all(_id_ok(i) for i in ids):
            return None
        return x, ids


def _id_ok(pid: Any) -> bool:
    """As ``Encoder._ids``: a string of at most 128 characters, a 64-bit integer, or none."""
    if type(pid) is str:
        return len(pid) <= 128
    return pid is None or (type(pid) is int and -(2**63) <= pid < 2**63)
