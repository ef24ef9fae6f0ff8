"""What every protocol's endpoints share: who may call, reading and decoding the body, finding the model,
scoring it, explaining it, and what is recorded after the answer.

Why one module under three protocols (``rest``, ``mlflow_protocol``, ``oip``): they differ only in how a
request and its answer are spelled; the checks, the limits, the audit line and the metrics must be the
same whichever way a patient arrives, so they are written once, here.

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
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from serve.bundles import BATCH_POOL, BATCH_THREADS, Model
from serve.clean_batch import CleanBatch
from serve.problems import Problems, invalid, problem
from serve.security import digest, is_loopback

if TYPE_CHECKING:
    from serve.app import State

log = logging.getLogger("serve")
THREAD_ROWS = 64  # batches above this run in a worker thread so the event loop keeps serving
EXPLAIN_THREAD_ROWS = 4  # explaining costs ~0.5 ms per row for 300 trees: move off the loop sooner
TOP_DEFAULT = 5  # inputs listed in an explanation's ``top`` unless the request says ``"top": k``
_dec = msgspec.json.Decoder()


def _enc_hook(obj: Any) -> Any:
    """numpy scalars (e.g. an offending value echoed in a problem) and anything else as text."""
    return obj.item() if isinstance(obj, np.generic) else str(obj)


json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_encoder.encode(body), status, headers, media_type="application/json")


def authorise(request: Request, state: State, role: str) -> str | None:
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


async def read_body(request: Request, state: State) -> bytes:
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


def decode_json(raw: bytes) -> Any:
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


# Below this size a body holds a few patients, and the detailed path reads them faster: one patient,
# 16 against 45 µs; four, 49 against 60 µs; eight, 394 against 73 µs (bench bodies, ~1 KB a patient).
SMALL_BODY = 2048


def fast_path(model: Model, raw: bytes) -> CleanBatch | None:
    """The model's typed fast path (serve/clean_batch.py) when the body is big enough to gain from it.
    Whatever it does not read as a clean batch, the caller reads on the detailed path, which names
    every problem."""
    return model.clean if len(raw) >= SMALL_BODY else None


def find_model(state: State, name: str, ctx: dict) -> Model:
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


def check_object(body: Any, allowed: set[str], where: str = "body") -> dict:
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


def check_batch_size(n: int, state: State, where: str) -> None:
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


def check_explain_batch(n: int, state: State, where: str) -> None:
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


def require_explainer(model: Model) -> None:
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


def explain_options(body: dict, model: Model, always: bool) -> ExplainOptions | None:
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
    require_explainer(model)
    return ExplainOptions(top=top, features=features)


def run_graphs(model: Model, x32: np.ndarray, explain: bool) -> tuple[dict, dict | None]:
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


async def score(
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
        outputs, explained = await anyio.to_thread.run_sync(run_graphs, model, x32, explain)
    else:
        outputs, explained = run_graphs(model, x32, explain)
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


def explanations(model: Model, x64: np.ndarray, out: dict[str, np.ndarray], opts: ExplainOptions) -> list:
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


def model_ref(m: Model) -> dict:
    return {"task": m.task, "name": m.name, "version": m.version, "sha256": m.sha256}


async def reload_models(state: State, why: str) -> dict:
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
            "models": [model_ref(m) for m in snap.models.values()],
            "refused": snap.refused,
        }


async def watch_reload_file(state: State) -> None:
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
            await reload_models(state, "reload file")
