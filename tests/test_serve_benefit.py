"""The IL-1 blockade benefit bundle in the scoring service: a real `python -m serve` process (training
stack import-blocked) on a tiny il1_benefit bundle trained through the CLI, called over HTTP.

What is checked against masml's own code on the same patients: the four outputs (``predict_frame``), the
guardrail statuses (``masml.guardrails.evaluate``, the reference evaluator of the manifest's rules,
including ``outside_overlap``, which reads the graph's ``propensity``), the same numbers through the Open
Inference Protocol and MLflow's /invocations, and the same guardrails there as REST predict gives (issue 4:
returned with every prediction): a ``guardrails`` record field in /invocations, a BYTES ``guardrails``
tensor in OIP (tritonclient, binary and JSON), absent for a risk bundle; the model listing with each
rule's ``kind``, the OpenAPI document of those fields, and that every text describing ``benefit`` says
what it is: the chosen learner's estimate, not ``risk_untreated - risk_treated``.

Explanations (issue 6): the bundle's explainer explains its two outcome models. Each block the service
answers is held to ``shap.TreeExplainer`` on the outcome boosters themselves (kept by the fixture), the
``difference`` block to untreated - treated, the margins to the ones ``model.onnx`` calibrates into
``risk_untreated`` / ``risk_treated``, and the OIP tensors to REST; plus the batch limit, client mistakes,
the 409 of a bundle without an explainer, and the texts saying ``benefit`` itself is not decomposed.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_serve_support import (
    Server,
    call,
    copy_bundle,
    patients_from_frame,
    post_raw,
    tiny_benefit_boosters,
    tiny_benefit_bundle,
    tiny_bundle,
)

from masml import guardrails
from masml.bundle import sha256_bytes
from masml.encoding import encode_inputs
from masml.io import load_dataset
from masml.predict import predict_frame
from masml.schema import INPUT_NAMES

TASK = "il1_benefit"
OUTPUTS = ["benefit", "risk_untreated", "risk_treated", "propensity"]
RULES = ["parasitic_or_fungal_trigger", "malignancy_trigger", "outside_overlap", "icu_level_severity"]
BLOCKS = ["untreated", "treated", "difference"]  # explanation blocks, in order (= OIP tensor prefixes)
ARMS = ["untreated", "treated"]  # the explained outcome models
PARTS = ["contributions", "input_contributions", "base_value", "margin"]  # each block's tensors
MAX_EXPLAIN = 40
ICU_FIELDS = ("cns_dysfunction", "hemorrhage", "platelets", "albumin", "mean_arterial_pressure", "lactate")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_benefit_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(bundle):
    return json.loads((bundle[1] / TASK / "manifest.json").read_text())


def _edge_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Hand-made patients on and beside every ICU-level cut-off and with each guarded trigger, with the
    statuses the rules' text implies (written out here, not computed by masml)."""
    base = frame.iloc[0].copy()
    base["trigger"] = "sjia"
    quiet = {"cns_dysfunction": 0.0, "hemorrhage": 0.0, "platelets": 150.0, "albumin": 3.5,
             "mean_arterial_pressure": 80.0, "lactate": 1.0}  # fmt: skip
    cases: list[tuple[dict, dict]] = [
        ({}, {}),
        # exactly on the cut-offs: not met
        ({"platelets": 20.0, "albumin": 2.0, "mean_arterial_pressure": 65.0, "lactate": 4.0}, {}),
        ({"platelets": 19.5}, {"icu_level_severity": "fires"}),
        ({"albumin": 1.9}, {"icu_level_severity": "fires"}),
        ({"mean_arterial_pressure": 64.0}, {"icu_level_severity": "fires"}),
        ({"lactate": 4.5}, {"icu_level_severity": "fires"}),
        ({"cns_dysfunction": 1.0}, {"icu_level_severity": "fires"}),
        ({"hemorrhage": 1.0}, {"icu_level_severity": "fires"}),
        ({f: np.nan for f in ICU_FIELDS}, {"icu_level_severity": "unknown"}),  # requires_any: none measured
        ({**{f: np.nan for f in ICU_FIELDS}, "lactate": 1.0}, {}),  # one measured, nothing met: clear
        ({"trigger": "fungal"}, {"parasitic_or_fungal_trigger": "fires"}),
        ({"trigger": "parasitic_leishmania"}, {"parasitic_or_fungal_trigger": "fires"}),
        ({"trigger": "lymphoma"}, {"malignancy_trigger": "fires"}),
        ({"trigger": "other_malignancy", "lactate": 9.0},
         {"malignancy_trigger": "fires", "icu_level_severity": "fires"}),
    ]  # fmt: skip
    rows, expected = [], []
    for k, (change, fired) in enumerate(cases):
        row = base.copy()
        for f, v in (quiet | change).items():
            row[f] = v
        row["patient_id"] = f"edge-{k}"
        rows.append(row)
        expected.append({r: fired.get(r, "clear") for r in RULES if r != "outside_overlap"})
    edge = pd.DataFrame(rows).reset_index(drop=True)
    for name in INPUT_NAMES:  # back to the cohort's dtypes (a row Series holds objects)
        edge[name] = edge[name].astype(frame[name].dtype)
    return edge, expected


@pytest.fixture(scope="module")
def cohort(bundle):
    """The whole tiny cohort (every trigger, a range of propensities) plus the hand-made edge patients."""
    frame = load_dataset(bundle[0]).reset_index(drop=True)
    edge, expected = _edge_rows(frame)
    both = pd.concat([frame, edge], ignore_index=True)
    return both, len(frame), expected


@pytest.fixture(scope="module")
def server(bundle):
    s = Server(bundle[1])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def scored(server, cohort):
    """One REST call on every patient: (response body, outputs as float64 arrays)."""
    frame = cohort[0]
    st, _, body = call(
        "POST", server.url(f"/v1/models/{TASK}/predict"), {"patients": patients_from_frame(frame)}
    )
    assert st == 200, body
    outs = {k: np.array([p[k] for p in body["predictions"]], dtype=np.float64) for k in OUTPUTS}
    return body, outs


def _statuses(predictions: list[dict]) -> list[dict]:
    return [{g["id"]: g["status"] for g in p["guardrails"]} for p in predictions]


def test_outputs_equal_masml_predict_frame(bundle, cohort, scored, manifest):
    frame = cohort[0]
    body, outs = scored
    expected = predict_frame(bundle[1] / TASK, frame)
    assert [p["patient_id"] for p in body["predictions"]] == frame["patient_id"].astype(str).tolist()
    for name in OUTPUTS:
        diff = np.abs(outs[name] - expected[name].to_numpy())
        assert diff.max() <= 1e-6, (name, float(diff.max()))
    assert list(body["predictions"][0])[:5] == ["patient_id", *OUTPUTS]
    assert body["model"]["task"] == TASK and body["model"]["sha256"] == manifest["model_sha256"]
    assert np.all((outs["risk_untreated"] >= 0) & (outs["risk_untreated"] <= 1))
    assert np.all((outs["propensity"] >= 0) & (outs["propensity"] <= 1))


def test_guardrails_agree_with_masml_reference_evaluator(bundle, cohort, scored, manifest):
    """Every patient's status for every manifest rule, as masml.guardrails.evaluate gives it on the same
    rows with masml's own outputs (so outside_overlap is checked on masml's propensity, not the server's)."""
    frame, n_cohort, edge_expected = cohort
    body, outs = scored
    ours = predict_frame(bundle[1] / TASK, frame)
    reference = guardrails.evaluate(
        manifest["guardrails"], frame, {k: ours[k].to_numpy() for k in OUTPUTS}
    ).to_dict("records")
    got = _statuses(body["predictions"])
    assert got == reference
    assert [r["id"] for r in manifest["guardrails"]] == RULES
    by_id = {r["id"]: r for r in manifest["guardrails"]}
    for flag in body["predictions"][0]["guardrails"]:
        assert flag["message"] == by_id[flag["id"]]["message"] and flag["kind"] == by_id[flag["id"]]["kind"]
    # The comparison means something only if every rule both fires and clears on these patients.
    for rule in RULES:
        seen = {row[rule] for row in got[:n_cohort]}
        assert {"fires", "clear"} <= seen, (rule, seen)
    # outside_overlap is exactly "propensity outside the manifest's overlap bounds", read from the graph.
    low, high = manifest["method"]["overlap_bounds"]
    outside = (outs["propensity"] < low) | (outs["propensity"] > high)
    assert [row["outside_overlap"] == "fires" for row in got] == outside.tolist()
    # The hand-made patients: statuses written out from the rules' text (on a cut-off = not met).
    edge = [{k: v for k, v in row.items() if k != "outside_overlap"} for row in got[n_cohort:]]
    assert edge == edge_expected


def test_missing_trigger_is_refused_and_unknown_when_the_manifest_allows_it(bundle, cohort, server, tmp_path):
    """The shipped manifest requires `trigger`, so a patient without one is a 422 naming the field (the
    service never reports "clear" for a trigger it was not told). With a manifest that does not require it,
    the trigger rules answer "unknown", as the reference evaluator does."""
    frame = cohort[0].head(40).copy()
    pts = patients_from_frame(frame)
    for p in pts[::4]:
        del p["trigger"]
    st, _, body = call("POST", server.url(f"/v1/models/{TASK}/predict"), {"patients": pts})
    assert st == 422, body
    assert {p["field"] for p in body["problems"]} == {f"patients[{i}].trigger" for i in range(0, 40, 4)}

    manifest = json.loads((bundle[1] / TASK / "manifest.json").read_text())
    inputs = [i | {"required": False} if i["name"] == "trigger" else i for i in manifest["inputs"]]
    copy_bundle(bundle[1] / TASK, tmp_path / "models" / TASK, inputs=inputs)
    s = Server(tmp_path / "models")
    try:
        st, _, body = call("POST", s.url(f"/v1/models/{TASK}/predict"), {"patients": pts})
    finally:
        s.stop()
    assert st == 200, body
    frame.loc[frame.index[::4], "trigger"] = None
    ours = predict_frame(bundle[1] / TASK, frame)
    for name in OUTPUTS:
        got = np.array([p[name] for p in body["predictions"]])
        assert np.max(np.abs(got - ours[name].to_numpy())) <= 1e-6, name
    reference = guardrails.evaluate(manifest["guardrails"], frame, {k: ours[k].to_numpy() for k in OUTPUTS})
    got = _statuses(body["predictions"])
    assert got == reference.to_dict("records")
    for i, row in enumerate(got):
        unknown = i % 4 == 0
        assert (row["parasitic_or_fungal_trigger"] == "unknown") == unknown
        assert (row["malignancy_trigger"] == "unknown") == unknown


def test_oip_infer_and_invocations_give_the_same_numbers(bundle, cohort, scored, server, manifest):
    import tritonclient.http as th

    frame = cohort[0].head(200)
    rest = {k: v[:200].astype(np.float32) for k, v in scored[1].items()}
    x = encode_inputs(frame, [i["name"] for i in manifest["inputs"]])
    assert np.isnan(x).any()  # missing values travel as NaN in the binary tensor
    client = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    meta = client.get_model_metadata(TASK)
    assert meta["outputs"] == [{"name": o, "datatype": "FP32", "shape": [-1]} for o in OUTPUTS] + [
        {"name": "guardrails", "datatype": "BYTES", "shape": [-1]}
    ]
    assert meta["parameters"]["explainer"] is True
    assert "same list as REST predict" in meta["parameters"]["guardrails_output"]
    inp = th.InferInput("inputs", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    res = client.infer(TASK, [inp], request_id="benefit-1")
    assert res.get_response()["id"] == "benefit-1"
    for name in OUTPUTS:
        assert np.array_equal(res.as_numpy(name), rest[name]), name

    nulls = [[None if np.isnan(v) else float(v) for v in row] for row in x[:3]]
    body = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [3, x.shape[1]], "data": nulls}]}
    st, _, resp = call("POST", server.url(f"/v2/models/{TASK}/infer"), body)
    assert st == 200, resp
    assert [o["name"] for o in resp["outputs"]] == [*OUTPUTS, "guardrails"]
    for o in resp["outputs"][:-1]:
        assert np.array_equal(np.array(o["data"], dtype=np.float32), rest[o["name"]][:3]), o["name"]

    pts = patients_from_frame(frame.head(30))
    cols = sorted({k for p in pts for k in p} - {"patient_id"})
    split = {"dataframe_split": {"columns": cols, "data": [[p.get(c) for c in cols] for p in pts]}}
    records = {"dataframe_records": [{k: v for k, v in p.items() if k != "patient_id"} for p in pts]}
    for path in ("/invocations", f"/invocations?model={TASK}"):
        for req in (split, records):
            st, _, resp = call("POST", server.url(path), req)
            assert st == 200, resp
            assert all(list(r) == [*OUTPUTS, "guardrails"] for r in resp["predictions"])
            for name in OUTPUTS:
                got = np.array([r[name] for r in resp["predictions"]], dtype=np.float32)
                assert np.array_equal(got, rest[name][:30]), (path, name)


def _covers_every_status(flags: list[list[dict]]) -> None:
    """A comparison of guardrails means something only if every rule both fires and clears in it."""
    for rule in RULES:
        seen = {f["status"] for row in flags for f in row if f["id"] == rule}
        assert {"fires", "clear"} <= seen, (rule, seen)


def test_invocations_records_carry_the_rest_guardrails(cohort, scored, server):
    """Every patient (cohort and hand-made edge rows), both MLflow formats: each record holds the numbers
    under the same keys as before, plus `guardrails`, equal to REST predict's list for that patient."""
    frame = cohort[0]
    body, outs = scored
    rest = [p["guardrails"] for p in body["predictions"]]
    _covers_every_status(rest)
    pts = patients_from_frame(frame)
    cols = sorted({k for p in pts for k in p} - {"patient_id"})
    split = {"dataframe_split": {"columns": cols, "data": [[p.get(c) for c in cols] for p in pts]}}
    records = {"dataframe_records": [{k: v for k, v in p.items() if k != "patient_id"} for p in pts]}
    for req in (split, records):
        st, _, resp = call("POST", server.url(f"/invocations?model={TASK}"), req)
        assert st == 200, resp
        preds = resp["predictions"]
        assert len(preds) == len(frame)
        assert all(list(r) == [*OUTPUTS, "guardrails"] for r in preds)
        for name in OUTPUTS:  # still plain numbers under their names, as MLflow clients read them
            assert all(type(r[name]) is float for r in preds), name
            assert np.array_equal(np.array([r[name] for r in preds]), outs[name]), name
        assert [r["guardrails"] for r in preds] == rest


def test_oip_guardrails_tensor_equals_rest_through_tritonclient(cohort, scored, server, manifest):
    """BYTES [N], one JSON text per patient, equal to REST predict's guardrails: binary (tritonclient's
    default), JSON (outputs requested with binary_data=False, and a plain JSON body with nulls), mixed;
    a client that names outputs gets exactly those, in its order."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    frame = cohort[0]
    body, outs = scored
    rest = [p["guardrails"] for p in body["predictions"]]
    _covers_every_status(rest)
    x = encode_inputs(frame, [i["name"] for i in manifest["inputs"]])
    client = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    inp = th.InferInput("inputs", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)

    def outputs_of(res) -> list[str]:
        return [o["name"] for o in res.get_response()["outputs"]]

    # every output, binary: the guardrails arrive as length-prefixed bytes
    res = client.infer(TASK, [inp])
    assert outputs_of(res) == [*OUTPUTS, "guardrails"]
    g = res.as_numpy("guardrails")
    assert g.shape == (len(frame),) and g.dtype == object and isinstance(g[0], bytes)
    assert [json.loads(b) for b in g] == rest
    for name in OUTPUTS:
        assert np.array_equal(res.as_numpy(name), outs[name].astype(np.float32)), name

    # every output named, as JSON: the guardrails are strings in "data"
    as_json = [th.InferRequestedOutput(n, binary_data=False) for n in [*OUTPUTS, "guardrails"]]
    res = client.infer(TASK, [inp], outputs=as_json)
    tensor = res.get_output("guardrails")
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [len(frame)] and "parameters" not in tensor
    assert all(isinstance(t, str) for t in tensor["data"])
    assert [json.loads(t) for t in res.as_numpy("guardrails")] == rest
    for name in OUTPUTS:
        assert np.array_equal(res.as_numpy(name), outs[name].astype(np.float32)), name

    # named outputs are honoured: without guardrails when not asked for; in the client's order, mixed
    res = client.infer(TASK, [inp], outputs=[th.InferRequestedOutput("benefit")])
    assert outputs_of(res) == ["benefit"] and res.as_numpy("guardrails") is None
    wanted = [th.InferRequestedOutput("guardrails"), th.InferRequestedOutput("propensity", binary_data=False)]
    res = client.infer(TASK, [inp], outputs=wanted)
    assert outputs_of(res) == ["guardrails", "propensity"]
    assert [json.loads(b) for b in res.as_numpy("guardrails")] == rest
    assert np.array_equal(res.as_numpy("propensity"), outs["propensity"].astype(np.float32))
    with pytest.raises(InferenceServerException, match="guardrails"):  # the error lists what exists
        client.infer(TASK, [inp], outputs=[th.InferRequestedOutput("nope")])

    # a plain JSON body (missing values as null), no "outputs": every output in JSON
    nulls = [[None if np.isnan(v) else float(v) for v in row] for row in x]
    req = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": list(x.shape), "data": nulls}]}
    st, _, resp = call("POST", server.url(f"/v2/models/{TASK}/infer"), req)
    assert st == 200, resp
    by_name = {o["name"]: o for o in resp["outputs"]}
    assert list(by_name) == [*OUTPUTS, "guardrails"]
    assert by_name["guardrails"]["datatype"] == "BYTES" and by_name["guardrails"]["shape"] == [len(frame)]
    assert [json.loads(t) for t in by_name["guardrails"]["data"]] == rest


def test_a_risk_bundle_has_no_guardrails_output(tmp_path_factory, bundle, cohort):
    """Served beside the benefit bundle, the onset model keeps its plain answers: no guardrails tensor in
    its OIP metadata or infer answer (asking for one is a 400), /invocations records hold only `risk`."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    risk_models = tiny_bundle(tmp_path_factory)[1]
    models = tmp_path_factory.mktemp("risk_and_benefit") / "models"
    copy_bundle(risk_models / "onset", models / "onset")
    copy_bundle(bundle[1] / TASK, models / TASK)
    s = Server(models)
    try:
        client = th.InferenceServerClient(f"127.0.0.1:{s.port}")
        meta = client.get_model_metadata("onset")
        assert meta["outputs"] == [{"name": "risk", "datatype": "FP32", "shape": [-1]}]
        assert "guardrails_output" not in meta["parameters"]
        assert [o["name"] for o in client.get_model_metadata(TASK)["outputs"]][-1] == "guardrails"
        onset = json.loads((risk_models / "onset" / "manifest.json").read_text())
        x = encode_inputs(cohort[0].head(2), [i["name"] for i in onset["inputs"]])
        inp = th.InferInput("inputs", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("onset", [inp])
        assert [o["name"] for o in res.get_response()["outputs"]] == ["risk"]
        with pytest.raises(InferenceServerException, match=r"among \['risk'\]"):
            client.infer("onset", [inp], outputs=[th.InferRequestedOutput("guardrails")])
        patient = {"age_years": 30, "sex": "M", "trigger": "sjia", "ferritin": 9000}
        st, _, resp = call("POST", s.url("/invocations?model=onset"), {"dataframe_records": [patient]})
        assert st == 200 and list(resp["predictions"][0]) == ["risk"], resp
        st, _, resp = call("POST", s.url(f"/invocations?model={TASK}"), {"dataframe_records": [patient]})
        assert st == 200 and list(resp["predictions"][0]) == [*OUTPUTS, "guardrails"], resp
        listed = {m["task"]: m for m in call("GET", s.url("/v1/models"))[2]["models"]}
        assert listed["onset"]["guardrails"] == [] and len(listed[TASK]["guardrails"]) == len(RULES)
    finally:
        s.stop()


def test_openapi_documents_guardrails_in_every_protocol(server):
    spec = call("GET", server.url("/openapi.json"))[2]
    schemas = spec["components"]["schemas"]
    record = schemas["InvocationsResponse"]["properties"]["predictions"]["items"]
    assert record["properties"]["guardrails"]["items"] == {"$ref": "#/components/schemas/GuardrailFlag"}
    assert record["additionalProperties"] == {"type": "number"}
    flag = schemas["GuardrailFlag"]
    assert flag["required"] == ["id", "status", "message"]
    assert "caution" in flag["properties"]["kind"]["description"]
    rule = schemas["ModelInfo"]["properties"]["guardrails"]["items"]
    assert rule == {"$ref": "#/components/schemas/GuardrailRule"}
    assert {"id", "message", "source", "kind"} <= set(schemas["GuardrailRule"]["properties"])
    assert "BYTES" in schemas["Tensor"]["properties"]["datatype"]["enum"]
    assert "'guardrails', BYTES [N]" in schemas["InferResponse"]["properties"]["outputs"]["description"]
    assert "'guardrails', BYTES [N]" in schemas["ModelMetadata"]["properties"]["outputs"]["description"]
    infer = spec["paths"][f"/v2/models/{TASK}/infer"]["post"]["summary"]
    assert "'guardrails', BYTES [N]" in infer and all(o in infer for o in OUTPUTS)
    assert "guardrail" in spec["paths"]["/invocations"]["post"]["responses"]["200"]["description"]


def test_model_list_shows_outputs_and_guardrails(server, manifest):
    st, _, body = call("GET", server.url("/v1/models"))
    assert st == 200 and body["refused"] == []
    (m,) = body["models"]
    assert m["task"] == TASK and m["sha256"] == manifest["model_sha256"]
    assert m["explainer"]["sha256"] == manifest["explainer"]["sha256"]
    assert [b["name"] for b in m["explainer"]["blocks"]] == BLOCKS
    assert f"not the chosen benefit learner ({manifest['method']['learner']})" in m["explainer"]["explains"]
    assert m["outputs"] == manifest["outputs"] and [o["name"] for o in m["outputs"]] == OUTPUTS
    assert m["guardrails"] == [
        {"id": r["id"], "message": r["message"], "source": r["source"], "kind": r["kind"]}
        for r in manifest["guardrails"]
    ]
    assert {r["kind"] for r in m["guardrails"]} == {"caution", "context"}
    by_id = {r["id"]: r["kind"] for r in m["guardrails"]}
    assert by_id["outside_overlap"] == "caution" and by_id["icu_level_severity"] == "context"
    assert call("GET", server.url(f"/v1/models/{TASK}"))[2] == m
    assert "BLOCKED IMPORT" not in server.stderr()


def test_texts_say_benefit_is_the_chosen_learners_estimate(server, manifest):
    """OpenAPI and the manifest: benefit is the chosen learner's estimate of P(death | untreated) -
    P(death | treated); the two risks are the outcome models' and need not differ by exactly benefit."""
    spec = call("GET", server.url("/openapi.json"))[2]
    props = spec["components"]["schemas"]["Prediction"]["properties"]
    meanings = {o["name"]: o["meaning"] for o in manifest["outputs"]}
    for where, text in (("openapi", {k: props[k]["description"] for k in OUTPUTS}), ("manifest", meanings)):
        b = text["benefit"]
        assert "chosen learner's estimate of P(death within 28 days | untreated) - P(death" in b, where
        assert "need not equal risk_untreated - risk_treated" in b, where
        assert not b.startswith("risk_untreated - risk_treated"), where
        for risk in ("risk_untreated", "risk_treated"):
            assert "outcome model's calibrated P(death within 28 days)" in text[risk], (where, risk)
            assert "risk_untreated - risk_treated need not equal benefit" in text[risk], (where, risk)
        assert "outside_overlap" in text["propensity"], where
    assert "only when the T-learner is chosen" in manifest["method"]["design"]


def test_benefit_is_not_the_difference_of_the_risks_unless_the_t_learner_is_chosen(scored, manifest):
    outs = scored[1]
    gap = np.abs(outs["benefit"] - (outs["risk_untreated"] - outs["risk_treated"]))
    learner = manifest["method"]["learner"]
    if learner == "t_learner":  # then they agree, up to float32 rounding of three numbers
        assert gap.max() <= 1e-6
    else:
        assert gap.max() > 1e-3, (learner, float(gap.max()))


# --------------------------------------------------------------------------------------------------
# Explanations: the two outcome models and their difference
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explain_server(bundle, tmp_path_factory):
    """The benefit bundle (with its explainer) and a copy without one ("plain"); explain calls capped at
    MAX_EXPLAIN patients."""
    models = tmp_path_factory.mktemp("benefit_explain") / "models"
    copy_bundle(bundle[1] / TASK, models / TASK)
    plain = copy_bundle(bundle[1] / TASK, models / "plain", task="plain", explainer=None)
    (plain / "explainer.onnx").unlink()
    s = Server(models, "--max-explain-batch", str(MAX_EXPLAIN))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def explained(explain_server, cohort, manifest):
    """One REST explain call at the batch limit: cohort patients (missing values left out) and hand-made
    edge patients (all ICU fields missing, guarded triggers); every input in ``top``, feature view on."""
    frame, n_cohort, _ = cohort
    rows = pd.concat([frame.head(MAX_EXPLAIN - 10), frame.iloc[n_cohort : n_cohort + 10]], ignore_index=True)
    k = len(manifest["inputs"])
    body = {"patients": patients_from_frame(rows), "top": k, "features": True}
    st, _, resp = call("POST", explain_server.url(f"/v1/models/{TASK}/explain"), body)
    assert st == 200, resp
    x = encode_inputs(rows, [i["name"] for i in manifest["inputs"]])
    assert np.isnan(x).any()
    return resp, x


def _matrix(resp: dict, block: str, key: str, columns: list[str]) -> np.ndarray:
    """One block's per-input (``contributions``) or per-feature view as float32 [N, columns]."""
    rows = [p["explanation"][block][key] for p in resp["predictions"]]
    return np.array([[r[c] for c in columns] for r in rows], dtype=np.float32)


def _vector(resp: dict, block: str, key: str) -> np.ndarray:
    return np.array([p["explanation"][block][key] for p in resp["predictions"]], dtype=np.float32)


def test_manifest_describes_the_outcome_models_explainer(bundle, manifest):
    ex = manifest["explainer"]
    assert ex["sha256"] == sha256_bytes((bundle[1] / TASK / ex["file"]).read_bytes())
    assert [b["name"] for b in ex["blocks"]] == BLOCKS and [b["prefix"] for b in ex["blocks"]] == [
        f"{b}_" for b in BLOCKS
    ]
    assert [b["explains"] for b in ex["blocks"][:2]] == ["risk_untreated", "risk_treated"]
    assert [o["name"] for o in ex["outputs"]] == [f"{b}_{p}" for b in BLOCKS for p in PARTS]
    learner = manifest["method"]["learner"]
    assert ex["benefit_learner"] == learner
    assert f"not the chosen benefit learner ({learner})" in ex["explains"]
    assert "not additively decomposed" in ex["explains"] and "difference of probabilities" in ex["explains"]
    assert "margin_untreated - margin_treated" in ex["blocks"][2]["meaning"]
    for arm in ARMS:  # the export gate's figures: shap within 1e-4, additivity on every row
        gate = ex["parity"][arm]
        assert gate["max_abs_diff_contributions"] <= 1e-4 and gate["max_abs_diff_additivity"] <= 1e-4
        assert gate["n_missing_rows"] > 0 and gate["n_threshold_rows"] > 0
        assert gate["max_abs_diff_margin_vs_model"] == 0.0  # model.onnx's own tree sum
    assert ex["parity"]["difference"]["max_abs_diff_contributions"] == 0.0


def test_each_outcome_model_block_equals_shap_on_its_booster(
    explained, explain_server, manifest, tmp_path_factory
):
    """untreated / treated: feature contributions = shap.TreeExplainer on the outcome booster (the very
    boosters the bundle was exported from), within 1e-4, on rows with missing values; base + Σ = margin."""
    import xgboost as xgb

    from masml.features import feature_names, feature_spec, transform
    from masml.onnx_export import used_rounds
    from masml.shap_export import attribution_map, reference_shap

    resp, x = explained
    assert "BLOCKED IMPORT" not in explain_server.stderr()
    ex = manifest["explainer"]
    inputs, features = ex["input_names"], ex["feature_names"]
    spec = feature_spec(inputs)  # the benefit model's spec (masml.causal)
    assert feature_names(spec) == features
    k = len(inputs)
    for p in resp["predictions"]:  # the usual answer (outputs, guardrails) plus the three blocks
        assert set(OUTPUTS) <= set(p) and [g["id"] for g in p["guardrails"]] == RULES
        assert list(p["explanation"]) == BLOCKS
        for block in BLOCKS:
            e = p["explanation"][block]
            assert list(e) == ["base_value", "margin", "contributions", "top", "feature_contributions"]
            assert len(e["top"]) == k
    boosters = tiny_benefit_boosters(tmp_path_factory)
    amap = attribution_map(spec, k)
    for arm in ARMS:
        booster = xgb.Booster(model_file=str(boosters[arm]))
        ref, ref_base = reference_shap(booster, transform(x, spec), features, used_rounds(booster))
        got = _matrix(resp, arm, "feature_contributions", features).astype(np.float64)
        got_in = _matrix(resp, arm, "contributions", inputs).astype(np.float64)
        base, margin = _vector(resp, arm, "base_value"), _vector(resp, arm, "margin")
        assert np.abs(got - ref).max() <= 1e-4, arm
        assert np.abs(base - ref_base).max() <= 1e-4, arm
        assert np.abs(base + got.sum(axis=1) - margin).max() <= 1e-4, arm
        assert np.abs(base + got_in.sum(axis=1) - margin).max() <= 1e-4, arm
        np.testing.assert_allclose(got_in, got @ amap, rtol=0, atol=1e-5)  # inputs credited by the map
        xgb_margin = booster.inplace_predict(transform(x, spec), predict_type="margin")
        assert np.abs(margin - xgb_margin).max() <= 1e-5, arm  # xgboost's own margin of the same rows


def test_difference_block_is_untreated_minus_treated(explained, manifest):
    resp, _ = explained
    ex = manifest["explainer"]
    for key, cols in (("contributions", ex["input_names"]), ("feature_contributions", ex["feature_names"])):
        u, t, d = (_matrix(resp, b, key, cols) for b in BLOCKS)
        np.testing.assert_array_equal(d, u - t)  # one float32 subtraction per value, in the graph
    for key in ("base_value", "margin"):
        u, t, d = (_vector(resp, b, key) for b in BLOCKS)
        np.testing.assert_array_equal(d, u - t)
    d_in = _matrix(resp, "difference", "contributions", ex["input_names"]).astype(np.float64)
    d_base, d_margin = _vector(resp, "difference", "base_value"), _vector(resp, "difference", "margin")
    assert np.abs(d_base + d_in.sum(axis=1) - d_margin).max() <= 1e-4  # adds up to the log odds ratio
    for p in resp["predictions"]:
        e = p["explanation"]["difference"]
        mags = [abs(t["contribution"]) for t in e["top"]]
        assert mags == sorted(mags, reverse=True)
        assert all(t["contribution"] == e["contributions"][t["input"]] for t in e["top"])


def test_margins_are_what_model_onnx_calibrates_into_the_two_risks(explained, bundle, manifest):
    """Calibration comes after the margin, so sigmoid(margin) is not the risk; what holds: each block's
    margin is the tree sum model.onnx calibrates into that risk (bit for bit), and the risk is a
    non-decreasing function of it (a Platt block: exactly sigmoid(a * margin + b))."""
    import onnx
    from onnx import numpy_helper

    from masml.onnx_benefit import with_outputs
    from masml.predict import onnx_session

    resp, x = explained
    graph = onnx.load(str(bundle[1] / TASK / "model.onnx"))
    names = [f"{arm}_margin" for arm in ARMS]
    inner = onnx_session(with_outputs(graph, names).SerializeToString()).run(names, {"inputs": x})
    consts = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    calibration = {b["name"]: b["calibration"] for b in manifest["explainer"]["blocks"][:2]}
    for arm, model_margin in zip(ARMS, inner, strict=True):
        margin = _vector(resp, arm, "margin")
        np.testing.assert_array_equal(margin, np.asarray(model_margin).reshape(-1))
        risk = np.array([p[f"risk_{arm}"] for p in resp["predictions"]])
        order = np.argsort(margin, kind="stable")
        assert np.all(np.diff(risk[order]) >= 0), arm
        if calibration[arm] == "platt":
            a, b = float(consts[f"{arm}_platt_a"]), float(consts[f"{arm}_platt_b"])
            expected = 1 / (1 + np.exp(-(a * margin.astype(np.float64) + b)))
            assert np.abs(risk - expected).max() <= 1e-6, arm


def test_oip_explain_tensors_equal_rest(explained, explain_server, manifest):
    import tritonclient.http as th

    resp, x = explained
    ex = manifest["explainer"]
    url = explain_server.url(f"/v2/models/{TASK}/explain")
    inp = th.InferInput("inputs", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, header_len = th.InferenceServerClient.generate_request_body([inp], request_id="b-1")
    st, hdrs, raw = post_raw(url, body, header_len)
    assert st == 200, raw
    res = th.InferenceServerClient.parse_response_body(
        raw, header_length=hdrs.get("inference-header-content-length")
    )
    out = res.get_response()
    assert out["id"] == "b-1" and [o["name"] for o in out["outputs"]] == [
        f"{b}_{p}" for b in BLOCKS for p in PARTS
    ]
    params = out["parameters"]
    assert params["blocks"] == BLOCKS and params["input_contributions_columns"] == ex["input_names"]
    assert params["contributions_columns"] == ex["feature_names"]
    assert "not the chosen benefit learner" in params["explains"]
    for b in BLOCKS:
        np.testing.assert_array_equal(
            res.as_numpy(f"{b}_input_contributions"), _matrix(resp, b, "contributions", ex["input_names"])
        )
        np.testing.assert_array_equal(
            res.as_numpy(f"{b}_contributions"), _matrix(resp, b, "feature_contributions", ex["feature_names"])
        )
        for part in ("base_value", "margin"):
            np.testing.assert_array_equal(res.as_numpy(f"{b}_{part}"), _vector(resp, b, part))
    # JSON, missing values as null, one named output
    nulls = [[None if np.isnan(v) else float(v) for v in row] for row in x[:3]]
    req = {
        "inputs": [{"name": "inputs", "datatype": "FP32", "shape": [3, x.shape[1]], "data": nulls}],
        "outputs": [{"name": "difference_margin"}],
    }
    st, _, got = call("POST", url, req)
    assert st == 200, got
    (o,) = got["outputs"]
    assert o["name"] == "difference_margin" and o["shape"] == [3]
    np.testing.assert_array_equal(
        np.array(o["data"], dtype=np.float32), _vector(resp, "difference", "margin")[:3]
    )
    assert call("GET", explain_server.url(f"/v2/models/{TASK}"))[2]["parameters"]["explainer"] is True


def test_explain_limits_and_client_mistakes_are_4xx(explain_server, explained, manifest):
    """The explain batch limit on every route, bad options and outputs, and a bundle without explainer:
    client errors with a reason, never a 500; the benefit model still predicts beside them."""
    patient = {"age_years": 30, "sex": "M", "trigger": "sjia", "ferritin": 9000}
    k = len(manifest["inputs"])
    v1 = explain_server.url(f"/v1/models/{TASK}/explain")
    big = [patient] * (MAX_EXPLAIN + 1)
    st, _, resp = call("POST", v1, {"patients": big})
    assert st == 413 and resp["problems"][0]["kind"] == "explain_batch_too_large", resp
    predict = explain_server.url(f"/v1/models/{TASK}/predict")
    assert call("POST", predict, {"patients": big, "explain": True})[0] == 413
    assert call("POST", predict, {"patients": big})[0] == 200
    tensor = {
        "name": "inputs",
        "datatype": "FP32",
        "shape": [MAX_EXPLAIN + 1, k],
        "data": [0.0] * ((MAX_EXPLAIN + 1) * k),
    }
    v2 = explain_server.url(f"/v2/models/{TASK}/explain")
    st, _, resp = call("POST", v2, {"inputs": [tensor]})
    assert st == 413 and f"limit of {MAX_EXPLAIN}" in resp["error"]
    for bad in ({"top": 0}, {"top": k + 1}, {"features": "yes"}, {"explain": True}):
        st, _, resp = call("POST", v1, {"patients": [patient], **bad})
        assert st == 422, (bad, resp)
    row = [None if np.isnan(v) else float(v) for v in explained[1][0]]
    one = {"name": "inputs", "datatype": "FP32", "shape": [1, k], "data": row}
    st, _, resp = call("POST", v2, {"inputs": [one], "outputs": [{"name": "margin"}]})
    assert st == 400 and "difference_margin" in resp["error"], resp  # the error lists what exists
    # with explain: true on predict, the same blocks as the explain route
    st, _, resp = call("POST", predict, {"patients": [patient], "explain": True, "top": 2})
    assert st == 200 and list(resp["predictions"][0]["explanation"]) == BLOCKS, resp
    assert all(len(b["top"]) == 2 for b in resp["predictions"][0]["explanation"].values())
    assert resp["predictions"][0] == call("POST", v1, {"patients": [patient], "top": 2})[2]["predictions"][0]
    # a benefit bundle without explainer.onnx: 409, and it still predicts
    for path, body in (
        ("/v1/models/plain/explain", {"patients": [patient]}),
        ("/v1/models/plain/predict", {"patients": [patient], "explain": True}),
        ("/v2/models/plain/explain", {"inputs": [one]}),
    ):
        st, hdrs, resp = call("POST", explain_server.url(path), body)
        assert st == 409 and hdrs["content-type"].startswith("application/json"), resp
        assert "has no explainer" in resp["error"]
        if "problems" in resp:
            (p,) = resp["problems"]
            assert p["kind"] == "no_explainer" and "bundles from before explanations" in p["expected"]
    st, _, resp = call("POST", explain_server.url("/v1/models/plain/predict"), {"patients": [patient]})
    assert st == 200 and "explanation" not in resp["predictions"][0]
    assert "internal error" not in explain_server.stderr()


def test_openapi_says_what_a_benefit_explanation_is(explain_server):
    spec = call("GET", explain_server.url("/openapi.json"))[2]
    schemas = spec["components"]["schemas"]
    assert schemas["Prediction"]["properties"]["explanation"]["$ref"].endswith("/Explanation")
    assert {r["$ref"].split("/")[-1] for r in schemas["Explanation"]["oneOf"]} == {
        "ExplanationBlock",
        "BenefitExplanation",
    }
    benefit = schemas["BenefitExplanation"]
    assert benefit["required"] == BLOCKS
    for text in (benefit["description"], spec["paths"][f"/v1/models/{TASK}/explain"]["post"]["summary"]):
        assert "not of the chosen benefit learner" in text
        assert "probability scale and is not additively decomposed" in text
        assert "margin_untreated - margin_treated" in text
    assert "untreated - treated" in benefit["properties"]["difference"]["description"]
    oip = spec["paths"][f"/v2/models/{TASK}/explain"]["post"]["summary"]
    assert "untreated_*, treated_*, difference_*" in oip and "difference_margin" in oip
    assert "untreated" not in spec["paths"]["/v2/models/plain/explain"]["post"]["summary"]
