"""ONNX export of a risk model: parity with the Python path, stress rows, determinism, edge cases."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import xgboost as xgb
from onnx import TensorProto, helper

from masml import onnx_export as ox
from masml.calibration import Calibrator, fit_calibrator
from masml.cohort import simulate
from masml.encoding import encode_inputs
from masml.features import feature_names, feature_spec, transform
from masml.schema import INPUT_NAMES

NAMES = list(INPUT_NAMES)
# nthread 1: on a shared 2-core machine OpenMP barriers make nthread=2 up to 20x slower under load
PARAMS = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.1, "nthread": 1, "seed": 0}


@pytest.fixture(scope="module")
def data():
    c = simulate(3000, seed=11)
    X = encode_inputs(c.data, NAMES)
    spec = feature_spec(NAMES)
    y = c.data["mas_onset"].to_numpy(dtype=float)
    return X, y, spec


@pytest.fixture(scope="module")
def model(data):
    """A 60-round booster on 2000 rows, calibrators fitted on 500 more, 500 rows held out for parity."""
    X, y, spec = data
    dtrain = xgb.DMatrix(transform(X[:2000], spec), label=y[:2000], missing=np.nan)
    booster = xgb.train(PARAMS, dtrain, 60)
    m = booster.inplace_predict(transform(X[2000:2500], spec), predict_type="margin")
    cals = {kind: fit_calibrator(m, y[2000:2500], kind) for kind in ("platt", "isotonic")}
    return booster, cals


def export(booster, spec, cal):
    return ox.risk_model_to_onnx(booster, spec, len(NAMES), cal, input_names=NAMES)


def session(model_or_bytes, threads: int | None = None):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_parity_on_held_out_missing_and_threshold_rows(data, model, kind):
    X, _, spec = data
    booster, cals = model
    onx = export(booster, spec, cals[kind])
    onnx.checker.check_model(onx, full_check=True)
    report = ox.parity_gate(onx, booster, spec, cals[kind], X[2500:])
    assert report["n_given_rows"] == 500
    assert report["n_missing_rows"] >= 25 * len(NAMES)
    assert report["n_threshold_rows"] > 100
    assert report["n_threshold_neighbour_rows"] > 100
    assert report["n_single_rows"] == 20
    stress = report["n_missing_rows"] + report["n_threshold_rows"] + report["n_threshold_neighbour_rows"]
    assert report["n_small_batch_rows"] == 500 + stress  # every row again through the small-batch branch
    assert set(report["by_kind"]) == {
        "given", "single_row", "small_batch", "missing", "threshold", "threshold_neighbour"
    }  # fmt: skip
    for kind_report in report["by_kind"].values():
        assert kind_report["max_abs_diff_risk"] <= 1e-5
        # by construction the margin is xgboost's bit for bit (same float32 sum, same order)
        assert kind_report["max_abs_diff_margin"] == 0.0
    # what is left on the risk is the final float32 rounding of a float64 probability
    assert report["max_abs_diff_risk"] < 1e-7


def test_threshold_rows_sit_exactly_on_splits(data, model):
    """The generated rows really put a feature on a split value, and both sides take the same branch."""
    X, _, spec = data
    booster, _ = model
    forest = ox._read_forest(booster)
    rows, labels = ox._stress_rows(forest, spec, X[2500:], missing_rows=0, threshold_rows=True, seed=0)
    on = np.array([kind == "threshold" for kind, _ in labels])
    F = transform(rows[on], spec)
    splits = {
        (int(t.feature[i]), float(t.threshold[i])) for t in forest.trees for i in np.flatnonzero(~t.is_leaf)
    }
    hits = {(f, float(F[r, f])) for r in range(len(F)) for f in range(F.shape[1])} & splits
    assert hits == splits  # every split of every tree has a row on its threshold exactly ...
    assert on.sum() == len(splits)  # ... and only one
    ops = {spec[f].op for f, _ in hits}
    assert {"column", "ratio", "one_hot"} <= ops


def _features_model(spec) -> onnx.ModelProto:
    """The features subgraph alone, as a model whose output is the feature matrix."""
    g = ox._Graph()
    out = ox._features(g, spec, len(NAMES))
    graph = helper.make_graph(
        g.nodes,
        "features",
        [helper.make_tensor_value_info(ox.INPUT, TensorProto.FLOAT, ["N", len(NAMES)])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", len(spec)])],
        g.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ox.OPSET)], ir_version=8)


def test_features_subgraph_matches_numpy_bitwise(data):
    """Gather / Equal / guarded Div: NaN codes, unknown codes, zero, negative and NaN denominators."""
    X, _, spec = data
    idx = {n: i for i, n in enumerate(NAMES)}
    x = X[:64].copy()
    x[0, idx["esr"]] = 0.0
    x[1, idx["esr"]] = -3.0
    x[2, idx["esr"]] = np.nan
    x[3, idx["ferritin"]] = np.nan
    x[4, idx["ferritin_prev"]] = np.float32(1e-30)  # huge but finite quotient
    x[5, idx["trigger"]] = np.nan
    x[6, idx["trigger"]] = 99.0  # not a category index: every one-hot is 0 on both sides
    x[7, idx["sex"]] = np.nan
    x[8, :] = np.nan
    m = _features_model(spec)
    (got,) = session(m).run(None, {ox.INPUT: x})
    want = transform(x, spec)
    np.testing.assert_array_equal(got, want)  # NaN positions equal, every value bit-identical
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_margin_is_independent_of_threads_and_batch(data, model):
    X, _, spec = data
    booster, cals = model
    data_bytes = export(booster, spec, cals["isotonic"]).SerializeToString()
    x = X[2500:]
    want = booster.inplace_predict(transform(x, spec), predict_type="margin")
    for threads in (1, 2):
        _, margin = session(data_bytes, threads).run(None, {ox.INPUT: x})
        np.testing.assert_array_equal(margin, want)
    one = session(data_bytes, 2)
    for i in range(5):
        np.testing.assert_array_equal(one.run(["margin"], {ox.INPUT: x[i : i + 1]})[0], want[i : i + 1])
    # either side of the graph's switch between its small-batch and large-batch ensembles
    for threads in (1, 2):
        sess = session(data_bytes, threads)
        for n in (2, ox.SMALL_BATCH - 1, ox.SMALL_BATCH, ox.SMALL_BATCH + 1, 2 * ox.SMALL_BATCH + 7):
            np.testing.assert_array_equal(sess.run(["margin"], {ox.INPUT: x[:n]})[0], want[:n])


def test_small_batches_take_the_single_target_ensemble(data, model):
    """The switch exists and is where the docstring says: a one-target ensemble up to SMALL_BATCH rows
    (the cheap kernel), a one-target-per-tree ensemble summed by CumSum above."""
    X, _, spec = data
    booster, cals = model
    onx = export(booster, spec, cals["isotonic"])
    (switch,) = [n for n in onx.graph.node if n.op_type == "If"]
    assert switch.output[0] == ox.MARGIN
    branches = {a.name: a.g for a in switch.attribute}
    targets = {
        name: [a.i for n in g.node if n.op_type == "TreeEnsembleRegressor" for a in n.attribute
               if a.name == "n_targets"]
        for name, g in branches.items()
    }  # fmt: skip
    n_trees = len(ox._read_forest(booster).trees)
    assert targets == {"then_branch": [1], "else_branch": [n_trees]}
    assert "CumSum" in {n.op_type for n in branches["else_branch"].node}
    limit = [i for i in onx.graph.initializer if i.name == "small_batch"][0]
    assert list(onnx.numpy_helper.to_array(limit)) == [ox.SMALL_BATCH]


def test_scoring_in_slices_of_rows_is_one_call_bit_for_bit(data, model):
    """masml.predict.run_rows bounds memory by scoring slices of rows (a ragged last one included):
    the outputs are those of one call, and in the input's order."""
    from masml.predict import run_rows

    X, _, spec = data
    booster, cals = model
    sess = session(export(booster, spec, cals["isotonic"]))
    x = X[2500:2937]
    whole = sess.run([ox.RISK, ox.MARGIN], {ox.INPUT: x})
    for rows in (1, 50, 436, 437, 10_000):
        sliced = run_rows(sess, [ox.RISK, ox.MARGIN], x, rows=rows)
        for got, want in zip(sliced, whole, strict=True):
            assert got.shape == (len(x),)
            np.testing.assert_array_equal(got, np.asarray(want).reshape(-1))


def test_early_stopped_booster_uses_best_iteration(data):
    X, y, spec = data
    dtrain = xgb.DMatrix(transform(X[:1500], spec), label=y[:1500], missing=np.nan)
    dvalid = xgb.DMatrix(transform(X[1500:2000], spec), label=y[1500:2000], missing=np.nan)
    params = {**PARAMS, "eta": 0.5, "max_depth": 6}
    booster = xgb.train(
        params, dtrain, 300, evals=[(dvalid, "valid")], early_stopping_rounds=5, verbose_eval=False
    )
    best = booster.best_iteration
    assert booster.num_boosted_rounds() > best + 1, "the booster must hold trees past its best iteration"
    cal = Calibrator("platt", a=0.9, b=-0.1)
    onx = export(booster, spec, cal)
    props = {p.key: p.value for p in onx.metadata_props}
    assert int(props["masml.rounds"]) == best + 1
    assert int(props["masml.trees"]) == best + 1
    x = X[2500:]
    F = transform(x, spec)
    _, margin = session(onx).run(None, {ox.INPUT: x})
    np.testing.assert_array_equal(
        margin, booster.inplace_predict(F, predict_type="margin", iteration_range=(0, best + 1))
    )
    assert np.abs(margin - booster.inplace_predict(F, predict_type="margin")).max() > 1e-3
    report = ox.parity_gate(onx, booster, spec, cal, x)
    assert report["max_abs_diff_margin"] == 0.0


# --------------------------------------------------------------------------------------------------
# The gate can fail
# --------------------------------------------------------------------------------------------------


BRANCHES = ["then_branch", "else_branch"]  # the graph's small-batch and large-batch ensembles


def _tree_attr(onx: onnx.ModelProto, name: str, branch: str) -> onnx.AttributeProto:
    switch = next(n for n in onx.graph.node if n.op_type == "If")
    graph = next(a.g for a in switch.attribute if a.name == branch)
    node = next(n for n in graph.node if n.op_type == "TreeEnsembleRegressor")
    return next(a for a in node.attribute if a.name == name)


def test_gate_fails_when_calibrator_differs(data, model):
    X, _, spec = data
    booster, cals = model
    onx = export(booster, spec, cals["platt"])
    wrong = Calibrator("platt", a=cals["platt"].a, b=cals["platt"].b + 1e-3)
    with pytest.raises(ox.ParityError, match=r"parity failed on risk.*python risk=.*onnx risk=") as err:
        ox.parity_gate(onx, booster, spec, wrong, X[2500:])
    assert err.value.report["max_abs_diff_risk"] > 1e-5
    assert err.value.report["max_abs_diff_margin"] == 0.0
    with pytest.raises(ox.ParityError):
        ox.parity_gate(onx, booster, spec, cals["isotonic"], X[2500:])


@pytest.mark.parametrize("branch", BRANCHES)
def test_gate_fails_on_a_tampered_leaf(data, model, branch):
    X, _, spec = data
    booster, cals = model
    onx = export(booster, spec, cals["platt"])
    weights = _tree_attr(onx, "target_weights", branch)
    weights.floats[3] += 0.01
    with pytest.raises(ox.ParityError, match=r"parity failed on risk|parity failed on margin"):
        ox.parity_gate(onx, booster, spec, cals["platt"], X[2500:], margin_tol=1e-3)


@pytest.mark.parametrize("branch", BRANCHES)
def test_threshold_rows_catch_a_one_ulp_threshold_error(data, model, branch):
    """Nudging one split up by one float32 step flips only rows sitting exactly on it: held-out rows
    can miss that, the generated threshold rows cannot."""
    X, _, spec = data
    booster, cals = model
    onx = export(booster, spec, cals["platt"])
    forest = ox._read_forest(booster)
    root = forest.trees[0]
    f, thr = int(root.feature[0]), np.float32(root.threshold[0])
    values = _tree_attr(onx, "nodes_values", branch)
    assert np.float32(values.floats[0]) == thr  # node 0 of tree 0 is the root
    values.floats[0] = float(np.nextafter(thr, np.float32(np.inf)))
    x = X[2500:]
    on_split = np.any(transform(x, spec)[:, f] == thr)
    if not on_split:  # no held-out row sits on this split: without threshold rows the error goes unseen
        ox.parity_gate(onx, booster, spec, cals["platt"], x, missing_rows=0, threshold_rows=False)
    with pytest.raises(ox.ParityError, match=r"\(threshold: feature |small_batch: threshold row, feature "):
        ox.parity_gate(onx, booster, spec, cals["platt"], x)


# --------------------------------------------------------------------------------------------------
# Determinism, metadata, checker
# --------------------------------------------------------------------------------------------------


def test_bytes_are_deterministic_and_sha256_is_of_the_file(tmp_path, data, model):
    _, _, spec = data
    booster, cals = model
    reloaded = xgb.Booster()
    reloaded.load_model(bytearray(booster.save_raw("json")))
    a = export(booster, spec, cals["isotonic"])
    b = export(copy.deepcopy(booster), spec, cals["isotonic"])
    c = export(reloaded, spec, cals["isotonic"])
    sha_a = ox.save_onnx(a, tmp_path / "a.onnx")
    sha_b = ox.save_onnx(b, tmp_path / "sub" / "b.onnx")
    sha_c = ox.save_onnx(c, tmp_path / "c.onnx")
    raw = (tmp_path / "a.onnx").read_bytes()
    assert raw == (tmp_path / "sub" / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    assert sha_a == sha_b == sha_c == hashlib.sha256(raw).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = onnx.load_from_string(raw)
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.producer_name == ox.PRODUCER_NAME and loaded.producer_version == ox.PRODUCER_VERSION
    other = ox.save_onnx(export(booster, spec, cals["platt"]), tmp_path / "platt.onnx")
    assert other != sha_a


def test_interface_and_metadata(data, model):
    _, _, spec = data
    booster, cals = model
    onx = export(booster, spec, cals["platt"])
    (inp,) = onx.graph.input
    assert inp.name == "inputs" and inp.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", len(NAMES)]
    assert [o.name for o in onx.graph.output] == ["risk", "margin"]
    props = {p.key: p.value for p in onx.metadata_props}
    assert json.loads(props["masml.input_names"]) == NAMES
    assert json.loads(props["masml.feature_names"]) == feature_names(spec)
    assert json.loads(props["masml.calibration"])["kind"] == "platt"
    assert "ferritin_esr_ratio" in onx.doc_string and "age_years" in inp.doc_string
    risk, margin = session(onx).run(None, {ox.INPUT: np.full((3, len(NAMES)), np.nan, np.float32)})
    assert risk.shape == margin.shape == (3,) and risk.dtype == margin.dtype == np.float32


def test_rejects_mismatched_arguments(data, model):
    _, _, spec = data
    booster, cals = model
    with pytest.raises(ValueError, match="input names"):
        ox.risk_model_to_onnx(booster, spec, len(NAMES), cals["platt"], input_names=NAMES[:-1])
    with pytest.raises(ValueError, match="features"):
        ox.risk_model_to_onnx(booster, spec[:-1], len(NAMES), cals["platt"], input_names=NAMES)
    with pytest.raises(ValueError, match="sorted"):
        export(booster, spec, Calibrator("isotonic", x=[1.0, 0.0], y=[0.1, 0.2]))
    with pytest.raises(ValueError, match="non-empty"):
        export(booster, spec, Calibrator("isotonic", x=[], y=[]))


# --------------------------------------------------------------------------------------------------
# Calibration edge cases
# --------------------------------------------------------------------------------------------------


def _calibration_session(cal: Calibrator):
    g = ox._Graph()
    out = ox._calibration(g, cal, "m")
    graph = helper.make_graph(
        g.nodes,
        "cal",
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N"])],
        g.inits,
    )
    return session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", ox.OPSET)], ir_version=8))


@pytest.mark.parametrize(
    "x, y",
    [
        ([0.25], [0.3]),  # K = 1: constant
        ([-1.0, 1.0], [0.1, 0.9]),  # K = 2
        ([-1.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.6, 0.9]),  # tied knots (a jump at 0)
        ([-2.0, -2.0, 0.5, 3.0, 3.0], [0.05, 0.1, 0.4, 0.7, 0.95]),  # ties at both ends
    ],
)
def test_isotonic_matches_np_interp_on_knots_between_and_outside(x, y):
    cal = Calibrator("isotonic", x=x, y=y)
    knots = np.asarray(x, np.float32)
    m = np.concatenate(
        [
            knots,
            np.nextafter(knots, np.float32(-np.inf)),
            np.nextafter(knots, np.float32(np.inf)),
            np.linspace(-5, 5, 101, dtype=np.float32),
            np.array([-1e30, 1e30, 0.0, -0.0], np.float32),
        ]
    )
    (got,) = _calibration_session(cal).run(None, {"m": m})
    want = cal.apply(m)
    assert np.abs(got - want).max() <= 6e-8  # float32 rounding of the float64 result only


def test_tiny_isotonic_through_the_gate(data, model):
    X, _, spec = data
    booster, _ = model
    for cal in (
        Calibrator("isotonic", x=[0.0], y=[0.4]),
        Calibrator("isotonic", x=[-1.0, 0.0, 0.0], y=[0.1, 0.3, 0.8]),
    ):
        onx = export(booster, spec, cal)
        report = ox.parity_gate(onx, booster, spec, cal, X[2500:2700])
        assert report["max_abs_diff_risk"] < 1e-7


# --------------------------------------------------------------------------------------------------
# Odd boosters
# --------------------------------------------------------------------------------------------------


def test_single_leaf_trees_and_a_small_input_set(data):
    """Inputs without categories or ratios; trees pruned to a single leaf (gamma) still export."""
    X, y, _ = data
    names = ["age_years", "ferritin", "platelets", "esr"]
    x = encode_inputs_subset(X, names)
    spec = feature_spec(names)
    assert [f.op for f in spec] == ["column"] * 4 + ["ratio"]
    d = xgb.DMatrix(transform(x[:2000], spec), label=y[:2000], missing=np.nan)
    stumps = xgb.train({**PARAMS, "gamma": 1e9}, d, 3)
    cal = Calibrator("platt", a=1.0, b=0.0)
    onx = ox.risk_model_to_onnx(stumps, spec, len(names), cal, input_names=names)
    onnx.checker.check_model(onx, full_check=True)
    report = ox.parity_gate(onx, stumps, spec, cal, x[2500:])
    assert report["n_threshold_rows"] == 0 and report["max_abs_diff_margin"] == 0.0
    deep = xgb.train({**PARAMS, "max_depth": 6}, d, 20)
    report = ox.parity_gate(
        ox.risk_model_to_onnx(deep, spec, len(names), cal, input_names=names), deep, spec, cal, x[2500:]
    )
    assert report["n_threshold_rows"] > 0 and report["max_abs_diff_margin"] == 0.0


def encode_inputs_subset(X: np.ndarray, names: list[str]) -> np.ndarray:
    return X[:, [NAMES.index(n) for n in names]]


def test_unsupported_boosters_are_refused(data):
    X, y, spec = data
    d = xgb.DMatrix(transform(X[:300], spec), label=y[:300], missing=np.nan)
    poisson = xgb.train({**PARAMS, "objective": "count:poisson"}, d, 2)
    with pytest.raises(ValueError, match="not supported"):
        export(poisson, spec, Calibrator("platt"))
    linear = xgb.train({**PARAMS, "booster": "gblinear"}, d, 2)
    with pytest.raises(ValueError, match="gbtree"):
        export(linear, spec, Calibrator("platt"))


def test_hscore_feature_matches_the_baseline_and_the_graph_bitwise():
    """The HScore computed inside the graph is masml.scores.hscore, on cut-offs and missing values too."""
    from masml import scores

    c = simulate(2000, seed=13)
    X = encode_inputs(c.data, NAMES)
    spec = feature_spec(NAMES, ["hscore"])
    assert spec[-1].name == "hscore" and spec[-1].op == "score"
    np.testing.assert_array_equal(transform(X, spec)[:, -1], scores.hscore(c.data).to_numpy())
    idx = {n: i for i, n in enumerate(NAMES)}
    x = np.repeat(X[:1], 6, axis=0)
    f = idx["ferritin"]
    x[:4, f] = [1999.0, 2000.0, 6000.0, np.nextafter(np.float32(6000), np.float32(np.inf))]
    x[4, idx["temperature_c"]] = np.nan
    x[5, :] = np.nan  # nothing known: 0 points
    got = transform(x, spec)[:, -1]
    # ferritin < 2000: 0; 2000-6000 inclusive: 35; > 6000: 50 (Fardet 2014)
    assert list(got[1:4] - got[0]) == [35, 35, 50] and got[5] == 0
    x = np.concatenate([x, X[:40]])
    m = _features_model(spec)
    (onnx_out,) = session(m).run(None, {ox.INPUT: x})
    np.testing.assert_array_equal(onnx_out, transform(x, spec))


def test_parity_gate_with_a_score_feature_stresses_its_cut_offs():
    c = simulate(3000, seed=14)
    X = encode_inputs(c.data, NAMES)
    spec = feature_spec(NAMES, ["hscore"])
    y = c.data["mas_onset"].to_numpy(dtype=float)
    booster = xgb.train(PARAMS, xgb.DMatrix(transform(X[:2000], spec), label=y[:2000], missing=np.nan), 30)
    cal = fit_calibrator(booster.inplace_predict(transform(X[2000:2500], spec), predict_type="margin"),
                         y[2000:2500], "platt")  # fmt: skip
    report = ox.parity_gate(export(booster, spec, cal), booster, spec, cal, X[2500:])
    assert report["max_abs_diff_risk"] <= 1e-5
    forest = ox._read_forest(booster)
    _, labels = ox._stress_rows(forest, spec, X[2500:], missing_rows=0, threshold_rows=True, seed=0)
    assert sum(text.startswith("score hscore") for _, text in labels) == 3 * 15  # 15 cut-offs, 3 values each
