"""The OpenAPI 3.1 document, generated from the loaded manifests.

Why generated: each model has its own inputs, units and ranges; a spec written by hand would drift from
the bundles it describes. Paths are listed per loaded task (``/v1/models/onset/predict``), so a client
generator or schemathesis sees the exact patient schema of each model.
"""

from __future__ import annotations

from typing import Any

from serve import __version__
from serve.bundles import Model, Snapshot

REF = "#/components/schemas/"
KIND_TEXT = (
    "present when the rule has one: 'caution' (a reason to distrust or withhold the estimate) or "
    "'context' (information that frames it); other values may appear and are to be shown as they are"
)
GUARDRAILS_TENSOR = (
    "'guardrails', BYTES [N]: per patient a UTF-8 JSON array of GuardrailFlag (id, status, message, "
    "kind), the same list as REST predict's"
)

# The benefit model's outputs (docs/architecture.md §3). Why spelled out: `benefit` comes from the learner
# chosen without ground truth (constant, DR-learners, X-learner or T-learner), while the two risks come from
# the per-arm outcome models (the T-learner pair), so risk_untreated - risk_treated need not equal benefit
# and a client must not recompute one from the others.
BENEFIT_DESCRIPTIONS = {
    "benefit": (
        "benefit model: the chosen learner's estimate of P(death within 28 days | untreated) - "
        "P(death within 28 days | IL-1 blockade) (> 0 favours treatment); it need not equal "
        "risk_untreated - risk_treated, which come from the outcome models"
    ),
    "risk_untreated": (
        "benefit model: the untreated-arm outcome model's calibrated P(death within 28 days) without IL-1 "
        "blockade; risk_untreated - risk_treated need not equal benefit"
    ),
    "risk_treated": (
        "benefit model: the treated-arm outcome model's calibrated P(death within 28 days) with IL-1 "
        "blockade; risk_untreated - risk_treated need not equal benefit"
    ),
    "propensity": (
        "benefit model: calibrated P(IL-1 blockade | inputs) in the training data; drives the "
        "outside_overlap guardrail"
    ),
}


# What a benefit bundle's explanation is (masml/onnx_benefit.py says why): the two outcome models, and the
# difference of their log-odds; never the chosen benefit learner, and never `benefit` decomposed.
BENEFIT_EXPLANATION_TEXT = (
    "a benefit model's explanation: exact TreeSHAP of its two outcome models (the models behind "
    "risk_untreated and risk_treated), not of the chosen benefit learner (e.g. dr_ridge), in log-odds before "
    "calibration. 'difference' = untreated - treated, input by input: its contributions add up to "
    "margin_untreated - margin_treated, the log odds ratio of death within 28 days without vs with IL-1 "
    "blockade. 'benefit' is a risk difference on the probability scale and is not additively decomposed"
)
BLOCK_TEXT = {
    "untreated": "the untreated-arm outcome model (risk_untreated is its calibration of this margin)",
    "treated": "the treated-arm outcome model (risk_treated is its calibration of this margin)",
    "difference": "untreated - treated: contributions, base_value and margin are the untreated block's "
    "minus the treated block's; margin = the log odds ratio (> 0: fewer deaths expected with treatment)",
}


def _ref(name: str) -> dict:
    return {"$ref": REF + name}


def _patient_schema(m: Model) -> dict:
    props: dict[str, Any] = {
        "patient_id": {
            "type": ["string", "integer", "null"],
            "maxLength": 128,
            "description": "echoed back; never logged",
        }
    }
    for s in m.encoder.specs:
        desc = m.manifest["inputs"][m.encoder.names.index(s.name)].get("description") or s.name
        if s.kind == "category":
            props[s.name] = {"enum": [*s.categories, None], "description": desc}  # type: ignore[misc]
        elif s.kind == "binary":
            props[s.name] = {
                "oneOf": [{"type": "boolean"}, {"enum": [0, 1]}, {"type": "null"}],
                "description": f"{desc} (0/1)",
            }
        else:
            plain = {"type": "number", "description": f"{desc}, in {s.unit}"}
            if s.low is not None:
                plain |= {"minimum": s.low, "maximum": s.high}
            props[s.name] = {
                "oneOf": [
                    plain,
                    {"type": "null"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["value", "unit"],
                        "description": f"{desc} in an accepted unit; converted, then range-checked",
                        "properties": {
                            "value": {"type": "number"},
                            "unit": {"type": "string", "examples": s.accepted},
                        },
                    },
                ],
                "description": f"{desc}; canonical unit {s.unit}, accepted units {s.accepted}",
            }
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": [s.name for s in m.encoder.specs if s.required],
        "description": f"one patient for model {m.task!r}; absent or null fields are missing values",
    }


def _common_schemas() -> dict:
    num_list = {"type": "array", "items": {"type": ["number", "null"]}}
    return {
        "Problem": {
            "type": "object",
            "required": ["field", "kind", "message"],
            "properties": {
                "field": {
                    "type": "string",
                    "description": "path of the offending field, e.g. patients[0].ferritin",
                },
                "kind": {"type": "string", "description": "machine-readable problem kind"},
                "message": {"type": "string"},
                "value": {"description": "the value sent"},
                "expected": {"description": "what would have been accepted"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "problems": {"type": "array", "items": _ref("Problem")},
                "request_id": {"type": "string"},
            },
            "description": "every client error (4xx)",
        },
        "OipError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
            "description": "Open Inference Protocol error",
        },
        "ModelRef": {
            "type": "object",
            "properties": {k: {"type": "string"} for k in ("task", "name", "version", "sha256")},
        },
        "GuardrailFlag": {
            "type": "object",
            "required": ["id", "status", "message"],
            "properties": {
                "id": {"type": "string"},
                "status": {"enum": ["fires", "clear", "unknown"]},
                "message": {"type": "string"},
                "kind": {"type": "string", "description": KIND_TEXT},
            },
            "description": "a manifest guardrail rule's outcome for one patient; every rule of the "
            "bundle is listed, in manifest order",
        },
        "GuardrailRule": {
            "type": "object",
            "required": ["id", "message"],
            "properties": {
                "id": {"type": "string"},
                "message": {"type": "string"},
                "source": {"type": ["string", "null"], "description": "where the caution comes from"},
                "kind": {"type": "string", "description": KIND_TEXT},
            },
            "description": "a guardrail rule shipped in the bundle's manifest",
        },
        "Prediction": {
            "type": "object",
            "additionalProperties": {"type": "number"},
            "properties": {
                "patient_id": {"type": ["string", "integer"]},
                "risk": {"type": "number", "description": "calibrated probability (risk models)"},
                "benefit": {"type": "number", "description": BENEFIT_DESCRIPTIONS["benefit"]},
                "risk_untreated": {"type": "number", "description": BENEFIT_DESCRIPTIONS["risk_untreated"]},
                "risk_treated": {"type": "number", "description": BENEFIT_DESCRIPTIONS["risk_treated"]},
                "propensity": {"type": "number", "description": BENEFIT_DESCRIPTIONS["propensity"]},
                "guardrails": {"type": "array", "items": _ref("GuardrailFlag")},
                "explanation": _ref("Explanation"),
            },
        },
        "PredictResponse": {
            "type": "object",
            "properties": {
                "request_id": {"type": "string"},
                "model": _ref("ModelRef"),
                "predictions": {"type": "array", "items": _ref("Prediction")},
                "explainer": {
                    "type": "object",
                    "description": "present when explained: the explainer's sha256 and the units (for a "
                    "benefit model, of each outcome model's margin; see BenefitExplanation)",
                    "properties": {"sha256": {"type": "string"}, "units": {"type": "string"}},
                },
            },
        },
        "TopContributor": {
            "type": "object",
            "required": ["input", "contribution", "value", "unit"],
            "properties": {
                "input": {"type": "string", "description": "canonical input name"},
                "contribution": {"type": "number", "description": "log-odds"},
                "value": {
                    "type": ["number", "string", "integer", "null"],
                    "description": "the patient's value as used: after unit conversion (null = missing; "
                    "a category as its label)",
                },
                "unit": {"type": ["string", "null"], "description": "canonical unit of the value"},
            },
        },
        "Explanation": {
            "oneOf": [_ref("ExplanationBlock"), _ref("BenefitExplanation")],
            "description": "a risk model's explanation (ExplanationBlock), or a benefit model's "
            "(BenefitExplanation: untreated, treated and difference blocks)",
        },
        "BenefitExplanation": {
            "type": "object",
            "required": ["untreated", "treated", "difference"],
            "description": BENEFIT_EXPLANATION_TEXT,
            "properties": {
                name: {"allOf": [_ref("ExplanationBlock")], "description": text}
                for name, text in BLOCK_TEXT.items()
            },
        },
        "ExplanationBlock": {
            "type": "object",
            "required": ["base_value", "margin", "contributions", "top"],
            "description": "exact path-dependent TreeSHAP of the margin: base_value + Σ contributions = "
            "margin (log-odds, before calibration); derived features credited to their inputs",
            "properties": {
                "base_value": {"type": "number", "description": "the model's expected margin (log-odds)"},
                "margin": {"type": "number", "description": "this patient's log-odds"},
                "contributions": {
                    "type": "object",
                    "additionalProperties": {"type": "number"},
                    "description": "canonical input name -> contribution (log-odds)",
                },
                "top": {
                    "type": "array",
                    "items": _ref("TopContributor"),
                    "description": "the largest |contribution| inputs, largest first",
                },
                "feature_contributions": {
                    "type": "object",
                    "additionalProperties": {"type": "number"},
                    "description": "model feature -> SHAP value (only with features: true)",
                },
            },
        },
        "ModelInfo": {
            "type": "object",
            "description": "a loaded bundle's manifest, summarised",
            "properties": {
                "task": {"type": "string"},
                "name": {"type": "string"},
                "version": {"type": "string"},
                "sha256": {"type": "string"},
                "inputs": {"type": "array", "items": {"type": "object"}},
                "outputs": {"type": "array", "items": {"type": "object"}},
                "metrics": {"type": "object"},
                "guardrails": {"type": "array", "items": _ref("GuardrailRule")},
            },
        },
        "ModelList": {
            "type": "object",
            "properties": {
                "models": {"type": "array", "items": _ref("ModelInfo")},
                "refused": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "path": {"type": "string"},
                            "reason": {"type": "string"},
                            "kept": _ref("ModelRef"),
                        },
                    },
                },
            },
        },
        "ReloadResult": {
            "type": "object",
            "properties": {
                "generation": {"type": "integer"},
                "models": {"type": "array", "items": _ref("ModelRef")},
                "refused": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Health": {"type": "object", "description": "liveness/readiness"},
        "InvocationsRequest": {
            "type": "object",
            "description": "MLflow scoring protocol; one of the two",
            "properties": {
                "dataframe_split": {
                    "type": "object",
                    "required": ["columns", "data"],
                    "properties": {
                        "columns": {"type": "array", "items": {"type": "string"}},
                        "data": {"type": "array", "items": {"type": "array"}},
                        "index": {"type": "array"},
                    },
                },
                "dataframe_records": {"type": "array", "items": {"type": "object"}},
                "params": {"type": "object"},
            },
        },
        "InvocationsResponse": {
            "type": "object",
            "properties": {
                "predictions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": {"type": "number"},
                        "properties": {
                            "guardrails": {
                                "type": "array",
                                "items": _ref("GuardrailFlag"),
                                "description": "only for a bundle with guardrails: the same flags as "
                                "REST predict's",
                            }
                        },
                        "description": "one record per patient, in order: each output under its name "
                        "(a number)",
                    },
                }
            },
        },
        "Tensor": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}},
                "datatype": {
                    "type": "string",
                    "enum": ["FP32", "BYTES"],
                    "description": "inputs are FP32; the guardrails output is BYTES",
                },
                "parameters": {"type": "object"},
                "data": {
                    "anyOf": [num_list, {"type": "array", "items": {"type": "string"}}],
                    "description": "row-major values; for BYTES, one string per element",
                },
            },
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": _ref("Tensor")},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                    },
                },
            },
        },
        "InferResponse": {
            "type": "object",
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {
                    "type": "array",
                    "items": _ref("Tensor"),
                    "description": "the requested outputs (default: all); for a bundle with guardrails, "
                    f"infer also gives {GUARDRAILS_TENSOR}",
                },
                "parameters": {
                    "type": "object",
                    "description": "explain: the columns of each matrix (contributions_columns, "
                    "input_contributions_columns); for a benefit model also 'blocks' (untreated, treated, "
                    "difference: the tensor name prefixes) and 'explains'",
                },
            },
        },
        "ModelMetadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("Tensor")},
                "outputs": {
                    "type": "array",
                    "items": _ref("Tensor"),
                    "description": "the FP32 outputs, then, for a bundle with guardrails, "
                    f"{GUARDRAILS_TENSOR}",
                },
                "parameters": {
                    "type": "object",
                    "description": "input_columns, sha256, model_name, explainer; guardrails_output "
                    "(the guardrails tensor's format) for a bundle with guardrails",
                },
            },
        },
        "ServerMetadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


def _resp(schema: str | None, text: str, errors: tuple[int, ...] = (), oip: bool = False) -> dict:
    out: dict[str, Any] = {"200": {"description": text}}
    if schema:
        out["200"]["content"] = {"application/json": {"schema": _ref(schema)}}
    for code in errors:
        out[str(code)] = {
            "description": "client error",
            "content": {"application/json": {"schema": _ref("OipError" if oip else "Error")}},
        }
    return out


def _explain_options_schema(k: int) -> dict:
    return {
        "top": {
            "type": "integer",
            "minimum": 1,
            "maximum": k,
            "default": min(5, k),
            "description": "how many of the largest contributors to list (with explain)",
        },
        "features": {
            "type": "boolean",
            "default": False,
            "description": "also return feature_contributions, per model feature (with explain)",
        },
    }


def _request_schema(patient: str, max_items: int, options: dict) -> dict:
    """A predict or explain body: the patients (up to that endpoint's batch limit) and its options."""
    patients = {"type": "array", "minItems": 1, "maxItems": max_items, "items": _ref(patient)}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["patients"],
        "properties": {"patients": patients} | options,
    }


def build_spec(snap: Snapshot, config: Any) -> dict:
    schemas = _common_schemas()
    auth = [{"bearer": []}]
    public_metrics = getattr(config, "public_metrics", False)
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "alive", "security": [], "responses": _resp("Health", "alive")}},
        "/readyz": {
            "get": {
                "summary": "at least one model loaded",
                "security": [],
                "responses": _resp("Health", "ready") | {"503": {"description": "not ready"}},
            }
        },
        "/ping": {
            "get": {"summary": "MLflow-style liveness", "security": [], "responses": _resp(None, "ok")}
        },
        "/health": {
            "get": {"summary": "MLflow-style liveness", "security": [], "responses": _resp(None, "ok")}
        },
        "/version": {"get": {"summary": "server version", "security": [], "responses": _resp(None, "ok")}},
        "/openapi.json": {
            "get": {"summary": "this document", "security": [], "responses": _resp(None, "ok")}
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                **({"security": []} if public_metrics else {}),
                "responses": _resp(None, "metrics", () if public_metrics else (401,)),
            }
        },
        "/v1/models": {
            "get": {
                "summary": "every loaded model and every refused bundle",
                "responses": _resp("ModelList", "models", (401,)),
            }
        },
        "/admin/reload": {
            "post": {
                "summary": "reload every bundle (admin key); a broken one is refused and the "
                "previous version keeps serving",
                "responses": _resp("ReloadResult", "reloaded", (401, 403)),
            }
        },
        "/invocations": {
            "post": {
                "summary": "MLflow scoring protocol (dataframe_split / dataframe_records)",
                "parameters": [
                    {
                        "name": "model",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": sorted(snap.models)},
                        "description": "task; needed when several models are served",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("InvocationsRequest")}},
                },
                "responses": _resp(
                    "InvocationsResponse",
                    "one record per patient: the outputs, and the guardrail flags for a bundle with "
                    "guardrails",
                    (400, 401, 413, 415, 422),
                ),
            }
        },
        "/v2": {
            "get": {
                "summary": "OIP server metadata",
                "responses": _resp("ServerMetadata", "ok", (401,), True),
            }
        },
        "/v2/health/live": {
            "get": {"summary": "OIP liveness", "security": [], "responses": _resp(None, "live")}
        },
        "/v2/health/ready": {
            "get": {
                "summary": "OIP readiness",
                "security": [],
                "responses": _resp(None, "ready") | {"503": {"description": "not ready"}},
            }
        },
    }
    for task, m in sorted(snap.models.items()):
        pname = f"Patient_{task}"
        schemas[pname] = _patient_schema(m)
        opts = _explain_options_schema(len(m.encoder.names))
        explain_flag = {
            "type": "boolean",
            "default": False,
            "description": f"explain each prediction (at most {config.max_explain_batch} patients; 409 if "
            "the bundle has no explainer)",
        }
        schemas[f"PredictRequest_{task}"] = _request_schema(
            pname, config.max_batch, opts | {"explain": explain_flag}
        )
        schemas[f"ExplainRequest_{task}"] = _request_schema(pname, config.max_explain_batch, opts)
        paths[f"/v1/models/{task}"] = {
            "get": {
                "summary": f"manifest summary of {task}",
                "responses": _resp("ModelInfo", "model", (401, 404)),
            }
        }
        paths[f"/v1/models/{task}/predict"] = {
            "post": {
                "summary": f"score patients with {task} ({', '.join(m.outputs)}, guardrail flags)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(f"PredictRequest_{task}")}},
                },
                "responses": _resp(
                    "PredictResponse", "one prediction per patient, in order", (400, 401, 404, 413, 422)
                ),
            }
        }
        multi = m.explainer is not None and m.explainer.multi
        explained = (
            f"predict and explain with {task}: per patient untreated, treated and difference blocks, each "
            "with base_value, contributions per input, margin and the top contributors. "
            + BENEFIT_EXPLANATION_TEXT
            if multi
            else f"predict and explain with {task}: per patient base_value, contributions per input, margin "
            "and the top contributors (exact TreeSHAP of the margin)"
        )
        paths[f"/v1/models/{task}/explain"] = {
            "post": {
                "summary": explained,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(f"ExplainRequest_{task}")}},
                },
                "responses": _resp(
                    "PredictResponse",
                    "one explained prediction per patient, in order",
                    (400, 401, 404, 409, 413, 422),
                ),
            }
        }
        paths[f"/v2/models/{task}"] = {
            "get": {
                "summary": "OIP model metadata",
                "responses": _resp("ModelMetadata", "ok", (401, 404), True),
            }
        }
        paths[f"/v2/models/{task}/ready"] = {
            "get": {"summary": "OIP model readiness", "responses": _resp(None, "ready", (401, 404), True)}
        }
        infer_outputs = f"outputs FP32 [N] {m.outputs}" + (
            f", and {GUARDRAILS_TENSOR}" if m.guardrails else ""
        )
        paths[f"/v2/models/{task}/infer"] = {
            "post": {
                "summary": f"OIP inference: FP32 {m.input_name!r} [N, {len(m.encoder.names)}], columns "
                f"in manifest order: {m.encoder.names}; {infer_outputs}",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("InferRequest")}},
                },
                "responses": _resp("InferResponse", "ok", (400, 401, 404, 413), True),
            }
        }
        tensors = "contributions [N, F], input_contributions [N, K], base_value [N], margin [N]"
        if multi:
            blocks = ", ".join(f"{p}*" for _, p in m.explainer.blocks)  # type: ignore[union-attr]
            tensors = f"for each block ({blocks}): {tensors}, e.g. difference_margin [N] = the log odds ratio"
        paths[f"/v2/models/{task}/explain"] = {
            "post": {
                "summary": f"OIP extension: the infer input; outputs {tensors} (columns in parameters)"
                + (f". {BENEFIT_EXPLANATION_TEXT}" if multi else ""),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("InferRequest")}},
                },
                "responses": _resp("InferResponse", "ok", (400, 401, 404, 409, 413), True),
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "masml scoring service",
            "version": __version__,
            "description": "Scores masml ONNX bundles. Inputs in canonical units or {value, unit}.",
        },
        "security": auth,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
