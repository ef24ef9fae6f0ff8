"""The HTTP application: its configuration, the routes of three protocols, and the one wrapper every
endpoint runs in.

The endpoints live by protocol: ``rest`` (masml's own API), ``mlflow_protocol`` (``/invocations``) and
``oip`` (the Open Inference Protocol); what they share (auth, the body, scoring, explanations, what is
recorded) is in ``scoring``.

Why plain Starlette endpoints and no middleware stack: one patient must be scored in well under a
millisecond end to end, so auth, timing, metrics and error mapping are done by one small wrapper per
endpoint instead of layers of ASGI middleware. Why every handler ends in ``Problems`` or a response: a
client can never cause a 500; anything unexpected is still answered as JSON and counted.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Address, Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serve.bundles import Snapshot, load_folder
from serve.metrics import Metrics
from serve.mlflow_protocol import invocations
from serve.oip import v2_explain, v2_infer, v2_live, v2_model, v2_model_ready, v2_ready, v2_server
from serve.problems import Problems, problem
from serve.rest import (
    admin_reload,
    explain,
    get_model,
    healthz,
    list_models,
    metrics,
    openapi,
    predict,
    readyz,
    version,
)
from serve.scoring import authorise, json_response, reload_models, watch_reload_file
from serve.security import Audit, Keys, is_loopback

log = logging.getLogger("serve")


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
                    ctx["principal"] = authorise(request, state, role)
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
            on_hup = lambda: asyncio.ensure_future(reload_models(state, "SIGHUP"))  # noqa: E731
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no SIGHUP
            pass
        watcher = asyncio.ensure_future(watch_reload_file(state)) if config.reload_file else None
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
    app.middleware_stack = ScoringFastPath(app.build_middleware_stack(), hot, invocations_ep)
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
