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

The bundle's ``explainer.onnx`` (``benefit_explainer_to_onnx``, issue 6) explains the two *outcome models*
behind ``risk_untreated`` and ``risk_treated``: exact path-dependent TreeSHAP of each one's margin
(log-odds, before calibration), built per model with ``masml.shap_export``'s tables and merged under
the prefixes ``untreated_`` / ``treated_`` exactly as the scoring graph merges the models, so each
``*_margin`` is the scoring graph's own tree sum, bit for bit. Why the two outcome models and not
``benefit``: every learner but the T-learner computes ``benefit`` from something other than these two
models (a ridge on effect modifiers, forests on pseudo-outcomes, a constant), and ``benefit`` is a
difference of *probabilities*, which no additive log-odds attribution decomposes. What the graph does
attribute is the difference of the two margins, ``difference_* = untreated_* - treated_*`` (output by
output, one float32 subtraction each): ``difference_margin`` = margin_untreated - margin_treated is the
log odds ratio of death without vs with IL-1 blockade as the outcome models see this patient, and its
base value and contributions add up to it as each model's do. The parity gate
(``benefit_explainer_parity_gate``) holds both models to ``shap.TreeExplainer`` as the risk explainer's is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from masml import causal, shap_export
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
EXPLAINER_PRODUCER_VERSION = "benefit-shap-1"  # bump when the explainer graph layout changes
# The explained outcome models: (block name = output prefix without "_", the model.onnx output it explains)
EXPLAINED_ARMS = (("untreated", "risk_untreated"), ("treated", "risk_treated"))
DIFFERENCE = "difference"  # block untreated - treated
EXPLAINER_OUTPUTS = ("contributions", "input_contributions", "base_value", "margin")
DIFFERENCE_MEANING = (
    "untreated minus treated, output by output: contributions and input_contributions are the untreated "
    "outcome model's minus the treated outcome model's (log-odds), base_value the difference of their base "
    "values, and margin = margin_untreated - margin_treated, the log odds ratio of death within 28 days "
    "without vs with IL-1 blockade as the outcome models estimate it (> 0: they expect fewer deaths with "
    "treatment); base_value + sum(contributions) = margin, as for each model"
)
EXPLAINS_TEXT = (
    "the two outcome models behind risk_untreated and risk_treated (exact TreeSHAP of each model's margin, "
    "log-odds before calibration), not the chosen benefit learner ({learner}); benefit is a difference of "
    "probabilities and is not additively decomposed; the difference block attributes the log odds ratio "
    "margin_untreated - margin_treated, not benefit"
)


def _merge(g: _Graph, sub: _Graph, prefix: str, external: set[str]) -> None:
    """Append ``sub``'s nodes and constants to ``g``, prefixing every name not in ``external``."""

    def rename(name: str) -> str:
        return name if (name in external or name == "") else prefix + name

    for init in sub.inits:
        init.name = rename(init.name)
        g.inits.append(init)
    for node in sub.nodes:
        _rename_node(node, rename)
        g.nodes.append(node)


def _rename_node(node: onnx.NodeProto, rename) -> None:
    """Rename a node's values, and every value inside its subgraphs (an ``If``'s branches): a branch
    reads outer values by name, so both scopes must be renamed alike."""
    node.input[:] = [rename(n) for n in node.input]
    node.output[:] = [rename(n) for n in node.output]
    node.name = rename(node.name)
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for init in graph.initializer:
                init.name = rename(init.name)
            for info in [*graph.input, *graph.output, *graph.value_info]:
                info.name = rename(info.name)
            for inner in graph.node:
                _rename_node(inner, rename)


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
    causal.check_one_spec(model)  # the features are computed once in the graph, for every sub-model
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


def benefit_explainer_to_onnx(model: causal.BenefitModel) -> tuple[onnx.ModelProto, dict]:
    """The outcome models' explainer and its manifest section (``sha256`` is added by the bundle writer).

    ``inputs`` float32 [N, K] (the same matrix as ``model.onnx``) -> for each block ``b`` in untreated,
    treated, difference: ``b_contributions`` [N, F], ``b_input_contributions`` [N, K], ``b_base_value``
    [N], ``b_margin`` [N], all float32 log-odds (see the module docstring for what the blocks mean).
    """
    causal.check_one_spec(model)  # both outcome models are explained on the scoring graph's features
    names = list(model.input_names)
    spec = model.spec
    n = len(names)
    forests = {
        arm: shap_export.explainable_forest(getattr(model.nuisances, arm).booster, spec)
        for arm, _ in EXPLAINED_ARMS
    }
    g = _Graph()
    feats = _features(g, spec, n)
    tables = {}
    for arm, _ in EXPLAINED_ARMS:
        sub = _Graph()
        tables[arm] = shap_export.explainer_nodes(sub, forests[arm], spec, n, feats)
        _merge(g, sub, f"{arm}_", {INPUT, feats})
    (a, _), (b, _) = EXPLAINED_ARMS
    for out in EXPLAINER_OUTPUTS:
        g.op("Sub", [f"{a}_{out}", f"{b}_{out}"], f"{DIFFERENCE}_{out}")

    fnames = feature_names(spec)
    shapes = {"contributions": ["N", len(spec)], "input_contributions": ["N", n], "base_value": ["N"],
              "margin": ["N"]}  # fmt: skip
    whose = {arm: f"the {arm}-arm outcome model ({output})" for arm, output in EXPLAINED_ARMS}
    whose[DIFFERENCE] = f"{a} minus {b}"
    meaning = {
        "contributions": "SHAP value of each model feature (log-odds) of {w}; columns: " + ", ".join(fnames),
        "input_contributions": "SHAP values of {w} attributed to the canonical inputs (log-odds)",
        "base_value": "expected margin (log-odds) of {w}",
        "margin": "margin (log-odds, before calibration) of {w}, = base_value + sum of contributions",
    }
    blocks = [arm for arm, _ in EXPLAINED_ARMS] + [DIFFERENCE]
    outs = [
        shap_export.float_info(f"{blk}_{o}", shapes[o], meaning[o].format(w=whose[blk]))
        for blk in blocks
        for o in EXPLAINER_OUTPUTS
    ]
    x_info = shap_export.float_info(INPUT, ["N", n], "float32 [N, K], NaN = missing; as model.onnx")
    graph = helper.make_graph(g.nodes, "masml_il1_benefit_explainer", [x_info], outs, g.inits)
    graph.doc_string = (
        f"Path-dependent TreeSHAP (Lundberg 2020) via Fast TreeSHAP v2 tables (Yang 2021) of the IL-1 "
        f"benefit bundle's outcome models ({', '.join(o for _, o in EXPLAINED_ARMS)}), and their "
        f"difference; {len(spec)} features. Not an explanation of the benefit learner ({model.learner})."
    )
    onnx_model = make_model(graph, EXPLAINER_PRODUCER_VERSION)
    onnx.checker.check_model(onnx_model)
    section = {
        "file": shap_export.EXPLAINER_FILE,
        "method": "path-dependent TreeSHAP (Lundberg et al. 2020) of each outcome model's margin, evaluated "
        "with Fast TreeSHAP v2 tables (Yang 2021); equal to shap.TreeExplainer / xgboost pred_contribs on "
        "each outcome model's booster",
        "explains": EXPLAINS_TEXT.format(learner=model.learner),
        "benefit_learner": model.learner,
        "input": INPUT,
        "blocks": [
            {
                "name": arm,
                "prefix": f"{arm}_",
                "explains": output,
                "meaning": f"the {arm}-arm outcome model: {output} = its calibration "
                f"({getattr(model.nuisances, arm).calibrator.kind}) of this block's margin",
                "calibration": getattr(model.nuisances, arm).calibrator.kind,
                "base_value": tables[arm].base_value,
                "trees": len(forests[arm].trees),
                "depth": tables[arm].depth,
            }
            for arm, output in EXPLAINED_ARMS
        ]
        + [{"name": DIFFERENCE, "prefix": f"{DIFFERENCE}_", "of": [a, b], "meaning": DIFFERENCE_MEANING}],
        "outputs": [
            {
                "name": f"{blk}_{o}",
                "shape": shapes[o],
                **({"columns": "feature_names"} if o == "contributions" else {}),
                **({"columns": "input_names"} if o == "input_contributions" else {}),
                "meaning": meaning[o].format(w=whose[blk]),
            }
            for blk in blocks
            for o in EXPLAINER_OUTPUTS
        ],  # fmt: skip
        "base_value_meaning": "log-odds (margin space, before calibration)",
        "calibration_note": "the margins are before calibration: risk_untreated and risk_treated are each "
        "outcome model's calibration of its margin (monotone, so it keeps the order of patients, but the "
        "contributions add up to the margin, not to the risk, and sigmoid(margin) need not equal the risk)",
        **shap_export.columns_section(spec, names),
    }
    return onnx_model, section


def with_outputs(onnx_model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the scoring graph that also outputs the named float32 [N] intermediates (e.g.
    ``untreated_margin``, the tree sum that ``risk_untreated`` calibrates): for checks, never shipped."""
    out = onnx.ModelProto()
    out.CopyFrom(onnx_model)
    produced = {o for node in out.graph.node for o in node.output}
    missing = [n for n in names if n not in produced]
    if missing:
        raise ValueError(f"the graph has no tensors {missing}")
    out.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N"]) for n in names)
    return out


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
    from masml.predict import onnx_session, run_rows

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
    got = dict(zip(OUTPUTS, run_rows(sess, list(OUTPUTS), rows), strict=True))
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


def benefit_explainer_parity_gate(
    explainer,
    onnx_model: onnx.ModelProto,
    model: causal.BenefitModel,
    X: np.ndarray,
    *,
    tol: float = 1e-4,
    threshold_rows: int = 1500,
    seed: int = 0,
) -> dict:
    """The risk explainer's gate (``shap_export.explainer_parity_gate``) on each outcome model, then the
    difference block; raises ``ExplainerParityError`` when anything is over ``tol``.

    Per model: its contributions and base value against ``shap.TreeExplainer`` on that model's booster,
    on X, rows with each input missing and rows on and beside that model's splits; additivity on every row
    against the margin ``model.onnx`` calibrates into the model's risk. Then, on X and the missing-value
    rows: every ``difference_*`` output = untreated - treated (float32), and difference base value + Σ
    contributions = margin_untreated - margin_treated of ``model.onnx``.
    """
    X = np.asarray(X, dtype=np.float32)
    margins = [f"{arm}_margin" for arm, _ in EXPLAINED_ARMS]
    scorer = with_outputs(onnx_model, margins)
    report: dict = {"tol": tol}
    for arm, _ in EXPLAINED_ARMS:
        try:
            report[arm] = shap_export.explainer_parity_gate(
                explainer, getattr(model.nuisances, arm).booster, model.spec, X, model=scorer,
                threshold_rows=threshold_rows, seed=seed, prefix=f"{arm}_", model_margin=f"{arm}_margin",
            )  # fmt: skip
        except shap_export.ExplainerParityError as err:  # the whole report so far, not only this arm's
            report[arm] = err.report
            raise shap_export.ExplainerParityError(str(err), report) from None

    from masml.predict import onnx_session, run_rows

    stress, _ = _stress_rows(_read_forest(model.nuisances.untreated.booster), model.spec, X, 10, False, seed)
    rows = np.concatenate([X, stress]).astype(np.float32)
    sess = onnx_session(
        explainer.SerializeToString() if isinstance(explainer, onnx.ModelProto) else explainer
    )
    blocks = {
        blk: shap_export.run_explainer(sess, rows, prefix=f"{blk}_")
        for blk in [arm for arm, _ in EXPLAINED_ARMS] + [DIFFERENCE]
    }
    (a, _), (b, _) = EXPLAINED_ARMS
    m = run_rows(onnx_session(scorer.SerializeToString()), margins, rows)
    model_diff = np.asarray(m[0], np.float32).reshape(-1) - np.asarray(m[1], np.float32).reshape(-1)
    d = blocks[DIFFERENCE]
    checks = {
        **{
            f"difference_{o}": _abs_diff(
                (blocks[a][o].astype(np.float32) - blocks[b][o].astype(np.float32)).reshape(len(rows), -1),
                d[o].reshape(len(rows), -1),
            ).max(axis=1, initial=0.0)
            for o in EXPLAINER_OUTPUTS
        },
        "difference_additivity": _abs_diff(d["base_value"] + d["contributions"].sum(axis=1), model_diff),
        "difference_margin_vs_model": _abs_diff(d["margin"], model_diff),
    }
    report[DIFFERENCE] = {"n_rows": int(len(rows))}
    for name, diff in checks.items():
        report[DIFFERENCE][f"max_abs_diff_{name.removeprefix('difference_')}"] = float(diff.max(initial=0.0))
        if len(diff) and diff.max() > tol:
            i = int(np.argmax(diff))
            raise shap_export.ExplainerParityError(
                f"explainer parity failed on {name}: max |diff| {diff[i]:.3g} > {tol:g} at row {i}; "
                f"{int(np.sum(diff > tol))} of {len(diff)} rows over tolerance",
                report,
            )
    report["max_abs_diff_contributions"] = max(
        report[arm]["max_abs_diff_contributions"] for arm, _ in EXPLAINED_ARMS
    )
    report["max_abs_diff_additivity"] = max(
        [report[arm]["max_abs_diff_additivity"] for arm, _ in EXPLAINED_ARMS]
        + [report[DIFFERENCE]["max_abs_diff_additivity"]]
    )
    return report
