"""The Open Inference Protocol (KServe v2 / Triton REST): health, model metadata, ``infer`` and
``explain`` on one FP32 tensor in the manifest's input order, JSON or binary tensor data."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from serve import __version__
from serve.bundles import Model
from serve.problems import Problems, problem
from serve.scoring import (
    check_batch_size,
    check_explain_batch,
    decode_json,
    find_model,
    json_encoder,
    json_response,
    read_body,
    require_explainer,
    score,
)

if TYPE_CHECKING:
    from serve.app import State

# OIP: a bundle with guardrails answers ``infer`` with one more tensor, BYTES [N], one JSON text per patient.
GUARDRAILS_OUTPUT = "guardrails"
GUARDRAILS_TENSOR_TEXT = (
    "BYTES [N]: per patient, a UTF-8 JSON array of the manifest's guardrail flags, "
    '[{"id", "status" (fires|clear|unknown), "message", "kind" (when the rule has one)}], '
    "the same list as REST predict's 'guardrails'"
)


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
    m = find_model(state, request.path_params["m"], ctx)
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
    m = find_model(state, request.path_params["m"], ctx)
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
        return decode_json(raw), False
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
    raw = await read_body(request, state)
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
    head = json_encoder.encode(resp)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


async def v2_infer(request: Request, state: State, ctx: dict) -> Response:
    model = find_model(state, request.path_params["m"], ctx)
    _check_version(request, model)
    req = await _oip_request(request, state, model, lambda n, where: check_batch_size(n, state, where))
    names, _ = _selected(req, _oip_outputs(model))  # a bad "outputs" is refused before scoring
    guard = GUARDRAILS_OUTPUT in names  # not asked for (client named other outputs): not evaluated
    outputs, flags, _ = await score(state, model, req.x32.astype(np.float64), ctx, "v2_infer", guard=guard)
    strings = {GUARDRAILS_OUTPUT: [json_encoder.encode(f) for f in flags]} if flags is not None else None
    return _oip_response(model, req, outputs, strings=strings)


async def v2_explain(request: Request, state: State, ctx: dict) -> Response:
    """OIP extension: the explainer's four tensors for the ``infer`` input; columns in ``parameters``.

    A benefit bundle answers the four per block, named ``untreated_*``, ``treated_*`` and ``difference_*``
    (e.g. ``difference_margin`` = the log odds ratio), with the block names in ``parameters.blocks``."""
    model = find_model(state, request.path_params["m"], ctx)
    _check_version(request, model)
    require_explainer(model)

    def rows_ok(n: int, where: str) -> None:
        check_batch_size(n, state, where)
        check_explain_batch(n, state, where)

    req = await _oip_request(request, state, model, rows_ok)
    x64 = req.x32.astype(np.float64)
    _, _, explained = await score(state, model, x64, ctx, "v2_explain", guard=False, explain=True)
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
