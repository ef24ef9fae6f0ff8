"""masml's scoring microservice: scores ONNX bundles over HTTP with onnxruntime, numpy and Starlette only.

Why a separate package that never imports masml: what runs at the bedside must be small, start fast and
carry no training stack; the bundle's manifest is the whole contract (docs/architecture.md §4).
"""

__version__ = "0.1.0"
