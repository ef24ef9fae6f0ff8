"""MLflow's scoring protocol, ``POST /invocations``, so callers written for ``mlflow models serve`` work
unchanged: ``dataframe_records`` (patient objects) or ``dataframe_split`` (columns and rows)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from serve.bundles import Model
from serve.problems import Problems, invalid, problem
from serve.scoring import (
    check_batch_size,
    check_object,
    decode_json,
    fast_path,
    find_model,
    json_response,
    read_body,
    score,
)

if TYPE_CHECKING:
    from serve.app import State

RECORDS_FIELDS = ("dataframe_records", "params")  # the patients' field first (``CleanBatch.read``'s order)


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
    model = find_model(state, name, ctx)
    raw = await read_body(request, state)
    fast = fast_path(model, raw)
    clean = fast.read(raw, RECORDS_FIELDS) if fast else None
    if clean is not None:  # a clean dataframe_records batch, already checked and encoded
        check_batch_size(len(clean[2]), state, "dataframe_records")
        return await _invocations_answer(state, model, clean[1], ctx)
    split = fast.read_split(raw) if fast else None
    if split is not None:  # the same for dataframe_split
        check_batch_size(len(split[1]), state, "dataframe_split.data")
        return await _invocations_answer(state, model, split[0], ctx)
    body = decode_json(raw)
    formats = {"dataframe_split", "dataframe_records"}
    body = check_object(body, formats | {"params"})
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
        where, patients = "dataframe_split.data", split_to_records(body["dataframe_split"])
    if isinstance(patients, list):
        check_batch_size(len(patients), state, where)
    x64, _ = model.encoder.encode(patients, where)
    return await _invocations_answer(state, model, x64, ctx)


async def _invocations_answer(state: State, model: Model, x64: np.ndarray, ctx: dict) -> Response:
    outputs, flags, _ = await score(state, model, x64, ctx, "invocations")
    cols = {k: v.tolist() for k, v in outputs.items()}
    preds = [{k: cols[k][i] for k in cols} for i in range(x64.shape[0])]
    if flags is not None:  # a bundle with guardrails: each record carries them, as REST predict does
        for row, f in zip(preds, flags, strict=True):
            row["guardrails"] = f
    return json_response({"predictions": preds})


def split_to_records(split: Any) -> Any:
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
