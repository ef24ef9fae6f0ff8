"""Benchmark: the scoring service against `mlflow models serve` of the same ONNX graph, and against
in-process onnxruntime (the floor).

Measures, over loopback with one lean asyncio HTTP/1.1 keep-alive client and, when the machine has it,
with wrk (a C client whose own cost per request is a small fraction of a Python client's): one-patient
latency (p50, p99), throughput at 1, 8 and 32 concurrent clients, and a 1,000-patient batch. Our
service is called three ways: REST ``/v1/models/{task}/predict`` (patients as JSON objects, validated
and unit-checked), the Open Inference Protocol (one FP32 tensor) and MLflow's ``/invocations``; mlflow
gets ``dataframe_split`` with the same rows. Prints a table; asserts nothing.

    .venv/bin/python bench/bench_serve.py [--bundle models/onset] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from masml.cohort import simulate
from masml.encoding import encode_inputs
from masml.predict import onnx_session

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on {port} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server on {port} not ready")


class Conn:
    """Minimal HTTP/1.1 keep-alive client: a request is one write and a content-length read."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _latency(port: int, path: str, body: bytes, n: int) -> np.ndarray:
    c = Conn(port)
    await c.open()
    for _ in range(50):  # warm-up
        await c.post(path, body)
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        st, payload = await c.post(path, body)
        out[i] = time.perf_counter() - t0
        assert st == 200, payload[:300]
    c.close()
    return out


async def _throughput(port: int, path: str, body: bytes, clients: int, seconds: float) -> tuple[float, int]:
    stop = time.perf_counter() + seconds
    counts, errors = [0] * clients, [0] * clients

    async def worker(k: int) -> None:
        c = Conn(port)
        await c.open()
        while time.perf_counter() < stop:
            st, _ = await c.post(path, body)
            counts[k] += 1
            errors[k] += st != 200
        c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    return sum(counts) / (time.perf_counter() - t0), sum(errors)


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}
# The floor under any Python ASGI service here: uvicorn (httptools, uvloop) answering with two sends.
BARE_ASGI = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})
"""


def _wrk(
    port: int, path: str, body: bytes | None, clients: int, seconds: float, tmp: Path
) -> tuple[float, float, float, int]:
    """wrk (a C load generator, Debian package ``wrk``): p50 ms, p99 ms, req/s and non-200 answers.
    ``body`` None: a plain GET.

    Why beside the Python client: a Python client spends about as long as the server per request on
    a 2-core machine, so its latency is the pair's; wrk's is close to the server's alone."""
    script_args: list[str] = []
    if body is not None:
        body_file = tmp / f"wrk-{abs(hash(body))}.json"
        body_file.write_bytes(body)
        script = tmp / f"wrk-{abs(hash(body))}.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
        )
        script_args = ["-s", str(script)]
    url = f"http://127.0.0.1:{port}{path}"
    subprocess.run(["wrk", "-t1", "-c1", "-d1s", *script_args, url], capture_output=True, check=True)
    text = subprocess.run(
        ["wrk", f"-t{min(clients, 2)}", f"-c{clients}", f"-d{seconds:g}s", "--latency", *script_args]
        + [url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lat = {}
    for q in ("50%", "99%"):
        v = text.split(f" {q}", 1)[1].split()[0]
        unit = v.lstrip("0123456789.")
        lat[q] = float(v[: -len(unit)]) * _UNIT[unit]
    rps = float(text.split("Requests/sec:", 1)[1].split()[0])
    bad = int(text.split("Non-2xx or 3xx responses:", 1)[1].split()[0]) if "Non-2xx" in text else 0
    return lat["50%"], lat["99%"], rps, bad


def pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=str(REPO / "models" / "onset"))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--latency-n", type=int, default=2000)
    args = ap.parse_args()
    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [i["name"] for i in manifest["inputs"]]
    specs = {i["name"]: i for i in manifest["inputs"]}

    # Complete rows (mlflow's JSON path has no missing values): simulated patients, gaps filled.
    frame = simulate(1200, seed=7).data.reset_index(drop=True)
    x = encode_inputs(frame, names)
    fill = np.array([specs[n]["low"] if specs[n]["low"] is not None else 0 for n in names], dtype=np.float32)
    x = np.where(np.isnan(x), fill, x).astype(np.float32)
    patients = []
    for row in x[:1000]:
        p = {}
        for n, v in zip(names, row.tolist(), strict=True):
            cats = specs[n]["categories"]
            p[n] = cats[int(v)] if cats else v
        patients.append(p)
    rest1 = json.dumps({"patients": patients[:1]}).encode()
    rest1k = json.dumps({"patients": patients}).encode()
    k = len(names)

    def oip(rows: np.ndarray) -> bytes:
        return json.dumps(
            {
                "inputs": [
                    {
                        "name": "inputs",
                        "datatype": "FP32",
                        "shape": list(rows.shape),
                        "data": rows.reshape(-1).tolist(),
                    }
                ]
            }
        ).encode()

    def split(rows: np.ndarray) -> bytes:
        return json.dumps({"dataframe_split": {"columns": names, "data": rows.tolist()}}).encode()

    oip1, oip1k = oip(x[:1]), oip(x[:1000])
    split1, split1k = split(x[:1]), split(x[:1000])  # mlflow: categories as codes, as the graph takes them

    def split_labels(rows: list[dict]) -> bytes:  # ours: categories by label, as masml's schema has them
        return json.dumps(
            {"dataframe_split": {"columns": names, "data": [[p[n] for n in names] for p in rows]}}
        ).encode()

    lsplit1, lsplit1k = split_labels(patients[:1]), split_labels(patients)
    task = manifest["task"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    procs: list[subprocess.Popen] = []
    results: list[tuple] = []
    wrk_rows: list[tuple] = []
    try:
        # ours: one worker, audit log to a file (as deployed)
        ours = free_port()
        models = tmp / "models"
        shutil.copytree(bundle, models / task)
        env = {k_: v for k_, v in os.environ.items() if not k_.startswith("MASML_SERVE_")}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "serve",
                    "--models",
                    str(models),
                    "--port",
                    str(ours),
                    "--log-level",
                    "warning",
                    "--audit-log",
                    str(tmp / "audit.jsonl"),
                ],
                cwd=REPO,
                env=env,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_http(ours, "/readyz", procs[-1])

        # mlflow: the same graph, logged with mlflow.onnx into a temp SQLite store, served locally
        import mlflow
        import onnx
        import pandas as pd
        from mlflow.models import infer_signature

        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        sess = onnx_session((bundle / "model.onnx").read_bytes())
        sample = pd.DataFrame(x[:5], columns=names)
        sig = infer_signature(
            sample,
            pd.DataFrame(
                {o.name: sess.run([o.name], {"inputs": x[:5]})[0].reshape(-1) for o in sess.get_outputs()}
            ),
        )
        with mlflow.start_run():
            info = mlflow.onnx.log_model(
                onnx.load(str(bundle / "model.onnx")),
                name="model",
                signature=sig,
                onnx_execution_providers=["CPUExecutionProvider"],
            )
        theirs = free_port()
        procs.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("mlflow")),
                    "models",
                    "serve",
                    "-m",
                    info.model_uri,
                    "--env-manager",
                    "local",
                    "-p",
                    str(theirs),
                    "-h",
                    "127.0.0.1",
                    "--workers",
                    "1",
                ],
                env=env
                | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                stdout=subprocess.DEVNULL,
                stderr=(tmp / "mlflow.log").open("w"),
            )
        )
        try:
            wait_http(theirs, "/ping", procs[-1])
        except RuntimeError:
            print((tmp / "mlflow.log").read_text()[-3000:], file=sys.stderr)
            raise

        targets = [
            ("masml serve REST /predict", ours, f"/v1/models/{task}/predict", rest1, rest1k),
            ("masml serve OIP /infer", ours, f"/v2/models/{task}/infer", oip1, oip1k),
            ("masml serve /invocations", ours, "/invocations", lsplit1, lsplit1k),
            ("mlflow models serve", theirs, "/invocations", split1, split1k),
        ]
        if shutil.which("wrk"):
            for label, port, path, one, batch in targets:
                p50, p99, rps1, bad = _wrk(port, path, one, 1, args.seconds, tmp)
                rates = [rps1] + [_wrk(port, path, one, c, args.seconds, tmp)[2] for c in (8, 32)]
                b50, _, _, bbad = _wrk(port, path, batch, 1, args.seconds, tmp)  # 1,000 patients per call
                wrk_rows.append((label, p50, p99, *rates, b50, bad + bbad))
            # the HTTP stack's own floor: a GET that does no work (uvicorn, Starlette's router)
            p50, p99, rps1, bad = _wrk(ours, "/healthz", None, 1, args.seconds, tmp)
            wrk_rows.append(("masml serve GET /healthz (no work)", p50, p99, rps1, "-", "-", "-", bad))
            # and below it, uvicorn alone: an ASGI app of two send calls, no framework
            (tmp / "bare_asgi.py").write_text(BARE_ASGI)
            bare = free_port()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "bare_asgi:app", "--app-dir", str(tmp), "--port",
                     str(bare), "--log-level", "warning", "--no-access-log"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
            wait_http(bare, "/", procs[-1])
            p50, p99, rps1, bad = _wrk(bare, "/", None, 1, args.seconds, tmp)
            label = "bare ASGI app on uvicorn (no framework, no work)"
            wrk_rows.append((label, p50, p99, rps1, "-", "-", "-", bad))
        for label, port, path, one, batch in targets:
            lat = asyncio.run(_latency(port, path, one, args.latency_n))
            row = [label, pct(lat, 50), pct(lat, 99)]
            for c in (1, 8, 32):
                rate, errs = asyncio.run(_throughput(port, path, one, c, args.seconds))
                row.append(rate if not errs else f"{rate:.0f} ({errs} err)")
            bl = asyncio.run(_latency(port, path, batch, 20))
            row.append(pct(bl, 50))
            results.append(tuple(row))

        # the floor: onnxruntime in process, no HTTP, no JSON
        t = np.empty(args.latency_n)
        one = x[:1]
        for _ in range(100):
            sess.run(["risk"], {"inputs": one})
        for i in range(args.latency_n):
            t0 = time.perf_counter()
            sess.run(["risk"], {"inputs": one})
            t[i] = time.perf_counter() - t0
        tb = []
        for _ in range(20):
            t0 = time.perf_counter()
            sess.run(["risk"], {"inputs": x[:1000]})
            tb.append(time.perf_counter() - t0)
        results.append(
            (
                "onnxruntime in-process",
                pct(t, 50),
                pct(t, 99),
                1 / np.median(t),
                "-",
                "-",
                float(np.median(tb) * 1e3),
            )
        )
        # as the service scores a batch: pieces of the manifest's small_batch_rows over two threads
        piece = json.loads((bundle / "manifest.json").read_text()).get("small_batch_rows")
        if piece:
            from concurrent.futures import ThreadPoolExecutor

            def half(rows: np.ndarray) -> None:
                for i in range(0, len(rows), piece):
                    sess.run(["risk"], {"inputs": rows[i : i + piece]})

            with ThreadPoolExecutor(2) as pool:
                tp = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    list(pool.map(half, [x[:500], x[500:1000]]))
                    tp.append(time.perf_counter() - t0)
            label = f"  same, 1,000 in {piece}-row calls on 2 threads"
            results.append((label, "-", "-", "-", "-", "-", float(np.median(tp) * 1e3)))
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    def f(v) -> str:
        return v if isinstance(v, str) else (f"{v:,.0f}" if v >= 100 else f"{v:.3f}" if v < 1 else f"{v:.2f}")

    head = ("endpoint", "1-patient p50 ms", "p99 ms", "req/s @1", "req/s @8", "req/s @32", "1000 patients ms")
    print(f"\nmodel {task} ({k} inputs), {os.cpu_count()} cores, {args.seconds:g} s per throughput point\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in results:
        print("| " + " | ".join([r[0], *map(f, r[1:])]) + " |")
    mine = next(r for r in results if r[0].startswith("masml serve REST"))
    theirs_row = next(r for r in results if r[0].startswith("mlflow"))
    ratio = [
        m / t
        for m, t in zip(mine[3:6], theirs_row[3:6], strict=True)
        if isinstance(m, float) and isinstance(t, float)
    ]
    print(
        f"\nREST throughput / mlflow throughput at 1, 8, 32 clients: {', '.join(f'{v:.1f}x' for v in ratio)}"
    )
    if not wrk_rows:
        print("\n(wrk not found: `apt-get install wrk` adds the same figures measured with a C client)")
        return
    head = ("endpoint (wrk)", "1-patient p50 ms", "p99 ms", "req/s @1", "req/s @8", "req/s @32",
            "1000 patients p50 ms", "non-200")  # fmt: skip
    print(f"\nThe same, measured with wrk (C client, {args.seconds:g} s per point)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in wrk_rows:
        print("| " + " | ".join([r[0], *map(f, r[1:7]), str(r[7])]) + " |")


if __name__ == "__main__":
    main()
