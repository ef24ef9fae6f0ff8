"""One ONNX graph for the IL-1 blockade benefit model (docs/architecture.md §3): ``inputs`` ->
``benefit``, ``risk_untreated``, ``risk_treated``, ``propensity`` (float32 [N] each).

Why one graph built from the risk export's parts (``masml.onnx_export``: ``_features``, ``_trees``,
``_calibration``, ``_read_forest``) rather than a new exporter: the outcome and propensity models *are*
risk-pipeline models, so they are written exactly as a risk bundle writes them (bit-exact tree sums,
float64 calibration), and the parity guarantees carry over. Each sub-model is built in its own scratch
graph and merged under a name prefix (``_merge``), because the risk export names its nodes for a graph
with one model. The derived features are computed once and shared.

The benefit itself is computed in float64 from the float64 risks, as ``causal.BenefitModel.predict``
does, then cast to float32:

* ``t_learner``: risk_untreated - risk_treated;
* ``dr_ridge``: pooled and per-group terms in [1, r0, r0^2] (r0 = risk_untreated), the groups being
  trigger one-hots and septic MAS features (``causal.modifier_matrix``; comparisons only, exact in float32);
* ``dr_forest``: a regression forest on the features;
* ``x_learner``: propensity * tau0 + (1 - propensity) * tau1 (two regression forests);
* ``constant``: one number for everyone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from masml import causal
from masml.calibration import Calibrator
from masml.features import feature_names
from masml.onnx_export import (
    INPUT,
    ParityError,
    _abs_diff,
    _calibration,
    _features,
    _Forest,
    _Graph,
    _read_forest,
    _stress_rows,
    _trees,
    make_model,
)
from masml.schema import TRIGGERS

OUTPUTS = ("benefit", "risk_untreated", "risk_treated", "propensity")
PRODUCER_VERSION = "benefit-1"  # bump when the graph layout changes


def _merge(g: _Graph, sub: _Graph, prefix: str, external: set[str]) -> None:
    """Append ``sub``'s nodes and constants to ``g``, prefixing every name not in ``external``."""

    def rename(name: str) -> str:
        return name if (name in external or name == "") else prefix + name

    for init in sub.inits:
        init.name = rename(init.name)
        g.inits.append(init)
    for node in sub.nodes:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = rename(node.name)
        g.nodes.append(node)


def _sub_model(g: _Graph, prefix: str, forest: _Forest, feats: str, cal: Calibrator | None) -> str:
    """A forest (+ calibration) under ``prefix``; returns the float64 output's name in ``g``."""
    sub = _Graph()
    margin = _trees(sub, forest, feats)
    if cal is None:
        sub.op("Cast", [margin], "value_f64", to=TensorProto.DOUBLE)
        out = "value_f64"
    else:
        _calibration(sub, cal, margin)  # names its float64 probability "risk_f64"
        out = "risk_f64"
    _merge(g, sub, prefix, {INPUT, feats})
    return prefix + out


def _modifiers(g: _Graph, input_names: Sequence[str]) -> str:
    """[N, G] float64 effect-modifier matrix: the ONNX twin of ``causal.modifier_matrix``."""
    index = {n: i for i, n in enumerate(input_names)}
    missing = [n for n in causal.MODIFIER_INPUTS if n not in index]
    if missing:
        raise ValueError(f"the benefit model's effect modifiers need the inputs {missing}")

    def column(name: str) -> str:
        return g.op(
            "Gather", [INPUT, g.const(f"em_{name}_index", index[name], np.int64)], f"em_{name}", axis=1
        )

    def cmp(op: str, name: str, value: float) -> str:
        return g.op(op, [column(name), g.const(f"em_{name}_{op}_c", value, np.float32)], f"em_{name}_{op}")

    trig = g.op(
        "Gather", [INPUT, g.const("em_trigger_cols", [index["trigger"]], np.int64)], "em_trigger_col", axis=1
    )
    codes = g.const("em_trigger_codes", [np.arange(len(TRIGGERS), dtype=np.float32)], np.float32)
    onehot = g.op(
        "Cast", [g.op("Equal", [trig, codes], "em_trigger_eq")], "em_trigger_onehot", to=TensorProto.DOUBLE
    )
    sepsis = g.op(
        "Equal",
        [column("trigger"), g.const("em_sepsis_code", TRIGGERS.index("bacterial_sepsis"), np.float32)],
        "em_sepsis",
    )
    hbd = g.op(
        "Or",
        [
            g.op("Or", [cmp("GreaterOrEqual", "bilirubin", causal.HBD_BILIRUBIN_MG_DL),
                        cmp("GreaterOrEqual", "alt", causal.HBD_TRANSAMINASE)], "em_hbd_a"),
            cmp("GreaterOrEqual", "ast", causal.HBD_TRANSAMINASE),
        ],
        "em_hbd",
    )  # fmt: skip
    dic = g.op(
        "And",
        [
            cmp("Less", "platelets", causal.HBD_DIC_PLATELETS),
            cmp("GreaterOrEqual", "inr", causal.HBD_DIC_INR),
        ],
        "em_dic",
    )
    features_ = g.op(
        "Or",
        [cmp("Greater", "ferritin", causal.MALS_FERRITIN), g.op("And", [hbd, dic], "em_hbd_dic")],
        "em_feat",
    )
    flag = g.op(
        "Cast", [g.op("And", [sepsis, features_], "em_septic_mas")], "em_flag_f64", to=TensorProto.DOUBLE
    )
    flag_col = g.op("Unsqueeze", [flag, g.const("em_axis1", [1], np.int64)], "em_flag_col")
    return g.op("Concat", [onehot, flag_col], "em_matrix", axis=1)


def _ridge(g: _Graph, stage: causal.RidgeStage, h: str, r0: str) -> str:
    """coef . [1, r0, r0^2, H, H*r0, H*r0^2], evaluated as pooled + H@A + (H@B) r0 + (H@C) r0^2."""
    c = np.asarray(stage.coef, np.float64)
    k = (len(c) - 3) // 3
    r0sq = g.op("Mul", [r0, r0], "dr_r0_sq")

    def matvec(name: str, coef: np.ndarray) -> str:
        return g.op("MatMul", [h, g.const(f"dr_{name}", coef, np.float64)], f"dr_h_{name}")

    pooled = g.op(
        "Add",
        [
            g.op("Add", [g.const("dr_c0", c[0], np.float64),
                         g.op("Mul", [r0, g.const("dr_c1", c[1], np.float64)], "dr_p1")], "dr_p01"),
            g.op("Mul", [r0sq, g.const("dr_c2", c[2], np.float64)], "dr_p2"),
        ],
        "dr_pooled",
    )  # fmt: skip
    a = matvec("a", c[3 : 3 + k])
    b = g.op("Mul", [matvec("b", c[3 + k : 3 + 2 * k]), r0], "dr_hb_r0")
    q = g.op("Mul", [matvec("c", c[3 + 2 * k :]), r0sq], "dr_hc_r0sq")
    return g.op("Add", [g.op("Add", [g.op("Add", [pooled, a], "dr_s1"), b], "dr_s2"), q], "benefit_f64")


def benefit_model_to_onnx(model: causal.BenefitModel) -> onnx.ModelProto:
    """The benefit model as one graph: ``inputs`` [N, K] -> benefit, risk_untreated, risk_treated,
    propensity (float32 [N])."""
    names = list(model.input_names)
    spec = model.spec
    n = len(names)
    nuis = model.nuisances
    g = _Graph()
    feats = _features(g, spec, n)
    r0 = _sub_model(g, "untreated_", _read_forest(nuis.untreated.booster), feats, nuis.untreated.calibrator)
    r1 = _sub_model(g, "treated_", _read_forest(nuis.treated.booster), feats, nuis.treated.calibrator)
    e = _sub_model(g, "propensity_", _read_forest(nuis.propensity.booster), feats, nuis.propensity.calibrator)
    learner = model.learner
    if learner == "t_learner":
        tau = g.op("Sub", [r0, r1], "benefit_f64")
    elif learner == "constant":
        zero = g.op("Mul", [r0, g.const("const_zero", 0.0, np.float64)], "const_zeros")
        tau = g.op("Add", [zero, g.const("const_benefit", model.constant, np.float64)], "benefit_f64")
    elif learner == "dr_ridge":
        if model.ridge is None:
            raise ValueError("dr_ridge learner without a fitted ridge stage")
        tau = _ridge(g, model.ridge, _modifiers(g, names), r0)
    elif learner == "dr_forest":
        tau = _sub_model(g, "drf_", _read_forest(model.dr_forest), feats, None)
    elif learner == "x_learner":
        t0 = _sub_model(g, "xt0_", _read_forest(model.x_tau0), feats, None)
        t1 = _sub_model(g, "xt1_", _read_forest(model.x_tau1), feats, None)
        one_minus = g.op("Sub", [g.const("x_one", 1.0, np.float64), e], "x_one_minus_e")
        tau = g.op(
            "Add", [g.op("Mul", [e, t0], "x_e_t0"), g.op("Mul", [one_minus, t1], "x_1me_t1")], "benefit_f64"
        )
    else:
        raise ValueError(f"unknown learner {learner!r}; expected one of {list(causal.LEARNERS)}")
    for name, src in zip(OUTPUTS, (tau, r0, r1, e), strict=True):
        g.op("Cast", [src], name, to=TensorProto.FLOAT)

    x_info = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", n])
    x_info.doc_string = "float32 [N, K], NaN = missing; columns: " + ", ".join(names)
    meaning = {
        "benefit": "the chosen learner's estimate of P(death 28 d | untreated) - P(death 28 d | IL-1 "
        "blockade); > 0 favours treatment; equals risk_untreated - risk_treated only for the T-learner",
        "risk_untreated": "untreated-arm outcome model: calibrated P(death within 28 days) without IL-1 "
        "blockade",
        "risk_treated": "treated-arm outcome model: calibrated P(death within 28 days) with IL-1 blockade "
        "within 48 h",
        "propensity": "calibrated P(IL-1 blockade | inputs) in the training data (overlap guardrail)",
    }
    outs = []
    for name in OUTPUTS:
        info = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"])
        info.doc_string = meaning[name]
        outs.append(info)
    graph = helper.make_graph(g.nodes, "masml_il1_benefit", [x_info], outs, g.inits)
    graph.doc_string = f"masml IL-1 blockade benefit model: learner {learner}, {len(spec)} derived features."
    onnx_model = make_model(graph, PRODUCER_VERSION)
    props = {
        "masml.input_names": json.dumps(names),
        "masml.feature_names": json.dumps(feature_names(spec)),
        "masml.learner": learner,
    }
    if model.ridge is not None and learner == "dr_ridge":
        props["masml.ridge"] = json.dumps(
            {
                "groups": list(causal.GROUPS),
                "lambda": model.ridge.lam,
                "coef": [float(v) for v in model.ridge.coef],
            }
        )
    helper.set_model_props(onnx_model, props)
    onnx.checker.check_model(onnx_model)
    return onnx_model


# --------------------------------------------------------------------------------------------------
# Parity gate
# --------------------------------------------------------------------------------------------------


def _modifier_rows(model: causal.BenefitModel, X: np.ndarray) -> np.ndarray:
    """Septic rows with each modifier lab set exactly on its cut-off and one float32 step either side."""
    if model.learner != "dr_ridge" or len(X) == 0:
        return np.zeros((0, X.shape[1]), np.float32)
    index = {n: i for i, n in enumerate(model.input_names)}
    base = X[0].copy()
    base[index["trigger"]] = np.float32(TRIGGERS.index("bacterial_sepsis"))
    rows = []
    cuts = {
        "ferritin": causal.MALS_FERRITIN,
        "bilirubin": causal.HBD_BILIRUBIN_MG_DL,
        "alt": causal.HBD_TRANSAMINASE,
        "ast": causal.HBD_TRANSAMINASE,
        "platelets": causal.HBD_DIC_PLATELETS,
        "inr": causal.HBD_DIC_INR,
    }
    for name, cut in cuts.items():
        c = np.float32(cut)
        for v in (c, np.nextafter(c, np.float32(-np.inf)), np.nextafter(c, np.float32(np.inf))):
            row = base.copy()
            row[index[name]] = v
            rows.append(row)
    return np.stack(rows).astype(np.float32)


def benefit_parity_gate(
    onnx_model,
    model: causal.BenefitModel,
    X: np.ndarray,
    *,
    tol: float = 1e-5,
    single_rows: int = 20,
    seed: int = 0,
) -> dict:
    """Every output of the graph against ``BenefitModel.predict`` on X, on stress rows (each input
    missing in turn, values exactly on and beside every split of every forest, modifier cut-offs) and
    on single rows; raises ``ParityError`` when any |difference| exceeds ``tol``."""
    from masml.predict import onnx_session

    X = np.asarray(X, dtype=np.float32)
    nuis = model.nuisances
    boosters = [nuis.untreated.booster, nuis.treated.booster, nuis.propensity.booster]
    boosters += [b for b in (model.dr_forest, model.x_tau0, model.x_tau1) if b is not None]
    blocks, kinds = [X], ["given"] * len(X)
    for k, booster in enumerate(boosters):
        rows, labels = _stress_rows(_read_forest(booster), model.spec, X, 10 if k == 0 else 0, True, seed)
        blocks.append(rows)
        kinds += [kind for kind, _ in labels]
    extra = _modifier_rows(model, X)
    blocks.append(extra)
    kinds += ["threshold"] * len(extra)
    rows = np.concatenate(blocks).astype(np.float32)
    kinds_arr = np.array(kinds)
    data = onnx_model.SerializeToString() if isinstance(onnx_model, onnx.ModelProto) else bytes(onnx_model)
    sess = onnx_session(data)
    got = dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {INPUT: rows}), strict=True))
    want = model.predict(rows)
    single = np.arange(min(len(X), single_rows))
    report: dict = {"n_rows": int(len(rows) + len(single)), "tol": tol, "by_kind": {}}
    worst = 0.0
    for name in OUTPUTS:
        ox = np.asarray(got[name], np.float64).reshape(-1)
        py = np.asarray(want[name], np.float64)
        for i in single:
            one = sess.run([name], {INPUT: rows[i : i + 1]})[0]
            ox = np.append(ox, float(np.asarray(one).reshape(-1)[0]))
            py = np.append(py, py[i])
        d = _abs_diff(py, ox)
        report[f"max_abs_diff_{name}"] = float(d.max())
        worst = max(worst, float(d.max()))
        if d.max() > tol:
            i = int(np.argmax(d))
            kind = kinds_arr[i] if i < len(kinds_arr) else "single_row"
            raise ParityError(
                f"ONNX/Python parity failed on {name}: max |diff| {d[i]:.3g} > {tol:g} at row {i} ({kind}): "
                f"python {py[i]!r}, onnx {ox[i]!r}; {int(np.sum(d > tol))} rows over tolerance",
                report,
            )
    report["max_abs_diff"] = worst
    for kind in ("given", "missing", "threshold", "threshold_neighbour"):
        report["by_kind"][kind] = int(np.sum(kinds_arr == kind))
    report["n_single_rows"] = int(len(single))
    return report
