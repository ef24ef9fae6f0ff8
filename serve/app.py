"""The HTTP application: masml's REST API, the Open Inference Protocol and MLflow's ``/invocations``.

Why plain Starlette endpoints and no middleware stack: one patient must be scored in well under a
millisecond end to end, so auth, timing, metrics and error mapping are done by one small wrapper per
endpoint instead of layers of ASGI middleware. Why every handler ends in ``Problems`` or a response: a
client can never cause a 500; anything unexpected is still answered as JSON and counted.

Explanations (``/v1/models/{task}/explain``, ``"explain": true`` on predict, OIP ``/v2/models/{m}/explain``)
run the bundle's ``explainer.onnx`` beside ``model.onnx`` on the same float32 matrix. Why a separate,
smaller batch limit: the explainer's intermediates take ~2 MB per row, so a 5,000-patient explain call
would take gigabytes; scoring stays cheap and keeps its own limit. A benefit bundle's explainer explains
its two outcome models, so each patient's explanation holds ``untreated``, ``treated`` and ``difference``
blocks (untreated - treated, the log odds ratio); ``benefit`` itself is not decomposed.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import itertools
import logging
import math
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import Address, Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serve import __version__
from serve.bundles import BATCH_POOL, BATCH_THREADS, Model, Snapshot, load_folder
from serve.clean_batch import CleanBatch
from serve.metrics import Metrics
from serve.openapi import build_spec
from serve.problems import Problems, invalid, problem
from serve.security import Audit, Keys, digest

log = logging.getLogger("serve")
THREAD_ROWS = 64  # batches above this run in a worker thread so the event loop keeps serving
EXPLAIN_THREAD_ROWS = 4  # explaining costs ~0.5 ms per row for 300 trees: move off the loop sooner
TOP_DEFAULT = 5  # inputs listed in an explanation's ``top`` unless the request says ``"top": k``
_dec = msgspec.json.Decoder()
# OIP: a bundle with guardrails answers ``infer`` with one more tensor, BYTES [N], one JSON text per patient.
GUARDRAILS_OUTPUT = "guardrails"
GUARDRAILS_TENSOR_TEXT = (
    "BYTES [N]: per patient, a UTF-8 JSON array of the manifest's guardrail flags, "
    '[{"id", "status" (fires|clear|unknown), "message", "kind" (when the rule has one)}], '
    "the same list as REST predict's 'guardrails'"
)


def _enc_hook(obj: Any) -> Any:
    """numpy scalars (e.g. an offending value echoed in a problem) and anything else as text."""
    return obj.item() if isinstance(obj, np.generic) else str(obj)


_enc = msgspec.json.Encoder(enc_hook=_enc_hook)


@dataclass
class Config:
    models: Path = Path("models")
    host: str | None = None
    api_keys: str | None = None
    api_keys_file: str | None = None
    audit_log: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch: int = 5000
    max_explain_batch: int = 100  # explanations are memory-heavy (~2 MB per row while computed)
    reload_file: str | None = None  # shared by workers: touching it makes every worker reload
    public_metrics: bool = False  # /metrics without a key, for a plain Prometheus scrape (no patient data)

    @classmethod
    def from_env(cls) -> Config:
        e = os.environ.get
        return cls(
            models=Path(e("MASML_SERVE_MODELS", "models")),
            host=e("MASML_SERVE_HOST"),
            api_keys=e("MASML_SERVE_API_KEYS"),
            api_keys_file=e("MASML_SERVE_API_KEYS_FILE"),
            audit_log=e("MASML_SERVE_AUDIT_LOG"),
            max_body_bytes=int(e("MASML_SERVE_MAX_BODY_BYTES", str(8 * 1024 * 1024))),
            max_batch=int(e("MASML_SERVE_MAX_BATCH", "5000")),
            max_explain_batch=int(e("MASML_SERVE_MAX_EXPLAIN_BATCH", "100")),
            reload_file=e("MASML_SERVE_RELOAD_FILE"),
            public_metrics=e("MASML_SERVE_PUBLIC_METRICS", "").lower() in ("1", "true", "yes"),
        )


@functools.lru_cache(maxsize=1024)  # asked on every request without keys; parsing an address is not free
def is_loopback(host: str | None) -> bool:
    if host in (None, "localhost"):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback  # type: ignore[arg-type]
    except ValueError:
        return False


@dataclass
class State:
    config: Config
    keys: Keys
    audit: Audit
    metrics: Metrics = field(default_factory=Metrics)
    snapshot: Snapshot = field(default_factory=Snapshot)
    reload_lock: asyncio.Lock | None = None
    reload_mtime: float = 0.0

    def reload(self) -> Snapshot:
        self.snapshot = load_folder(self.config.models, self.snapshot)  # one reference swap: atomic
        settle_heap()
        return self.snapshot


def settle_heap() -> None:
    """Hide every object alive now (modules, the loaded bundles) from Python's cyclic collector.

    Why: a 1,000-patient REST call builds about 40,000 containers (a dict per patient, its values), so
    the collector runs often, and about once in 30 such calls it made a full pass over the ~38,000
    long-lived objects of the loaded service: a 13-19 ms stall inside a ~20 ms call (in process, 60
    calls, a gc callback timing each pass). Frozen (``gc.freeze``), those objects are not scanned:
    no full pass in the same 60 calls, and the younger passes took 1.1-1.5 ms in all instead of
    3.0-3.8 ms. Why unfreeze and collect first: on a reload the previous snapshot was frozen, and if
    any of it is held only by reference cycles, only a collection that sees it can free it."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_enc.encode(body), status_code=status, media_type="application/json", headers=headers)


Handler = Callable[[Request, "State", dict], Awaitable[Response]]


def create_app(config: Config | None = None) -> Starlette:
    config = config or Config.from_env()
    keys = Keys.load(config.api_keys, config.api_keys_file)
    if not keys.enabled:
        if config.host is not None and not is_loopback(config.host):
            raise SystemExit(
                f"refusing to serve on {config.host} without API keys: set MASML_SERVE_API_KEYS "
                "or --api-keys-file (only loopback may run without keys)"
            )
        log.warning("authentication is OFF: no API keys configured; only loopback clients are answered")
    state = State(config=config, keys=keys, audit=Audit(config.audit_log))
    state.reload()
    if not state.snapshot.models:
        log.error("no model loaded from %s; /readyz will report not ready", config.models)

    def endpoint(name: str, fn: Handler, role: str | None = "user", oip: bool = False):
        """Auth, request id, timing, metrics and the never-500 rule, around one handler. What is only
        recorded (request metrics, a scoring call's audit line) goes in ``resp.background``, which
        Starlette and ``ScoringFastPath`` both run after the answer has been sent."""

        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            ctx: dict[str, Any] = {
                "model": "-",
                "request_id": request.headers.get("x-request-id") or new_request_id(),
            }
            try:
                if role is not None:
                    ctx["principal"] = _authorise(request, state, role)
                resp = await fn(request, state, ctx)
            except Problems as p:
                state.metrics.error(p.problems[0]["kind"] if p.problems else f"http_{p.status}")
                body = {"error": p.text()} if oip else p.body() | {"request_id": ctx["request_id"]}
                headers = {"WWW-Authenticate": "Bearer"} if p.status == 401 else None
                resp = json_response(body, p.status, headers)
            except ClientDisconnect:
                state.metrics.error("client_disconnect")
                resp = Response(status_code=499)
            except Exception:  # a bug, not the client's fault: still JSON, still counted
                log.exception("internal error in %s (request %s)", name, ctx["request_id"])
                state.metrics.error("internal")
                resp = json_response({"error": "internal error", "request_id": ctx["request_id"]}, 500)
            resp.raw_headers.append((b"x-request-id", ctx["request_id"].encode("latin-1")))
            seconds, record = time.perf_counter() - t0, ctx.get("record")

            async def after() -> None:
                if record is not None:
                    try:
                        record()
                    except Exception:  # a bug: the answer is out, so log and count it, as above
                        log.exception("internal error recording request %s", ctx["request_id"])
                        state.metrics.error("internal")
                state.metrics.request(name, ctx["model"], resp.status_code, seconds)

            resp.background = after  # type: ignore[assignment]
            return resp

        return run

    R = Route
    # one wrapper per scoring endpoint, shared by its route(s) and by ScoringFastPath
    predict_ep = endpoint("predict", predict)
    explain_ep = endpoint("explain", explain)
    infer_ep = endpoint("v2_infer", v2_infer, oip=True)
    v2_explain_ep = endpoint("v2_explain", v2_explain, oip=True)
    invocations_ep = endpoint("invocations", invocations)
    metrics_role = None if config.public_metrics else "user"
    routes = [
        R("/v1/models/{task}/predict", predict_ep, methods=["POST"]),
        R("/v1/models/{task}/explain", explain_ep, methods=["POST"]),
        R("/healthz", endpoint("healthz", healthz, None), methods=["GET"]),
        R("/readyz", endpoint("readyz", readyz, None), methods=["GET"]),
        R("/ping", endpoint("ping", healthz, None), methods=["GET"]),
        R("/health", endpoint("health", healthz, None), methods=["GET"]),
        R("/version", endpoint("version", version, None), methods=["GET"]),
        R("/openapi.json", endpoint("openapi", openapi, None), methods=["GET"]),
        R("/metrics", endpoint("metrics", metrics, metrics_role), methods=["GET"]),
        R("/v1/models", endpoint("models", list_models), methods=["GET"]),
        R("/v1/models/{task}", endpoint("model", get_model), methods=["GET"]),
        R("/admin/reload", endpoint("reload", admin_reload, "admin"), methods=["POST"]),
        R("/invocations", invocations_ep, methods=["POST"]),
        R("/v2", endpoint("v2", v2_server, oip=True), methods=["GET"]),
        R("/v2/health/live", endpoint("v2_live", v2_live, None, oip=True), methods=["GET"]),
        R("/v2/health/ready", endpoint("v2_ready", v2_ready, None, oip=True), methods=["GET"]),
        R("/v2/models/{m}", endpoint("v2_model", v2_model, oip=True), methods=["GET"]),
        R("/v2/models/{m}/versions/{v}", endpoint("v2_model", v2_model, oip=True), methods=["GET"]),
        R("/v2/models/{m}/ready", endpoint("v2_model_ready", v2_model_ready, oip=True), methods=["GET"]),
        R(
            "/v2/models/{m}/versions/{v}/ready",
            endpoint("v2_model_ready", v2_model_ready, oip=True),
            methods=["GET"],
        ),
        R("/v2/models/{m}/infer", infer_ep, methods=["POST"]),
        R("/v2/models/{m}/versions/{v}/infer", infer_ep, methods=["POST"]),
        R("/v2/models/{m}/explain", v2_explain_ep, methods=["POST"]),
        R("/v2/models/{m}/versions/{v}/explain", v2_explain_ep, methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        state.metrics.error(f"http_{code}")
        return json_response(
            {"error": detail, "problems": [problem(request.url.path, f"http_{code}", detail)]}, code
        )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        state.reload_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(state, "SIGHUP")))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no SIGHUP
            pass
        watcher = asyncio.ensure_future(_watch_reload_file(state)) if config.reload_file else None
        yield
        if watcher:
            watcher.cancel()

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: http_error},
        lifespan=lifespan,
    )
    app.state.serve = state
    hot = {
        ("v1", "predict"): ("task", predict_ep),
        ("v1", "explain"): ("task", explain_ep),
        ("v2", "infer"): ("m", infer_ep),
        ("v2", "explain"): ("m", v2_explain_ep),
    }
    app.middleware_stack = ScoringFastPath(
        app.build_middleware_stack(), hot, invocations_ep
    )
    return app


class ScoringFastPath:
    """``POST /v1/models/{task}/predict`` and ``/explain``, ``/v2/models/{m}/infer`` and ``/explain``, and
    ``/invocations`` go straight to their endpoint; every other request goes through Starlette's
    middleware and router.

    Why: for one patient those layers cost about as much as scoring (~140k of ~860k instructions per
    request in-process, measured with callgrind), and the endpoint wrapper already does all they add
    (errors as JSON, never a 500). Only exact shapes are taken; anything else, including the same paths
    with another method, gets Starlette's usual answer (404, 405)."""

    def __init__(
        self, app: Callable, hot: dict[tuple[str, str], tuple[str, Callable]], invocations: Callable
    ):
        self.app, self.hot, self.invocations = app, hot, invocations

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            parts = path.split("/")
            fn = None
            if len(parts) == 5 and parts[0] == "" and parts[2] == "models" and parts[3]:
                param, fn = self.hot.get((parts[1], parts[4]), (None, None))
                if fn is not None:
                    scope["path_params"] = {param: parts[3]}
            elif path == "/invocations":
                fn, scope["path_params"] = self.invocations, {}
            if fn is not None:
                response = await fn(ScoringRequest(scope, receive))
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": response.raw_headers})  # fmt: skip
                await send({"type": "http.response.body", "body": response.body})
                await response.background()
                return
        await self.app(scope, receive, send)


class ScoringRequest:
    """What the scoring handlers read of a request (headers, path parameters, query, client, the body's
    messages), made from the ASGI scope without Starlette's ``Request``: the same answers for less work
    on the one-patient path. Starlette's ``Headers`` and ``QueryParams`` still parse what is read. The
    handlers are annotated with ``Request`` because the router gives them one; on the fast path they
    get this, so a handler may use only these attributes (tests/test_serve.py runs every scoring
    endpoint through the fast path)."""

    __slots__ = ("scope", "receive", "path_params", "headers")

    def __init__(self, scope: dict, receive: Callable) -> None:
        self.scope, self.receive, self.path_params = scope, receive, scope["path_params"]
        self.headers = Headers(scope=scope)

    @property
    def client(self) -> Address | None:
        c = self.scope.get("client")
        return Address(*c) if c else None

    @property
    def query_params(self) -> QueryParams:
        return QueryParams(self.scope["query_string"])


def new_request_id() -> str:
    """32 hex digits, unique per process: a random prefix drawn once (again in a forked child) and a
    counter. Why not ``uuid4()``: it reads the OS's random source and builds a UUID object on every
    request (~4 µs, 2% of a one-patient predict in process); the random prefix keeps ids from
    repeating across workers and restarts just as well."""
    return f"{_rid_prefix}{next(_rid_counter):016x}"


def _reset_request_ids() -> None:
    global _rid_prefix, _rid_counter
    _rid_prefix, _rid_counter = os.urandom(8).hex(), itertools.count()


_reset_request_ids()
os.register_at_fork(after_in_child=_reset_request_ids)


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory serve.app:app_from_env`` (what ``python -m serve`` runs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(Config.from_env())


# --- plumbing -------------------------------------------------------------------------------------------


def _authorise(request: Request, state: State, role: str) -> str | None:
    if not state.keys.enabled:
        client = request.client.host if request.client else None
        if client is not None and not is_loopback(client) and client != "testclient":
            raise Problems(403, "this server runs without API keys and answers loopback clients only")
        return None
    header = request.headers.get("authorization")
    got = state.keys.role(header)
    if got is None:
        raise Problems(
            401,
            "missing or invalid API key",
            [problem("headers.authorization", "unauthorized", "send 'Authorization: Bearer <key>'")],
        )
    if role == "admin" and got != "admin":
        raise Problems(
            403,
            "this endpoint needs an admin key",
            [problem("headers.authorization", "forbidden", "the key is valid but not an admin key")],
        )
    return digest(header[7:].strip())[:12]  # type: ignore[index]


async def _read_body(request: Request, state: State) -> bytes:
    limit = state.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise Problems(400, "invalid Content-Length header") from None
        if too_big:
            raise Problems(
                413,
                "request body too large",
                [
                    problem(
                        "body",
                        "too_large",
                        f"{declared} bytes is over the limit",
                        expected=f"at most {limit} bytes",
                    )
                ],
            )
    chunks, size, receive = [], 0, request.receive
    while True:  # the ASGI messages themselves: Starlette's ``stream()`` is an async generator per request
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Problems(
                413,
                "request body too large",
                [problem("body", "too_large", "body is over the limit", expected=f"at most {limit} bytes")],
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _decode(raw: bytes) -> Any:
    if not raw:
        raise Problems(
            400,
            "empty request body",
            [problem("body", "empty", "the body is empty", expected="a JSON object")],
        )
    try:
        return _dec.decode(raw)
    except msgspec.DecodeError as err:
        raise Problems(
            400, "malformed JSON", [problem("body", "malformed_json", str(err), expected="a JSON object")]
        ) from None


# Body fields of the patient endpoints, the patients' field first (``CleanBatch.read``'s order).
PREDICT_FIELDS = ("patients", "top", "features", "explain")
EXPLAIN_FIELDS = ("patients", "top", "features")
RECORDS_FIELDS = ("dataframe_records", "params")
# Below this size a body holds a few patients, and the detailed path reads them faster: one patient,
# 16 against 45 µs; four, 49 against 60 µs; eight, 394 against 73 µs (bench bodies, ~1 KB a patient).
SMALL_BODY = 2048


def _fast_path(model: Model, raw: bytes) -> CleanBatch | None:
    """The model's typed fast path (serve/clean_batch.py) when the body is big enough to gain from it.
    Whatever it does not read as a clean batch, the caller reads on the detailed path, which names
    every problem."""
    return model.clean if len(raw) >= SMALL_BODY else None


def _model(state: State, name: str, ctx: dict) -> Model:
    m = state.snapshot.get(name)
    if m is None:
        raise Problems(
            404,
            f"no model {name!r}",
            [
                problem(
                    "path.model",
                    "unknown_model",
                    f"no model {name!r} is loaded",
                    expected=f"one of {sorted(state.snapshot.models)}",
                )
            ],
        )
    ctx["model"] = m.task
    return m


def _object(body: Any, allowed: set[str], where: str = "body") -> dict:
    if not isinstance(body, dict):
        raise invalid(
            where, "type", "the body must be a JSON object", expected=f"an object with {sorted(allowed)}"
        )
    extra = sorted(set(body) - allowed)
    if extra:
        raise Problems(
            422,
            "invalid input",
            [
                problem(
                    f"{where}.{k}",
                    "unknown_field",
                    f"unknown field {k!r}",
                    expected=f"only {sorted(allowed)}",
                )
                for k in extra
            ],
        )
    return body


def _batch_size_ok(n: int, state: State, where: str) -> None:
    if n > state.config.max_batch:
        raise Problems(
            413,
            "batch too large",
            [
                problem(
                    where, "batch_too_large", f"{n} patients", expected=f"at most {state.config.max_batch}"
                )
            ],
        )


def _explain_batch_ok(n: int, state: State, where: str) -> None:
    limit = state.config.max_explain_batch
    if n > limit:
        raise Problems(
            413,
            "batch too large to explain",
            [
                problem(
                    where,
                    "explain_batch_too_large",
                    f"{n} patients to explain in one call, over the limit of {limit} (an explanation "
                    "takes ~2 MB per patient while it is computed)",
                    expected=f"at most {limit} patients per explain call (split the batch, or predict "
                    "without explain)",
                )
            ],
        )


def _explainer_of(model: Model) -> None:
    """409, not 404: the model exists and predicts; its bundle was exported without an explainer."""
    if model.explainer is None:
        raise Problems(
            409,
            f"model {model.task!r} (version {model.version}) has no explainer",
            [
                problem(
                    "path.model",
                    "no_explainer",
                    f"the bundle of {model.task!r} version {model.version} carries no explainer.onnx, so "
                    "its predictions cannot be explained",
                    expected="a bundle whose manifest has an 'explainer' section (masml exports one with "
                    "every risk and il1_benefit bundle; bundles from before explanations have none), or "
                    "predict without explain",
                )
            ],
        )


@dataclass(frozen=True)
class ExplainOptions:
    top: int = TOP_DEFAULT
    features: bool = False


def _explain_options(body: dict, model: Model, always: bool) -> ExplainOptions | None:
    """``explain``/``top``/``features`` of a predict or explain body; None when nothing is to be explained.

    Why reject ``top`` without ``explain``: a client that sends it expects explanations, and silently
    answering without them would look like a model with nothing to say.
    """
    probs = []
    explain = body.get("explain", always)
    if type(explain) is not bool:
        probs.append(problem("body.explain", "type", "explain must be true or false", explain, "a boolean"))
    k = len(model.encoder.names)
    top = body.get("top", TOP_DEFAULT if k >= TOP_DEFAULT else k)
    if type(top) is not int or not 1 <= top <= k:
        probs.append(
            problem(
                "body.top",
                "out_of_range",
                f"top must be an integer from 1 to {k} (the model's number of inputs)",
                top,
                f"an integer between 1 and {k}",
            )
        )
    features = body.get("features", False)
    if type(features) is not bool:
        probs.append(
            problem("body.features", "type", "features must be true or false", features, "a boolean")
        )
    if probs:
        raise Problems(422, "invalid input", probs)
    if not explain:
        extra = sorted({"top", "features"} & set(body))
        if extra:
            raise invalid(
                f"body.{extra[0]}",
                "needs_explain",
                f"{' and '.join(map(repr, extra))} only make sense with explanations",
                expected='"explain": true, or POST /v1/models/{task}/explain',
            )
        return None
    _explainer_of(model)
    return ExplainOptions(top=top, features=features)


def _run(model: Model, x32: np.ndarray, explain: bool) -> tuple[dict, dict | None]:
    """The outputs, and the explainer's when asked.

    Why two threads for a small explain call: the two graphs are independent and onnxruntime lets go of
    the GIL, so scoring runs beside the (several times dearer) explainer. One patient on the 300-tree
    bench bundle, wrk, four interleaved rounds: p50 1.12 against 1.21 ms, p99 2.1 against 2.6 ms, and 8
    clients 1.5% to 8% more calls per second. Only when ``model.run`` makes one call (at most
    ``piece_rows`` rows): a bigger batch splits itself over the same pool, and pool tasks waiting on
    pool tasks could deadlock it."""
    if not (explain and model.explainer):
        return model.run(x32), None
    if BATCH_THREADS > 1 and (model.piece_rows is None or x32.shape[0] <= model.piece_rows):
        scored = BATCH_POOL.submit(model.run, x32)
        explained = model.explainer.run(x32)
        return scored.result(), explained
    return model.run(x32), model.explainer.run(x32)


async def _score(
    state: State,
    model: Model,
    x64: np.ndarray,
    ctx: dict,
    endpoint: str,
    guard: bool = True,
    explain: bool = False,
) -> tuple[dict[str, np.ndarray], list[list[dict]] | None, dict[str, np.ndarray] | None]:
    """Model outputs, guardrail flags and (when asked) the explainer's outputs; the audit line and
    metrics are left in ``ctx["record"]`` for the endpoint wrapper to run after the answer (``_record``)."""
    x32 = x64.astype(np.float32)
    if x32.shape[0] > (EXPLAIN_THREAD_ROWS if explain else THREAD_ROWS):
        outputs, explained = await anyio.to_thread.run_sync(_run, model, x32, explain)
    else:
        outputs, explained = _run(model, x32, explain)
    flags = model.guardrails.evaluate(x64, outputs) if (guard and model.guardrails) else None
    exposed = {k: outputs[k] for k in model.outputs}
    record = functools.partial(_record, state, model, x32, x64, exposed, flags, explained, ctx, endpoint)
    ctx["record"] = record
    return exposed, flags, explained


def _record(
    state: State,
    model: Model,
    x32: np.ndarray,
    x64: np.ndarray,
    exposed: dict[str, np.ndarray],
    flags: list[list[dict]] | None,
    explained: dict[str, np.ndarray] | None,
    ctx: dict,
    endpoint: str,
) -> None:
    """The audit line(s) and the prediction metrics of one scoring call, run after its answer is sent.

    Why after: for one patient they cost 25-40 µs of a ~180 µs call in process; done once the answer is
    in the socket, they overlap the client's turn instead of adding to its wait (wrk, one patient, four
    interleaved rounds on a slow spell: p50 462-489 against 506-606 µs). They still run before the
    server reads its next request, so ``/metrics`` never lags. The price, stated in the README: if the
    audit line cannot be written (full disk), the client already has its answer; the failure is logged
    at ERROR with the request id and counted as ``masml_errors_total{kind="audit"}`` instead of turning
    a computed prediction into a 500. The audit line goes first, so that nothing after it can cost it."""
    audit_extra = None if explained is None else {"explainer_sha256": model.explainer.sha256}  # type: ignore[union-attr]
    try:
        state.audit.write(
            ctx["request_id"],
            endpoint,
            model,
            x32,
            {k: v.tolist() for k, v in exposed.items()},
            ctx.get("principal"),
            audit_extra,
        )
    except OSError:
        log.exception("could not record request %s (audit line)", ctx["request_id"])
        state.metrics.error("audit")
    state.metrics.scored(model.task, model.encoder.names, x64, exposed)
    if flags is not None:
        for row in flags:
            for f in row:
                state.metrics.guardrails[(model.task, f["id"], f["status"])] += 1
    if explained is not None:
        state.metrics.explained[model.task] += x32.shape[0]


def _shown(spec: Any, v: float) -> Any:
    """A canonical matrix value as the client knows it: category label, 0/1, number; None if missing."""
    if v != v:
        return None
    if spec.kind == "category":
        return spec.categories[int(v)]
    return int(v) if spec.kind == "binary" else v


def _explanations(model: Model, x64: np.ndarray, out: dict[str, np.ndarray], opts: ExplainOptions) -> list:
    """Per patient: base_value + Σ contributions = margin (log-odds), and the top |contribution| inputs
    with the value used (after unit conversion) and its canonical unit.

    An explainer of several models (the benefit bundle's) answers one such block per model and for their
    difference, by block name: ``{"untreated": {...}, "treated": {...}, "difference": {...}}``."""
    e = model.explainer
    assert e is not None
    if not e.multi:
        return _explanation_block(model, x64, out, opts, "")
    blocks = [(name, _explanation_block(model, x64, out, opts, prefix)) for name, prefix in e.blocks]
    return [{name: items[i] for name, items in blocks} for i in range(x64.shape[0])]


def _explanation_block(
    model: Model, x64: np.ndarray, out: dict[str, np.ndarray], opts: ExplainOptions, prefix: str
) -> list[dict]:
    """One block per patient from the explainer outputs named ``prefix`` + the four names."""
    e = model.explainer
    assert e is not None
    names, specs = e.input_names, model.encoder.specs
    ic = out[prefix + "input_contributions"]
    order = np.argsort(-np.abs(ic), axis=1, kind="stable")[:, : opts.top].tolist()
    rows, base, margin = ic.tolist(), out[prefix + "base_value"].tolist(), out[prefix + "margin"].tolist()
    feats = out[prefix + "contributions"].tolist() if opts.features else None
    units = [s.unit if s.kind == "numeric" else None for s in specs]
    result = []
    for i, row in enumerate(rows):
        xi = x64[i].tolist()
        item: dict[str, Any] = {
            "base_value": base[i],
            "margin": margin[i],
            "contributions": dict(zip(names, row, strict=True)),
            "top": [
                {
                    "input": names[j],
                    "contribution": row[j],
                    "value": _shown(specs[j], xi[j]),
                    "unit": units[j],
                }
                for j in order[i]
            ],
        }
        if feats is not None:
            item["feature_contributions"] = dict(zip(e.feature_names, feats[i], strict=True))
        result.append(item)
    return result


def _model_ref(m: Model) -> dict:
    return {"task": m.task, "name": m.name, "version": m.version, "sha256": m.sha256}


async def _reload(state: State, why: str) -> dict:
    assert state.reload_lock is not None
    async with state.reload_lock:
        t0 = time.perf_counter()
        snap = await anyio.to_thread.run_sync(state.reload)
        log.info(
            "reload (%s): %d model(s) serving, %d refused, %.0f ms",
            why,
            len(snap.models),
            len(snap.refused),
            1e3 * (time.perf_counter() - t0),
        )
        return {
            "generation": snap.generation,
            "models": [_model_ref(m) for m in snap.models.values()],
            "refused": snap.refused,
        }


async def _watch_reload_file(state: State) -> None:
    """With several workers, /admin/reload touches a shared file and every worker reloads from it."""
    path = Path(state.config.reload_file)  # type: ignore[arg-type]
    state.reload_mtime = path.stat().st_mtime if path.exists() else 0.0
    while True:
        await asyncio.sleep(0.5)
        try:
            mtime = path.stat().st_mtime if path.exists() else 0.0
        except OSError:
            continue
        if mtime != state.reload_mtime:
            state.reload_mtime = mtime
            await _reload(state, "reload file")


# --- masml REST -----------------------------------------------------------------------------------------


async def healthz(request: Request, state: State, ctx: dict) -> Response:
    return json_response({"status": "alive"})


async def readyz(request: Request, state: State, ctx: dict) -> Response:
    snap = state.snapshot
    ready = bool(snap.models)
    return json_response(
        {"ready": ready, "models": sorted(snap.models), "refused": len(snap.refused)}, 200 if ready else 503
    )


async def version(request: Request, state: State, ctx: dict) -> Response:
    return json_response({"name": "masml-serve", "version": __version__})


async def openapi(request: Request, state: State, ctx: dict) -> Response:
    return json_response(build_spec(state.snapshot, state.config))


async def metrics(request: Request, state: State, ctx: dict) -> Response:
    text = state.metrics.render({t: m.encoder.names for t, m in state.snapshot.models.items()})
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def list_models(request: Request, state: State, ctx: dict) -> Response:
    snap = state.snapshot
    return json_response({"models": [m.summary() for m in snap.models.values()], "refused": snap.refused})


async def get_model(request: Request, state: State, ctx: dict) -> Response:
    return json_response(_model(state, request.path_params["task"], ctx).summary())


async def admin_reload(request: Request, state: State, ctx: dict) -> Response:
    result = await _reload(state, "POST /admin/reload")
    if state.config.reload_file:  # tell the other workers; ours just reloaded
        p = Path(state.config.reload_file)
        p.touch()
        state.reload_mtime = p.stat().st_mtime
    return json_response(result)


async def predict(request: Request, state: State, ctx: dict) -> Response:
    return await _predict(request, state, ctx, "predict")


async def explain(request: Request, state: State, ctx: dict) -> Response:
    """Predict with ``explain`` implied: the same body, validation and answer, each row explained."""
    return await _predict(request, state, ctx, "explain")


async def _predict(request: Request, state: State, ctx: dict, endpoint: str) -> Response:
    model = _model(state, request.path_params["task"], ctx)
    fields = PREDICT_FIELDS if endpoint == "predict" else EXPLAIN_FIELDS
    raw = await _read_body(request, state)
    fast = _fast_path(model, raw)
    clean = fast.read(raw, fields) if fast else None
    body = clean[0] if clean is not None else _object(_decode(raw), set(fields))
    opts = _explain_options(body, model, always=endpoint == "explain")
    patients = clean[2] if clean is not None else body.get("patients")  # the ids: one per patient
    if isinstance(patients, list):
        _batch_size_ok(len(patients), state, "patients")
        if opts is not None:
            _explain_batch_ok(len(patients), state, "patients")
    elif "patients" not in body:
        raise invalid("patients", "required", "'patients' is required", expected="a list of patient objects")
    x64, ids = clean[1:] if clean is not None else model.encoder.encode(patients, "patients")
    outputs, flags, explained = await _score(state, model, x64, ctx, endpoint, explain=opts is not None)
    cols = {k: v.tolist() for k, v in outputs.items()}
    expl = _explanations(model, x64, explained, opts) if explained is not None and opts else None
    preds = []
    for i in range(len(ids)):
        row: dict[str, Any] = {"patient_id": ids[i]} if ids[i] is not None else {}
        for k, v in cols.items():
            row[k] = v[i]
        row["guardrails"] = flags[i] if flags is not None else []
        if expl is not None:
            row["explanation"] = expl[i]
        preds.append(row)
    resp = {"request_id": ctx["request_id"], "model": _model_ref(model), "predictions": preds}
    if expl is not None:
        resp["explainer"] = {
            "sha256": model.explainer.sha256,  # type: ignore[union-attr]
            "units": "log-odds (the model's margin, before calibration)",
        }
    return json_response(resp)


# --- MLflow scoring protocol ----------------------------------------------------------------------------


async def invocations(request: Request, state: State, ctx: dict) -> Response:
    """MLflow's ``/invocations``: one served model by default, ``?model=<task>`` when several are loaded.

    Each record holds the outputs as numbers under their names; for a bundle with guardrails it also holds
    ``guardrails``, the same list of flags as REST predict (MLflow clients read records as objects, so an
    extra key keeps the answer valid for them).
    """
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise Problems(
            415,
            "unsupported content type",
            [
                problem(
                    "headers.content-type",
                    "unsupported_media_type",
                    f"{ctype!r}",
                    expected="application/json",
                )
            ],
        )
    snap = state.snapshot
    name = request.query_params.get("model")
    if name is None:
        if len(snap.models) != 1:
            raise Problems(
                400,
                "several models are served: choose one with ?model=<task>",
                [
                    problem(
                        "query.model",
                        "required",
                        "which model to use",
                        expected=f"one of {sorted(snap.models)}",
                    )
                ],
            )
        name = next(iter(snap.models))
    model = _model(state, name, ctx)
    raw = await _read_body(request, state)
    fast = _fast_path(model, raw)
    clean = fast.read(raw, RECORDS_FIELDS) if fast else None
    if clean is not None:  # a clean dataframe_records batch, already checked and encoded
        _batch_size_ok(len(clean[2]), state, "dataframe_records")
        return await _invocations_answer(state, model, clean[1], ctx)
    split = fast.read_split(raw) if fast else None
    if split is not None:  # the same for dataframe_split
        _batch_size_ok(len(split[1]), state, "dataframe_split.data")
        return await _invocations_answer(state, model, split[0], ctx)
    body = _decode(raw)
    formats = {"dataframe_split", "dataframe_records"}
    body = _object(body, formats | {"params"})
    given = [k for k in formats if k in body]
    if len(given) != 1:
        raise invalid(
            "body",
            "format",
            "exactly one of dataframe_split or dataframe_records is needed",
            expected=sorted(formats),
        )
    if given[0] == "dataframe_records":
        where, patients = "dataframe_records", body["dataframe_records"]
    else:
        where, patients = "dataframe_split.data", _split_to_records(body["dataframe_split"])
    if isinstance(patients, list):
        _batch_size_ok(len(patients), state, where)
    x64, _ = model.encoder.encode(patients, where)
    return await _invocations_answer(state, model, x64, ctx)


async def _invocations_answer(state: State, model: Model, x64: np.ndarray, ctx: dict) -> Response:
    outputs, flags, _ = await _score(state, model, x64, ctx, "invocations")
    cols = {k: v.tolist() for k, v in outputs.items()}
    preds = [{k: cols[k][i] for k in cols} for i in range(x64.shape[0])]
    if flags is not None:  # a bundle with guardrails: each record carries them, as REST predict does
        for row, f in zip(preds, flags, strict=True):
            row["guardrails"] = f
    return json_response({"predictions": preds})


def _split_to_records(split: Any) -> Any:
    where = "dataframe_split"
    if (
        not isinstance(split, dict)
        or not isinstance(split.get("columns"), list)
        or not isinstance(split.get("data"), list)
    ):
        raise invalid(
            where,
            "type",
            "dataframe_split must be an object with 'columns' (list of names) and 'data' (list of rows)",
        )
    extra = sorted(set(split) - {"columns", "data", "index"})
    cols = split["columns"]
    probs = [problem(f"{where}.{k}", "unknown_field", f"unknown field {k!r}") for k in extra]
    if not all(isinstance(c, str) for c in cols) or len(set(cols)) != len(cols):
        probs.append(problem(f"{where}.columns", "type", "columns must be distinct strings", value=cols))
    for i, row in enumerate(split["data"]):
        if not isinstance(row, list) or len(row) != len(cols):
            probs.append(
                problem(
                    f"{where}.data[{i}]", "shape", f"a row must be a list of {len(cols)} values", value=row
                )
            )
    if probs:
        raise Problems(422, "invalid input", probs)
    return [dict(zip(cols, row, strict=True)) for row in split["data"]]


# --- Open Inference Protocol (KServe v2) ----------------------------------------------------------------


async def v2_server(request: Request, state: State, ctx: dict) -> Response:
    return json_response(
        {"name": "masml-serve", "version": __version__, "extensions": ["binary_tensor_data", "explain"]}
    )


async def v2_live(request: Request, state: State, ctx: dict) -> Response:
    return Response(status_code=200)


async def v2_ready(request: Request, state: State, ctx: dict) -> Response:
    return Response(status_code=200 if state.snapshot.models else 503)


def _check_version(request: Request, model: Model) -> None:
    v = request.path_params.get("v")
    if v is not None and v != model.version:
        raise Problems(404, f"model {model.task!r} has no version {v!r} (serving {model.version})")


def _oip_outputs(m: Model) -> list[str]:
    """What ``infer`` can return: the graph's exposed outputs, then ``guardrails`` if the bundle has rules."""
    return [*m.outputs, GUARDRAILS_OUTPUT] if m.guardrails else m.outputs


async def v2_model(request: Request, state: State, ctx: dict) -> Response:
    m = _model(state, request.path_params["m"], ctx)
    _check_version(request, m)
    params: dict[str, Any] = {
        "input_columns": m.encoder.names,
        "sha256": m.sha256,
        "model_name": m.name,
        "explainer": m.explainer is not None,  # POST /v2/models/{m}/explain answers
    }
    outputs = [{"name": o, "datatype": "FP32", "shape": [-1]} for o in m.outputs]
    if m.guardrails:
        outputs.append({"name": GUARDRAILS_OUTPUT, "datatype": "BYTES", "shape": [-1]})
        params["guardrails_output"] = GUARDRAILS_TENSOR_TEXT
    return json_response(
        {
            "name": m.task,
            "versions": [m.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": m.input_name, "datatype": "FP32", "shape": [-1, len(m.encoder.names)]}],
            "outputs": outputs,
            "parameters": params,
        }
    )


async def v2_model_ready(request: Request, state: State, ctx: dict) -> Response:
    m = _model(state, request.path_params["m"], ctx)
    _check_version(request, m)
    return Response(status_code=200)


def _flat_numbers(data: Any, where: str) -> list:
    flat = data
    for _ in range(3):
        if flat and all(isinstance(r, list) for r in flat):
            flat = list(chain.from_iterable(flat))
    if not isinstance(flat, list) or not set(map(type, flat)) <= {int, float, type(None)}:
        raise Problems(
            400,
            "invalid input tensor",
            [problem(where, "type", "data must be a (nested) list of numbers (null = missing)")],
        )
    return flat


class _FlatTensor(msgspec.Struct):
    """An OIP input tensor whose ``data`` is a flat list of numbers and nulls (what clients send)."""

    name: Any = None
    datatype: Any = None
    shape: Any = None
    data: list[float | None] | None = None
    parameters: Any = None


class _FlatInfer(msgspec.Struct):
    id: Any = None
    parameters: Any = None
    inputs: list[_FlatTensor] | None = None
    outputs: Any = None


_flat_infer = msgspec.json.Decoder(_FlatInfer)


def _decode_infer(raw: bytes) -> tuple[Any, bool]:
    """An OIP body as plain objects, and whether every tensor's ``data`` is already a checked flat list
    of floats and None.

    Why decode twice at worst: msgspec checks ``list[float | None]`` in C while it parses, for no more
    time than an untyped decode, where checking 35,000 values in Python (``_flat_numbers``) costs
    ~1 ms of a 1,000-patient call. Anything else (nested data, a string, a boolean, a number too large,
    a field of another type) fails the typed decode and is decoded again untyped, so it gets the same
    checks and the same errors as before. A field left out and a field sent as null read the same
    (``None``) either way."""
    try:
        b = _flat_infer.decode(raw)
    except msgspec.DecodeError:  # not the flat shape, or not JSON at all: the general path says why
        return _decode(raw), False
    tensors = None if b.inputs is None else [msgspec.structs.asdict(t) for t in b.inputs]
    checked = b.inputs is not None and all(t.data is not None for t in b.inputs)  # absent/null: not checked
    return {"id": b.id, "parameters": b.parameters, "inputs": tensors, "outputs": b.outputs}, checked


@dataclass
class OipRequest:
    x32: np.ndarray
    req_id: str | None
    wanted: Any  # the body's "outputs", or None for every output
    binary_out: bool  # parameters.binary_data_output


async def _oip_request(
    request: Request, state: State, model: Model, max_rows: Callable[[int, str], None]
) -> OipRequest:
    """An OIP body (JSON, or JSON + binary tensor data) as the checked float32 [N, K] matrix."""
    raw = await _read_body(request, state)
    header_len = request.headers.get("inference-header-content-length")
    binary = b""
    if header_len is not None:
        try:
            n = int(header_len)
            if not 0 < n <= len(raw):
                raise ValueError
        except ValueError:
            raise Problems(400, "invalid Inference-Header-Content-Length") from None
        raw, binary = raw[:n], raw[n:]
    body, flat_checked = _decode_infer(raw)
    if not isinstance(body, dict):
        raise Problems(400, "the request must be a JSON object")
    req_id = body.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise Problems(400, "'id' must be a string")
    params = body.get("parameters") or {}
    inputs = body.get("inputs")
    if (
        not isinstance(params, dict)
        or not isinstance(inputs, list)
        or len(inputs) != 1
        or not isinstance(inputs[0], dict)
    ):
        raise Problems(400, f"'inputs' must hold exactly one tensor, {model.input_name!r}")
    t = inputs[0]
    k = len(model.encoder.names)
    where = f"inputs[0] ({model.input_name})"
    if t.get("name") != model.input_name or t.get("datatype") != "FP32":
        raise Problems(
            400,
            f"expected input {model.input_name!r} with datatype FP32, got "
            f"{t.get('name')!r} {t.get('datatype')!r}",
        )
    shape = t.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(s) is int for s in shape)
        and shape[1] == k
        and shape[0] >= 1
    ):
        raise Problems(400, f"shape must be [N, {k}] with N >= 1, got {shape!r}")
    max_rows(shape[0], where)
    tparams = t.get("parameters") or {}
    size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
    if size is not None:
        if type(size) is not int or size != len(binary) or size != shape[0] * k * 4:
            raise Problems(
                400,
                f"binary_data_size must be {shape[0] * k * 4} bytes for shape {shape}, "
                f"and the body must carry exactly that many",
            )
        x32 = np.frombuffer(binary, dtype="<f4").reshape(shape[0], k)
    else:
        if binary:
            raise Problems(400, "binary data was sent but no input declares binary_data_size")
        flat = t.get("data") if flat_checked else _flat_numbers(t.get("data"), where)
        if len(flat) != shape[0] * k:
            raise Problems(400, f"data holds {len(flat)} values, shape {shape} needs {shape[0] * k}")
        if None in flat:  # numpy's conversion takes a slow path for None: NaN first is ~1 ms less
            nan = math.nan
            flat = [nan if v is None else v for v in flat]
        try:
            x32 = np.array(flat, dtype=np.float64).astype(np.float32).reshape(shape[0], k)
        except OverflowError:
            raise Problems(400, "a value does not fit in FP32") from None
    model.encoder.check_matrix(x32, where)
    return OipRequest(x32, req_id, body.get("outputs"), bool(params.get("binary_data_output", False)))


def _selected(req: OipRequest, available: list[str]) -> tuple[list[str], dict[str, bool]]:
    """The output names the request asks for (default: all ``available``) and which of them go binary."""
    if req.wanted is None:
        return available, {}
    if not isinstance(req.wanted, list) or not all(
        isinstance(o, dict) and o.get("name") in available for o in req.wanted
    ):
        raise Problems(400, f"requested outputs must be among {available}")
    per_binary = {
        o["name"]: bool((o.get("parameters") or {}).get("binary_data", req.binary_out)) for o in req.wanted
    }
    return [o["name"] for o in req.wanted], per_binary


def _oip_response(
    model: Model,
    req: OipRequest,
    outputs: dict[str, np.ndarray],
    extra: dict | None = None,
    strings: dict[str, list[bytes]] | None = None,
) -> Response:
    """The requested (default: all) ``outputs`` as FP32 tensors and ``strings`` as BYTES tensors of shape
    [N] (UTF-8), JSON or binary as the request asked.

    BYTES follow the protocol: in JSON, ``data`` is a list of strings; in binary, each element is its
    length (4 bytes, little-endian) then its bytes, and ``binary_data_size`` counts both.
    """
    strings = strings or {}
    names, per_binary = _selected(req, [*outputs, *strings])
    out_meta, blobs = [], []
    for name in names:
        binary = per_binary.get(name, req.binary_out)
        meta: dict[str, Any]
        if name in strings:
            items = strings[name]
            meta = {"name": name, "datatype": "BYTES", "shape": [len(items)]}
            if binary:
                blob = b"".join(struct.pack("<I", len(b)) + b for b in items)
                meta["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                meta["data"] = [b.decode() for b in items]
            out_meta.append(meta)
            continue
        v = np.ascontiguousarray(outputs[name], dtype="<f4")
        meta = {"name": name, "datatype": "FP32", "shape": [int(d) for d in v.shape]}
        if binary:
            meta["parameters"] = {"binary_data_size": v.nbytes}
            blobs.append(v.tobytes())
        else:
            meta["data"] = v.reshape(-1).tolist()
        out_meta.append(meta)
    resp: dict[str, Any] = {"model_name": model.task, "model_version": model.version, "outputs": out_meta}
    if req.req_id is not None:
        resp["id"] = req.req_id
    if extra:
        resp["parameters"] = extra
    head = _enc.encode(resp)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


async def v2_infer(request: Request, state: State, ctx: dict) -> Response:
    model = _model(state, request.path_params["m"], ctx)
    _check_version(request, model)
    req = await _oip_request(request, state, model, lambda n, where: _batch_size_ok(n, state, where))
    names, _ = _selected(req, _oip_outputs(model))  # a bad "outputs" is refused before scoring
    guard = GUARDRAILS_OUTPUT in names  # not asked for (client named other outputs): not evaluated
    outputs, flags, _ = await _score(state, model, req.x32.astype(np.float64), ctx, "v2_infer", guard=guard)
    strings = {GUARDRAILS_OUTPUT: [_enc.encode(f) for f in flags]} if flags is not None else None
    return _oip_response(model, req, outputs, strings=strings)


async def v2_explain(request: Request, state: State, ctx: dict) -> Response:
    """OIP extension: the explainer's four tensors for the ``infer`` input; columns in ``parameters``.

    A benefit bundle answers the four per block, named ``untreated_*``, ``treated_*`` and ``difference_*``
    (e.g. ``difference_margin`` = the log odds ratio), with the block names in ``parameters.blocks``."""
    model = _model(state, request.path_params["m"], ctx)
    _check_version(request, model)
    _explainer_of(model)

    def rows_ok(n: int, where: str) -> None:
        _batch_size_ok(n, state, where)
        _explain_batch_ok(n, state, where)

    req = await _oip_request(request, state, model, rows_ok)
    x64 = req.x32.astype(np.float64)
    _, _, explained = await _score(state, model, x64, ctx, "v2_explain", guard=False, explain=True)
    e = model.explainer
    assert e is not None and explained is not None
    columns: dict[str, Any] = {
        "contributions_columns": e.feature_names,
        "input_contributions_columns": e.input_names,
    }
    if e.multi:  # tensors are "<block>_contributions", ...: say which blocks, and what they explain
        columns["blocks"] = [name for name, _ in e.blocks]
        columns["explains"] = e.section.get("explains")
    return _oip_response(model, req, explained, columns)
