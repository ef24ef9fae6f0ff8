"""The bundle: ``model.onnx`` + ``manifest.json``, the only contract between training and serving.

Why a manifest beside the graph: a server (or a safety officer) must know, without masml installed,
what each input means, in which unit and range, what the outputs mean, how the model performed and on
which data it was trained; and it must be able to prove that the graph it loaded is the one described
(``model_sha256``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from masml import __version__
from masml.schema import SCHEMA_VERSION

BUNDLE_FORMAT = 1
MODEL_FILE, MANIFEST_FILE = "model.onnx", "manifest.json"
EXPLAINER_FILE = "explainer.onnx"  # optional: exact SHAP of the margin (masml.shap_export)


class BundleError(ValueError):
    """A bundle that is incomplete, tampered with, or made for another schema."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the frame's content (values and column names, not the row index): same data, same
    fingerprint, whatever file format it came from."""
    h = hashlib.sha256()
    h.update("\x1f".join(map(str, frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import xgboost

    return {
        "masml": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "xgboost": xgboost.__version__,
    }


def write_bundle(
    out_dir: str | Path, model_bytes: bytes, manifest: dict, explainer: bytes | None = None
) -> Path:
    """Write the graph and its manifest; the manifest records the graph's sha256 and the format.

    ``explainer`` (bytes of ``explainer.onnx``) needs ``manifest["explainer"]``, which gains its sha256
    so that a server can prove the explanations it serves belong to this model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model_bytes)
    if explainer is not None:
        if "explainer" not in manifest:
            raise BundleError("an explainer graph needs its manifest section (manifest['explainer'])")
        manifest = {**manifest, "explainer": {**manifest["explainer"], "sha256": sha256_bytes(explainer)}}
        (out / manifest["explainer"].get("file", EXPLAINER_FILE)).write_bytes(explainer)
    from masml.onnx_export import SMALL_BATCH

    full = {
        "bundle_format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        # batches up to this many rows take the graph's cheaper tree ensemble (onnx_export._trees)
        "small_batch_rows": SMALL_BATCH,
        **manifest,
        "model_sha256": sha256_bytes(model_bytes),
        "versions": versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return out


def read_bundle(bundle_dir: str | Path) -> tuple[dict, bytes]:
    """Manifest and graph bytes of a bundle, after checking it is complete, untampered and current."""
    d = Path(bundle_dir)
    missing = [f for f in (MODEL_FILE, MANIFEST_FILE) if not (d / f).is_file()]
    if missing:
        raise BundleError(f"{d} is not a masml bundle: missing {', '.join(missing)}")
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{d / MANIFEST_FILE} is not valid JSON: {err}") from None
    model = (d / MODEL_FILE).read_bytes()
    if sha256_bytes(model) != manifest.get("model_sha256"):
        raise BundleError(
            f"{d / MODEL_FILE} does not match its manifest: sha256 {sha256_bytes(model)[:16]}... "
            f"but the manifest says {str(manifest.get('model_sha256'))[:16]}..."
        )
    if isinstance(manifest.get("explainer"), dict):
        path = d / str(manifest["explainer"].get("file", EXPLAINER_FILE))
        if not path.is_file():
            raise BundleError(f"{d} lists an explainer but {path.name} is missing")
        if sha256_bytes(path.read_bytes()) != manifest["explainer"].get("sha256"):
            raise BundleError(f"{path} does not match the sha256 in its manifest's explainer section")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{d} was made for schema {manifest.get('schema_version')!r}; this masml: {SCHEMA_VERSION!r}"
        )
    return manifest, model
