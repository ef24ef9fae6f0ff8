"""masml's scoring microservice: scores ONNX bundles over HTTP with onnxruntime, numpy and Starlette only.

Why a separate package that never imports masml: what runs at the bedside must be small, start fast and
carry no training stack; the bundle's manifest is the whole contract (docs/architecture.md §4).

A request's way through the modules:
- ``app``: configuration, the routes, the one wrapper every endpoint runs in (auth, errors, timing).
- ``rest``, ``mlflow_protocol``, ``oip``: one protocol each, how a request and its answer are spelled.
- ``scoring``: what they share: the body, the model, scoring, explanations, what is recorded after.
- ``clean_batch`` (the fast path for clean batches) and ``inputs`` (every value, every error): JSON
  patients to the model's input matrix.
- ``bundles`` (loading and checking bundles, the onnxruntime sessions), ``guardrails``, ``security``
  (API keys, the audit log), ``metrics`` (Prometheus), ``openapi``, ``problems`` (4xx answers).
"""

import os

# onnxruntime 1.31 looks up Microsoft's telemetry host unless told not to (seen with tcpdump from the
# container, where the Dockerfile sets this too); a clinical scoring service sends nothing out. Set
# before serve's modules import onnxruntime; an explicit ORT_DISABLE_TELEMETRY in the environment wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
