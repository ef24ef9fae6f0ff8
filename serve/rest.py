"""masml's own REST API: health, the model list, ``predict`` and ``explain`` on patient objects, and the
admin reload."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from serve import __version__
from serve.openapi import build_spec
from serve.problems import invalid
from serve.scoring import (
    check_batch_size,
    check_explain_batch,
    check_object,
    decode_json,
    explain_options,
    explanations,
    fast_path,
    find_model,
    json_response,
    model_ref,
    read_body,
    reload_models,
    score,
)

if TYPE_CHECKING:
    from serve.app import State

# Body fields of predict and explain, the patients' field first (``CleanBatch.read``'s order).
PREDICT_FIELDS = ("patients", "top", "features", "explain")
EXPLAIN_FIELDS = ("patients", "top", "features")


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
    return json_response(find_model(state, request.path_params["task"], ctx).summary())


async def admin_reload(request: Request, state: State, ctx: dict) -> Response:
    result = await reload_models(state, "POST /admin/reload")
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
    model = find_model(state, request.path_params["task"], ctx)
    fields = PREDICT_FIELDS if endpoint == "predict" else EXPLAIN_FIELDS
    raw = await read_body(request, state)
    fast = fast_path(model, raw)
    clean = fast.read(raw, fields) if fast else None
    body = clean[0] if clean is not None else check_object(decode_json(raw), set(fields))
    opts = explain_options(body, model, always=endpoint == "explain")
    patients = clean[2] if clean is not None else body.get("patients")  # the ids: one per patient
    if isinstance(patients, list):
        check_batch_size(len(patients), state, "patients")
        if opts is not None:
            check_explain_batch(len(patients), state, "patients")
    elif "patients" not in body:
        raise invalid("patients", "required", "'patients' is required", expected="a list of patient objects")
    x64, ids = clean[1:] if clean is not None else model.encoder.encode(patients, "patients")
    outputs, flags, explained = await score(state, model, x64, ctx, endpoint, explain=opts is not None)
    cols = {k: v.tolist() for k, v in outputs.items()}
    expl = explanations(model, x64, explained, opts) if explained is not None and opts else None
    preds = []
    for i in range(len(ids)):
        row: dict[str, Any] = {"patient_id": ids[i]} if ids[i] is not None else {}
        for k, v in cols.items():
            row[k] = v[i]
        row["guardrails"] = flags[i] if flags is not None else []
        if expl is not None:
            row["explanation"] = expl[i]
        preds.append(row)
    resp = {"request_id": ctx["request_id"], "model": model_ref(model), "predictions": preds}
    if expl is not None:
        resp["explainer"] = {
            "sha256": model.explainer.sha256,  # type: ignore[union-attr]
            "units": "log-odds (the model's margin, before calibration)",
        }
    return json_response(resp)
