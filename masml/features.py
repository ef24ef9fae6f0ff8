"""Derived features, defined once as data and computed twice: here in numpy, and in the ONNX graph.

Why declarative: the exported graph must reproduce training exactly, so each feature is one of a few
operations that are bit-exact in float32 on both sides (selection, equality, division). Ratios stand in
for log-ratios because trees are invariant to monotone transforms and ``log`` is not bit-exact across
libraries: a value on a split threshold must take the same branch in xgboost and onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from masml.schema import COLUMNS

Op = Literal["column", "one_hot", "ratio"]

# (name, numerator, denominator): ratios that carry clinical meaning.
RATIOS: tuple[tuple[str, str, str], ...] = (
    # Eloseily 2019 (ACR Open Rheumatol 1:345): ferritin:ESR separates sJIA-MAS from flares, because
    # fibrinogen consumption lowers the ESR while ferritin climbs (clinical-reference §5).
    ("ferritin_esr_ratio", "ferritin", "esr"),
    # MAS onset is a change, not a level: ferritin rises and platelets fall over 24-72 h (Minoia 2014,
    # clinical-reference §9 and "Dynamics").
    ("ferritin_trend", "ferritin", "ferritin_prev"),
    ("platelets_trend", "platelets", "platelets_prev"),
)


@dataclass(frozen=True)
class Feature:
    """One model feature: ``inputs`` are input-matrix column indices; ``value`` is a category index."""

    name: str
    op: Op
    inputs: tuple[int, ...]
    value: float | None = None


def feature_spec(input_names: Sequence[str]) -> list[Feature]:
    """The features a model trained on these inputs sees, in column order."""
    index = {n: i for i, n in enumerate(input_names)}
    spec: list[Feature] = []
    for name in input_names:
        col = COLUMNS[name]
        if col.kind == "category":
            for k, cat in enumerate(col.categories or ()):
                spec.append(Feature(f"{name}={cat}", "one_hot", (index[name],), float(k)))
        else:
            spec.append(Feature(name, "column", (index[name],)))
    for name, num, den in RATIOS:
        if num in index and den in index:
            spec.append(Feature(name, "ratio", (index[num], index[den])))
    return spec


def transform(x: np.ndarray, spec: Sequence[Feature]) -> np.ndarray:
    """Input matrix (float32 [N, K]) -> feature matrix (float32 [N, F]); missing stays NaN.

    A ratio is NaN when either side is missing or the denominator is not positive (never inf, which
    xgboost would reject and which would not mean anything clinically).
    """
    x = np.asarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], len(spec)), dtype=np.float32)
    for j, f in enumerate(spec):
        if f.op == "column":
            out[:, j] = x[:, f.inputs[0]]
        elif f.op == "one_hot":
            out[:, j] = (x[:, f.inputs[0]] == np.float32(f.value)).astype(np.float32)
        else:
            num, den = x[:, f.inputs[0]], x[:, f.inputs[1]]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, j] = np.where(den > 0, num / den, np.float32(np.nan))
    return out


def feature_names(spec: Sequence[Feature]) -> list[str]:
    return [f.name for f in spec]
