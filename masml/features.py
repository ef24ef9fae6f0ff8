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
Comparison = Literal[">=", ">", "<=", "<", "=="]

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

    A condition may also be a nested ``ScoreItem``, which adds its own points (non-negative integers)
    to the count instead of 0 or 1. That makes "and", "or" and "at least n of" of comparisons
    expressible (``points`` (0, 0, 1) over two conditions is "both", (0, 1, 1) is "either"), e.g. the
    age-dependent haemoglobin limit of HLH-2004 or "ferritin > 684 and 2 of 4 labs" of MAS 2016, while
    every value stays an integer count, exact in float32 and int64 on both sides.
    ``points`` has one entry per possible count: ``len(points) == max_count + 1``.
    """

    conditions: tuple[Condition | ScoreItem, ...]
    points: tuple[int, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in self.points):
            raise ValueError(f"score item points must be integers, got {self.points}")
        for term in self.conditions:
            if isinstance(term, ScoreItem) and min(term.points) < 0:
                raise ValueError(f"a nested score item counts its points, which must be >= 0: {term.points}")
        if len(self.points) != self.max_count + 1:
            raise ValueError(f"score item has counts 0..{self.max_count} but {len(self.points)} points")

    @property
    def max_count(self) -> int:
        return sum(max(t.points) if isinstance(t, ScoreItem) else 1 for t in self.conditions)


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


def _cond(index: dict[str, int]) -> Callable[[str, Comparison, float], Condition]:
    return lambda name, op, threshold: Condition(index[name], op, threshold)


def _either(*terms: Condition | ScoreItem) -> ScoreItem:
    """1 when at least one of the conditions holds (each term worth at most 1), else 0."""
    return ScoreItem(terms, (0,) + (1,) * len(terms))


def _both(*terms: Condition | ScoreItem) -> ScoreItem:
    """1 when every condition holds (each term worth at most 1), else 0."""
    return ScoreItem(terms, (0,) * len(terms) + (1,))


def _hlh2004_items(index: dict[str, int]) -> tuple[ScoreItem, ...]:
    """HLH-2004 (Henter 2007): the number of criteria met, exactly as :func:`masml.scores.hlh2004` counts.

    One item per criterion, worth 1 when met. Cytopenias: >= 2 of the 3 lineages; the haemoglobin
    lineage is Hb < 10 g/dL under 4 weeks of age and Hb < 9 g/dL otherwise (or with age unknown), i.e.
    at least 2 of (Hb < 9, Hb < 10, infant). Triglycerides >= 265 mg/dL or fibrinogen <= 150 mg/dL is one
    criterion. NK activity is not in the schema and is never met (as in the baseline), so 0-7.
    Missing inputs: a criterion whose inputs are missing is not met, so the value is the number of the
    assessable criteria that are met (0 with nothing known); a partly known criterion (one lineage, TG
    without fibrinogen) is judged on what is known, and an unknown age uses the general Hb limit.
    """
    from masml import scores as s

    c = _cond(index)
    hb_low = ScoreItem(
        (
            c("hemoglobin", "<", s.HLH2004_HB_G_DL),
            c("hemoglobin", "<", s.HLH2004_HB_INFANT_G_DL),
            c("age_years", "<", s.HLH2004_INFANT_AGE_YEARS),
        ),
        (0, 0, 1, 1),
    )
    lineages = (
        hb_low,
        c("platelets", "<", s.HLH2004_PLATELETS),
        c("neutrophils", "<", s.HLH2004_NEUTROPHILS),
    )
    at_least = s.HLH2004_CYTOPENIA_LINEAGES
    return (
        _either(c("temperature_c", ">=", s.HLH2004_FEVER_C)),
        _either(c("splenomegaly", "==", 1)),
        ScoreItem(lineages, tuple(int(k >= at_least) for k in range(len(lineages) + 1))),
        _either(c("triglycerides", ">=", s.HLH2004_TG_MG_DL),
                c("fibrinogen", "<=", s.HLH2004_FIBRINOGEN_MG_DL)),
        _either(c("bone_marrow_hemophagocytosis", "==", 1)),
        _either(c("ferritin", ">=", s.HLH2004_FERRITIN)),
        _either(c("scd25", ">=", s.HLH2004_SCD25)),
    )  # fmt: skip


def _mas2016_items(index: dict[str, int]) -> tuple[ScoreItem, ...]:
    """2016 EULAR/ACR/PRINTO criteria (Ravelli 2016): 1 when classified as MAS, else 0.

    Not a sum of points but a rule: fever AND ferritin > 684 ng/mL AND at least 2 of the 4 labs
    (platelets <= 181, AST > 48, triglycerides > 156, fibrinogen <= 360), exactly as
    :func:`masml.scores.mas2016`, fever included (its ``MAS2016_FEVER_C`` assumption). It is a rule, not
    a sum of points, so the model sees the classification itself (a tree splits on it exactly at 0.5).
    Missing inputs: a missing value meets no condition, so a missing temperature or ferritin gives 0,
    and a missing lab counts as not abnormal (1 only when 2 of the known labs are).
    """
    from masml import scores as s

    c = _cond(index)
    labs = (
        c("platelets", "<=", s.MAS2016_PLATELETS),
        c("ast", ">", s.MAS2016_AST),
        c("triglycerides", ">", s.MAS2016_TG_MG_DL),
        c("fibrinogen", "<=", s.MAS2016_FIBRINOGEN_MG_DL),
    )
    enough_labs = ScoreItem(labs, tuple(int(k >= s.MAS2016_MIN_LABS) for k in range(len(labs) + 1)))
    fever, ferritin = c("temperature_c", ">=", s.MAS2016_FEVER_C), c("ferritin", ">", s.MAS2016_FERRITIN)
    return (_both(fever, ferritin, enough_labs),)


def _mals_ferritin_items(index: dict[str, int]) -> tuple[ScoreItem, ...]:
    """MALS by ferritin (Kyriazopoulou 2017, PROVIDE): 1 when ferritin > 4420 ng/mL, else 0 (missing: 0)."""
    from masml import scores as s

    return (_either(_cond(index)("ferritin", ">", s.MALS_FERRITIN)),)


def _dic_isth_items(index: dict[str, int]) -> tuple[ScoreItem, ...]:
    """ISTH overt-DIC score (Taylor 2001), 0-8, with the D-dimer and INR assumptions of ``masml.scores``.

    Platelets < 100 -> 1, < 50 -> 2; D-dimer 1.0-2.0 mg/L FEU (inclusive) -> 2, > 2.0 -> 3; INR >= 1.25 ->
    1, >= 1.5 -> 2; fibrinogen < 100 mg/dL -> 1, as :func:`masml.scores.dic_isth`. Missing inputs: a
    missing item scores 0, so the value is the partial sum of the items that could be assessed.
    """
    from masml import scores as s

    c = _cond(index)
    plt_lo, plt_hi = s.DIC_PLATELETS
    dd_lo, dd_hi = s.DIC_D_DIMER
    inr_lo, inr_hi = s.DIC_INR
    return (
        ScoreItem((c("platelets", "<", plt_hi), c("platelets", "<", plt_lo)), (0, 1, 2)),
        ScoreItem((c("d_dimer", ">=", dd_lo), c("d_dimer", ">", dd_hi)), s.DIC_D_DIMER_POINTS),
        ScoreItem((c("inr", ">=", inr_lo), c("inr", ">=", inr_hi)), (0, 1, 2)),
        ScoreItem((c("fibrinogen", "<", s.DIC_FIBRINOGEN_MG_DL),), (0, 1)),
    )


def _hbd_dic_items(index: dict[str, int]) -> tuple[ScoreItem, ...]:
    """HBD + DIC (Shakoory 2016, masml's operational definition): 1 when both are present, else 0.

    HBD: bilirubin >= 2.0 mg/dL or ALT >= 80 or AST >= 80 U/L. DIC: ISTH score >= 5, or platelets < 100
    with INR >= 1.5. Exactly :func:`masml.scores.hbd_dic`. Missing inputs: a missing value meets no
    condition, so each part is judged on the labs that are known and is absent when none are.
    """
    from masml import scores as s

    c = _cond(index)
    hbd = _either(c("bilirubin", ">=", s.HBD_BILIRUBIN_MG_DL), c("alt", ">=", s.HBD_TRANSAMINASE),
                  c("ast", ">=", s.HBD_TRANSAMINASE))  # fmt: skip
    isth = _dic_isth_items(index)
    isth_max = sum(max(item.points) for item in isth)
    overt = ScoreItem(isth, tuple(int(k >= s.DIC_OVERT) for k in range(isth_max + 1)))
    dic = _either(overt, _both(c("platelets", "<", s.HBD_DIC_PLATELETS), c("inr", ">=", s.HBD_DIC_INR)))
    return (_both(hbd, dic),)


# Clinical scores a config may add as model features (``score_features``): name -> (inputs it reads,
# items). Only scores whose every rule is a comparison of one input with a constant (combined by
# counting, see ``ScoreItem``) can live in the exported graph exactly. Each equals its
# ``masml.scores`` baseline on every row, missing values included: a missing input meets no condition,
# as a missing item is "not met" / scores 0 there. Left out:
# - ms_score (Minoia 2019): a weighted sum of continuous labs with decimal coefficients, not points of
#   comparisons. In float32 it would differ from the float64 baseline (which rounds to 9 decimals near
#   its -2.1 cut-off), its numpy/onnxruntime agreement would rest on both evaluating the same float32
#   multiplies and adds in the same order (no fusion, no reordering), which onnxruntime does not
#   promise, and scoring a missing term 0 is not neutral for its negative terms. Trees see its 7
#   inputs directly.
# - hscore_probability: a monotone map of hscore, which a tree already splits on identically.
# - ferritin_esr_ratio: a ratio, already a feature (``RATIOS``) whenever ferritin and esr are inputs.
SCORES: dict[str, tuple[tuple[str, ...], Callable[[dict[str, int]], tuple[ScoreItem, ...]]]] = {
    "hscore": (
        ("immunosuppressed", "temperature_c", "hepatomegaly", "splenomegaly", "hemoglobin", "wbc",
         "platelets", "ferritin", "triglycerides", "fibrinogen", "ast", "bone_marrow_hemophagocytosis"),
        _hscore_items,
    ),
    "hlh2004": (
        ("temperature_c", "splenomegaly", "hemoglobin", "age_years", "platelets", "neutrophils",
         "triglycerides", "fibrinogen", "bone_marrow_hemophagocytosis", "ferritin", "scd25"),
        _hlh2004_items,
    ),
    "mas2016": (
        ("temperature_c", "ferritin", "platelets", "ast", "triglycerides", "fibrinogen"),
        _mas2016_items,
    ),
    "mals_ferritin": (("ferritin",), _mals_ferritin_items),
    "dic_isth": (("platelets", "d_dimer", "inr", "fibrinogen"), _dic_isth_items),
    "hbd_dic": (
        ("bilirubin", "alt", "ast", "platelets", "d_dimer", "inr", "fibrinogen"),
        _hbd_dic_items,
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
    if cond.op == "<":
        return values < thr
    return values == thr


def _count(x: np.ndarray, item: ScoreItem) -> np.ndarray:
    """int64 count of an item's conditions met, a nested item adding its points."""
    met = np.zeros(x.shape[0], dtype=np.int64)
    for term in item.conditions:
        if isinstance(term, ScoreItem):
            met += np.asarray(term.points, dtype=np.int64)[_count(x, term)]
        else:
            met += _holds(x[:, term.input], term)
    return met


def score_points(x: np.ndarray, items: Sequence[ScoreItem]) -> np.ndarray:
    """Total points of a score for each row of the input matrix (float32; a missing value scores 0)."""
    total = np.zeros(x.shape[0], dtype=np.float32)
    for item in items:
        total += np.asarray(item.points, dtype=np.float32)[_count(x, item)]
    return total


def score_conditions(items: Sequence[ScoreItem]) -> list[Condition]:
    """Every comparison of a score, nested items included, in definition order (its cut-offs)."""
    out: list[Condition] = []
    for item in items:
        for term in item.conditions:
            out += score_conditions((term,)) if isinstance(term, ScoreItem) else [term]
    return out


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
