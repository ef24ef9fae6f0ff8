"""The scoring service as deployed: a real `python -m serve` process (training stack import-blocked) on
loopback, called over HTTP: every endpoint, parity with masml's own scoring, units, bad inputs, auth,
audit log, guardrails, refused bundles, the Open Inference Protocol through tritonclient, MLflow's
/invocations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest
from test_serve_support import MASML, Server, audit_lines, call, copy_bundle, patients_from_frame, tiny_bundle

from masml.encoding import encode_inputs
from masml.io import load_dataset
from masml.predict import onnx_session

USER, ADMIN = "user-key-123", "admin-key-456"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def frame(bundle):
    return load_dataset(bundle[0]).head(300).reset_index(drop=True)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """Open loopback server (no keys) with small limits so the size checks are cheap to hit."""
    tmp = tmp_path_factory.mktemp("srv")
    models = tmp / "models"
    shutil.copytree(bundle[1], models)
    broken = copy_bundle(bundle[1] / "onset", models / "broken", task="broken")
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:-10] + b"0123456789")
    audit = tmp / "audit.jsonl"
    s = Server(
        models, "--max-batch", "500", "--max-body-bytes", "300000", "--audit-log", str(audit), log=audit
    )
    s.audit = audit
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(bundle, tmp_path_factory):
    """Server with keys: one from the environment, an admin key from a file holding only its hash."""
    tmp = tmp_path_factory.mktemp("keyed")
    keys = tmp / "keys.txt"
    keys.write_text(f"# admin\nsha256:{hashlib.sha256(ADMIN.encode()).hexdigest()} admin\n")
    s = Server(bundle[1], "--api-keys-file", str(keys), env={"MASML_SERVE_API_KEYS": USER})
    yield s
    s.stop()


def predict(server, patients, task="onset", headers=None):
    return call("POST", server.url(f"/v1/models/{task}/predict"), {"patients": patients}, headers)


def test_health_models_and_refused_bundle(server):
    assert call("GET", server.url("/healthz"))[0] == 200
    st, _, ready = call("GET", server.url("/readyz"))
    assert st == 200 and ready["ready"] and ready["models"] == ["onset"]
    st, _, body = call("GET", server.url("/v1/models"))
    assert st == 200
    (m,) = body["models"]
    assert m["task"] == "onset" and len(m["sha256"]) == 64 and m["version"]
    ferritin = next(i for i in m["inputs"] if i["name"] == "ferritin")
    assert ferritin["unit"] == "ng/mL" and ferritin["low"] == 1 and "pmol/L" in ferritin["accepted_units"]
    assert [o["name"] for o in m["outputs"]] == ["risk"] and "auroc" in m["metrics"]
    (refused,) = body["refused"]
    assert refused["path"].endswith("broken") and "sha256" in refused["reason"]
    assert "bundle refused" in server.stderr() and "BLOCKED IMPORT" not in server.stderr()
    assert call("GET", server.url("/v1/models/onset"))[2]["task"] == "onset"
    for path in (
        "/ping",
        "/health",
        "/version",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/onset/ready",
    ):
        assert call("GET", server.url(path))[0] == 200, path


def test_predictions_equal_onnxruntime_on_masml_encoding(server, bundle, frame):
    """The service's risk is bit-for-bit onnxruntime on masml's encode_inputs of the same patients.
    300 patients: more than the manifest's small_batch_rows, so the service scores them in pieces of
    that many rows on two threads, while the reference is one call (the graph's large-batch branch)."""
    from serve.bundles import BATCH_THREADS

    manifest = json.loads((bundle[1] / "onset" / "manifest.json").read_text())
    assert len(frame) > 2 * manifest["small_batch_rows"] and BATCH_THREADS >= 1
    names = [i["name"] for i in manifest["inputs"]]
    sess = onnx_session((bundle[1] / "onset" / "model.onnx").read_bytes())
    expected = sess.run(["risk"], {"inputs": encode_inputs(frame, names)})[0].reshape(-1)
    st, _, body = predict(server, patients_from_frame(frame))
    assert st == 200, body
    got = np.array([p["risk"] for p in body["predictions"]], dtype=np.float32)
    assert np.array_equal(got, expected)
    assert [p["patient_id"] for p in body["predictions"]] == frame["patient_id"].tolist()
    assert body["model"]["sha256"] == manifest["model_sha256"] and body["predictions"][0]["guardrails"] == []
    assert "margin" not in body["predictions"][0]


@pytest.mark.parametrize("threads", [2, 1])  # MASML_SERVE_BATCH_THREADS: 1 scores the pieces in turn
def test_a_batch_scored_in_pieces_on_threads_equals_one_call(bundle, frame, tmp_path, monkeypatch, threads):
    """Model.run cuts a batch into calls of small_batch_rows on the graph's single-target branch, split
    over threads; every output equals one onnxruntime call, at and around the piece size. A manifest
    whose small_batch_rows is not a whole number >= 1 is refused, naming the field."""
    from serve import bundles
    from serve.bundles import BundleRefused, load_model

    monkeypatch.setattr(bundles, "BATCH_THREADS", threads)

    model = load_model(bundle[1] / "onset")
    assert model.piece_rows == 50
    names = [s.name for s in model.encoder.specs]
    x = encode_inputs(frame, names).astype(np.float32)
    sess = onnx_session((bundle[1] / "onset" / "model.onnx").read_bytes())
    for n in (1, 49, 50, 51, 100, 137, len(x)):
        want = dict(zip(model.run_outputs, sess.run(model.run_outputs, {"inputs": x[:n]}), strict=True))
        got = model.run(x[:n])
        for k in model.run_outputs:
            np.testing.assert_array_equal(got[k], want[k].reshape(-1), err_msg=f"{k} at {n} rows")

    bad = copy_bundle(bundle[1] / "onset", tmp_path / "onset", small_batch_rows=0)
    with pytest.raises(BundleRefused, match=r"small_batch_rows is 0; expected a whole number >= 1"):
        load_model(bad)


def test_units_are_converted_before_scoring(server):
    base = {
        "age_years": 9,
        "sex": "F",
        "trigger": "sjia",
        "ferritin": 8000,
        "temperature_c": 39.0,
        "platelets": 90,
        "hemoglobin": 9.0,
    }
    alt = base | {
        "ferritin": {"value": 8000, "unit": "µg/L"},
        "temperature_c": {"value": 102.2, "unit": "°F"},
        "platelets": {"value": 90, "unit": "x10⁹/L"},
        "hemoglobin": {"value": 90, "unit": "g/L"},
        "age_years": {"value": 108, "unit": "months"},
    }
    st, _, body = predict(server, [base, alt, {**base, "hemoglobin": None, "ferritin": None}])
    assert st == 200, body
    r = [p["risk"] for p in body["predictions"]]
    assert r[0] == pytest.approx(r[1], abs=1e-6) and 0 <= r[2] <= 1


BASE = {"age_years": 30, "sex": "M", "trigger": "sjia"}


@pytest.mark.parametrize(
    ("body", "status", "fields"),
    [
        ({"patients": [BASE | {"ferritni": 100}]}, 422, ["patients[0].ferritni"]),
        ({"patients": [BASE | {"ferritin": "high"}]}, 422, ["patients[0].ferritin"]),
        ({"patients": [BASE | {"ferritin": True}]}, 422, ["patients[0].ferritin"]),
        (
            {"patients": [BASE | {"ferritin": -5, "sodium": 500}]},
            422,
            ["patients[0].ferritin", "patients[0].sodium"],
        ),
        (
            {"patients": [BASE | {"ferritin": {"value": 3, "unit": "furlongs"}}]},
            422,
            ["patients[0].ferritin"],
        ),
        ({"patients": [BASE | {"ferritin": {"value": 3}}]}, 422, ["patients[0].ferritin"]),
        (
            {"patients": [BASE | {"hemoglobin": {"value": 500, "unit": "g/L"}}]},
            422,
            ["patients[0].hemoglobin"],
        ),
        ({"patients": [BASE | {"trigger": "martian"}]}, 422, ["patients[0].trigger"]),
        ({"patients": [BASE | {"hepatomegaly": 3}]}, 422, ["patients[0].hepatomegaly"]),
        ({"patients": [{"sex": "F", "trigger": "sjia"}]}, 422, ["patients[0].age_years"]),
        ({"patients": [BASE, 7, BASE | {"x": 1}]}, 422, ["patients[1]"]),
        ({"patients": []}, 422, ["patients"]),
        ({"patients": {"a": 1}}, 422, ["patients"]),
        ({}, 422, ["patients"]),
        ({"patients": [BASE], "extra": 1}, 422, ["body.extra"]),
        ({"patients": [BASE] * 501}, 413, ["patients"]),
        ([1, 2], 422, ["body"]),
        ({"patients": [BASE | {"patient_id": [1]}]}, 422, ["patients[0].patient_id"]),
        ({"patients": [BASE | {"ferritin": 1e999}]}, 400, ["body"]),
    ],
)
def test_bad_input_gets_4xx_listing_every_problem(server, body, status, fields):
    st, hdrs, resp = call("POST", server.url("/v1/models/onset/predict"), body)
    assert st == status, resp
    assert hdrs["content-type"].startswith("application/json") and resp["error"]
    got = [p["field"] for p in resp["problems"]]
    assert got[: len(fields)] == fields or set(fields) <= set(got), got
    for p in resp["problems"]:
        assert p["message"] and p["kind"]


def test_a_large_batch_lists_every_problem_and_a_clean_one_scores_the_same_on_both_paths(server, frame):
    """Bodies above SMALL_BODY are read on the typed fast path first (serve/clean_batch.py): a batch with
    problems must still get every one of them, by field path, and a clean batch (with unit objects or
    without) must score exactly as its patients sent two by two, in bodies small enough for the
    detailed path."""
    patients = patients_from_frame(frame.head(60))
    bad = [dict(p) for p in patients]
    bad[7]["ferritin"] = -5
    bad[42] |= {"trigger": "martian", "ferritni": 1}
    st, _, resp = predict(server, bad)
    assert st == 422, resp
    assert {p["field"] for p in resp["problems"]} == {
        "patients[7].ferritin",
        "patients[42].trigger",
        "patients[42].ferritni",
    }
    st, _, fast = predict(server, patients)
    assert st == 200, fast
    pairs = [predict(server, patients[i : i + 2]) for i in range(0, len(patients), 2)]
    assert all(st == 200 for st, _, _ in pairs) and len(json.dumps(patients[:2])) < 2048
    assert fast["predictions"] == [p for _, _, body in pairs for p in body["predictions"]]
    unit = [dict(p) for p in patients]
    for p in unit[::3]:
        p["age_years"] = {"value": p["age_years"] * 12, "unit": "months"}
    st, _, with_units = predict(server, unit)
    assert st == 200, with_units
    pairs = [predict(server, unit[i : i + 2]) for i in range(0, len(unit), 2)]
    assert with_units["predictions"] == [p for _, _, body in pairs for p in body["predictions"]]
    options = (({"top": 3}, "body.top"), ({"explain": "yes"}, "body.explain"), ({"x": 1}, "body.x"))
    for extra, field in options:  # the body's other fields, checked as on the detailed path
        st, _, resp = call("POST", server.url("/v1/models/onset/predict"), {"patients": patients, **extra})
        assert st == 422 and [p["field"] for p in resp["problems"]] == [field], resp
    st, _, resp = call("POST", server.url("/v1/models/onset/predict"), {"patients": patients, "explain": True,
                                                                         "top": 2})  # fmt: skip
    assert st == 200 and [len(p["explanation"]["top"]) for p in resp["predictions"]] == [2] * len(patients)
    assert [p["risk"] for p in resp["predictions"]] == [p["risk"] for p in fast["predictions"]]
    # MLflow's dataframe_records: the same two paths
    st, _, inv = call("POST", server.url("/invocations?model=onset"), {"dataframe_records": patients})
    assert st == 200, inv
    assert [r["risk"] for r in inv["predictions"]] == [p["risk"] for p in fast["predictions"]]
    st, _, inv = call("POST", server.url("/invocations?model=onset"), {"dataframe_records": bad})
    assert st == 422 and {p["field"] for p in inv["problems"]} == {
        "dataframe_records[7].ferritin",
        "dataframe_records[42].trigger",
        "dataframe_records[42].ferritni",
    }, inv
    columns = sorted({k for p in bad for k in p})  # dataframe_split, including the unknown column
    for records in (patients, bad):
        split = {"columns": columns, "data": [[p.get(c) for c in columns] for p in records]}
        st, _, inv = call("POST", server.url("/invocations?model=onset"), {"dataframe_split": split})
        if records is patients:  # the unknown column holds only nulls here: still refused
            assert st == 422 and {p["field"] for p in inv["problems"]} == {
                f"dataframe_split.data[{i}].ferritni" for i in range(len(patients))
            }
        else:
            assert st == 422 and {p["field"] for p in inv["problems"]} >= {
                "dataframe_split.data[7].ferritin",
                "dataframe_split.data[42].trigger",
                "dataframe_split.data[42].ferritni",
            }, inv
    columns.remove("ferritni")
    split = {"columns": columns, "data": [[p.get(c) for c in columns] for p in patients]}
    st, _, inv = call("POST", server.url("/invocations?model=onset"), {"dataframe_split": split})
    assert st == 200 and [r["risk"] for r in inv["predictions"]] == [p["risk"] for p in fast["predictions"]]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status"),
    [
        ("POST", "/v1/models/onset/predict", b'{"patients": [', 400),
        ("POST", "/v1/models/onset/predict", b"", 400),
        ("POST", "/v1/models/onset/predict", b"\xff\xfe", 400),
        ("POST", "/v1/models/onset/predict", b'{"patients": [{"age_years": NaN}]}', 400),
        ("POST", "/v1/models/onset/predict", b"[" * 400_000, 413),
        ("POST", "/v1/models/nope/predict", b"{}", 404),
        ("GET", "/v1/models/onset/predict", None, 405),
        ("GET", "/nowhere", None, 404),
        ("POST", "/invocations", b'{"instances": [[1, 2]]}', 422),
        ("POST", "/v2/models/onset/infer", b'{"inputs": "x"}', 400),
        (
            "POST",
            "/v2/models/onset/infer",
            b'{"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}',
            400,
        ),
        ("GET", "/v2/models/onset/versions/zzz", None, 404),
        # near misses of the scoring fast path fall through to the router
        ("POST", "/v1/models//predict", b"{}", 404),
        ("POST", "/v1/models/onset/infer", b"{}", 404),
        ("POST", "/v3/models/onset/predict", b"{}", 404),
        ("PUT", "/v2/models/onset/infer", b"{}", 405),
    ],
)
def test_malformed_requests_are_json_4xx(server, method, path, raw, status):
    st, hdrs, body = call(method, server.url(path), raw=raw)
    assert st == status, body
    assert hdrs["content-type"].startswith("application/json") and "error" in body


def test_audit_log_has_hashes_and_outputs_but_no_inputs(server):
    secret = {
        "patient_id": "MRN-0042-SECRET",
        "age_years": 47.25,
        "sex": "F",
        "trigger": "aosd",
        "ferritin": 98765.4321,
        "crp": 123.456,
    }
    other = BASE | {"ferritin": 1234.5}
    st, hdrs, body = predict(server, [secret, other, secret])
    assert st == 200
    recs = audit_lines(server.audit, hdrs["x-request-id"], 3)
    # one line per prediction, in batch order
    assert [r["index"] for r in recs] == [0, 1, 2] and {r["n"] for r in recs} == {3}
    for rec, pred in zip(recs, body["predictions"], strict=True):
        assert rec["sha256"] == body["model"]["sha256"] and rec["outputs"] == {"risk": pred["risk"]}
        assert len(rec["input_sha256"]) == 32 and rec["version"]
        stamp = datetime.strptime(rec["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - stamp).total_seconds()) < 120  # UTC, to the millisecond
    assert recs[0]["input_sha256"] == recs[2]["input_sha256"] != recs[1]["input_sha256"]
    text = server.audit.read_text() + server.stderr()
    for raw in ("MRN-0042-SECRET", "98765.4", "123.456", "47.25", "aosd"):
        assert raw not in text


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device whose writes fail)")
def test_an_audit_line_that_cannot_be_written_is_logged_and_counted(bundle):
    """The audit line is written just after the answer is sent, so a full disk cannot turn a computed
    prediction into a 500; the failure must not pass quietly: an ERROR log line naming the request, and
    ``masml_errors_total{kind="audit"}`` for alerting. The next request is served as usual."""
    s = Server(bundle[1], "--audit-log", "/dev/full")
    try:
        st, hdrs, body = predict(s, [BASE])
        assert st == 200 and 0 <= body["predictions"][0]["risk"] <= 1
        st, _, text = call("GET", s.url("/metrics"))
        assert 'masml_errors_total{kind="audit"} 1' in text
        assert 'masml_patients_scored_total{model="onset"} 1' in text  # the metrics after it still ran
        assert 'masml_requests_total{endpoint="predict",model="onset",status="200"} 1' in text
        assert f"could not record request {hdrs['x-request-id']}" in s.stderr()
        assert "No space left on device" in s.stderr()
        assert predict(s, [BASE])[0] == 200
    finally:
        s.stop()


def test_metrics_count_requests_missingness_and_predictions(server):
    predict(server, [BASE])
    predict(server, [BASE | {"ferritin": -1}])
    st, _, text = call("GET", server.url("/metrics"))
    assert st == 200
    assert 'masml_requests_total{endpoint="predict",model="onset",status="200"}' in text
    assert 'masml_requests_total{endpoint="predict",model="onset",status="422"}' in text
    assert 'masml_errors_total{kind="out_of_range"}' in text
    assert 'masml_input_missing_total{model="onset",input="ferritin"}' in text
    assert 'masml_prediction_bucket{model="onset",output="risk",le="0.5"}' in text
    assert 'masml_request_duration_seconds_count{endpoint="predict",model="onset"}' in text


def test_metrics_count_the_same_one_patient_at_a_time_as_in_a_batch():
    """Metrics.scored has a one-patient path (plain loops) and a batch path (numpy): same counts."""
    from serve.metrics import Metrics

    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[0, 1] = np.nan
    risk = rng.random(40)
    risk[[3, 7]] = np.nan
    names = ["a", "b", "c", "d", "e"]
    one, batch = Metrics(), Metrics()
    for i in range(40):
        one.scored("m", names, x[i : i + 1], {"risk": risk[i : i + 1]})
    batch.scored("m", names, x, {"risk": risk})
    assert (
        dict(one.missing)
        == dict(batch.missing)
        == {("m", n): int(np.isnan(x[:, j]).sum()) for j, n in enumerate(names) if np.isnan(x[:, j]).any()}
    )
    h1, h2 = one.predictions[("m", "risk")], batch.predictions[("m", "risk")]
    assert h1.counts == h2.counts and h1.count == h2.count == 38 and h1.sum == pytest.approx(h2.sum)
    renamed = ["v", "w", "x", "y", "z"]  # a reloaded model with other inputs: counted under its names
    one.scored("m", renamed, x[:1], {"risk": risk[:1]})
    gaps = {("m", renamed[j]) for j in np.flatnonzero(np.isnan(x[0]))}
    assert {k for k in one.missing if k[1] in renamed} == gaps and ("m", "w") in gaps


def test_openapi_documents_every_schema(server):
    st, _, spec = call("GET", server.url("/openapi.json"))
    assert st == 200 and spec["openapi"].startswith("3.")
    schemas = spec["components"]["schemas"]
    patient = schemas["Patient_onset"]
    assert patient["additionalProperties"] is False and "age_years" in patient["required"]
    assert "/v1/models/onset/predict" in spec["paths"] and "/v2/models/onset/infer" in spec["paths"]
    refs = set()

    def walk(o):
        if isinstance(o, dict):
            if "$ref" in o:
                refs.add(o["$ref"].split("/")[-1])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(spec)
    assert refs <= set(schemas) and {"Error", "Problem", "PredictResponse", "InferRequest"} <= refs


def test_invocations_speaks_mlflow(server, frame):
    pts = patients_from_frame(frame.head(5))
    ref = [p["risk"] for p in predict(server, pts)[2]["predictions"]]
    cols = sorted({k for p in pts for k in p} - {"patient_id"})
    split = {"dataframe_split": {"columns": cols, "data": [[p.get(c) for c in cols] for p in pts]}}
    records = {"dataframe_records": [{k: v for k, v in p.items() if k != "patient_id"} for p in pts]}
    for body in (split, records):
        st, _, resp = call("POST", server.url("/invocations"), body)
        assert st == 200, resp
        assert [r["risk"] for r in resp["predictions"]] == ref
    st, _, resp = call("POST", server.url("/invocations"), {"dataframe_records": [{"sex": "Q"}]})
    assert st == 422 and {p["field"] for p in resp["problems"]} >= {"dataframe_records[0].sex"}


def test_open_inference_protocol_with_tritonclient(server, bundle, frame):
    import tritonclient.http as th

    manifest = json.loads((bundle[1] / "onset" / "manifest.json").read_text())
    x = encode_inputs(frame.head(20), [i["name"] for i in manifest["inputs"]])
    client = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("onset")
    assert client.get_server_metadata()["name"] == "masml-serve"
    meta = client.get_model_metadata("onset")
    assert client.is_model_ready("onset", model_version=meta["versions"][0])
    assert meta["inputs"][0] == {"name": "inputs", "datatype": "FP32", "shape": [-1, x.shape[1]]}
    expected = onnx_session((bundle[1] / "onset" / "model.onnx").read_bytes()).run(["risk"], {"inputs": x})[0]
    lows = np.array([i["low"] or 0 for i in manifest["inputs"]], dtype=np.float32)
    complete = np.where(np.isnan(x), lows, x)  # JSON numbers cannot be NaN: fill with valid values
    for binary in (True, False):  # NaN (missing) travels in the binary tensor extension
        inp = th.InferInput("inputs", list(x.shape), "FP32")
        inp.set_data_from_numpy(x if binary else complete, binary_data=binary)
        outs = [th.InferRequestedOutput("risk", binary_data=binary)]
        res = client.infer("onset", [inp], request_id=f"req-{binary}", outputs=outs)
        assert res.get_response()["id"] == f"req-{binary}"
        if binary:
            assert np.array_equal(res.as_numpy("risk"), expected.reshape(-1))
    res = client.infer("onset", [inp], model_version=meta["versions"][0])  # every output, binary
    assert res.as_numpy("risk").shape == (20,)
    bad = th.InferInput("inputs", [1, x.shape[1]], "FP32")
    bad.set_data_from_numpy(np.full((1, x.shape[1]), 1e9, dtype=np.float32))
    with pytest.raises(Exception, match="not valid for"):
        client.infer("onset", [bad])
    nulls = {
        "id": "n",
        "inputs": [
            {
                "name": "inputs",
                "datatype": "FP32",
                "shape": [1, x.shape[1]],
                "data": [None if np.isnan(v) else float(v) for v in x[0]],
            }
        ],
    }
    st, _, resp = call("POST", server.url("/v2/models/onset/infer"), nulls)
    assert st == 200 and resp["id"] == "n" and np.float32(resp["outputs"][0]["data"][0]) == expected[0]


def test_oip_json_data_flat_nested_or_wrong_gets_the_same_answers(server, bundle, frame):
    """OIP JSON ``data`` as a flat list of numbers and nulls is checked while it is decoded (typed
    msgspec); anything else is decoded again untyped and checked as before. Flat, nested and integer
    data answer the same risks; a boolean, a string, a number too large for float64 and malformed JSON
    are each a 400 naming the problem, never a 500."""
    manifest = json.loads((bundle[1] / "onset" / "manifest.json").read_text())
    x = encode_inputs(frame.head(3), [i["name"] for i in manifest["inputs"]])
    k = x.shape[1]
    lows = np.array([i["low"] or 0 for i in manifest["inputs"]], dtype=np.float32)
    rows = np.where(np.isnan(x), lows, x)
    gap = next(j for j, i in enumerate(manifest["inputs"]) if not i.get("required"))
    rows[0, gap] = np.nan  # a missing value, sent as null

    def infer(data, shape=(3, k)):
        body = {
            "id": "d",
            "inputs": [{"name": "inputs", "datatype": "FP32", "shape": list(shape), "data": data}],
        }
        return call("POST", server.url("/v2/models/onset/infer"), body)

    flat = [None if v != v else float(v) for v in rows.reshape(-1)]
    answers = [
        infer(flat),
        infer([int(v) if v is not None and v.is_integer() else v for v in flat]),  # whole: 3, not 3.0
        infer([flat[i * k : (i + 1) * k] for i in range(3)]),
    ]
    assert {st for st, _, _ in answers} == {200}, answers
    assert answers[0][2]["outputs"] == answers[1][2]["outputs"] == answers[2][2]["outputs"]
    for bad in (True, "1.5"):
        st, _, resp = infer([bad] + flat[1:])
        assert st == 400 and "data must be a (nested) list of numbers" in resp["error"], resp
    raw = b'{"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1, %d], "data": [%s]}]}'
    huge = raw % (k, b", ".join([b"9" * 400] + [b"1"] * (k - 1)))
    st, _, resp = call("POST", server.url("/v2/models/onset/infer"), raw=huge)
    assert st == 400 and "error" in resp, resp
    st, _, resp = call("POST", server.url("/v2/models/onset/infer"), raw=b'{"inputs": [{"data": [1.0, ')
    assert st == 400 and "malformed JSON" in resp["error"], resp
    for absent in ({}, {"data": None}):  # no data and no binary part: the client's mistake, not a 500
        tensor = {"name": "inputs", "datatype": "FP32", "shape": [1, k]} | absent
        st, _, resp = call("POST", server.url("/v2/models/onset/infer"), {"inputs": [tensor]})
        assert st == 400 and "data must be a (nested) list of numbers" in resp["error"], resp


def test_auth_keys_hashed_health_open(keyed):
    url = keyed.url
    assert call("GET", url("/healthz"))[0] == 200 and call("GET", url("/v2/health/ready"))[0] == 200
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": USER}):
        st, hdrs, body = call("GET", url("/v1/models"), headers=headers)
        assert st == 401 and hdrs.get("www-authenticate") == "Bearer" and body["problems"]
    user, admin = {"Authorization": f"Bearer {USER}"}, {"Authorization": f"Bearer {ADMIN}"}
    assert call("GET", url("/v1/models"), headers=user)[0] == 200
    assert predict(keyed, [BASE], headers=user)[0] == 200
    assert call("POST", url("/admin/reload"), headers=user)[0] == 403
    st, _, body = call("POST", url("/admin/reload"), headers=admin)
    assert st == 200 and body["models"][0]["task"] == "onset"
    assert call("GET", url("/metrics"))[0] == 401 and call("GET", url("/metrics"), headers=admin)[0] == 200
    assert "authentication is OFF" not in keyed.stderr()


def test_public_metrics_answers_a_plain_scrape_and_nothing_else(bundle):
    s = Server(bundle[1], "--public-metrics", env={"MASML_SERVE_API_KEYS": USER})
    try:
        st, hdrs, text = call("GET", s.url("/metrics"))
        assert st == 200 and "masml_requests_total" in text and hdrs["content-type"].startswith("text/plain")
        assert call("GET", s.url("/v1/models"))[0] == 401 and predict(s, [BASE])[0] == 401
        spec = call("GET", s.url("/openapi.json"))[2]
        assert spec["paths"]["/metrics"]["get"]["security"] == [] and spec["security"] == [{"bearer": []}]
    finally:
        s.stop()


def test_no_keys_refused_off_loopback_and_warned_on_it(bundle, server):
    r = subprocess.run(
        [sys.executable, "-m", "serve", "--models", str(bundle[1]), "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(MASML_ROOT),
        env={k: v for k, v in os.environ.items() if not k.startswith("MASML_SERVE")},
    )
    assert r.returncode == 2 and "without API keys" in r.stderr
    assert "authentication is OFF" in server.stderr()


MASML_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_guardrails_from_the_manifest(bundle, tmp_path):
    rules = [
        {
            "id": "infection",
            "message": "treat the infection first",
            "source": "ref",
            "any": [{"field": "trigger", "op": "in", "value": ["parasitic_leishmania", "fungal"]}],
        },
        {
            "id": "very_high_ferritin",
            "message": "ferritin above 10000",
            "requires": ["ferritin"],
            "any": [{"field": "ferritin", "op": ">=", "value": 10000}],
        },
        {
            "id": "old_and_low_platelets",
            "message": "both",
            "all": [
                {"field": "age_years", "op": ">", "value": 60},
                {"field": "platelets", "op": "<", "value": 100},
            ],
        },
        {"id": "risky", "message": "model risk over 0", "any": [{"field": "risk", "op": ">=", "value": 0}]},
    ]
    models = tmp_path / "models"
    copy_bundle(bundle[1] / "onset", models / "onset", guardrails=rules)
    copy_bundle(
        bundle[1] / "onset",
        models / "bad",
        task="bad",
        guardrails=[{"id": "x", "message": "m", "any": [{"field": "nope", "op": "<", "value": 1}]}],
    )
    s = Server(models)
    try:
        pts = [
            BASE | {"trigger": "fungal", "ferritin": 20000},
            BASE | {"age_years": 70, "platelets": 50},
            BASE | {"platelets": 50},
        ]
        st, _, body = predict(s, pts)
        assert st == 200, body
        status = [{g["id"]: g["status"] for g in p["guardrails"]} for p in body["predictions"]]
        assert status[0] == {
            "infection": "fires",
            "very_high_ferritin": "fires",
            "old_and_low_platelets": "clear",
            "risky": "fires",
        }
        assert status[1] == {
            "infection": "clear",
            "very_high_ferritin": "unknown",
            "old_and_low_platelets": "fires",
            "risky": "fires",
        }
        assert status[2]["old_and_low_platelets"] == "clear"  # age missing-free but 30: all-rule needs both
        refused = call("GET", s.url("/v1/models"))[2]["refused"]
        assert len(refused) == 1 and "unknown field 'nope'" in refused[0]["reason"]
        assert (
            'masml_guardrail_total{model="onset",rule="infection",status="fires"} 1'
            in call("GET", s.url("/metrics"))[2]
        )
    finally:
        s.stop()


def test_masml_serve_command_starts_the_service(bundle):
    from test_serve_support import free_port

    port = free_port()
    proc = subprocess.Popen(
        [MASML, "serve", "--models", str(bundle[1]), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        import time

        for _ in range(200):
            try:
                if call("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        st, _, body = call("POST", f"http://127.0.0.1:{port}/v1/models/onset/predict", {"patients": [BASE]})
        assert st == 200 and 0 <= body["predictions"][0]["risk"] <= 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_guardrails_agree_with_masml_reference_evaluator(bundle, frame, tmp_path):
    """The benefit bundle's own rules (masml.guardrails, issue 4) give the same statuses in the service."""
    ref = pytest.importorskip("masml.guardrails")
    rules = [r for r in ref.benefit_guardrails((0.1, 0.9)) if "propensity" not in json.dumps(r)]
    rules.append(
        {
            "id": "risk_high",
            "message": "m",
            "requires": ["ferritin"],
            "all": [
                {"field": "risk", "op": ">", "value": 0.5},
                {"field": "ferritin", "op": ">=", "value": 500},
            ],
        }
    )
    copy_bundle(bundle[1] / "onset", tmp_path / "models" / "onset", guardrails=rules)
    s = Server(tmp_path / "models")
    try:
        st, _, body = predict(s, patients_from_frame(frame))
        assert st == 200, body
    finally:
        s.stop()
    risk = np.array([p["risk"] for p in body["predictions"]])
    expected = ref.evaluate(rules, frame, {"risk": risk})
    got = [{g["id"]: g["status"] for g in p["guardrails"]} for p in body["predictions"]]
    assert got == expected.to_dict("records")
    assert {v for row in got for v in row.values()} >= {"fires", "clear"}


def test_serve_turns_onnxruntime_telemetry_off_unless_told_otherwise():
    """onnxruntime looked up Microsoft's telemetry host from the container: serve sets the switch off
    before any of its modules import onnxruntime, and an explicit setting wins."""
    code = "import os, serve; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    for given, want in ((None, "1"), ("0", "0")):
        run_env = env if given is None else env | {"ORT_DISABLE_TELEMETRY": given}
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=run_env, timeout=60
        )
        assert r.returncode == 0 and r.stdout.strip() == want, r.stderr


@pytest.mark.parametrize("bad", ["two", "0", "-1", ""])
def test_a_bad_batch_threads_setting_stops_the_service_naming_it(bundle, bad):
    r = subprocess.run(
        [sys.executable, "-m", "serve", "--models", str(bundle[1])],
        capture_output=True, text=True, timeout=60, env=os.environ | {"MASML_SERVE_BATCH_THREADS": bad},
    )  # fmt: skip
    assert r.returncode != 0
    assert f"MASML_SERVE_BATCH_THREADS is {bad!r}; expected a whole number >= 1" in r.stderr


@pytest.mark.parametrize("n", [1, 6])  # the one-to-four-patient path and the column path
def test_an_input_without_a_range_still_refuses_infinity_on_every_path(n):
    """JSON's 1e999 decodes to inf: an input whose manifest gives no range must still refuse it (REST,
    both paths, and OIP), naming the field; a manifest giving only one bound is refused at load."""
    import math

    from serve.inputs import Encoder
    from serve.problems import Problems

    enc = Encoder([{"name": "a", "kind": "numeric", "unit": "x"},
                   {"name": "b", "kind": "numeric", "unit": "g", "low": 0, "high": 10}])  # fmt: skip
    with pytest.raises(Problems) as err:
        enc.encode([{"a": 2.5, "b": 1}] * (n - 1) + [{"a": math.inf, "b": 1}])
    [p] = err.value.problems
    assert p["field"] == f"patients[{n - 1}].a" and p["kind"] == "out_of_range"
    assert p["message"] == "inf x is not a finite number" and p["expected"] == "a finite number in x"
    assert enc.encode([{"a": 2.5, "b": 1}] * n)[0].tolist() == [[2.5, 1.0]] * n
    with pytest.raises(Problems, match="invalid"):
        enc.check_matrix(np.array([[np.inf, 1.0]], np.float32), "inputs")
    with pytest.raises(ValueError, match="'c' gives a low bound without a high one"):
        Encoder([{"name": "c", "kind": "numeric", "unit": "x", "low": 0}])


@pytest.mark.parametrize("key", [None, "audit-key-0123", "k" * 100])  # none, short, longer than a block
def test_audit_input_hash_is_sha256_or_hmac_of_the_row_bytes(key, monkeypatch, tmp_path):
    """The audit line's input hash is what an auditor recomputes from the row: sha256 of its float32
    bytes, or HMAC-SHA256 with MASML_SERVE_AUDIT_KEY (so the log cannot be matched against guessed
    inputs without the key); one line per row, the outputs beside it."""
    import hashlib
    import hmac
    from types import SimpleNamespace

    from serve.security import Audit

    if key is None:
        monkeypatch.delenv("MASML_SERVE_AUDIT_KEY", raising=False)
    else:
        monkeypatch.setenv("MASML_SERVE_AUDIT_KEY", key)
    audit = Audit(str(tmp_path / "audit.jsonl"))
    x = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    x[1, 2] = np.nan
    model = SimpleNamespace(name="m", task="onset", version="3", sha256="ab" * 32)
    audit.write("req-1", "predict", model, x, {"risk": [0.1, None, 0.3, 0.4, 0.5]}, "user-key")
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    expected = [
        (
            hmac.new(key.encode(), row.tobytes(), hashlib.sha256) if key else hashlib.sha256(row.tobytes())
        ).hexdigest()[:32]
        for row in x
    ]
    assert [r["input_sha256"] for r in lines] == expected
    assert [r["index"] for r in lines] == [0, 1, 2, 3, 4] and lines[1]["outputs"] == {"risk": None}
    assert {(r["request_id"], r["model"], r["version"], r["n"]) for r in lines} == {("req-1", "m", "3", 5)}


def test_audit_lines_hold_every_output_and_refuse_a_column_of_the_wrong_length(tmp_path):
    """Lines are joined from per-column pieces: several outputs (numbers, null, text with a comma) each
    land in their own line's ``outputs``, and a column shorter than the batch raises instead of leaving
    patients out of the log."""
    from types import SimpleNamespace

    from serve.security import Audit

    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    model = SimpleNamespace(name="m", task="il1_benefit", version="3", sha256="ab" * 32)
    x = np.zeros((3, 4), dtype=np.float32)
    outputs = {"benefit": [0.1, None, -0.2], "risk_treated": [1, 0.5, None], "note": ["a,b", None, "c"]}
    audit.write("req-2", "predict", model, x, outputs, None, {"explainer_sha256": "cd" * 32})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["outputs"] for r in lines] == [
        dict(zip(outputs, v, strict=True)) for v in zip(*outputs.values(), strict=True)
    ]
    assert {r["explainer_sha256"] for r in lines} == {"cd" * 32} and [r["index"] for r in lines] == [0, 1, 2]
    audit.write("req-4", "predict", model, x[:1], {}, None)  # no outputs: still a whole JSON line
    assert json.loads(path.read_text().splitlines()[-1])["outputs"] == {}
    with pytest.raises(ValueError, match="3 rows but outputs of lengths \\[2\\]"):
        audit.write("req-3", "predict", model, x, {"risk": [0.1, 0.2]}, None)
    assert len(path.read_text().splitlines()) == 4


def test_request_ids_are_unique_across_requests_and_forked_workers(server):
    """Ids the server mints (no ``x-request-id`` sent) are 32 hex digits, never repeated; a forked process
    draws a new random prefix, so two workers forked from one parent cannot hand out the same id."""
    from serve.app import new_request_id

    ids = [predict(server, [BASE])[1]["x-request-id"] for _ in range(5)]
    assert len(set(ids)) == 5 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    here = [new_request_id() for _ in range(3)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report an id and leave without running pytest's exit handlers
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(set(here)) == 3 and child not in here and child[:16] != here[0][:16]


def test_settle_heap_hides_what_is_loaded_and_frees_cycles_it_hid_before():
    """The service freezes its long-lived objects after each (re)load so that full collections do not
    rescan them; a cycle frozen by one load and dropped later is freed by the next load's settle."""
    import gc
    import weakref

    from serve.app import settle_heap

    class Node:
        pass

    a = Node()
    a.me = a  # a reference cycle: only the cyclic collector can free it
    ref = weakref.ref(a)
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        del a
        gc.collect()
        assert ref() is not None  # frozen: invisible to the collector
        settle_heap()
        assert ref() is None
    finally:
        gc.unfreeze()
