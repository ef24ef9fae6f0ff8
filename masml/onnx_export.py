"""One ONNX graph for the whole scoring path of a risk model (docs/architecture.md §1-§3).

``inputs`` (float32 [N, K]) -> derived features (the ONNX twin of ``masml.features.transform``) -> the
xgboost margin -> calibration -> ``risk`` and ``margin`` (float32 [N]).

Why the tree ensemble is written here from the booster's JSON instead of with a converter: converters
have repeatedly got the intercept wrong (xgboost 3's vector-string ``base_score``, ``best_iteration``
after early stopping; shared anchors §2), and we need the margin as an output anyway. Every split is
emitted as ``BRANCH_LT`` with its float32 threshold, exactly as xgboost compares (``x < t`` goes left,
NaN follows the learned default branch), so a value sitting on a threshold takes the same branch on
both sides. ``parity_gate`` proves that, on real rows and on rows built to sit exactly on (and one
float32 step either side of) every threshold, plus rows with each input missing in turn.

The margin is xgboost's, bit for bit: trees are summed in float32 in tree order starting from the
base margin, exactly as xgboost's CPU predictor does (see ``_trees``), whatever onnxruntime's thread
count. Calibration runs in float64 inside the graph, as ``Calibrator.apply`` does, and is cast to
float32 at the end: the risk differs from Python's only by that final rounding (< 6e-8).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from masml.calibration import Calibrator
from masml.features import Condition, Feature, ScoreItem, feature_names, score_conditions, transform
from masml.predict import ROWS_PER_RUN, run_rows

OPSET = 18  # default domain; onnxruntime 1.31 runs it
ML_OPSET = 3  # ai.onnx.ml: TreeEnsembleRegressor v3 (deprecated, not removed, in ml opset 5)
INPUT, RISK, MARGIN = "inputs", "risk", "margin"
PRODUCER_NAME = "masml.onnx_export"
PRODUCER_VERSION = "1"  # bump when the graph layout changes; never a timestamp or library version

# Objectives whose margin base is logit(base_score): xgboost stores base_score in probability space.
_LOGIT_BASE = frozenset({"binary:logistic", "binary:logitraw", "reg:logistic"})
_IDENTITY_BASE = frozenset({"reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror"})


_KINDS = ("given", "single_row", "small_batch", "missing", "threshold", "threshold_neighbour")


class ParityError(ValueError):
    """The ONNX graph and the Python scoring path disagree beyond tolerance (``.report`` has the figures)."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


# --------------------------------------------------------------------------------------------------
# Reading the booster
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tree:
    """One tree, reachable nodes only, numbered in preorder (0 = root); ``left == -1`` marks a leaf."""

    left: np.ndarray  # int64
    right: np.ndarray  # int64
    feature: np.ndarray  # int64 (0 for leaves)
    threshold: np.ndarray  # float32 split value (0 for leaves)
    default_left: np.ndarray  # bool: where NaN goes
    value: np.ndarray  # float32 leaf value (0 for internal nodes)
    cover: np.ndarray  # float64 sum of hessians reaching the node: TreeSHAP's path weights (shap_export)

    @property
    def is_leaf(self) -> np.ndarray:
        return self.left < 0


@dataclass(frozen=True)
class _Forest:
    trees: list[_Tree]
    base_margin: float  # float32-representable
    n_features: int
    n_rounds: int  # boosting rounds used (best_iteration + 1 after early stopping)
    objective: str


def used_rounds(booster) -> int:
    """Boosting rounds a risk model scores with: ``best_iteration + 1`` when early-stopped, else all."""
    total = int(booster.num_boosted_rounds())
    best = booster.attr("best_iteration")
    return total if best is None else min(total, int(best) + 1)


def _parse_base_score(raw) -> float:
    """xgboost 3.x stores base_score as a vector string like "[5E-1]"; older versions as "5E-1"."""
    text = str(raw).strip()
    if text.startswith("["):
        parts = [p for p in text.strip("[]").split(",") if p.strip()]
        if len(parts) != 1:
            raise ValueError(f"expected one base_score (single-target model), got {text!r}")
        text = parts[0]
    return float(text)


def _read_forest(booster) -> _Forest:
    model = json.loads(booster.save_raw("json"))
    learner = model["learner"]
    objective = learner["objective"]["name"]
    gb = learner["gradient_booster"]
    if gb.get("name") != "gbtree":
        raise ValueError(f"only gbtree boosters can be exported, got {gb.get('name')!r}")
    if objective not in _LOGIT_BASE | _IDENTITY_BASE:
        raise ValueError(
            f"objective {objective!r} is not supported; "
            f"expected one of {sorted(_LOGIT_BASE | _IDENTITY_BASE)}"
        )
    param = learner["learner_model_param"]
    if int(param.get("num_class", 0)) > 1 or int(param.get("num_target", 1)) > 1:
        raise ValueError("only single-output (binary or regression) boosters can be exported")
    base_score = _parse_base_score(param["base_score"])

    gbm = gb["model"]
    n_rounds = used_rounds(booster)
    per_round = int(gbm["gbtree_model_param"].get("num_parallel_tree", 1))
    indptr = gbm.get("iteration_indptr") or [
        r * per_round for r in range(int(booster.num_boosted_rounds()) + 1)
    ]
    trees = [_read_tree(t, k) for k, t in enumerate(gbm["trees"][: int(indptr[n_rounds])])]
    n_features = int(param["num_feature"])
    base = _base_margin(booster, objective, base_score, trees[: int(indptr[1])], n_features)
    return _Forest(trees, base, n_features, n_rounds, objective)


def _base_margin(
    booster, objective: str, base_score: float, first_round: list[_Tree], n_features: int
) -> float:
    """The float32 margin xgboost starts every prediction from, bit for bit.

    xgboost computes ``-log(1/p - 1)`` in float32 with the C library's ``logf``; numpy's float32 log
    differs from it by one step for some p (0.30833334, 0.77), so the candidates (the correctly rounded
    value, numpy's, and their float32 neighbours) are checked against xgboost's own first-round
    predictions on probe rows and the first that reproduces them all is used.
    """
    p = np.float32(base_score)
    if objective in _IDENTITY_BASE:
        return float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"base_score {base_score} is not a probability for objective {objective}")
    with np.errstate(all="ignore"):
        u = np.float32(np.float32(1.0) / p) - np.float32(1.0)
        exact = np.float32(-np.log(np.float64(u)))
        candidates = [exact, np.float32(-np.log(u))]
    up = down = exact
    for _ in range(4):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        candidates += [up, down]
    probe = [np.full(n_features, np.nan, np.float32), np.zeros(n_features, np.float32)]
    for t in first_round:
        for thr in t.threshold[~t.is_leaf]:
            below = np.nextafter(thr, np.float32(-np.inf))
            probe += [np.full(n_features, thr, np.float32), np.full(n_features, below, np.float32)]
    P = np.stack(probe)
    seen = np.asarray(
        booster.inplace_predict(P, predict_type="margin", missing=np.nan, iteration_range=(0, 1)), np.float32
    ).reshape(-1)
    leaves = [_leaf_values(t, P) for t in first_round]
    misses = []
    for c in candidates:
        acc = np.full(len(P), c, np.float32)
        for v in leaves:
            acc = acc + v
        misses.append(int(np.sum(acc != seen)))
        if misses[-1] == 0:
            return float(c)
    return float(candidates[int(np.argmin(misses))])  # the parity gate will report what remains


def _leaf_values(t: _Tree, F: np.ndarray) -> np.ndarray:
    """float32 leaf value each row of F lands on (xgboost's rule: x < t goes left, NaN the default way)."""
    node = np.zeros(len(F), np.int64)
    active = np.flatnonzero(~t.is_leaf[node])
    while len(active):
        at = node[active]
        v = F[active, t.feature[at]]
        go_left = np.where(np.isnan(v), t.default_left[at], v < t.threshold[at])
        node[active] = np.where(go_left, t.left[at], t.right[at])
        active = active[~t.is_leaf[node[active]]]
    return t.value[node]


def _read_tree(t: dict, k: int) -> _Tree:
    if int(t["tree_param"].get("size_leaf_vector", "1")) > 1:
        raise ValueError(f"tree {k} has vector leaves (multi-target): not supported")
    left, right = t["left_children"], t["right_children"]
    split_type = t.get("split_type") or [0] * len(left)
    order: list[int] = []  # preorder over reachable nodes (skips any deleted/pruned node)
    stack = [0]
    while stack:
        i = stack.pop()
        order.append(i)
        if left[i] != -1:
            if split_type[i] != 0:
                raise ValueError(f"tree {k} node {i} is a categorical split: not supported (use one-hot)")
            stack.append(right[i])
            stack.append(left[i])
    new = {old: n for n, old in enumerate(order)}
    n = len(order)
    out = {
        "left": np.full(n, -1, np.int64),
        "right": np.full(n, -1, np.int64),
        "feature": np.zeros(n, np.int64),
        "threshold": np.zeros(n, np.float32),
        "default_left": np.zeros(n, bool),
        "value": np.zeros(n, np.float32),
        "cover": np.asarray(t["sum_hessian"], np.float64)[order],
    }
    for n_id, i in enumerate(order):
        cond = np.float32(t["split_conditions"][i])  # JSON floats round-trip float32 exactly
        if left[i] == -1:
            out["value"][n_id] = cond
        else:
            out["left"][n_id], out["right"][n_id] = new[left[i]], new[right[i]]
            out["feature"][n_id] = t["split_indices"][i]
            out["threshold"][n_id] = cond
            out["default_left"][n_id] = bool(t["default_left"][i])
    return _Tree(**out)


# --------------------------------------------------------------------------------------------------
# Building the graph
# --------------------------------------------------------------------------------------------------


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value, dtype) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, domain=domain, **attrs))
        return output


def _features(g: _Graph, spec: Sequence[Feature], n_inputs: int) -> str:
    """The ONNX twin of ``features.transform``: Gather / Equal / guarded Div, then spec order."""
    for f in spec:
        if any(not 0 <= i < n_inputs for i in f.inputs):
            raise ValueError(f"feature {f.name!r} reads input columns {f.inputs}, outside 0..{n_inputs - 1}")
    groups: list[str] = []
    order: list[int] = []  # spec index of each column of the concatenated groups
    cols = [j for j, f in enumerate(spec) if f.op == "column"]
    hots = [j for j, f in enumerate(spec) if f.op == "one_hot"]
    ratios = [j for j, f in enumerate(spec) if f.op == "ratio"]
    scored = [j for j, f in enumerate(spec) if f.op == "score"]
    unknown = [f.op for f in spec if f.op not in ("column", "one_hot", "ratio", "score")]
    if unknown:
        raise ValueError(f"unknown feature ops {sorted(set(unknown))}")
    if cols:
        idx = g.const("column_index", [spec[j].inputs[0] for j in cols], np.int64)
        groups.append(g.op("Gather", [INPUT, idx], "column_features", axis=1))
        order += cols
    if hots:
        idx = g.const("one_hot_index", [spec[j].inputs[0] for j in hots], np.int64)
        val = g.const("one_hot_value", [[spec[j].value for j in hots]], np.float32)
        codes = g.op("Gather", [INPUT, idx], "one_hot_codes", axis=1)
        eq = g.op("Equal", [codes, val], "one_hot_equal")  # NaN code -> false -> 0, as numpy
        groups.append(g.op("Cast", [eq], "one_hot_features", to=TensorProto.FLOAT))
        order += hots
    if ratios:
        num_idx = g.const("ratio_num_index", [spec[j].inputs[0] for j in ratios], np.int64)
        den_idx = g.const("ratio_den_index", [spec[j].inputs[1] for j in ratios], np.int64)
        num = g.op("Gather", [INPUT, num_idx], "ratio_num", axis=1)
        den = g.op("Gather", [INPUT, den_idx], "ratio_den", axis=1)
        zero = g.const("ratio_zero", 0.0, np.float32)
        nan = g.const("ratio_nan", np.nan, np.float32)
        positive = g.op("Greater", [den, zero], "ratio_den_positive")  # NaN -> false -> NaN
        quotient = g.op("Div", [num, den], "ratio_quotient")
        groups.append(g.op("Where", [positive, quotient, nan], "ratio_features"))
        order += ratios
    if scored:
        groups.append(_scores(g, [spec[j] for j in scored]))
        order += scored
    if not groups:
        raise ValueError("the feature spec is empty")
    joined = groups[0] if len(groups) == 1 else g.op("Concat", groups, "grouped_features", axis=1)
    if order == list(range(len(spec))):
        return joined
    perm = g.const("feature_order", [order.index(j) for j in range(len(spec))], np.int64)
    return g.op("Gather", [joined, perm], "features", axis=1)


_COMPARE = {">=": "GreaterOrEqual", ">": "Greater", "<=": "LessOrEqual", "<": "Less", "==": "Equal"}


def _scores(g: _Graph, feats: Sequence[Feature]) -> str:
    """float32 [N, S]: the ONNX twin of ``features.score_points`` for every score feature at once.

    Each comparison is met or not (a NaN meets none); an item's count is a MatMul of the met flags
    (and of its nested items' points) with a 0/1 membership matrix; its points are one Gather from all
    items' point tables laid end to end; a score's total is a MatMul of the items' points with another
    0/1 matrix. Every value is a small integer, exact in float32 whatever the order of the sums, so the
    totals equal numpy's item by item.

    Why not one Gather, compare, Cast and Add per condition, as before: HScore alone took 68 graph nodes
    that way, and onnxruntime pays ~1-2 µs per node and call, more than the arithmetic (one patient
    explained with the 300-tree bench bundle spent ~0.1 ms in them). This form takes two nodes per
    comparison operator used, five per level of items (nested items add a level) and three more, whatever
    the number of scores and items: 16 for HScore."""
    conditions: list[Condition] = []
    items: list[tuple[int, ScoreItem]] = []  # (height, item): height 0 holds only comparisons
    parts: list[list[tuple[str, int]]] = []  # per item: ("c", condition index) or ("i", item index)
    tops: list[tuple[int, int]] = []  # (item index, score) of every top-level item

    def visit(item: ScoreItem) -> int:
        terms: list[tuple[str, int]] = []
        for t in item.conditions:
            if isinstance(t, ScoreItem):
                terms.append(("i", visit(t)))
            else:
                terms.append(("c", len(conditions)))
                conditions.append(t)
        height = 1 + max((items[i][0] for kind, i in terms if kind == "i"), default=-1)
        items.append((height, item))
        parts.append(terms)
        return len(items) - 1

    for s_idx, f in enumerate(feats):
        for item in f.items:
            tops.append((visit(item), s_idx))

    # the comparisons, grouped by operator: one Gather and one compare per operator used
    met_groups, column_of = [], np.empty(len(conditions), dtype=np.int64)
    for op in sorted({c.op for c in conditions}):
        which = [k for k, c in enumerate(conditions) if c.op == op]
        column_of[which] = np.arange(len(which)) + sum(len(m) for _, m in met_groups)
        p = f"score_{_COMPARE[op].lower()}"
        col = g.op("Gather", [INPUT, g.const(f"{p}_index", [conditions[k].input for k in which], np.int64)],
                   f"{p}_values", axis=1)  # fmt: skip
        thr = g.const(f"{p}_threshold", [[conditions[k].threshold for k in which]], np.float32)
        met_groups.append((g.op(_COMPARE[op], [col, thr], f"{p}_met"), which))
    flags = [m for m, _ in met_groups]
    met = flags[0] if len(flags) == 1 else g.op("Concat", flags, "score_met", axis=1)
    values = g.op("Cast", [met], "score_met_counts", to=TensorProto.FLOAT)

    # items, lowest first; ``column`` is each item's points column in ``values`` once computed
    width, column = len(conditions), np.full(len(items), -1, dtype=np.int64)
    for h in range(max(hh for hh, _ in items) + 1):
        level = [i for i, (hh, _) in enumerate(items) if hh == h]
        member = np.zeros((width, len(level)), dtype=np.float32)
        for j, i in enumerate(level):
            for kind, k in parts[i]:
                member[column_of[k] if kind == "c" else column[k], j] = 1.0
        tables = [items[i][1].points for i in level]
        offsets = np.cumsum([0] + [len(t) for t in tables[:-1]])
        p = f"score_level{h}"
        count = g.op("MatMul", [values, g.const(f"{p}_member", member, np.float32)], f"{p}_count")
        at = g.op("Add", [count, g.const(f"{p}_offset", [offsets], np.float32)], f"{p}_table_at")
        at = g.op("Cast", [at], f"{p}_table_index", to=TensorProto.INT64)
        flat = g.const(f"{p}_points", [p_ for t in tables for p_ in t], np.float32)
        points = g.op("Gather", [flat, at], f"{p}_points_met", axis=0)
        values = g.op("Concat", [values, points], f"{p}_values", axis=1)
        column[level] = width + np.arange(len(level))
        width += len(level)
    total = np.zeros((width, len(feats)), dtype=np.float32)
    for i, s_idx in tops:
        total[column[i], s_idx] = 1.0
    return g.op("MatMul", [values, g.const("score_total", total, np.float32)], "score_features")


SMALL_BATCH = 50  # rows onnxruntime's TreeEnsemble adds up tree by tree, in order, on any thread count
SMALL_BATCH_GIVEN_ROWS = 2_000  # given rows the parity gate also scores through the small-batch branch


def _trees(g: _Graph, forest: _Forest, features: str) -> str:
    """Margin = ((base + leaf_0) + leaf_1) + ... in float32, in tree order: xgboost's sum, bit for bit.

    The base margin is folded into tree 0's leaves (``base + leaf`` is what xgboost adds first). Then:

    * up to ``SMALL_BATCH`` rows (one patient, a small request), one single-target ensemble. onnxruntime
      adds the trees to each row in order there whatever its thread count (``parallel_N_`` = 50 in
      ``tree_ensemble_common.h``; measured bit-identical on 1 and 2 threads at 1-50 rows), and it is
      the cheaper kernel: 25-40% less time per row than the form below on the main job's onset graph.
    * more rows, every tree writes its own target ([N, T], exact: each target receives one leaf) and
      ``CumSum`` (a sequential loop in onnxruntime) adds them in order. The single-target kernel would
      split the trees across threads for such batches and add the partial sums, which moves the margin
      by a few float32 steps (enough to move an isotonic risk across a steep segment): 48 of 51 rows
      differed on two threads.

    An ``If`` on the row count picks the branch, so the graph is exact on any batch and thread count;
    the cost is a second copy of the trees in the file. A caller that wants the cheap kernel on a big
    batch sends it in pieces of at most ``SMALL_BATCH`` rows (the service does, across threads)."""
    a: dict[str, list] = {
        k: []
        for k in (
            "nodes_treeids",
            "nodes_nodeids",
            "nodes_featureids",
            "nodes_modes",
            "nodes_values",
            "nodes_truenodeids",
            "nodes_falsenodeids",
            "nodes_missing_value_tracks_true",
            "target_treeids",
            "target_nodeids",
            "target_ids",
            "target_weights",
        )
    }
    for k, t in enumerate(forest.trees):
        n = len(t.left)
        leaf = t.is_leaf
        a["nodes_treeids"] += [k] * n
        a["nodes_nodeids"] += list(range(n))
        a["nodes_featureids"] += t.feature.tolist()
        a["nodes_modes"] += ["LEAF" if is_leaf else "BRANCH_LT" for is_leaf in leaf]
        a["nodes_values"] += t.threshold.tolist()
        a["nodes_truenodeids"] += np.where(leaf, 0, t.left).tolist()  # true branch = x < t = left
        a["nodes_falsenodeids"] += np.where(leaf, 0, t.right).tolist()
        a["nodes_missing_value_tracks_true"] += t.default_left.astype(np.int64).tolist()
        leaves = np.flatnonzero(leaf)
        weights = t.value[leaves]
        if k == 0:
            weights = np.float32(forest.base_margin) + weights  # float32 add, as xgboost does it
        a["target_treeids"] += [k] * len(leaves)
        a["target_nodeids"] += leaves.tolist()
        a["target_ids"] += [k] * len(leaves)
        a["target_weights"] += weights.astype(np.float32).tolist()
    ensemble = {"domain": "ai.onnx.ml", "aggregate_function": "SUM", "post_transform": "NONE"}

    small = _Graph()  # one target: the trees' sum
    total = small.op("TreeEnsembleRegressor", [features], "tree_sum", n_targets=1,
                     **ensemble, **(a | {"target_ids": [0] * len(a["target_ids"])}))  # fmt: skip
    small.op("Reshape", [total, small.const("tree_sum_shape", [-1], np.int64)], "margin_small_batch")

    large = _Graph()  # one target per tree, summed in order
    per_tree = large.op("TreeEnsembleRegressor", [features], "tree_values", n_targets=len(forest.trees),
                        **ensemble, **a)  # fmt: skip
    running = large.op("CumSum", [per_tree, large.const("tree_axis", 1, np.int64)], "running_margin")
    last = large.const("last_tree", len(forest.trees) - 1, np.int64)
    large.op("Gather", [running, last], "margin_large_batch", axis=1)

    rows = g.op("Shape", [features], "tree_rows", start=0, end=1)
    few = g.op("LessOrEqual", [rows, g.const("small_batch", [SMALL_BATCH], np.int64)], "small_batch_rows")
    return g.op("If", [few], MARGIN, then_branch=_branch(small, "margin_small_batch", "small_batch"),
                else_branch=_branch(large, "margin_large_batch", "large_batch"))  # fmt: skip


def _branch(sub: _Graph, output: str, name: str) -> onnx.GraphProto:
    """An ``If`` branch: ``sub``'s nodes and constants, reading the outer graph's values by name."""
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N"])
    return helper.make_graph(sub.nodes, name, [], [out], sub.inits)


def _calibration_arrays(cal: Calibrator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Isotonic knots -> per-segment (x_ref, y_ref, slope) tables indexed by count(knots <= margin).

    ``np.interp`` picks j = the last knot with x[j] <= m and returns y[j] + slope_j * (m - x[j]); index 0
    (left of every knot) and index K (at or right of the last knot) are flat. Tied knots are never
    picked as j except as the last one, so their (undefined) slope is never used.
    """
    x = np.asarray(cal.x, dtype=np.float64)
    y = np.asarray(cal.y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
        raise ValueError(f"isotonic calibrator needs matching non-empty knots, got {len(x)} x and {len(y)} y")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("isotonic knots must be finite")
    if np.any(np.diff(x) < 0):
        raise ValueError("isotonic knots x must be sorted (non-decreasing)")
    k = len(x)
    x_ref = np.concatenate([[x[0]], x])
    y_ref = np.concatenate([[y[0]], y])
    slope = np.zeros(k + 1)
    if k > 1:
        dx, dy = np.diff(x), np.diff(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope[1:k] = np.where(dx > 0, dy / dx, 0.0)
    return x_ref, y_ref, slope


def _calibration(g: _Graph, cal: Calibrator, margin: str) -> str:
    m64 = g.op("Cast", [margin], "margin_f64", to=TensorProto.DOUBLE)
    if cal.kind == "platt":
        if not (np.isfinite(cal.a) and np.isfinite(cal.b)):
            raise ValueError(f"Platt coefficients must be finite, got a={cal.a}, b={cal.b}")
        a = g.const("platt_a", float(cal.a), np.float64)
        b = g.const("platt_b", float(cal.b), np.float64)
        z = g.op("Add", [g.op("Mul", [m64, a], "platt_am"), b], "platt_logit")
        p64 = g.op("Sigmoid", [z], "risk_f64")
    elif cal.kind == "isotonic":
        x_ref, y_ref, slope = _calibration_arrays(cal)
        knots = g.const("iso_knots", np.asarray(cal.x, dtype=np.float64)[None, :], np.float64)
        axis1 = g.const("axis_1", [1], np.int64)
        col = g.op("Unsqueeze", [m64, axis1], "iso_margin_col")
        le = g.op("LessOrEqual", [knots, col], "iso_knot_le")  # [N, K]: x[i] <= m
        idx = g.op(
            "ReduceSum",
            [g.op("Cast", [le], "iso_le_i64", to=TensorProto.INT64), axis1],
            "iso_index",
            keepdims=0,
        )
        xr = g.op("Gather", [g.const("iso_x_ref", x_ref, np.float64), idx], "iso_x")
        yr = g.op("Gather", [g.const("iso_y_ref", y_ref, np.float64), idx], "iso_y")
        sl = g.op("Gather", [g.const("iso_slope", slope, np.float64), idx], "iso_s")
        step = g.op("Mul", [sl, g.op("Sub", [m64, xr], "iso_dx")], "iso_step")
        p64 = g.op("Add", [step, yr], "risk_f64")  # numpy: slope * (x - xp[j]) + fp[j]
    else:
        raise ValueError(f"calibrator kind must be 'platt' or 'isotonic', got {cal.kind!r}")
    return g.op("Cast", [p64], RISK, to=TensorProto.FLOAT)


def risk_model_to_onnx(
    booster,
    spec: list[Feature],
    n_inputs: int,
    calibrator: Calibrator,
    *,
    input_names: list[str],
) -> onnx.ModelProto:
    """The whole scoring path as one ONNX graph: ``inputs`` [N, K] -> ``risk`` [N], ``margin`` [N]."""
    input_names = list(input_names)
    if len(input_names) != n_inputs:
        raise ValueError(f"{len(input_names)} input names for {n_inputs} input columns")
    forest = _read_forest(booster)
    if forest.n_features != len(spec):
        raise ValueError(f"the booster was trained on {forest.n_features} features, the spec has {len(spec)}")
    names = feature_names(spec)
    if booster.feature_names is not None and list(booster.feature_names) != names:
        raise ValueError("the booster's feature names differ from the spec's feature names")

    g = _Graph()
    features = _features(g, spec, n_inputs)
    margin = _trees(g, forest, features)
    _calibration(g, calibrator, margin)

    x_info = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", n_inputs])
    x_info.doc_string = "float32 [N, K], NaN = missing; columns: " + ", ".join(input_names)
    risk_info = helper.make_tensor_value_info(RISK, TensorProto.FLOAT, ["N"])
    risk_info.doc_string = f"calibrated probability ({calibrator.kind} calibration of the margin)"
    margin_info = helper.make_tensor_value_info(MARGIN, TensorProto.FLOAT, ["N"])
    margin_info.doc_string = "xgboost margin (log-odds before calibration)"
    graph = helper.make_graph(g.nodes, "masml_risk_model", [x_info], [risk_info, margin_info], g.inits)
    graph.doc_string = (
        f"masml risk model: {len(spec)} derived features, {len(forest.trees)} trees "
        f"({forest.n_rounds} rounds, {forest.objective}), {calibrator.kind} calibration."
    )
    model = make_model(graph, PRODUCER_VERSION)
    model.doc_string = (
        "Inputs (matrix columns, in order): "
        + ", ".join(input_names)
        + ". Features (tree feature indices, in order): "
        + ", ".join(names)
        + "."
    )
    helper.set_model_props(
        model,
        {
            "masml.input_names": json.dumps(input_names),
            "masml.feature_names": json.dumps(names),
            "masml.calibration": json.dumps(_calibrator_dict(calibrator), sort_keys=True),
            "masml.xgboost_objective": forest.objective,
            "masml.trees": str(len(forest.trees)),
            "masml.rounds": str(forest.n_rounds),
            "masml.base_margin": repr(forest.base_margin),
        },
    )
    return model


def make_model(graph: onnx.GraphProto, producer_version: str) -> onnx.ModelProto:
    """A model around ``graph`` with masml's opsets and producer (no timestamps: deterministic bytes)."""
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name=PRODUCER_NAME,
        producer_version=producer_version,
        ir_version=helper.find_min_ir_version_for(opsets),
    )
    model.model_version = 1
    return model


def _calibrator_dict(cal: Calibrator) -> dict:
    return {
        "kind": cal.kind,
        "a": float(cal.a),
        "b": float(cal.b),
        "x": [float(v) for v in np.asarray(cal.x, dtype=np.float64).reshape(-1)],
        "y": [float(v) for v in np.asarray(cal.y, dtype=np.float64).reshape(-1)],
    }


def save_onnx(model: onnx.ModelProto, path) -> str:
    """Write the model's bytes (deterministic: no timestamps in the graph) and return their sha256."""
    data = model.SerializeToString()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Parity gate
# --------------------------------------------------------------------------------------------------


def _first_visitors(forest: _Forest, F: np.ndarray) -> list[np.ndarray]:
    """Per tree, per node: the first row of F whose path reaches the node (-1 if none)."""
    out = []
    rows = np.arange(len(F))
    for t in forest.trees:
        first = np.full(len(t.left), -1, np.int64)
        node = np.zeros(len(F), np.int64)
        active = rows
        while len(active):
            at = node[active]
            fresh = first[at] < 0
            # rows are in increasing order, so np.unique's first index is the first visitor
            uniq, pos = np.unique(at[fresh], return_index=True)
            first[uniq] = active[fresh][pos]
            inner = ~t.is_leaf[at]
            active, at = active[inner], at[inner]
            v = F[active, t.feature[at]]
            go_left = np.where(np.isnan(v), t.default_left[at], v < t.threshold[at])
            node[active] = np.where(go_left, t.left[at], t.right[at])
        out.append(first)
    return out


def _stress_rows(
    forest: _Forest,
    spec: Sequence[Feature],
    X: np.ndarray,
    missing_rows: int,
    threshold_rows: bool,
    seed: int,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Rows built to break a graph: each input missing in turn, and values exactly on every split."""
    n, k = X.shape
    base = X if n else np.full((1, k), np.nan, np.float32)
    rows: list[np.ndarray] = []
    labels: list[tuple[str, str]] = []
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(base), size=min(missing_rows, len(base)), replace=False))
    for j in range(k):
        block = base[pick].copy()
        block[:, j] = np.nan
        rows.append(block)
        labels += [("missing", f"row {i} with input {j} set to NaN") for i in pick]
    rows.append(np.full((1, k), np.nan, np.float32))
    labels.append(("missing", "all inputs NaN"))
    if threshold_rows:
        sample = base[: min(len(base), 2000)]
        visitors = _first_visitors(forest, transform(sample, spec))
        splits: dict[tuple[int, float], int] = {}
        for t, first in zip(forest.trees, visitors, strict=True):
            for node in np.flatnonzero(~t.is_leaf):
                key = (int(t.feature[node]), float(t.threshold[node]))
                if splits.get(key, -1) < 0:
                    splits[key] = int(first[node])
        for c, (f, thr) in enumerate(sorted(splits)):
            row = sample[splits[(f, thr)]] if splits[(f, thr)] >= 0 else sample[c % len(sample)]
            for kind, value in _values_on_split(spec, f, np.float32(thr)):
                new = _set_feature(row, spec, f, value)
                if new is not None:
                    rows.append(new[None, :])
                    labels.append((kind, f"feature {spec[f].name} = {value!r} (split at {thr!r})"))
        # A clinical score's own cut-offs: an input exactly on (and one float32 step around) each one.
        for f in (g for g in spec if g.op == "score"):
            conditions = score_conditions(f.items)
            for c_no, c in enumerate(conditions):
                thr, inf = np.float32(c.threshold), np.float32(np.inf)
                for value in (np.nextafter(thr, -inf), thr, np.nextafter(thr, inf)):
                    new = sample[c_no % len(sample)].copy()
                    new[c.input] = value
                    rows.append(new[None, :])
                    text = f"score {f.name}: input {c.input} = {value!r} ({c.op} {thr!r})"
                    labels.append(("threshold", text))
    return np.concatenate(rows).astype(np.float32), labels


def _values_on_split(spec: Sequence[Feature], f: int, thr: np.float32) -> list[tuple[str, np.float32]]:
    out = [("threshold", thr)]
    if spec[f].op != "one_hot":  # a one-hot feature is 0 or 1: no neighbouring values
        out.append(("threshold_neighbour", np.nextafter(thr, np.float32(-np.inf))))
        out.append(("threshold_neighbour", np.nextafter(thr, np.float32(np.inf))))
    return out


def _set_feature(row: np.ndarray, spec: Sequence[Feature], f: int, value: np.float32) -> np.ndarray | None:
    """A copy of the input row whose feature f equals value exactly, or None when that is impossible."""
    feat = spec[f]
    new = row.copy()
    if feat.op == "column":
        new[feat.inputs[0]] = value
    elif feat.op == "ratio":
        new[feat.inputs[0]], new[feat.inputs[1]] = value, np.float32(1.0)  # value / 1 == value exactly
    elif feat.op == "score":
        return None  # a points total is not set directly; its items' cut-offs are stressed instead
    elif value == 1.0:
        new[feat.inputs[0]] = np.float32(feat.value)
    elif value == 0.0:
        others = [
            g.value for g in spec if g.op == "one_hot" and g.inputs == feat.inputs and g.value != feat.value
        ]
        new[feat.inputs[0]] = np.float32(others[0]) if others else np.float32(np.nan)
    else:
        return None
    got = transform(new[None, :], spec)[0, f]
    return new if got == value else None


GATE_THREADS = 2  # parity gates run onnxruntime on two threads, so a thread-split sum shows on any machine


def _onnx_session(onnx_model):
    import onnxruntime as ort

    if isinstance(onnx_model, onnx.ModelProto):
        data = onnx_model.SerializeToString()
    elif isinstance(onnx_model, bytes):
        data = onnx_model
    else:
        data = Path(onnx_model).read_bytes()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = GATE_THREADS
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def parity_gate(
    onnx_model,
    booster,
    spec: list[Feature],
    calibrator: Calibrator,
    X: np.ndarray,
    *,
    tol: float = 1e-5,
    margin_tol: float = 1e-4,
    missing_rows: int = 25,
    threshold_rows: bool = True,
    single_rows: int = 20,
    seed: int = 0,
) -> dict:
    """Score X plus generated stress rows with Python and onnxruntime; raise ParityError on disagreement.

    Python path: ``features.transform`` -> ``booster.inplace_predict(margin)`` over the rounds the export
    uses (``best_iteration + 1`` when early-stopped) -> ``calibrator.apply``. Stress rows: ``missing_rows``
    sampled rows with each input set to NaN in turn (+ one all-NaN row), and for every distinct split of
    every used tree a row (one that reaches that split, when X has one) with the split feature set
    exactly to the float32 threshold and to its float32 neighbours either side. The first
    ``single_rows`` rows of X are also scored one at a time (onnxruntime's one-row code path), and every
    stress row and the first ``SMALL_BATCH_GIVEN_ROWS`` rows of X again in calls of ``SMALL_BATCH`` rows
    (the graph's small-batch branch, which holds its own copy of the trees).
    ``onnx_model`` is a ModelProto, serialized bytes or a path.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D input matrix, got shape {X.shape}")
    forest = _read_forest(booster)
    stress, labels = _stress_rows(forest, spec, X, missing_rows, threshold_rows, seed)
    rows = np.concatenate([X, stress])
    kinds = np.array(["given"] * len(X) + [kind for kind, _ in labels])
    notes = [f"X row {i}" for i in range(len(X))] + [note for _, note in labels]

    F = transform(rows, spec)
    py_margin = booster.inplace_predict(
        F, predict_type="margin", missing=np.nan, iteration_range=(0, forest.n_rounds)
    )
    py_margin = np.asarray(py_margin, dtype=np.float32).reshape(-1)
    py_risk = np.asarray(calibrator.apply(py_margin), dtype=np.float64)
    notes = list(notes)

    sess = _onnx_session(onnx_model)
    ox_risk, ox_margin = _run(sess, rows)
    # onnxruntime takes other code paths for one row than for a batch: score some rows one at a time too
    single = np.arange(min(len(X), single_rows))
    for i in single:
        r, m = _run(sess, rows[i : i + 1])
        ox_risk = np.append(ox_risk, r)
        ox_margin = np.append(ox_margin, m)
    py_risk = np.append(py_risk, py_risk[single])
    py_margin = np.append(py_margin, py_margin[single])
    kinds = np.append(kinds, ["single_row"] * len(single))
    notes += [f"X row {i} scored alone" for i in single]
    # the graph's small-batch branch too, in calls of SMALL_BATCH rows: every stress row, and given rows
    few = np.concatenate([np.arange(min(len(X), SMALL_BATCH_GIVEN_ROWS)), np.arange(len(X), len(rows))])
    r, m = _run(sess, rows[few], SMALL_BATCH)
    ox_risk, ox_margin = np.append(ox_risk, r), np.append(ox_margin, m)
    py_risk, py_margin = np.append(py_risk, py_risk[few]), np.append(py_margin, py_margin[few])
    kinds = np.append(kinds, ["small_batch"] * len(few))
    notes += [f"{kinds[i]} row, {notes[i]}, in calls of {SMALL_BATCH} rows" for i in few]

    d_risk = _abs_diff(py_risk, ox_risk)
    d_margin = _abs_diff(py_margin.astype(np.float64), ox_margin)
    n = len(kinds)
    report: dict = {
        "n_rows": int(n),
        "n_given_rows": int(len(X)),
        "n_missing_rows": int(np.sum(kinds == "missing")),
        "n_threshold_rows": int(np.sum(kinds == "threshold")),
        "n_threshold_neighbour_rows": int(np.sum(kinds == "threshold_neighbour")),
        "n_single_rows": int(len(single)),
        "n_small_batch_rows": int(len(few)),
        "max_abs_diff_risk": float(d_risk.max()) if n else 0.0,
        "max_abs_diff_margin": float(d_margin.max()) if n else 0.0,
        "by_kind": {
            kind: {
                "n_rows": int(np.sum(kinds == kind)),
                "max_abs_diff_risk": float(d_risk[kinds == kind].max()),
                "max_abs_diff_margin": float(d_margin[kinds == kind].max()),
            }
            for kind in _KINDS
            if np.any(kinds == kind)
        },
        "tol": tol,
        "margin_tol": margin_tol,
    }
    for name, d, py, ox, limit in (
        ("margin", d_margin, py_margin, ox_margin, margin_tol),
        ("risk", d_risk, py_risk, ox_risk, tol),
    ):
        if n and d.max() > limit:
            i = int(np.argmax(d))
            raise ParityError(
                f"ONNX/Python parity failed on {name}: max |diff| {d[i]:.3g} > {limit:g} at row {i} "
                f"({kinds[i]}: {notes[i]}): python {name}={float(py[i])!r}, onnx {name}={float(ox[i])!r}; "
                f"{int(np.sum(d > limit))} of {n} rows over tolerance",
                report,
            )
    return report


def _run(sess, rows: np.ndarray, per_call: int = ROWS_PER_RUN) -> tuple[np.ndarray, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    if RISK not in names or MARGIN not in names:
        raise ParityError(f"the ONNX graph must output {RISK!r} and {MARGIN!r}, got {sorted(names)}")
    risk, margin = run_rows(sess, [RISK, MARGIN], rows, per_call)
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    margin = np.asarray(margin, dtype=np.float64).reshape(-1)
    if len(risk) != len(rows) or len(margin) != len(rows):
        raise ParityError(
            f"the ONNX graph returned {len(risk)} risks, {len(margin)} margins for {len(rows)} rows"
        )
    return risk, margin


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b|, with NaN on exactly one side counted as an infinite difference (both NaN = equal)."""
    d = np.abs(a - b)
    both = np.isnan(a) & np.isnan(b)
    return np.where(both, 0.0, np.where(np.isnan(d), np.inf, d))
