"""The explainer graph (issue 6): exact TreeSHAP vs shap.TreeExplainer, additivity, attribution, gate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import xgboost as xgb
from onnx import numpy_helper

from masml import onnx_export as ox
from masml import shap_export as se
from masml.bundle import BundleError, read_bundle, write_bundle
from masml.calibration import fit_calibrator
from masml.cohort import simulate
from masml.encoding import encode_inputs
from masml.features import feature_names, feature_spec, transform
from masml.schema import INPUT_NAMES

NAMES = list(INPUT_NAMES)
# nthread 1: on a shared 2-core machine OpenMP barriers make nthread=2 much slower under load
PARAMS = {"objective": "binary:logistic", "max_depth": 6, "eta": 0.05, "nthread": 1, "seed": 0}


@pytest.fixture(scope="module")
def data():
    c = simulate(4000, seed=11)
    X = encode_inputs(c.data, NAMES)
    spec = feature_spec(NAMES, ["hscore"])  # column, one_hot, ratio and score features
    y = c.data["mas_onset"].to_numpy(dtype=float)
    return X, y, spec


@pytest.fixture(scope="module")
def model(data):
    """300 trees of depth 6 on 3000 patients; 300 held-out rows are explained."""
    X, y, spec = data
    dtrain = xgb.DMatrix(transform(X[:3000], spec), label=y[:3000], feature_names=feature_names(spec))
    booster = xgb.train({**PARAMS, "min_child_weight": 0.5}, dtrain, 300)
    cal = fit_calibrator(booster.inplace_predict(transform(X[3000:3500], spec), predict_type="margin"),
                         y[3000:3500], "platt")  # fmt: skip
    explainer, section = se.explainer_to_onnx(booster, spec, NAMES)
    scorer = ox.risk_model_to_onnx(booster, spec, len(NAMES), cal, input_names=NAMES)
    return booster, explainer, section, scorer


@pytest.fixture(scope="module")
def gate(data, model):
    X, _, spec = data
    booster, explainer, _, scorer = model
    return se.explainer_parity_gate(explainer, booster, spec, X[3500:3800], model=scorer, threshold_rows=1000)


def session(m) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_exact_against_shap_on_held_out_missing_and_threshold_rows(model, gate):
    booster = model[0]
    assert len(booster.get_dump()) == 300 and model[2]["depth"] == 6
    assert gate["n_given_rows"] == 300
    assert gate["n_missing_rows"] >= 10 * len(NAMES)
    assert gate["n_threshold_rows"] > 200 and gate["n_threshold_neighbour_rows"] > 200
    assert gate["n_single_row_rows"] > 0
    for kind, r in gate["by_kind"].items():
        assert r["contributions"] <= 1e-4, kind
        assert r["base_value"] <= 1e-4, kind
        assert r["additivity"] <= 1e-4, kind  # against model.onnx's margin
        assert r["margin_vs_model"] == 0.0, kind  # the same tree sum, bit for bit
    assert gate["max_abs_diff_contributions"] < 2e-5  # float32 tables: well inside the gate


def test_derived_features_are_explained_and_attributed(data, model):
    X, _, spec = data
    booster, explainer, section, _ = model
    out = se.run_explainer(session(explainer), X[3500:3800])
    names = feature_names(spec)
    used = np.abs(out["contributions"]).max(axis=0) > 0
    for op in ("one_hot", "ratio", "score"):
        assert any(used[j] for j, f in enumerate(spec) if f.op == op), f"no {op} feature is used by the model"
    # Σ over inputs = Σ over features, row by row: attribution moves credit, never creates it
    np.testing.assert_allclose(
        out["input_contributions"].sum(axis=1), out["contributions"].sum(axis=1), rtol=0, atol=1e-5
    )
    amap = section["attribution"]["map"]
    assert set(amap) == set(names) == set(section["feature_names"])
    assert all(abs(sum(w.values()) - 1.0) < 1e-12 for w in amap.values())
    assert amap["ferritin_esr_ratio"] == {"ferritin": 0.5, "esr": 0.5}
    assert amap["sex=M"] == {"sex": 1.0}
    assert len(amap["hscore"]) == 12 and set(amap["hscore"].values()) == {1 / 12}
    # the trigger is read by its one-hots only, so its credit is exactly theirs
    hot = [j for j, f in enumerate(spec) if f.op == "one_hot" and NAMES[f.inputs[0]] == "trigger"]
    m = se.attribution_map(spec, len(NAMES))
    assert np.flatnonzero(m[:, NAMES.index("trigger")]).tolist() == hot
    np.testing.assert_allclose(
        out["input_contributions"][:, NAMES.index("trigger")],
        out["contributions"][:, hot].sum(axis=1),
        atol=1e-6,
    )


def test_base_value_and_margin_add_up_on_every_row(data, model):
    X, _, spec = data
    booster, explainer, section, scorer = model
    rows = X[3500:3600].copy()
    rows[::3, :] = np.nan  # whole rows missing too
    out = se.run_explainer(session(explainer), rows)
    margin = session(scorer).run(["margin"], {"inputs": rows})[0]
    np.testing.assert_array_equal(out["margin"], margin)
    np.testing.assert_allclose(
        out["base_value"] + out["contributions"].sum(axis=1), margin, atol=1e-4, rtol=0
    )
    assert np.all(out["base_value"] == np.float32(section["base_value"]))
    ref, base = se.reference_shap(booster, transform(rows, spec), feature_names(spec), 300)
    np.testing.assert_allclose(out["contributions"], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["base_value"], base, atol=1e-5, rtol=0)


def test_gate_fails_on_a_corrupted_table(data, model):
    X, _, spec = data
    booster, explainer, _, _ = model
    bad = onnx.ModelProto()
    bad.CopyFrom(explainer)
    for k, init in enumerate(bad.graph.initializer):
        if init.name == "shap_table":
            table = numpy_helper.to_array(init).copy()
            table[::97] *= np.float32(1.01)
            bad.graph.initializer[k].CopyFrom(numpy_helper.from_array(table, init.name))
    with pytest.raises(se.ExplainerParityError, match="explainer parity failed on contributions") as err:
        se.explainer_parity_gate(bad, booster, spec, X[3500:3600], threshold_rows=0)
    assert err.value.report["max_abs_diff_contributions"] > 1e-4


def test_same_booster_gives_identical_explainer_bytes(model, data):
    _, _, spec = data
    booster, explainer, section, _ = model
    onnx.checker.check_model(explainer, full_check=True)
    again, section_again = se.explainer_to_onnx(booster, spec, NAMES)
    assert again.SerializeToString() == explainer.SerializeToString()
    assert json.dumps(section_again, sort_keys=True) == json.dumps(section, sort_keys=True)


def test_bundle_carries_a_verified_explainer(tmp_path, model):
    _, explainer, section, scorer = model
    data = explainer.SerializeToString()
    write_bundle(tmp_path, scorer.SerializeToString(), {"task": "t", "explainer": section}, data)
    manifest, _ = read_bundle(tmp_path)
    ex = manifest["explainer"]
    assert ex["file"] == "explainer.onnx" and (tmp_path / ex["file"]).read_bytes() == data
    assert [o["name"] for o in ex["outputs"]] == [
        "contributions",
        "input_contributions",
        "base_value",
        "margin",
    ]
    assert ex["base_value_meaning"].startswith("log-odds")
    (tmp_path / "explainer.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match="explainer"):
        read_bundle(tmp_path)
    with pytest.raises(BundleError, match="manifest section"):
        write_bundle(tmp_path / "x", scorer.SerializeToString(), {"task": "t"}, data)


def test_early_stopped_booster_explains_the_rounds_that_score(data):
    X, y, spec = data
    names = feature_names(spec)
    dtrain = xgb.DMatrix(transform(X[:1500], spec), label=y[:1500], feature_names=names)
    dvalid = xgb.DMatrix(transform(X[1500:2000], spec), label=y[1500:2000], feature_names=names)
    booster = xgb.train({**PARAMS, "max_depth": 3, "eta": 0.5}, dtrain, 200, evals=[(dvalid, "v")],
                        early_stopping_rounds=3, verbose_eval=False)  # fmt: skip
    assert ox.used_rounds(booster) < booster.num_boosted_rounds()
    explainer, section = se.explainer_to_onnx(booster, spec, NAMES)
    assert section["trees"] == ox.used_rounds(booster)
    report = se.explainer_parity_gate(explainer, booster, spec, X[3500:3600], threshold_rows=300)
    assert report["max_abs_diff_contributions"] <= 1e-4


def test_clear_errors(data, model):
    _, _, spec = data
    booster = model[0]
    with pytest.raises(ValueError, match="spec has"):
        se.explainer_to_onnx(booster, spec[:-1], NAMES)
    reg = xgb.train({"objective": "reg:squarederror", "max_depth": 2, "nthread": 1},
                    xgb.DMatrix(np.random.default_rng(0).normal(size=(50, len(spec))).astype(np.float32),
                                label=np.arange(50.0)), 2)  # fmt: skip
    with pytest.raises(ValueError, match="log-odds"):
        se.explainer_to_onnx(reg, spec, NAMES)
