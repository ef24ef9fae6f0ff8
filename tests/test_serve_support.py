"""Helpers shared by the serving tests: a tiny trained bundle, a real server process, an HTTP client.

No tests here. Why a real process: the service must work as deployed (uvicorn, loopback HTTP, signals),
and it runs under an import blocker so that any import of masml or the training stack fails loudly.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MASML = str(Path(sys.executable).with_name("masml"))
REPO = Path(__file__).resolve().parents[1]
TINY = "tuning:\n  n_trials: 1\n  max_rounds: 60\nn_boot: 20\nfolds: 3\n"
BLOCKED = ("masml", "pipelines", "xgboost", "sklearn", "shap", "mlflow")

# Runs `python -m serve` with a meta-path finder that refuses the training stack.
LAUNCHER = """
import sys, importlib.abc
BLOCKED = %r
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            sys.stderr.write(f"BLOCKED IMPORT: {name}\\n"); sys.stderr.flush()
            raise ImportError(f"serve must not import {name}")
        return None
sys.meta_path.insert(0, Block())
from serve.__main__ import main
main(sys.argv[1:])
"""


def tiny_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(cohort parquet, models folder with an onset bundle), trained once per session via the CLI."""
    return _trained_once(tmp_path_factory, "serve_tiny", "onset", TINY, n=2000, seed=1)


def tiny_benefit_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(cohort parquet, models folder with an il1_benefit bundle), trained once per session.

    The cohort tests/test_benefit.py trains on (3,000 patients, seed 21: ~900 MAS patients, enough deaths
    in both arms for 3-fold cross-fitting), one tuning trial per nuisance model: about 20 s on a quiet
    2-core machine. The estimates mean nothing; the bundle only has to be a real one for the service.
    Trained by `masml train il1_benefit` (the command's app run in a subprocess) that also keeps the two
    outcome boosters (``tiny_benefit_boosters``): the bundle holds only ONNX graphs, and the explanation
    tests need the boosters for shap.TreeExplainer.
    """
    return _trained_once(
        tmp_path_factory, "serve_benefit", "il1_benefit", TINY, n=3000, seed=21, keep_boosters=True
    )


def tiny_benefit_boosters(tmp_path_factory) -> dict[str, Path]:
    """The tiny benefit bundle's outcome boosters (xgboost UBJSON files), by arm: untreated, treated."""
    root = tiny_benefit_bundle(tmp_path_factory)[1].parent / "outcome_boosters"
    return {arm: root / f"{arm}.ubj" for arm in ("untreated", "treated")}


# `masml train il1_benefit` itself (the installed command's app, in this process), with the pipeline's
# result kept so its outcome boosters (which the bundle does not carry) can be saved for SHAP references.
BENEFIT_TRAIN = """
import sys
from pathlib import Path
import pipelines.il1_benefit as pipeline
from masml.cli import app
data, config, out, keep = map(Path, sys.argv[1:])
run, kept = pipeline.run_il1_benefit_pipeline, []
pipeline.run_il1_benefit_pipeline = lambda *a, **k: kept.append(run(*a, **k)) or kept[-1]
app(["train", "il1_benefit", "--data", str(data), "--config", str(config), "--out", str(out)],
    standalone_mode=False)
keep.mkdir(parents=True, exist_ok=True)
for arm in ("untreated", "treated"):
    getattr(kept[0].extra["model"].nuisances, arm).booster.save_model(str(keep / f"{arm}.ubj"))
"""


def _trained_once(
    tmp_path_factory, name: str, task: str, config: str, n: int, seed: int, keep_boosters: bool = False
) -> tuple[Path, Path]:
    """`masml cohort` + `masml train TASK` in subprocesses, with their own SQLite MLflow store; reused.
    With ``keep_boosters`` (il1_benefit), ``BENEFIT_TRAIN`` runs the same command and keeps the boosters."""
    root = tmp_path_factory.getbasetemp() / name
    models, data = root / "models", root / "cohort.parquet"
    kept = root / "outcome_boosters"
    if (models / task / "manifest.json").exists() and (not keep_boosters or kept.is_dir()):
        return data, models
    root.mkdir(parents=True, exist_ok=True)
    tiny = root / "tiny.yaml"
    tiny.write_text(config)
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    train = [MASML, "train", task, "--data", str(data), "--config", str(tiny), "--out", str(models / task)]
    if keep_boosters:
        train = [sys.executable, "-c", BENEFIT_TRAIN, str(data), str(tiny), str(models / task), str(kept)]
    for cmd in ([MASML, "cohort", "--n", str(n), "--seed", str(seed), "--out", str(data)], train):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    return data, models


def copy_bundle(src: Path, dst: Path, **manifest_changes: Any) -> Path:
    """A copy of a bundle with manifest fields changed (sha256 covers only model.onnx, so it stays valid)."""
    if Path(src).resolve() != Path(dst).resolve():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    m = json.loads((dst / "manifest.json").read_text())
    m.update(manifest_changes)
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m serve` process on a free loopback port, started with the import blocker."""

    def __init__(self, models: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.port = free_port()
        self.log = log
        cmd = [
            sys.executable,
            "-c",
            LAUNCHER % (BLOCKED,),
            "--models",
            str(models),
            "--port",
            str(self.port),
            *args,
        ]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MASML_SERVE_")}
        full_env |= {"PYTHONPATH": str(REPO)} | (env or {})
        self.stderr_path = (log or Path(models)).parent / f"server-{self.port}.stderr"
        self._err = open(self.stderr_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._err, stderr=self._err, env=full_env, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.stderr()}")
            try:
                if call("GET", self.url("/healthz"))[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.stderr()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text()

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._err.close()


def call(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON or text) over one fresh connection."""
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} | (headers or {})
    try:
        conn.request(method, "/" + rest, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    if hdrs.get("content-type", "").startswith("application/json"):
        return resp.status, hdrs, json.loads(payload)
    return resp.status, hdrs, payload.decode(errors="replace")


def audit_lines(path: Path, request_id: str, n: int, timeout: float = 10) -> list[dict]:
    """The ``n`` audit lines of one request, waiting for them: the service writes them just after the
    answer has been sent, so a client may read the file a moment before they land."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        whole = text.split("\n")[:-1]  # a line still being written has no newline yet
        recs = [r for r in map(json.loads, whole) if r["request_id"] == request_id]
        if len(recs) >= n or time.monotonic() > deadline:
            return recs
        time.sleep(0.01)


def post_raw(url: str, body: bytes, header_len: int | None):
    """POST a binary OIP body (JSON header + raw tensor bytes); (status, headers, body bytes)."""
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=30)
    headers = {"Content-Type": "application/octet-stream"}
    if header_len is not None:
        headers["Inference-Header-Content-Length"] = str(header_len)
    try:
        conn.request("POST", "/" + rest, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def patients_from_frame(frame) -> list[dict]:
    """Cohort rows as the JSON a bedside app would send: missing values left out, numbers as numbers."""
    import math

    from masml.schema import INPUT_NAMES

    out = []
    for rec in frame[["patient_id", *INPUT_NAMES]].to_dict("records"):
        p = {}
        for k, v in rec.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            p[k] = v if isinstance(v, str) else float(v)
        out.append(p)
    return out
