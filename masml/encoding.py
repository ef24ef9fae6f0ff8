"""The input matrix: the one float32 tensor every bundle takes (docs/architecture.md §1).

Why one dense matrix: a server then needs nothing but the manifest to turn JSON into model input, the
Open Inference Protocol can carry it as a single FP32 tensor, and the Python and ONNX paths see exactly
the same float32 numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from masml.schema import COLUMNS, INPUT_NAMES


def input_spec(names: Sequence[str] = INPUT_NAMES) -> list[dict]:
    """Manifest entries for the given inputs, in matrix order (unit, range, categories from the schema)."""
    spec = []
    for name in names:
        if name not in COLUMNS or name not in INPUT_NAMES:
            raise ValueError(f"{name!r} is not a model input; expected one of {list(INPUT_NAMES)}")
        c = COLUMNS[name]
        spec.append(
            {
                "name": c.name,
                "kind": c.kind,
                "unit": c.unit,
                "low": c.low,
                "high": c.high,
                "categories": list(c.categories) if c.categories else None,
                "accepted_units": _accepted_units(c.name) if c.kind == "numeric" else None,
                "required": c.required,
                "description": c.description,
            }
        )
    return spec


def _accepted_units(name: str) -> list[dict]:
    """Every unit a caller may send for this input, with ``canonical = value × factor + offset``.

    The manifest carries the conversions so a server can accept ``{"value": 3.1, "unit": "g/L"}``
    without importing masml. ``aliases`` match case-insensitively (after removing spaces and writing
    µ/μ as u); ``exact_aliases`` only as written, because their case carries meaning (``G/L``).
    """
    from masml.units import UNIT_TABLE

    return [
        {
            "unit": conv.unit,
            "factor": conv.factor,
            "offset": conv.offset,
            "aliases": list(conv.aliases),
            "exact_aliases": list(conv.exact_aliases),
        }
        for conv in UNIT_TABLE[name]
    ]


def encode_inputs(frame: pd.DataFrame, names: Sequence[str] = INPUT_NAMES) -> np.ndarray:
    """Canonical (validated) frame -> float32 [N, K]; categories become their index, missing stays NaN."""
    out = np.empty((len(frame), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        if name not in frame.columns:
            raise KeyError(f"input column {name!r} is missing from the frame")
        c = COLUMNS[name]
        if c.kind == "category":
            codes = pd.Categorical(frame[name], categories=list(c.categories)).codes.astype(np.float32)
            unknown = (codes < 0) & frame[name].notna().to_numpy()
            if unknown.any():
                bad = sorted(set(frame.loc[unknown, name].astype(str)))[:5]
                raise ValueError(f"{name}: values {bad} are not in the categories {list(c.categories)}")
            codes[codes < 0] = np.nan
            out[:, j] = codes
        else:
            out[:, j] = frame[name].to_numpy(dtype=np.float64)
    return out
