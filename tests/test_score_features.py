"""Clinical scores as model features: equal to their masml.scores baselines, and bit-exact in the graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import xgboost as xgb
from onnx import TensorProto, helper

from masml import onnx_export as ox
from masml import scores
from masml.calibration import fit_calibrator
from masml.cohort import simulate, write_cohort
from masml.encoding import encode_inputs
from masml.features import SCORES, Feature, ScoreItem, feature_spec, score_conditions, transform
from masml.schema import INPUT_NAMES

NAMES = list(INPUT_NAMES)
NEW = ["hlh2004", "mas2016", "mals_ferritin", "dic_isth", "hbd_dic"]
IDX = {n: i for i, n in enumerate(NAMES)}


@pytest.fixture(scope="module")
def cohort():
    """A simulated cohort with a quarter of every input a score reads blanked at random, on top of the
    simulator's own missingness (marrow, triglycerides, sCD25, D-dimer, INR, ... are often missing)."""
    data = simulate(2000, seed=31).data.copy()
    rng = np.random.default_rng(31)
    for name in sorted({n for needs, _ in SCORES.values() for n in needs} - {"age_years"}):
        data.loc[rng.random(len(data)) < 0.25, name] = np.nan
    return data


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _features_model(spec) -> onnx.ModelProto:
    """The features subgraph alone, as a model whose output is the feature matrix."""
    g = ox._Graph()
    out = ox._features(g, spec, len(NAMES))
    graph = helper.make_graph(
        g.nodes, "features",
        [helper.make_tensor_value_info(ox.INPUT, TensorProto.FLOAT, ["N", len(NAMES)])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", len(spec)])],
        g.inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ox.OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _reference(x: np.ndarray, name: str) -> np.ndarray:
    """masml.scores' float64 baseline on an input matrix (float32 -> float64 is exact)."""
    return scores.SCORES[name](pd.DataFrame(x.astype(np.float64), columns=NAMES)).to_numpy()


@pytest.mark.parametrize("name", NEW)
def test_score_feature_equals_its_baseline_with_missing_values(cohort, name):
    """Every row, missing inputs included: the baselines are defined everywhere (a missing input makes
    its item "not met"), and the feature follows the same rule (a missing value meets no condition)."""
    needs, _ = SCORES[name]
    x = encode_inputs(cohort, NAMES)
    got = transform(x, feature_spec(NAMES, [name]))[:, -1]
    np.testing.assert_array_equal(got, scores.SCORES[name](cohort).to_numpy())
    gaps = cohort[list(needs)].isna().to_numpy()
    assert gaps.any(axis=1).mean() > 0.2 and (~gaps).all(axis=1).any()  # both kinds of rows were compared
    assert len(np.unique(got)) > 1
    nothing = np.full((1, len(NAMES)), np.nan, np.float32)
    assert transform(nothing, feature_spec(NAMES, [name]))[0, -1] == 0  # nothing known: nothing met


def _threshold_rows(base: np.ndarray, conditions) -> tuple[np.ndarray, list[int]]:
    """For each condition, base rows with its input one float32 step below, on and above its cut-off."""
    rows, cond_of_row = [], []
    inf = np.float32(np.inf)
    for k, c in enumerate(conditions):
        thr = np.float32(c.threshold)
        for value in (np.nextafter(thr, -inf), thr, np.nextafter(thr, inf)):
            block = base.copy()
            block[:, c.input] = value
            rows.append(block)
            cond_of_row += [k] * len(block)
    return np.concatenate(rows), cond_of_row


def test_values_on_every_cut_off_take_the_same_branch_in_numpy_onnxruntime_and_the_baseline(cohort):
    x_all = encode_inputs(cohort, NAMES)
    base = x_all[:12]
    spec = feature_spec(NAMES, list(SCORES))  # HScore too: all six side by side in one graph
    score_cols = {f.name: j for j, f in enumerate(spec) if f.op == "score"}
    conditions = list(dict.fromkeys(c for f in spec if f.op == "score" for c in score_conditions(f.items)))
    # Each comparison alone, as its own one-condition feature: the branch of every cut-off, unmasked.
    alone = [Feature(f"c{k}", "score", (c.input,), items=(ScoreItem((c,), (0, 1)),))
             for k, c in enumerate(conditions)]  # fmt: skip
    assert {c.op for c in conditions} == {">=", ">", "<=", "<", "=="}
    x, cond_of_row = _threshold_rows(base, conditions)
    (got,) = _session(_features_model(alone)).run(None, {ox.INPUT: x})
    np.testing.assert_array_equal(got, transform(x, alone))
    on = x[np.arange(len(x)), [conditions[k].input for k in cond_of_row]] == np.float32(
        [conditions[k].threshold for k in cond_of_row])  # fmt: skip
    want_on = np.array([conditions[k].op in (">=", "<=", "==") for k in cond_of_row])
    assert np.array_equal(got[on, np.asarray(cond_of_row)[on]] == 1, want_on[on])  # the inclusive ones hold
    # The whole scores on the same rows, all six in one graph, plus the infant haemoglobin rule.
    (got,) = _session(_features_model(spec)).run(None, {ox.INPUT: x})
    np.testing.assert_array_equal(got, transform(x, spec))
    # And the float64 baselines of the new scores: equal wherever their cut-off is a float32 number. The
    # one that is not (HLH-2004's 28 days = 0.0767 years) may score a float32 step around it differently.
    new = {c for f in spec if f.name in NEW for c in score_conditions(f.items)}
    inexact = {
        k for k, c in enumerate(conditions) if c in new and float(np.float32(c.threshold)) != c.threshold
    }
    assert {conditions[k].input for k in inexact} == {IDX["age_years"]}
    keep = np.array([k not in inexact for k in cond_of_row])
    for name in NEW:
        j = score_cols[name]
        np.testing.assert_array_equal(got[keep, j], _reference(x[keep], name), err_msg=name)


def test_clinical_edges_of_the_new_scores():
    """Hand-checked rows: which side of each published edge a value lands on."""
    x = np.full((8, len(NAMES)), np.nan, np.float32)
    # MAS 2016: fever, ferritin > 684, and 2 of 4 labs; AST must exceed 48 (> 48, not >= 48).
    x[0:3, IDX["temperature_c"]] = 38.0
    x[0:3, IDX["ferritin"]] = [685.0, 685.0, 684.0]
    x[0:3, IDX["platelets"]] = 181.0
    x[0:3, IDX["ast"]] = [48.0, 49.0, 49.0]
    # HLH-2004 cytopenias: Hb 9.5 g/dL counts under 4 weeks of age only; platelets 99 is a second lineage.
    x[3:6, IDX["hemoglobin"]] = 9.5
    x[3:6, IDX["platelets"]] = 99.0
    x[3:6, IDX["age_years"]] = [0.05, 1.0, np.nan]
    # ISTH DIC: platelets 49 (2), D-dimer exactly 2.0 (2, the middle band is inclusive), INR 1.5 (2),
    # fibrinogen 99 (1) = 7; with bilirubin 2.0 it is also HBD + DIC.
    x[6:8, IDX["platelets"]] = 49.0
    x[6:8, IDX["d_dimer"]] = 2.0
    x[6:8, IDX["inr"]] = 1.5
    x[6:8, IDX["fibrinogen"]] = 99.0
    x[7, IDX["bilirubin"]] = 2.0
    spec = feature_spec(NAMES, NEW)
    f = pd.DataFrame(transform(x, spec)[:, -len(NEW) :], columns=NEW)
    assert f["mas2016"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert f["hlh2004"].tolist()[3:6] == [1, 0, 0]  # unknown age: the general limit (Hb < 9)
    assert f["dic_isth"].tolist()[6:] == [7, 7] and f["hbd_dic"].tolist()[6:] == [0, 1]
    assert f["mals_ferritin"].sum() == 0
    for name in NEW:
        np.testing.assert_array_equal(f[name].to_numpy(), _reference(x, name), err_msg=name)


def test_score_items_must_have_one_point_value_per_count():
    c = SCORES["mals_ferritin"][1](IDX)[0].conditions[0]
    with pytest.raises(ValueError, match=r"counts 0..1 but 3 points"):
        ScoreItem((c,), (0, 1, 2))
    with pytest.raises(ValueError, match=r"must be >= 0"):
        ScoreItem((ScoreItem((c,), (0, -1)),), (0, 1))


def test_parity_gate_stresses_the_cut_offs_of_nested_items():
    c = simulate(1500, seed=32)
    X = encode_inputs(c.data, NAMES)
    spec = feature_spec(NAMES, ["hbd_dic", "hlh2004"])
    y = c.data["mas_onset"].to_numpy(dtype=float)
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": 0}
    booster = xgb.train(params, xgb.DMatrix(transform(X[:1000], spec), label=y[:1000], missing=np.nan), 10)
    cal = fit_calibrator(booster.inplace_predict(transform(X[1000:1300], spec), predict_type="margin"),
                         y[1000:1300], "platt")  # fmt: skip
    model = ox.risk_model_to_onnx(booster, spec, len(NAMES), cal, input_names=NAMES)
    report = ox.parity_gate(model, booster, spec, cal, X[1300:])
    assert report["max_abs_diff_risk"] <= 1e-5
    _, labels = ox._stress_rows(ox._read_forest(booster), spec, X[1300:], 0, True, 0)
    for f in spec[-2:]:
        n = len(score_conditions(f.items))  # hbd_dic: 3 HBD + 7 ISTH + 2 = 12; hlh2004: 12
        assert sum(text.startswith(f"score {f.name}:") for _, text in labels) == 3 * n == 36


def test_icu_pipeline_with_hlh2004_and_mas2016_features_passes_the_parity_gate(tmp_path):
    """End to end (tiny tuning, no tracking): the scores are the last features of the exported graph."""
    from pipelines.risk import run_risk_pipeline

    data, _ = write_cohort(simulate(3_000, seed=21), tmp_path / "cohort.parquet")
    config = tmp_path / "tiny.yaml"
    config.write_text("tuning:\n  n_trials: 2\n  max_rounds: 120\nn_boot: 100\nfolds: 3\n"
                      "score_features: [hlh2004, mas2016]\n")  # fmt: skip
    result = run_risk_pipeline("icu", data, tmp_path / "models" / "icu", config_path=config,
                               log=lambda m: None, track=False)  # fmt: skip
    assert result.extra["model"].feature_names[-2:] == ["hlh2004", "mas2016"]
    assert result.parity["max_abs_diff_risk"] <= 1e-5
    assert result.parity["n_threshold_rows"] > 0
