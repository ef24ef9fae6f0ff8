"""Calibration of the model's margin (log-odds) into the probability that ships.

Fitted on out-of-fold margins, so the map learns how the model's scores behave on patients it did not
train on. Both kinds are simple enough to be written as a handful of ONNX nodes, which is why they are
stored as plain numbers (``a``, ``b`` or the isotonic knots) rather than as fitted sklearn objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy.special import expit

# Assumption: isotonic probabilities are kept inside [0.0005, 0.9995] so that no patient is told a risk
# of exactly 0 or 1 (which a finite held-out set can never support) and log loss stays finite.
ISOTONIC_FLOOR, ISOTONIC_CEILING = 0.0005, 0.9995


@dataclass
class Calibrator:
    kind: Literal["platt", "isotonic"]
    a: float = 1.0  # platt: risk = sigmoid(a * margin + b)
    b: float = 0.0
    x: list[float] = field(default_factory=list)  # isotonic knots on the margin ...
    y: list[float] = field(default_factory=list)  # ... and their probabilities (linear in between)

    def apply(self, margin: np.ndarray) -> np.ndarray:
        margin = np.asarray(margin, dtype=np.float64)
        if self.kind == "platt":
            return expit(self.a * margin + self.b)
        return np.interp(margin, self.x, self.y)  # clips to the end knots outside their range

    def to_dict(self) -> dict:
        return asdict(self)


def fit_calibrator(margin: np.ndarray, y: np.ndarray, kind: str) -> Calibrator:
    """Fit Platt scaling (logistic on the margin) or isotonic regression (monotone, piecewise linear)."""
    margin, y = np.asarray(margin, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if kind == "platt":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e6, max_iter=1000).fit(margin.reshape(-1, 1), y)
        return Calibrator("platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))
    if kind == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=ISOTONIC_FLOOR, y_max=ISOTONIC_CEILING, out_of_bounds="clip")
        iso.fit(margin, y)
        return Calibrator("isotonic", x=iso.X_thresholds_.tolist(), y=iso.y_thresholds_.tolist())
    raise ValueError(f"calibration must be 'platt' or 'isotonic', got {kind!r}")
