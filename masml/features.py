"""Derived features, defined once as data and computed twice: here in numpy, and in the ONNX graph.

Why declarative: the exported graph must reproduce training exactly, so each feature is one of a few
operations that are bit-exact in float32 on both sides (selection, comparison, division, sums of integer
points). Ratios stand in
for log-ratios because trees are invariant to monotone transforms and ``log`` is not bit-exact across
libraries: a value on a split threshold must take the same branch in xgboost and onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from masml.schema import COLUMNS

Op = Literal["column", "one_hot", "ratio", "score"]
Comparison = Literal[">=", ">", "<=", "=="]

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
class Condition:
    """``x[:, input] <op> threshold`` in float32; a missing value never meets a condition."""

    input: int
    op: Comparison
    threshold: float


@dataclass(frozen=True)
class ScoreItem:
    """One item of a points score: ``points[k]`` when exactly k of its conditions hold.

    Counting conditions covers every item shape of the published scores: a sign (one condition), a
    three-band lab (``>= lo`` and ``> hi``: 0, 1 or 2 hold), a count of lineages or organs.
    """

    conditions: tuple[Condition, ...]
    points: tuple[int, ...]


@dataclass(frozen=True)
class Feature:
    """One model feature: ``inputs`` are input-matrix column indices; ``value`` is a category index;
    ``items`` define a clinical score computed from the inputs (op ``score``)."""

    name: str
    op: Op
    inputs: tuple[int, ...]
    value: float | None = None
    items: tuple[ScoreItem, ...] = ()


def _hscore_items(index: dict[str, int]) -> tuple[ScoreItem, ...]:
    """HScore (Fardet 2014) as score items, with the constants of ``masml.scores`` (which cites them).

    The same rules as :func:`masml.scores.hscore`, evaluated on the float32 inputs the graph sees:
    a value within float32 rounding of a cut-off may score differently from the float64 baseline.
    """
    from masml import scores as s

    def c(name: str, op: Comparison, threshold: float) -> Condition:
        return Condition(index[name], op, threshold)

    tg_lo, tg_hi = (v * s.TG_MG_DL_PER_MMOL_L for v in s.HSCORE_TG_MMOL_L)  # mmol/L -> mg/dL
    return (
        ScoreItem((c("immunosuppressed", "==", 1),), (0, s.HSCORE_IMMUNOSUPPRESSION_POINTS)),
        ScoreItem((c("temperature_c", ">=", s.HSCORE_TEMP_C[0]), c("temperature_c", ">", s.HSCORE_TEMP_C[1])),
                  s.HSCORE_TEMP_POINTS),
        ScoreItem((c("hepatomegaly", "==", 1), c("splenomegaly", "==", 1)), s.HSCORE_ORGANOMEGALY_POINTS),
        ScoreItem(
            (c("hemoglobin", "<=", s.HSCORE_HB_G_DL), c("wbc", "<=", s.HSCORE_WBC),
             c("platelets", "<=", s.HSCORE_PLATELETS)),
            (0, *s.HSCORE_CYTOPENIA_POINTS),  # 0 or 1 lineage score 0
        ),
        ScoreItem((c("ferritin", ">=", s.HSCORE_FERRITIN[0]), c("ferritin", ">", s.HSCORE_FERRITIN[1])),
                  s.HSCORE_FERRITIN_POINTS),
        ScoreItem((c("triglycerides", ">=", tg_lo), c("triglycerides", ">", tg_hi)), s.HSCORE_TG_POINTS),
        ScoreItem((c("fibrinogen", "<=", s.HSCORE_FIBRINOGEN_MG_DL),), (0, s.HSCORE_FIBRINOGEN_POINTS)),
        ScoreItem((c("ast", ">=", s.HSCORE_AST),), (0, s.HSCORE_AST_POINTS)),
        ScoreItem((c("bone_marrow_hemophagocytosis", "==", 1),), (0, s.HSCORE_MARROW_POINTS)),
    )  # fmt: skip


# Clinical scores a config may add as model features (``score_features``): name -> (inputs it reads,
# items). Only scores whose every rule is a comparison of one input with a constant can live in the
# exported graph exactly; HScore is the one adult sHLH score of that shape.
SCORES: dict[str, tuple[tuple[str, ...], Callable[[dict[str, int]], tuple[ScoreItem, ...]]]] = {
    "hscore": (
        ("immunosuppressed", "temperature_c", "hepatomegaly", "splenomegaly", "hemoglobin", "wbc",
         "platelets", "ferritin", "triglycerides", "fibrinogen", "ast", "bone_marrow_hemophagocytosis"),
        _hscore_items,
    ),
}  # fmt: skip


def feature_spec(input_names: Sequence[str], scores: Sequence[str] = ()) -> list[Feature]:
    """The features a model trained on these inputs sees, in column order (``scores`` last)."""
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
    for name in scores:
        if name not in SCORES:
            raise ValueError(f"score feature {name!r} is unknown; available: {sorted(SCORES)}")
        needs, build = SCORES[name]
        absent = [n for n in needs if n not in index]
        if absent:
            raise ValueError(f"score feature {name!r} needs the inputs {absent}, which the model lacks")
        spec.append(Feature(name, "score", tuple(index[n] for n in needs), items=build(index)))
    return spec


def _holds(values: np.ndarray, cond: Condition) -> np.ndarray:
    thr = np.float32(cond.threshold)
    if cond.op == ">=":
        return values >= thr
    if cond.op == ">":
        return values > thr
    if cond.op == "<=":
        return values <= thr
    return values == thr


def score_points(x: np.ndarray, items: Sequence[ScoreItem]) -> np.ndarray:
    """Total points of a score for each row of the input matrix (float32; a missing value scores 0)."""
    total = np.zeros(x.shape[0], dtype=np.float32)
    for item in items:
        met = sum(_holds(x[:, c.input], c).astype(np.int64) for c in item.conditions)
        total += np.asarray(item.points, dtype=np.float32)[met]
    return total


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
        elif f.op == "score":
            out[:, j] = score_points(x, f.items)
        else:
            num, den = x[:, f.inputs[0]], x[:, f.inputs[1]]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, j] = np.where(den > 0, num / den, np.float32(np.nan))
    return out


def feature_names(spec: Sequence[Feature]) -> list[str]:
    return [f.name for f in spec]


class FeatureBuilder(TransformerMixin, BaseEstimator):
    """The derived features as an sklearn transformer, so they compose with sklearn pipelines.

    Stateless on purpose: ``fit`` learns nothing from the data (no imputation, no scaling), because
    everything it computes must also run inside the exported ONNX graph with no fitted parameters.
    Takes the float32 input matrix of :func:`masml.encoding.encode_inputs` in ``input_names`` order.
    """

    def __init__(self, input_names: tuple[str, ...] = (), score_features: tuple[str, ...] = ()) -> None:
        self.input_names = input_names
        self.score_features = score_features

    def fit(self, X, y=None) -> FeatureBuilder:
        self.spec_ = feature_spec(list(self.input_names), list(self.score_features))
        self.n_features_in_ = len(self.input_names)
        self._check(X)
        return self

    def _check(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.input_names):
            raise ValueError(
                f"FeatureBuilder expects an input matrix [N, {len(self.input_names)}] in the order "
                f"{list(self.input_names)[:3]}...; got shape {X.shape}"
            )
        return X

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "spec_")
        return transform(self._check(X), self.spec_)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "spec_")
        return np.asarray(feature_names(self.spec_), dtype=object)
