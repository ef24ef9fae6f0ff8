"""Exact SHAP explanations as an ONNX graph: ``explainer.onnx`` beside ``model.onnx`` (issue 6).

Why a graph and not the shap package: the service must explain every prediction with onnxruntime and
numpy only, and shap/xgboost break with each other's releases (shared anchors §3). The explanation is
path-dependent TreeSHAP of the margin (Lundberg et al. 2020, "From local explanations to global
understanding with explainable AI for trees", Nat Mach Intell 2:56), the values ``shap.TreeExplainer``
(= xgboost ``pred_contribs``) returns, evaluated with the precomputed tables of Fast TreeSHAP v2
(Yang 2021, arXiv:2109.09847).

Why the tables make this a graph of gathers: for one leaf with value v whose root path splits on the
distinct features P (conditions on the same feature merged, as TreeSHAP does), a row enters TreeSHAP
only through which features' conditions it meets (o_k = 1 when every condition on feature k sends it
towards the leaf; a missing value goes the node's default way, as in xgboost) and the cover fractions
z_k (product over the feature's conditions of cover(child) / cover(parent)). With
``H(A) = sum_{S ⊆ A} |S|! (d-|S|-1)! / d! * prod_{k ∉ S} z_k`` (d = |P|), the leaf adds to feature i

    phi_i = v * (o_i - z_i) / z_i * H(O \\ {i}),   O = {k : o_k = 1},

(every term of H(O \\ {i}) holds the factor z_i, so the division is exact algebra). H is tabulated once
per leaf over all 2^d patterns of its d path *conditions* (so that repeated features need no merging
at run time; Yang's tables are over merged features, which here cost a broadcast that onnxruntime runs
slowly), and explaining a row is: decide every split, form each leaf's condition bit pattern,
gather H at the pattern with feature i's bits cleared, multiply by a per-(leaf, feature) coefficient
chosen by o_i, and sum per feature (entries stored feature by feature, summed in chunks, the chunks
added into their feature's column by a small MatMul: ``_by_feature``). The per-leaf work is O(D) instead of
TreeSHAP's O(D^2) and has no data-dependent control flow.

Tables are computed in float64 and stored in float32; contributions are accumulated in float32 (their
error is ~1e-6 log-odds, far inside the 1e-4 gate). ``margin`` is the scoring graph's own tree sum
(``onnx_export._trees``), so it equals ``model.onnx``'s margin bit for bit, and ``base_value`` is
``base margin + sum over trees of the cover-weighted mean leaf value`` (xgboost's bias term).

Derived features are also attributed back to the canonical inputs they are computed from
(``input_contributions``), by a fixed linear map whose rows sum to one (:data:`ATTRIBUTION_RULE`), so
the attributed values add up to the same margin.

The benefit bundle's explainer (``masml.onnx_benefit.benefit_explainer_to_onnx``) is built from the same
pieces (``explainable_forest``, ``explainer_nodes``, ``columns_section``) once per outcome model, under a
name prefix, and checked by the same gate (``explainer_parity_gate`` with ``prefix``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from masml.features import Feature, feature_names, transform
from masml.onnx_export import (
    INPUT,
    MARGIN,
    ParityError,
    _abs_diff,
    _features,
    _Forest,
    _Graph,
    _onnx_session,
    _read_forest,
    _stress_rows,
    _trees,
    make_model,
)

CONTRIBUTIONS, INPUT_CONTRIBUTIONS, BASE_VALUE = "contributions", "input_contributions", "base_value"
EXPLAINER_FILE = "explainer.onnx"
PRODUCER_VERSION = "shap-2"  # bump when the explainer graph layout changes
MAX_TABLE_ENTRIES = 64_000_000  # 256 MB of float32: beyond this, depth is too large for v2 tables
ATTRIBUTION_RULE = (
    "column -> its input (weight 1); one_hot -> its categorical input (weight 1); ratio -> numerator and "
    "denominator, 1/2 each; score -> each input the score reads, equally (1/number of inputs). Every "
    "feature's weights sum to 1, so the input contributions add up to the same margin."
)


class ExplainerParityError(ParityError):
    """The explainer graph disagrees with shap.TreeExplainer, or its values do not add up to the margin."""


@dataclass(frozen=True)
class _Tables:
    """Everything the graph needs, flattened over all trees (internal nodes, leaves, (leaf, feature))."""

    node_feature: np.ndarray  # int64 [M+1]: feature each internal node splits on (+ a padding node)
    node_threshold: np.ndarray  # float32 [M+1]
    node_default_left: np.ndarray  # bool [M+1]
    node_bit: np.ndarray  # int32 [M+1]: 2^depth of the node (its condition's bit in a path), 0 for padding
    cond_index: np.ndarray  # int64 [L*D]: node of each leaf's c-th condition, + (M+1) if it holds on the
    #   right; padding conditions point at the padding node, whose bit is 0 on both sides
    depth: int  # D: the longest root-to-leaf path
    table: np.ndarray  # float32 [L * 2^D]: H at each condition pattern, leaf l's from l * 2^D
    entry_leaf: np.ndarray  # int64 [P]: the leaf of each (leaf, feature) pair
    entry_keep: np.ndarray  # int32 [P]: condition bits of the other features, and every bit >= D (the
    #   leaf's table row, which the pattern carries in its high bits)
    entry_mask: np.ndarray  # int32 [P]: condition bits of this feature
    entry_one: np.ndarray  # float32 [P]: v (1 - z) / z, used when the row meets the feature's conditions
    entry_zero: np.ndarray  # float32 [P]: -v, used when it does not
    entry_feature: np.ndarray  # int64 [P]: model feature index
    base_value: float  # float64: base margin + sum of the trees' expected values


def _shapley_weights(d: int) -> np.ndarray:
    """w[s] = s! (d - s - 1)! / d! for s < d; the full set is never a coalition that excludes i."""
    w = np.zeros(d + 1)
    for s in range(d):
        w[s] = math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d)
    return w


def _leaf_table(z: np.ndarray, slot_masks: np.ndarray, depth: int) -> np.ndarray:
    """H over every pattern of the path's conditions (float64 [2^depth]); see the module docstring."""
    d = len(z)
    subsets = np.arange(1 << d)
    members = (subsets[:, None] >> np.arange(d)) & 1  # [2^d, d]
    size = members.sum(axis=1)
    absent = np.where(members == 0, z[None, :], 1.0).prod(axis=1)
    h = _shapley_weights(d)[size] * absent
    for k in range(d):  # subset sums: h[A] = sum over S ⊆ A of terms[S]
        has = (subsets >> k) & 1 == 1
        h[has] += h[subsets[has] ^ (1 << k)]
    patterns = np.arange(1 << depth)
    merged = np.zeros(len(patterns), np.int64)  # the feature subset O each condition pattern means
    for k, m in enumerate(slot_masks):
        merged |= ((patterns & m) == m).astype(np.int64) << k
    return h[merged]


def _tables(forest: _Forest) -> _Tables:
    """Walk every root-to-leaf path once; tabulate H per leaf and the per-(leaf, feature) constants."""
    offsets = np.cumsum([0] + [int(np.sum(~t.is_leaf)) for t in forest.trees])
    paths: list[tuple[float, list[tuple[int, bool, int, float]]]] = []  # (v, [(node, left, feature, frac)])
    expected = 0.0
    for k, t in enumerate(forest.trees):
        internal = np.cumsum(~t.is_leaf) - 1  # node id -> index among the tree's internal nodes
        stack: list[tuple[int, list]] = [(0, [])]
        while stack:
            node, path = stack.pop()
            if t.is_leaf[node]:
                frac = np.prod([c[3] for c in path]) if path else 1.0
                expected += float(t.value[node]) * float(frac)
                paths.append((float(t.value[node]), path))
                continue
            for child, left in ((t.right[node], False), (t.left[node], True)):
                if t.cover[node] <= 0 or t.cover[child] <= 0:
                    raise ValueError(
                        f"tree {k} node {child} has cover {t.cover[child]!r} under {t.cover[node]!r}: "
                        "TreeSHAP needs every node reached by training data (min_child_weight > 0)"
                    )
                step = (int(offsets[k] + internal[node]), left, int(t.feature[node]),
                        float(t.cover[child] / t.cover[node]))  # fmt: skip
                stack.append((int(child), [*path, step]))
    depth = max(len(p) for _, p in paths)
    if depth == 0:
        raise ValueError("every tree is a single leaf: the model has no splits, so nothing to explain")
    n_leaves = len(paths)
    stride = 1 << depth  # every leaf's table padded to 2^D: its row is then the pattern's high bits
    size = n_leaves * stride
    if size > MAX_TABLE_ENTRIES:
        raise ValueError(
            f"explainer tables would hold {size:,} entries ({n_leaves} leaves, paths up to {depth} splits): "
            f"too large for this method (limit {MAX_TABLE_ENTRIES:,}); use shallower trees"
        )
    pad = int(offsets[-1])  # the padding node, after every internal node
    cond_index = np.full((n_leaves, depth), pad, np.int64)
    node_bit = np.zeros(pad + 1, np.int32)
    table = np.zeros(size, np.float64)  # a leaf at depth d fills 2^d of its 2^D slots
    entries: list[tuple[int, int, int, float, float, int]] = []
    high = ~(stride - 1)  # the bits above the pattern: the leaf's table row
    for leaf, (v, path) in enumerate(paths):
        features: list[int] = []  # distinct features in path order
        for c, (node, left, feature, _) in enumerate(path):
            cond_index[leaf, c] = node if left else node + pad + 1
            node_bit[node] = 1 << c  # the c-th condition of every path through it: its depth is c
            if feature not in features:
                features.append(feature)
        masks = np.array(
            [sum(1 << c for c, step in enumerate(path) if step[2] == f) for f in features], np.int64
        )
        z = np.array([np.prod([step[3] for step in path if step[2] == f]) for f in features])
        table[leaf * stride : leaf * stride + (1 << len(path))] = _leaf_table(z, masks, len(path))
        full = (1 << len(path)) - 1
        for f, m, zk in zip(features, masks, z, strict=True):
            entries.append((leaf, (full & ~int(m)) | high, int(m), v * (1.0 - zk) / zk, -v, f))
    e = list(zip(*entries, strict=True)) if entries else [[] for _ in range(6)]

    def nodes(values: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate([*values, np.zeros(1, dtype)]).astype(dtype)  # + the padding node

    return _Tables(
        node_feature=nodes([t.feature[~t.is_leaf] for t in forest.trees], np.int64),
        node_threshold=nodes([t.threshold[~t.is_leaf] for t in forest.trees], np.float32),
        node_default_left=nodes([t.default_left[~t.is_leaf] for t in forest.trees], bool),
        node_bit=node_bit,
        cond_index=cond_index.reshape(-1),
        depth=depth,
        table=table.astype(np.float32),
        entry_leaf=np.asarray(e[0], np.int64),
        entry_keep=np.asarray(e[1], np.int32),
        entry_mask=np.asarray(e[2], np.int32),
        entry_one=np.asarray(e[3], np.float32),
        entry_zero=np.asarray(e[4], np.float32),
        entry_feature=np.asarray(e[5], np.int64),
        base_value=float(forest.base_margin) + expected,
    )


def attribution_map(spec: Sequence[Feature], n_inputs: int) -> np.ndarray:
    """float64 [F, K]: how much of each feature's contribution goes to each canonical input (rows sum
    to 1). A ratio or a score has no single input to blame, so it is shared by the rule in
    :data:`ATTRIBUTION_RULE`; the per-feature values stay available under their own names."""
    a = np.zeros((len(spec), n_inputs))
    for j, f in enumerate(spec):
        if f.op in ("column", "one_hot"):
            a[j, f.inputs[0]] = 1.0
        elif f.op in ("ratio", "score"):
            for i in f.inputs:
                a[j, i] += 1.0 / len(f.inputs)
        else:
            raise ValueError(f"feature {f.name!r} has op {f.op!r}, which has no attribution rule")
    return a


def _columns(g: _Graph, data: str, index: np.ndarray, name: str) -> str:
    """``data[:, index]`` as GatherElements: onnxruntime's Gather copies one element at a time (~40 ns
    each, 10x GatherElements), and the explainer gathers ~10^5 elements per row."""
    rows = g.op("Shape", [data], f"{name}_rows", start=0, end=1)
    shape = g.op("Concat", [rows, g.const(f"{name}_width", [len(index)], np.int64)], f"{name}_shape", axis=0)
    idx = g.op("Expand", [g.const(f"{name}_index", index[None, :], np.int32), shape], f"{name}_index_rows")
    return g.op("GatherElements", [data, idx], name, axis=1)


def _by_feature(tb: _Tables, n_features: int, chunk: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The (leaf, feature) entries ordered by feature (by leaf within one), each feature's run padded
    to a multiple of ``chunk`` with entries worth 0 (mask 0 is always met, and its coefficient is 0),
    and the one-hot [runs / chunk, F] matrix mapping each chunk to its feature.

    Why: summing per feature is then a ReduceSum over contiguous chunks and a small MatMul, which
    onnxruntime runs faster than a ScatterElements add over ~10^5 entries per row, the largest single
    cost of a one-patient explanation in its profiler (300 trees of depth 6: 12-15% less time for one
    patient, 30-45% less for batches; keeping leaf order and permuting before the sums measured the
    same)."""
    order = np.argsort(tb.entry_feature, kind="stable")
    counts = np.bincount(tb.entry_feature, minlength=n_features)
    padded = -(-counts // chunk) * chunk  # each feature's run rounded up to whole chunks
    start, first = np.cumsum(padded) - padded, np.cumsum(counts) - counts  # of each run, padded / not
    pos = np.repeat(start, counts) + np.arange(len(order)) - np.repeat(first, counts)  # sorted entry -> slot
    fields = {
        "leaf": (tb.entry_leaf, 0), "keep": (tb.entry_keep, 0), "mask": (tb.entry_mask, 0),
        "one": (tb.entry_one, 0.0), "zero": (tb.entry_zero, 0.0),
    }  # fmt: skip
    out = {}
    for name, (values, pad) in fields.items():
        column = np.full(int(padded.sum()), pad, dtype=values.dtype)
        column[pos] = values[order]
        out[name] = column
    owner = np.repeat(np.arange(n_features), padded // chunk)  # the feature of each chunk
    onehot = np.zeros((len(owner), n_features), np.float32)
    onehot[np.arange(len(owner)), owner] = 1.0
    return out, onehot


SUM_CHUNK = 64  # entries summed per chunk before the per-feature MatMul (padding <= 63 per feature)


def _explain_graph(g: _Graph, tb: _Tables, features: str, n_features: int) -> str:
    """Decisions -> condition patterns -> table gathers -> per-feature sums into [N, F] (float32)."""
    c = g.const
    entry, onehot = _by_feature(tb, n_features, SUM_CHUNK)
    values = _columns(g, features, tb.node_feature, "shap_node_x")
    below = g.op("Less", [values, c("shap_node_threshold", tb.node_threshold, np.float32)], "shap_below")
    missing = g.op("IsNaN", [values], "shap_node_missing")
    # xgboost: x < t goes left, NaN the default way (NaN < t is false, so only NaN rows take the And)
    default_left = c("shap_node_default_left", tb.node_default_left, bool)
    go_left = g.op("Or", [below, g.op("And", [missing, default_left], "shap_nan_left")], "shap_go_left")
    # each node's bit on the side the row took, per side ([left | right], once per node, not per path)
    bit = c("shap_node_bit", tb.node_bit, np.int32)
    left = g.op("Where", [go_left, bit, c("shap_zero_i32", 0, np.int32)], "shap_left_bit")
    sides = g.op("Concat", [left, g.op("Sub", [bit, left], "shap_right_bit")], "shap_side_bits", axis=1)
    bits = _columns(g, sides, tb.cond_index, "shap_cond_bits")
    per_leaf = g.op("Reshape", [bits, c("shap_cond_shape", [0, -1, tb.depth], np.int64)], "shap_cond_bits_3d")
    pattern = g.op("ReduceSum", [per_leaf, c("shap_axis_2", [2], np.int64)], "shap_leaf_pattern", keepdims=0)
    row = c("shap_leaf_row", np.arange(len(tb.table) >> tb.depth) << tb.depth, np.int32)
    located = g.op("Add", [pattern, row], "shap_leaf_located")  # + where the leaf's table starts
    pat = _columns(g, located, entry["leaf"], "shap_entry_pattern")
    index = g.op("BitwiseAnd", [pat, c("shap_entry_keep", entry["keep"], np.int32)], "shap_entry_index")
    # the table as one row [1, T] and all rows' indices as one row [1, N*P]: GatherElements along axis 1
    # (6x faster in onnxruntime than a [T, 1] column along axis 0, and 10x faster than Gather)
    flat = g.op("Reshape", [index, c("shap_one_row", [1, -1], np.int64)], "shap_entry_index_row")
    h_row = g.op(
        "GatherElements", [c("shap_table", tb.table[None, :], np.float32), flat], "shap_entry_h_row", axis=1
    )
    h = g.op("Reshape", [h_row, g.op("Shape", [pat], "shap_entry_shape")], "shap_entry_h")
    mask = c("shap_entry_mask", entry["mask"], np.int32)
    own = g.op("Equal", [g.op("BitwiseAnd", [pat, mask], "shap_entry_own"), mask], "shap_entry_met")
    coef = g.op("Where", [own, c("shap_entry_one", entry["one"], np.float32),
                          c("shap_entry_zero", entry["zero"], np.float32)], "shap_entry_coef")  # fmt: skip
    phi = g.op("Mul", [h, coef], "shap_entry_phi")
    chunks = g.op("Reshape", [phi, c("shap_chunk_shape", [0, -1, SUM_CHUNK], np.int64)], "shap_entry_chunks")
    sums = g.op("ReduceSum", [chunks, c("shap_axis_2b", [2], np.int64)], "shap_chunk_sums", keepdims=0)
    return g.op("MatMul", [sums, c("shap_chunk_feature", onehot, np.float32)], CONTRIBUTIONS)


def explainable_forest(booster, spec: Sequence[Feature]) -> _Forest:
    """The booster's trees, after checking they match the spec and have a log-odds margin to explain."""
    forest = _read_forest(booster)
    if forest.n_features != len(spec):
        raise ValueError(f"the booster was trained on {forest.n_features} features, the spec has {len(spec)}")
    if booster.feature_names is not None and list(booster.feature_names) != feature_names(spec):
        raise ValueError("the booster's feature names differ from the spec's feature names")
    if forest.objective not in ("binary:logistic", "binary:logitraw", "reg:logistic"):
        raise ValueError(
            f"explanations are in log-odds; objective {forest.objective!r} has no log-odds margin"
        )
    return forest


def explainer_nodes(
    g: _Graph, forest: _Forest, spec: Sequence[Feature], n_inputs: int, features: str
) -> _Tables:
    """Add one model's four explainer outputs to ``g`` (``contributions``, ``input_contributions``,
    ``margin``, ``base_value``), reading the derived-feature matrix ``features``; returns the tables.

    Shared by the risk explainer (these names are its outputs) and the benefit bundle's explainer, which
    builds this once per outcome model in a scratch graph and merges it under a name prefix."""
    tb = _tables(forest)
    amap = attribution_map(spec, n_inputs)
    contributions = _explain_graph(g, tb, features, len(spec))
    g.op("MatMul", [contributions, g.const("shap_attribution", amap, np.float32)], INPUT_CONTRIBUTIONS)
    margin = _trees(g, forest, features)
    g.op("Expand", [g.const("shap_base_value", tb.base_value, np.float32),
                    g.op("Shape", [margin], "shap_margin_shape")], BASE_VALUE)  # fmt: skip
    return tb


def float_info(name: str, shape: list, doc: str) -> onnx.ValueInfoProto:
    v = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    v.doc_string = doc
    return v


def columns_section(spec: Sequence[Feature], input_names: Sequence[str]) -> dict:
    """The manifest keys that name the explainer's columns and how features are credited to inputs."""
    input_names = list(input_names)
    names = feature_names(spec)
    amap = attribution_map(spec, len(input_names))
    return {
        "feature_names": names,
        "input_names": input_names,
        "features": [
            {"name": f.name, "op": f.op, "inputs": [input_names[i] for i in f.inputs]} for f in spec
        ],
        "attribution": {
            "rule": ATTRIBUTION_RULE,
            "map": {
                names[j]: {input_names[i]: float(amap[j, i]) for i in np.flatnonzero(amap[j])}
                for j in range(len(spec))
            },
        },
    }


def explainer_to_onnx(
    booster, spec: list[Feature], input_names: Sequence[str]
) -> tuple[onnx.ModelProto, dict]:
    """The explainer graph and its manifest section (without ``sha256``, which the bundle writer adds).

    ``inputs`` float32 [N, K] (the same matrix as ``model.onnx``) -> ``contributions`` [N, F],
    ``input_contributions`` [N, K], ``base_value`` [N] and ``margin`` [N], all float32 log-odds.
    """
    input_names = list(input_names)
    forest = explainable_forest(booster, spec)
    names = feature_names(spec)

    g = _Graph()
    features = _features(g, spec, len(input_names))
    tb = explainer_nodes(g, forest, spec, len(input_names), features)
    info = float_info

    x_info = info(INPUT, ["N", len(input_names)], "float32 [N, K], NaN = missing; as model.onnx")
    outputs = [
        info(CONTRIBUTIONS, ["N", len(spec)], "SHAP value of each model feature, log-odds; columns: "
             + ", ".join(names)),
        info(INPUT_CONTRIBUTIONS, ["N", len(input_names)], "SHAP values attributed to the canonical inputs"),
        info(BASE_VALUE, ["N"], "expected margin (log-odds) over the training data's cover"),
        info(MARGIN, ["N"], "the model's margin (log-odds), = base_value + sum of contributions"),
    ]  # fmt: skip
    graph = onnx.helper.make_graph(g.nodes, "masml_explainer", [x_info], outputs, g.inits)
    graph.doc_string = (
        f"Path-dependent TreeSHAP (Lundberg 2020) via Fast TreeSHAP v2 tables (Yang 2021): {len(spec)} "
        f"features, {len(forest.trees)} trees, depth {tb.depth}, {len(tb.entry_leaf)} (leaf, feature) pairs."
    )
    model = make_model(graph, PRODUCER_VERSION)
    section = {
        "file": EXPLAINER_FILE,
        "method": "path-dependent TreeSHAP (Lundberg et al. 2020) of the margin, evaluated with Fast "
        "TreeSHAP v2 tables (Yang 2021); equal to shap.TreeExplainer / xgboost pred_contribs",
        "input": INPUT,
        "outputs": [
            {
                "name": CONTRIBUTIONS,
                "shape": ["N", "F"],
                "columns": "feature_names",
                "meaning": "SHAP value of each model feature (log-odds)",
            },
            {
                "name": INPUT_CONTRIBUTIONS,
                "shape": ["N", "K"],
                "columns": "input_names",
                "meaning": "the feature SHAP values attributed to the canonical inputs by attribution.map",
            },
            {
                "name": BASE_VALUE,
                "shape": ["N"],
                "meaning": "log-odds every explanation starts from (the model's expected margin)",
            },
            {
                "name": MARGIN,
                "shape": ["N"],
                "meaning": "the model's margin (log-odds), equal to model.onnx's margin; "
                "base_value + sum(contributions) = base_value + sum(input_contributions) = margin",
            },
        ],  # fmt: skip
        "base_value": tb.base_value,
        "base_value_meaning": "log-odds (margin space, before calibration)",
        **columns_section(spec, input_names),
        "trees": len(forest.trees),
        "depth": tb.depth,
    }
    return model, section


# --------------------------------------------------------------------------------------------------
# Parity gate
# --------------------------------------------------------------------------------------------------


def reference_shap(booster, features: np.ndarray, names: Sequence[str], n_rounds: int):
    """(values [N, F], base values [N]) from shap.TreeExplainer over the rounds the export uses."""
    from masml.explain import shap_explanation

    if n_rounds < int(booster.num_boosted_rounds()):
        booster = booster[:n_rounds]  # early stopping: explain the trees that score
    expl = shap_explanation(booster, features, names)
    return np.asarray(expl.values, np.float64), np.asarray(expl.base_values, np.float64).reshape(-1)


def run_explainer(sess, rows: np.ndarray, batch: int = 64, prefix: str = "") -> dict[str, np.ndarray]:
    """Run the explainer in batches: its intermediates take ~2 MB per row for 300 trees of depth 6.

    ``prefix`` selects one model's outputs of an explainer that holds several (the benefit bundle's
    ``untreated_`` / ``treated_``); the result is keyed by the unprefixed names either way."""
    names = [CONTRIBUTIONS, INPUT_CONTRIBUTIONS, BASE_VALUE, MARGIN]
    wanted = [prefix + n for n in names]
    got = [o.name for o in sess.get_outputs()]
    if (sorted(got) != sorted(wanted)) if not prefix else not set(wanted) <= set(got):
        raise ExplainerParityError(f"the explainer graph must output {wanted}, got {got}")
    parts = [sess.run(wanted, {INPUT: rows[i : i + batch]}) for i in range(0, max(len(rows), 1), batch)]
    return {n: np.concatenate([np.asarray(p[k], np.float64) for p in parts]) for k, n in enumerate(names)}


def explainer_parity_gate(
    explainer,
    booster,
    spec: list[Feature],
    X: np.ndarray,
    *,
    model=None,
    tol: float = 1e-4,
    missing_rows: int = 10,
    threshold_rows: int = 1500,
    single_rows: int = 5,
    seed: int = 0,
    prefix: str = "",
    model_margin: str = MARGIN,
) -> dict:
    """Explain X plus stress rows with the graph and with shap.TreeExplainer; raise on disagreement.

    Stress rows are ``onnx_export._stress_rows``: ``missing_rows`` rows with each input NaN in turn, and
    rows on (and one float32 step either side of) the splits, ``threshold_rows`` of them drawn at random
    (seeded) because each costs shap and the graph a full explanation. Checked on every row: max |Δ|
    of each contribution and of the base value against shap; additivity (base_value + Σ contributions
    = margin, with ``model``'s margin when the scoring graph is given); Σ input_contributions = Σ
    contributions. ``explainer`` and ``model`` are ModelProtos, bytes or paths.

    ``prefix`` checks one model of an explainer that holds several (outputs ``prefix + name``), and
    ``model_margin`` names the scoring graph's output holding that model's margin.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D input matrix, got shape {X.shape}")
    forest = _read_forest(booster)
    stress, labels = _stress_rows(forest, spec, X, missing_rows, threshold_rows > 0, seed)
    kinds_all = np.array([kind for kind, _ in labels])
    keep = np.flatnonzero(kinds_all == "missing")
    other = np.flatnonzero(kinds_all != "missing")
    if len(other) > threshold_rows:
        other = np.sort(np.random.default_rng(seed).choice(other, threshold_rows, replace=False))
    keep = np.concatenate([keep, other])
    rows = np.concatenate([X, stress[keep]])
    kinds = np.array(["given"] * len(X) + [labels[i][0] for i in keep])
    notes = [f"X row {i}" for i in range(len(X))] + [labels[i][1] for i in keep]

    names = feature_names(spec)
    ref, ref_base = reference_shap(booster, transform(rows, spec), names, forest.n_rounds)
    sess = _onnx_session(explainer)
    out = run_explainer(sess, rows, prefix=prefix)
    single = np.arange(min(len(X), single_rows))
    for i in single:  # onnxruntime's one-row code paths
        one = run_explainer(sess, rows[i : i + 1], prefix=prefix)
        for k in out:
            out[k] = np.concatenate([out[k], one[k]])
    ref = np.concatenate([ref, ref[single]])
    ref_base = np.concatenate([ref_base, ref_base[single]])
    kinds = np.append(kinds, ["single_row"] * len(single))
    notes += [f"X row {i} explained alone" for i in single]
    margin = out[MARGIN]
    if model is not None:
        m_sess = _onnx_session(model)
        margin = np.concatenate(
            [np.asarray(m_sess.run([model_margin], {INPUT: r})[0], np.float64).reshape(-1)
             for r in (rows, *[rows[i : i + 1] for i in single])]
        )  # fmt: skip

    checks = {
        "contributions": _abs_diff(ref, out[CONTRIBUTIONS]).max(axis=1, initial=0.0),
        "base_value": _abs_diff(ref_base, out[BASE_VALUE]),
        "additivity": _abs_diff(out[BASE_VALUE] + out[CONTRIBUTIONS].sum(axis=1), margin),
        "input_attribution": _abs_diff(out[INPUT_CONTRIBUTIONS].sum(axis=1), out[CONTRIBUTIONS].sum(axis=1)),
        "margin_vs_model": _abs_diff(out[MARGIN], margin),
    }
    report: dict = {
        "n_rows": int(len(kinds)),
        **{f"n_{k}_rows": int(np.sum(kinds == k)) for k in np.unique(kinds)},
        **{f"max_abs_diff_{name}": float(d.max(initial=0.0)) for name, d in checks.items()},
        "by_kind": {
            k: {name: float(d[kinds == k].max(initial=0.0)) for name, d in checks.items()}
            for k in np.unique(kinds)
        },
        "tol": tol,
        "reference": "shap.TreeExplainer (path-dependent) on the margin",
    }
    for name, d in checks.items():
        if len(d) and d.max() > tol:
            i = int(np.argmax(d))
            worst = ""
            if name == "contributions":
                j = int(np.argmax(_abs_diff(ref[i], out[CONTRIBUTIONS][i])))
                worst = f" on feature {names[j]}: shap {ref[i, j]!r}, onnx {out[CONTRIBUTIONS][i, j]!r}"
            raise ExplainerParityError(
                f"explainer parity failed on {prefix}{name}: max |diff| {d[i]:.3g} > {tol:g} at row {i} "
                f"({kinds[i]}: {notes[i]}){worst}; {int(np.sum(d > tol))} of {len(d)} rows over tolerance",
                report,
            )
    return report
