"""masml's scoring microservice: scores ONNX bundles over HTTP with onnxruntime, numpy and Starlette only.

Why a separate package that never imports masml: what runs at the bedside must be small, start fast and
carry no training stack; the bundle's manifest is the whole contract (docs/architecture.md §4).
"""

import os

# onnxruntime 1.31 looks up Microsoft's telemetry host unless told not to (seen with tcpdump from the
# container, where the Dockerfile sets this too); a clinical scoring service sends nothing out. Set
# before serve's modules import onnxruntime; an explicit ORT_DISABLE_TELEMETRY in the environment wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
