"""Explanations as deployed (issue 6): a real `python -m serve` process (training stack import-blocked)
explains over HTTP, and its numbers are held to onnxruntime on ``explainer.onnx`` fed masml's own
``encode_inputs`` of the same patients; additivity, ``top``, units, ``explain: true`` on predict, bundles
without or with a tampered explainer, the explain batch limit, the OIP extension, metrics, audit log,
OpenAPI and hot reload.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_serve_support import (
    Server,
    audit_lines,
    call,
    copy_bundle,
    patients_from_frame,
    post_raw,
    tiny_bundle,
)

from masml.encoding import encode_inputs
from masml.io import load_dataset
from masml.predict import onnx_session

MAX_EXPLAIN = 40
BASE = {"age_years": 9, "sex": "F", "trigger": "sjia"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def frame(bundle):
    return load_dataset(bundle[0]).head(MAX_EXPLAIN).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(bundle, frame):
    """onnxruntime on the bundle's own graphs, fed masml's encoding: what the service must answer."""
    src = bundle[1] / "onset"
    manifest = json.loads((src / "manifest.json").read_text())
    assert manifest["explainer"]["file"] == "explainer.onnx"  # the tiny fixture exports an explainer
    x = encode_inputs(frame, [i["name"] for i in manifest["inputs"]])
    names = ["contributions", "input_contributions", "base_value", "margin"]
    values = onnx_session((src / "explainer.onnx").read_bytes()).run(names, {"inputs": x})
    expl = dict(zip(names, values, strict=True))
    model = onnx_session((src / "model.onnx").read_bytes()).run(["margin", "risk"], {"inputs": x})
    return {"x": x, "manifest": manifest, "model_margin": model[0].reshape(-1), **expl}


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """onset (with explainer), plain (without), tampered (explainer changed: refused), swap (reloaded)."""
    tmp = tmp_path_factory.mktemp("explain")
    models = tmp / "models"
    shutil.copytree(bundle[1] / "onset", models / "onset")
    plain = copy_bundle(bundle[1] / "onset", models / "plain", task="plain", explainer=None)
    (plain / "explainer.onnx").unlink()
    tampered = copy_bundle(bundle[1] / "onset", models / "tampered", task="tampered")
    data = bytearray((tampered / "explainer.onnx").read_bytes())
    data[-5:] = b"XXXXX"
    (tampered / "explainer.onnx").write_bytes(bytes(data))
    copy_bundle(bundle[1] / "onset", models / "swap", task="swap")
    audit = tmp / "audit.jsonl"
    s = Server(models, "--max-explain-batch", str(MAX_EXPLAIN), "--audit-log", str(audit), log=audit)
    s.audit, s.models = audit, models
    yield s
    s.stop()


def explain(server, patients, task="onset", **opts):
    return call("POST", server.url(f"/v1/models/{task}/explain"), {"patients": patients, **opts})


def test_explanations_equal_onnxruntime_on_masml_encoding_and_add_up(server, frame, reference):
    st, _, body = explain(server, patients_from_frame(frame), features=True)
    assert st == 200, body
    assert "BLOCKED IMPORT" not in server.stderr()
    man = reference["manifest"]["explainer"]
    rows = [p["explanation"] for p in body["predictions"]]
    got_in = np.array([[r["contributions"][k] for k in man["input_names"]] for r in rows], dtype=np.float32)
    got_f = np.array(
        [[r["feature_contributions"][k] for k in man["feature_names"]] for r in rows], dtype=np.float32
    )
    base = np.array([r["base_value"] for r in rows], dtype=np.float32)
    margin = np.array([r["margin"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(got_in, reference["input_contributions"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_f, reference["contributions"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(base, reference["base_value"])
    np.testing.assert_array_equal(margin, reference["margin"])
    np.testing.assert_array_equal(margin, reference["model_margin"])  # the margin model.onnx calibrates
    for contrib in (got_in, got_f):
        additivity = base.astype(np.float64) + contrib.astype(np.float64).sum(axis=1) - margin
        assert np.abs(additivity).max() <= 1e-4
    assert [p["patient_id"] for p in body["predictions"]] == frame["patient_id"].tolist()
    risk = call("POST", server.url("/v1/models/onset/predict"), {"patients": patients_from_frame(frame)})[2]
    assert [p["risk"] for p in body["predictions"]] == [p["risk"] for p in risk["predictions"]]
    assert body["explainer"]["sha256"] == man["sha256"]


@pytest.mark.parametrize("threads", [2, 1])
def test_scoring_beside_the_explainer_answers_as_one_after_the_other(bundle, reference, monkeypatch, threads):
    """A small explain call scores on a pool thread while the explainer runs (``scoring.run_graphs``);
    the outputs are the graphs' own at 1 and 40 rows, and past small_batch_rows (scored in pieces, so
    not beside the explainer: pool tasks waiting on pool tasks could deadlock) on 1 and 2 threads."""
    from serve import scoring
    from serve.bundles import load_model

    monkeypatch.setattr(scoring, "BATCH_THREADS", threads)
    model = load_model(bundle[1] / "onset")
    x = np.concatenate([reference["x"]] * 2).astype(np.float32)  # 80 rows: over small_batch_rows (50)
    risk = onnx_session((bundle[1] / "onset" / "model.onnx").read_bytes()).run(["risk"], {"inputs": x})[0]
    for n in (1, MAX_EXPLAIN, len(x)):
        scored, explained = scoring.run_graphs(model, x[:n], explain=True)
        np.testing.assert_array_equal(scored["risk"], risk.reshape(-1)[:n])
        np.testing.assert_array_equal(explained["margin"], np.tile(reference["model_margin"], 2)[:n])
        for k in ("contributions", "base_value"):
            np.testing.assert_array_equal(explained[k], np.concatenate([reference[k]] * 2)[:n])
    assert scoring.run_graphs(model, x[:1], explain=False)[1] is None


def test_top_is_ordered_with_converted_values_and_canonical_units(server, reference):
    canonical = BASE | {"ferritin": 8000, "temperature_c": 39.0, "platelets": 90, "hemoglobin": 9.0}
    sent = canonical | {
        "ferritin": {"value": 8000, "unit": "µg/L"},
        "temperature_c": {"value": 102.2, "unit": "°F"},
        "hemoglobin": {"value": 90, "unit": "g/L"},
    }
    k = len(reference["manifest"]["inputs"])
    st, _, body = explain(server, [canonical, sent], top=k)
    assert st == 200, body
    a, b = (p["explanation"] for p in body["predictions"])
    units = {i["name"]: i.get("unit") for i in reference["manifest"]["inputs"]}
    for e in (a, b):
        mags = [abs(t["contribution"]) for t in e["top"]]
        assert len(e["top"]) == k and mags == sorted(mags, reverse=True)
        assert all(t["contribution"] == e["contributions"][t["input"]] for t in e["top"])
    top = {t["input"]: t for t in b["top"]}
    assert top["temperature_c"]["value"] == pytest.approx(39.0) and top["temperature_c"]["unit"] == "degC"
    assert (
        top["hemoglobin"]["value"] == pytest.approx(9.0) and top["hemoglobin"]["unit"] == units["hemoglobin"]
    )
    assert top["ferritin"] == {**top["ferritin"], "value": 8000, "unit": "ng/mL"}
    assert top["trigger"]["value"] == "sjia" and top["trigger"]["unit"] is None
    assert top["ast"]["value"] is None  # missing: shown as such, its default branch still has credit
    assert a["contributions"] == pytest.approx(b["contributions"], abs=1e-6)
    st, _, body = explain(server, [canonical])
    assert st == 200 and len(body["predictions"][0]["explanation"]["top"]) == 5
    assert "feature_contributions" not in body["predictions"][0]["explanation"]
    for bad in (0, k + 1, "5", True, 2.5):
        st, _, resp = explain(server, [canonical], top=bad)
        assert st == 422 and resp["problems"][0]["field"] == "body.top", resp
        assert str(k) in resp["problems"][0]["expected"]


def test_explain_true_on_predict(server):
    url = server.url("/v1/models/onset/predict")
    st, _, body = call("POST", url, {"patients": [BASE], "explain": True, "top": 3})
    assert st == 200, body
    ref = explain(server, [BASE], top=3)[2]["predictions"][0]
    assert body["predictions"][0] == ref and len(ref["explanation"]["top"]) == 3
    plain = call("POST", url, {"patients": [BASE], "explain": False})[2]["predictions"][0]
    assert "explanation" not in plain and plain["risk"] == ref["risk"]
    for extra, field in (({"top": 3}, "body.top"), ({"explain": "yes"}, "body.explain")):
        st, _, resp = call("POST", url, {"patients": [BASE], **extra})
        assert st == 422 and resp["problems"][0]["field"] == field, resp
    st, _, resp = explain(server, [BASE], explain=True)  # the explain endpoint takes no 'explain' flag
    assert st == 422 and resp["problems"][0]["field"] == "body.explain"


def test_bundle_without_explainer_answers_409_and_tampered_one_is_refused(server):
    for method, path, body in (
        ("POST", "/v1/models/plain/explain", {"patients": [BASE]}),
        ("POST", "/v1/models/plain/predict", {"patients": [BASE], "explain": True}),
        ("POST", "/v2/models/plain/explain", {"inputs": []}),
    ):
        st, hdrs, resp = call(method, server.url(path), body)
        assert st == 409 and hdrs["content-type"].startswith("application/json"), resp
        assert "has no explainer" in resp["error"]
    assert call("POST", server.url("/v1/models/plain/predict"), {"patients": [BASE]})[0] == 200
    models = call("GET", server.url("/v1/models"))[2]
    by_task = {m["task"]: m for m in models["models"]}
    assert by_task["plain"]["explainer"] is None and by_task["onset"]["explainer"]["attribution_rule"]
    (refused,) = models["refused"]
    assert refused["path"].endswith("tampered")
    assert "explainer.onnx sha256" in refused["reason"] and "does not match" in refused["reason"]


def test_oversized_explain_batch_is_413(server, reference):
    k = reference["x"].shape[1]
    st, _, resp = explain(server, [BASE] * (MAX_EXPLAIN + 1))
    assert st == 413 and resp["problems"][0]["kind"] == "explain_batch_too_large"
    assert f"at most {MAX_EXPLAIN}" in resp["problems"][0]["expected"]
    big = [BASE] * (MAX_EXPLAIN + 1)
    assert call("POST", server.url("/v1/models/onset/predict"), {"patients": big})[0] == 200
    assert call("POST", server.url("/v1/models/onset/predict"), {"patients": big, "explain": True})[0] == 413
    x = np.zeros((MAX_EXPLAIN + 1, k)).tolist()
    tensor = {"name": "inputs", "datatype": "FP32", "shape": [MAX_EXPLAIN + 1, k], "data": x}
    st, _, resp = call("POST", server.url("/v2/models/onset/explain"), {"inputs": [tensor]})
    assert st == 413 and f"limit of {MAX_EXPLAIN}" in resp["error"]


def test_open_inference_protocol_explain(server, reference):
    """Binary tensors (NaN = missing) built and parsed by tritonclient, and plain JSON with an id."""
    import tritonclient.http as th

    x = reference["x"][:7]
    inp = th.InferInput("inputs", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outs = [th.InferRequestedOutput(n, binary_data=True) for n in ("contributions", "input_contributions")]
    outs += [th.InferRequestedOutput(n, binary_data=False) for n in ("base_value", "margin")]
    body, header_len = th.InferenceServerClient.generate_request_body([inp], outs, request_id="e-1")
    st, hdrs, raw = post_raw(server.url("/v2/models/onset/explain"), body, header_len)
    assert st == 200, raw
    res = th.InferenceServerClient.parse_response_body(
        raw, header_length=hdrs.get("inference-header-content-length")
    )
    assert res.get_response()["id"] == "e-1"
    for name in ("contributions", "input_contributions", "base_value", "margin"):
        np.testing.assert_allclose(res.as_numpy(name), reference[name][:7], rtol=0, atol=1e-6)
    cols = res.get_response()["parameters"]
    assert cols["input_contributions_columns"] == reference["manifest"]["explainer"]["input_names"]
    lows = np.array([i["low"] or 0 for i in reference["manifest"]["inputs"]], dtype=np.float32)
    complete = np.where(np.isnan(x[:1]), lows, x[:1])
    tensor = {"name": "inputs", "datatype": "FP32", "shape": [1, x.shape[1]], "data": complete.tolist()}
    st, _, resp = call("POST", server.url("/v2/models/onset/explain"), {"id": "j", "inputs": [tensor]})
    assert st == 200 and resp["id"] == "j", resp
    shapes = {o["name"]: o["shape"] for o in resp["outputs"]}
    assert shapes == {
        "contributions": [1, len(cols["contributions_columns"])],
        "input_contributions": [1, x.shape[1]],
        "base_value": [1],
        "margin": [1],
    }
    st, _, resp = call("POST", server.url("/v2/models/onset/explain"), {"inputs": [tensor | {"shape": [2]}]})
    assert st == 400 and set(resp) == {"error"}
    assert call("GET", server.url("/v2"))[2]["extensions"] == ["binary_tensor_data", "explain"]
    assert call("GET", server.url("/v2/models/onset"))[2]["parameters"]["explainer"] is True


def test_metrics_audit_and_openapi(server):
    secret = BASE | {"patient_id": "MRN-77-SECRET", "ferritin": 54321.123, "crp": 87.654}
    st, hdrs, body = explain(server, [secret])
    assert st == 200
    (rec,) = audit_lines(server.audit, hdrs["x-request-id"], 1)
    assert rec["endpoint"] == "explain" and rec["explainer_sha256"] == body["explainer"]["sha256"]
    assert rec["outputs"] == {"risk": body["predictions"][0]["risk"]} and rec["index"] == 0 and rec["n"] == 1
    text = server.audit.read_text() + server.stderr()
    for raw in ("MRN-77-SECRET", "54321.1", "87.654"):
        assert raw not in text
    metrics = call("GET", server.url("/metrics"))[2]
    assert 'masml_requests_total{endpoint="explain",model="onset",status="200"}' in metrics
    assert 'masml_request_duration_seconds_count{endpoint="explain",model="onset"}' in metrics
    assert 'masml_patients_explained_total{model="onset"}' in metrics
    spec = call("GET", server.url("/openapi.json"))[2]
    assert {"/v1/models/onset/explain", "/v2/models/onset/explain"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["ExplainRequest_onset"]["properties"]["patients"]["maxItems"] == MAX_EXPLAIN
    assert schemas["Prediction"]["properties"]["explanation"]["$ref"].endswith("/Explanation")
    assert "409" in spec["paths"]["/v1/models/onset/explain"]["post"]["responses"]


def test_hot_reload_swaps_the_explainer_with_the_model(server, bundle):
    """A tampered explainer on reload keeps the previous version (model and explainer) serving; a good new
    version replaces both at once."""
    swap = server.models / "swap"
    before = explain(server, [BASE], task="swap")[2]
    good = (swap / "explainer.onnx").read_bytes()
    (swap / "explainer.onnx").write_bytes(good[:-5] + b"XXXXX")
    result = call("POST", server.url("/admin/reload"))[2]
    entry = next(r for r in result["refused"] if r["path"].endswith("swap"))
    assert "explainer.onnx sha256" in entry["reason"] and entry["kept"]["task"] == "swap"
    st, _, kept = explain(server, [BASE], task="swap")
    assert st == 200 and kept["predictions"] == before["predictions"]
    (swap / "explainer.onnx").write_bytes(good)
    copy_bundle(swap, swap, version="v-swapped")
    result = call("POST", server.url("/admin/reload"))[2]
    assert not any(r["path"].endswith("swap") for r in result["refused"])
    st, _, after = explain(server, [BASE], task="swap")
    assert st == 200 and after["model"]["version"] == "v-swapped"
    assert after["predictions"][0]["explanation"] == before["predictions"][0]["explanation"]
