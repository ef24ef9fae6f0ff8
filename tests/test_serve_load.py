"""The service under load: hot reload (admin endpoint and SIGHUP) with no failed request, a bounded load
test at 32 concurrent clients, and schemathesis against the live OpenAPI document (no 5xx).
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_serve_support import Server, call, copy_bundle, tiny_bundle

ADMIN = "admin-key-load"
PATIENT = {"age_years": 12, "sex": "F", "trigger": "sjia", "ferritin": {"value": 9000, "unit": "ug/L"},
           "platelets": 80, "temperature_c": 39.4}  # fmt: skip
BODY = json.dumps({"patients": [PATIENT]}).encode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)[1]


class Hammer:
    """Clients on keep-alive connections posting predictions until stopped; records every outcome."""

    def __init__(self, port: int, clients: int, headers: dict[str, str]) -> None:
        self.port, self.headers = port, {"Content-Type": "application/json"} | headers
        self.stop_flag = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.seen: list[list[str]] = [[] for _ in range(clients)]  # per client: versions in answer order
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(clients)]

    def run(self, k: int) -> None:
        """Client ``k``; its own answers are in order (one connection), the clients' are not."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop_flag.is_set():
            try:
                conn.request("POST", "/v1/models/onset/predict", body=BODY, headers=self.headers)
                resp = conn.getresponse()
                payload = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status} {payload[:200]!r}")
                version = json.loads(payload)["model"]["version"]
                with self.lock:
                    self.ok += 1
                if not self.seen[k] or self.seen[k][-1] != version:
                    self.seen[k].append(version)
            except Exception as err:  # every failure counts, whatever its kind
                with self.lock:
                    self.failures.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)


def test_reload_under_load_never_fails_a_request(models, tmp_path):
    served = tmp_path / "models"
    shutil.copytree(models / "onset", served / "onset")
    s = Server(served, env={"MASML_SERVE_API_KEYS": f"{ADMIN}:admin"})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    onset = served / "onset"
    try:
        with Hammer(s.port, 8, admin) as h:
            time.sleep(0.7)
            copy_bundle(onset, onset, version="v2")  # a valid new bundle: the admin endpoint swaps it in
            st, _, body = call("POST", s.url("/admin/reload"), headers=admin)
            assert st == 200 and body["models"][0]["version"] == "v2" and not body["refused"]
            time.sleep(0.7)
            good = (onset / "model.onnx").read_bytes()
            (onset / "model.onnx").write_bytes(good[: len(good) // 2])  # broken: refused, v2 keeps serving
            st, _, body = call("POST", s.url("/admin/reload"), headers=admin)
            assert st == 200 and body["models"][0]["version"] == "v2"
            assert "sha256" in body["refused"][0]["reason"] and body["refused"][0]["kept"]["version"] == "v2"
            time.sleep(0.7)
            (onset / "model.onnx").write_bytes(good)
            copy_bundle(onset, onset, version="v3")
            s.hup()  # SIGHUP reloads too
            deadline = time.monotonic() + 10
            while call("GET", s.url("/v1/models"), headers=admin)[2]["models"][0]["version"] != "v3":
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.05)
            time.sleep(0.5)
        assert h.failures == [] and h.ok > 100
        # every client moved forward only (first version, v2, v3: never back to an older one), and
        # together they saw all three; across clients answers may be read out of order
        first = next(v[0] for v in h.seen if v)
        order = [first, "v2", "v3"]
        for versions in h.seen:
            assert versions == sorted(versions, key=order.index) and len(set(versions)) == len(versions)
        assert set().union(*h.seen) == set(order)
        listed = call("GET", s.url("/v1/models"), headers=admin)[2]
        assert listed["refused"] == []
    finally:
        s.stop()


def test_load_32_concurrent_clients_no_errors(models):
    s = Server(models)
    try:
        t0 = time.monotonic()
        with Hammer(s.port, 32, {}) as h:
            time.sleep(5)
        rate = h.ok / (time.monotonic() - t0)
        assert h.failures == [] and h.ok > 500, (h.failures[:5], h.ok)
        print(f"\n32 clients for 5 s: {h.ok} requests, {rate:.0f}/s, no errors")
    finally:
        s.stop()


def test_schemathesis_finds_no_server_error(models, tmp_path):
    pytest.importorskip("schemathesis")
    keys = "user-key-st"
    s = Server(models, env={"MASML_SERVE_API_KEYS": keys})
    try:
        exe = str(Path(sys.executable).with_name("schemathesis"))
        r = subprocess.run(
            [exe, "run", s.url("/openapi.json"), "--checks", "not_a_server_error", "--max-examples", "25",
             "--seed", "1", "-H", f"Authorization: Bearer {keys}", "--phases", "examples,coverage,fuzzing",
             "--suppress-health-check", "all"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "internal error" not in s.stderr()
    finally:
        s.stop()


def test_admin_reload_reaches_every_worker(models, tmp_path):
    """With --workers 2 the reload request lands on one worker; the others follow through the reload file."""
    served = tmp_path / "models"
    shutil.copytree(models / "onset", served / "onset")
    s = Server(served, "--workers", "2", env={"MASML_SERVE_API_KEYS": f"{ADMIN}:admin"})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        copy_bundle(served / "onset", served / "onset", version="w2")
        assert call("POST", s.url("/admin/reload"), headers=admin)[0] == 200
        time.sleep(1.5)  # workers poll the reload file every 0.5 s
        seen = {call("GET", s.url("/v1/models"), headers=admin)[2]["models"][0]["version"] for _ in range(30)}
        assert seen == {"w2"}
    finally:
        s.stop()
