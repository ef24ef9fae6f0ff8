"""Loading bundles into onnxruntime sessions and swapping them atomically on reload.

Why refuse rather than crash: one tampered or half-copied bundle must not take the other models down;
it is listed with its reason and the rest keep serving. Why an immutable snapshot: a reload builds a new
``Snapshot`` beside the old one and replaces one reference, so a request in flight always sees one
consistent set of models, never a half-loaded one. The explainer (``explainer.onnx``, exact TreeSHAP of
the margin, docs/architecture.md §5) belongs to its ``Model``, so it is swapped with it: an explanation
is never computed by another version's trees than the risk it explains. A benefit bundle's explainer
holds several *blocks* (``manifest["explainer"]["blocks"]``: the untreated and treated outcome models and
their difference), each the same four outputs under a name prefix; a risk bundle's has one, unprefixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serve.clean_batch import CleanBatch
from serve.guardrails import Guardrails
from serve.inputs import Encoder

# Passed to every run: given none, onnxruntime builds default run options on each call, ~3-5 µs of a
# one-patient predict in process (six interleaved rounds, p10 145-149 -> 140-146 µs). Only read by a
# run, so one object serves every thread.
RUN_OPTIONS = ort.RunOptions()

log = logging.getLogger("serve")

MODEL_FILE, MANIFEST_FILE, EXPLAINER_FILE = "model.onnx", "manifest.json", "explainer.onnx"
EXPLAINER_OUTPUTS = ("contributions", "input_contributions", "base_value", "margin")
EXPLAIN_CHUNK_ROWS = 16  # the explainer's intermediates take ~2 MB per row: bound the memory of one run
SUPPORTED_FORMATS = {1}
HIDDEN_OUTPUTS = {"margin"}  # internal to explanations; the raw log-odds are not a clinical output


class BundleRefused(ValueError):
    pass


@dataclass
class Explainer:
    """``explainer.onnx`` of one bundle: its session and the column names of its two matrices."""

    session: Any
    input_name: str
    sha256: str
    feature_names: list[str]  # columns of ``contributions``
    input_names: list[str]  # columns of ``input_contributions``: the manifest inputs, in matrix order
    section: dict  # manifest["explainer"]
    blocks: list[tuple[str, str]] = field(default_factory=lambda: [("", "")])  # (name, output prefix)
    chunk_rows: int = EXPLAIN_CHUNK_ROWS

    @property
    def output_names(self) -> list[str]:
        return [prefix + o for _, prefix in self.blocks for o in EXPLAINER_OUTPUTS]

    @property
    def multi(self) -> bool:
        """True for an explainer of several models (the benefit bundle's), answered block by block."""
        return self.blocks != [("", "")]

    def run(self, x32: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for ``x32`` [N, K], run in chunks of ``chunk_rows`` rows (memory)."""
        names, step = self.output_names, self.chunk_rows
        rows = range(0, x32.shape[0], step)
        parts = [self.session.run(names, {self.input_name: x32[i : i + step]}, RUN_OPTIONS) for i in rows]
        if len(parts) == 1:
            return {k: np.asarray(v) for k, v in zip(names, parts[0], strict=True)}
        return {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(names)}


@dataclass
class Model:
    task: str
    name: str
    version: str
    sha256: str
    path: str
    manifest: dict
    session: Any
    input_name: str
    encoder: Encoder
    outputs: list[str]  # exposed, in manifest order
    run_outputs: list[str]  # exposed + what the guardrails need
    guardrails: Guardrails | None
    fingerprint: str = ""
    explainer: Explainer | None = None
    piece_rows: int | None = None  # manifest "small_batch_rows": rows per call on the graph's cheap branch
    clean: CleanBatch | None = None  # the typed fast path for clean JSON batches (serve/clean_batch.py)

    def run(self, x32: np.ndarray) -> dict[str, np.ndarray]:
        n = x32.shape[0]
        if self.piece_rows is None or n <= self.piece_rows:
            values = self.session.run(self.run_outputs, {self.input_name: x32}, RUN_OPTIONS)
            return {k: np.asarray(v).reshape(-1) for k, v in zip(self.run_outputs, values, strict=True)}
        pieces = range(0, n, self.piece_rows)
        spans = np.array_split(np.asarray(pieces), min(BATCH_THREADS, len(pieces)))
        parts = (
            BATCH_POOL.map(self._run_pieces, [x32] * len(spans), spans)
            if len(spans) > 1
            else [self._run_pieces(x32, spans[0])]
        )
        done = [p for span in parts for p in span]
        return {
            k: np.concatenate([np.asarray(p[j]).reshape(-1) for p in done])
            for j, k in enumerate(self.run_outputs)
        }

    def _run_pieces(self, x32: np.ndarray, starts: np.ndarray) -> list[list]:
        """One thread's share of a batch, ``piece_rows`` rows per call (onnxruntime lets go of the GIL)."""
        step, feed = self.piece_rows, self.input_name
        names, opts = self.run_outputs, RUN_OPTIONS
        return [self.session.run(names, {feed: x32[i : i + step]}, opts) for i in starts.tolist()]

    def summary(self) -> dict:
        m = self.manifest
        return {
            "task": self.task,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "label": m.get("label"),
            "population": m.get("population"),
            "inputs": [
                {
                    k: i.get(k)
                    for k in ("name", "kind", "unit", "low", "high", "categories", "required", "description")
                }
                | {"accepted_units": [u["unit"] for u in i.get("accepted_units") or []] or None}
                for i in m["inputs"]
            ],
            "outputs": [o for o in m["outputs"] if o["name"] in self.outputs],
            "thresholds": m.get("thresholds"),
            "metrics": _metrics_summary(m.get("metrics") or {}),
            "guardrails": [
                {"id": r.id, "message": r.message, "source": r.source} | ({"kind": r.kind} if r.kind else {})
                for r in (self.guardrails.rules if self.guardrails else [])
            ],
            "created_at": m.get("created_at"),
            "training_data": m.get("training_data"),
            "explainer": _explainer_summary(self.explainer),
        }


def _explainer_summary(e: Explainer | None) -> dict | None:
    """What a client needs to read an explanation: method, units, how derived features are credited."""
    if e is None:
        return None
    sec = e.section
    out = {
        "sha256": e.sha256,
        "method": sec.get("method"),
        "base_value_meaning": sec.get("base_value_meaning"),
        "attribution_rule": (sec.get("attribution") or {}).get("rule"),
        "feature_names": e.feature_names,
    }
    if e.multi:  # what is explained (e.g. the outcome models, not the benefit learner) and each block
        out["explains"] = sec.get("explains")
        out["blocks"] = [
            {k: b.get(k) for k in ("name", "explains", "of", "meaning") if b.get(k) is not None}
            for b in sec["blocks"]
        ]
    return out


def _metrics_summary(metrics: dict) -> dict:
    """Headline figures only: estimates with their interval, no curves or tables."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, dict) and "estimate" in v:
            out[k] = {kk: v.get(kk) for kk in ("estimate", "lo", "hi")}
    return out


# A batch of more than the manifest's ``small_batch_rows`` (50 for masml's graphs) is scored in calls of
# that many rows, split over BATCH_THREADS Python threads sharing the model's one-thread session.
# Why pieces: up to that many rows the graph takes its single-target tree ensemble, which onnxruntime
# sums tree by tree in order (xgboost's margin bit for bit) and runs 25-40% faster per row than the
# one-target-per-tree form the graph uses for bigger batches (docs/architecture.md §3). Why threads of
# our own rather than onnxruntime's: its threads would split a small batch over trees, which reorders
# the sums; split over rows, every row's risk is the same as one call's (tests/test_serve.py checks).
# Small explain calls also use the pool: the score runs beside the explainer (serve.scoring.run_graphs).
# A bundle without ``small_batch_rows`` (made before it) is scored in one call, on one thread.


def _batch_threads(raw: str) -> int:
    """MASML_SERVE_BATCH_THREADS, capped at the machine's cores; 1 scores a batch's pieces in turn."""
    if not raw.strip().isdigit() or int(raw) < 1:
        raise SystemExit(
            f"MASML_SERVE_BATCH_THREADS is {raw!r}; expected a whole number >= 1 (1: no batch threads)"
        )
    return min(int(raw), os.cpu_count() or 1)


BATCH_THREADS = _batch_threads(os.environ.get("MASML_SERVE_BATCH_THREADS", "2"))
BATCH_POOL = ThreadPoolExecutor(BATCH_THREADS, thread_name_prefix="masml-batch")  # threads start on first use


def session_for(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # batches are split over rows by _run_pieces, not inside onnxruntime
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def fingerprint(bundle: Path) -> str:
    """Cheap identity of a bundle on disk, so an unchanged bundle is not rebuilt on reload."""
    parts = []
    for f in (MODEL_FILE, MANIFEST_FILE, EXPLAINER_FILE):
        if f == EXPLAINER_FILE and not (bundle / f).exists():
            continue
        st = (bundle / f).stat()
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def load_explainer(bundle: Path, section: Any, input_names: list[str]) -> Explainer:
    """``manifest["explainer"]``'s graph, checked like model.onnx: file present, sha256, graph shape.

    Why refuse the whole bundle on a bad explainer rather than serve it without: a tampered explainer
    would give wrong reasons beside right risks, and silently dropping it would turn explain calls into
    409s no operator asked for; a refusal keeps the previous version (with its explainer) serving.
    """
    if not isinstance(section, dict):
        raise BundleRefused("manifest 'explainer' must be an object (docs/architecture.md §5)")
    name = str(section.get("file") or EXPLAINER_FILE)
    path = bundle / name
    if Path(name).name != name or not path.is_file():
        raise BundleRefused(f"the manifest lists an explainer but {name} is missing from the bundle")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != section.get("sha256"):
        raise BundleRefused(
            f"{name} sha256 {digest[:16]}... does not match the manifest's explainer sha256 "
            f"{str(section.get('sha256'))[:16]}..."
        )
    features, inputs = section.get("feature_names"), section.get("input_names")
    if not isinstance(features, list) or inputs != input_names:
        raise BundleRefused(
            f"manifest explainer input_names {inputs!r} must equal the manifest inputs {input_names} "
            "and feature_names must be a list"
        )
    blocks = _explainer_blocks(section.get("blocks"))
    try:
        session = session_for(data)
    except Exception as err:  # onnxruntime raises its own exception types for a corrupt graph
        raise BundleRefused(f"onnxruntime cannot load {name}: {err}") from None
    graph_in = session.get_inputs()
    shapes = {o.name: o.shape for o in session.get_outputs()}
    expected = [prefix + o for _, prefix in blocks for o in EXPLAINER_OUTPUTS]
    widths = {
        prefix + o: w
        for _, prefix in blocks
        for o, w in (("contributions", len(features)), ("input_contributions", len(inputs)))
    }
    if (
        len(graph_in) != 1
        or graph_in[0].type != "tensor(float)"
        or graph_in[0].shape[-1] != len(inputs)
        or any(o not in shapes for o in expected)
        or any(shapes[o][-1] != w for o, w in widths.items())
    ):
        raise BundleRefused(
            f"{name} takes {[(i.name, i.shape) for i in graph_in]} and gives {shapes}, but the manifest "
            f"describes one float32 [N, {len(inputs)}] input and outputs {expected} "
            f"with {len(features)} feature and {len(inputs)} input columns"
        )
    # several explained models hold several models' intermediates per row: fewer rows per run
    models = sum(1 for b in (section.get("blocks") or [{}]) if not b.get("of"))
    return Explainer(
        session, graph_in[0].name, digest, [str(f) for f in features], list(inputs), section, blocks,
        max(1, EXPLAIN_CHUNK_ROWS // max(1, models)),
    )  # fmt: skip


def _explainer_blocks(blocks: Any) -> list[tuple[str, str]]:
    """(name, output prefix) of each block of ``manifest["explainer"]["blocks"]``; one unnamed, unprefixed
    block when the manifest has none (a risk bundle)."""
    if blocks is None:
        return [("", "")]
    if (
        not isinstance(blocks, list)
        or not blocks
        or not all(
            isinstance(b, dict) and isinstance(b.get("name"), str) and b["name"]
            and isinstance(b.get("prefix"), str) and b["prefix"]
            for b in blocks
        )
        or len({b["name"] for b in blocks}) != len(blocks)
        or len({b["prefix"] for b in blocks}) != len(blocks)
    ):  # fmt: skip
        raise BundleRefused(
            "manifest explainer 'blocks' must be a non-empty list of objects with distinct non-empty "
            "'name' and 'prefix' strings (docs/architecture.md §5)"
        )
    return [(b["name"], b["prefix"]) for b in blocks]


def load_model(bundle: Path, previous: Model | None = None) -> Model:
    """One bundle, fully checked: files present, sha256 matches, manifest consistent with the graph."""
    missing = [f for f in (MODEL_FILE, MANIFEST_FILE) if not (bundle / f).is_file()]
    if missing:
        raise BundleRefused(f"not a bundle: missing {', '.join(missing)}")
    fp = fingerprint(bundle)
    if previous is not None and previous.fingerprint == fp:
        return previous
    try:
        manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleRefused(f"manifest.json is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise BundleRefused("manifest.json is not an object")
    model_bytes = (bundle / MODEL_FILE).read_bytes()
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != manifest.get("model_sha256"):
        raise BundleRefused(
            f"model.onnx sha256 {digest[:16]}... does not match the manifest's "
            f"{str(manifest.get('model_sha256'))[:16]}..."
        )
    if manifest.get("bundle_format") not in SUPPORTED_FORMATS:
        raise BundleRefused(
            f"bundle_format {manifest.get('bundle_format')!r} is not supported "
            f"(this server reads {sorted(SUPPORTED_FORMATS)})"
        )
    for key in ("task", "inputs", "outputs"):
        if key not in manifest:
            raise BundleRefused(f"manifest lacks {key!r}")
    try:
        encoder = Encoder(manifest["inputs"])
        clean = CleanBatch(encoder.specs)
    except (KeyError, TypeError, ValueError) as err:
        raise BundleRefused(f"manifest inputs are malformed: {err}") from None
    try:
        session = session_for(model_bytes)
    except Exception as err:  # onnxruntime raises its own exception types for a corrupt graph
        raise BundleRefused(f"onnxruntime cannot load model.onnx: {err}") from None
    graph_in = session.get_inputs()
    if (
        len(graph_in) != 1
        or graph_in[0].type != "tensor(float)"
        or graph_in[0].shape[-1] != len(encoder.names)
    ):
        raise BundleRefused(
            f"the graph takes {[(i.name, i.type, i.shape) for i in graph_in]}, but the manifest "
            f"describes one float32 [N, {len(encoder.names)}] input"
        )
    graph_out = {o.name for o in session.get_outputs()}
    listed = [o["name"] for o in manifest["outputs"]]
    absent = [o for o in listed if o not in graph_out]
    if absent:
        raise BundleRefused(f"the manifest lists outputs {absent} the graph does not produce")
    exposed = [o for o in listed if o not in HIDDEN_OUTPUTS]
    guardrails = None
    if manifest.get("guardrails"):
        categories = {s.name: list(s.categories or []) for s in encoder.specs if s.kind == "category"}
        try:
            guardrails = Guardrails(manifest["guardrails"], categories, encoder.names, graph_out)
        except (KeyError, TypeError, ValueError) as err:
            raise BundleRefused(f"guardrails are malformed: {err}") from None
    extra = sorted(guardrails.needed_outputs - set(exposed)) if guardrails else []
    explainer = None
    if manifest.get("explainer") is not None:
        explainer = load_explainer(bundle, manifest["explainer"], encoder.names)
    task = str(manifest["task"])
    return Model(
        task=task,
        name=str(manifest.get("model_name") or f"masml-{task}"),
        version=str(manifest.get("version") or manifest.get("model_version") or digest[:12]),
        sha256=digest,
        path=str(bundle),
        manifest=manifest,
        session=session,
        input_name=graph_in[0].name,
        encoder=encoder,
        outputs=exposed,
        run_outputs=exposed + extra,
        guardrails=guardrails,
        fingerprint=fp,
        explainer=explainer,
        piece_rows=_piece_rows(manifest),
        clean=clean,
    )


def _piece_rows(manifest: dict) -> int | None:
    raw = manifest.get("small_batch_rows")
    if raw is None:
        return None
    if type(raw) is not int or raw < 1:
        raise BundleRefused(f"manifest small_batch_rows is {raw!r}; expected a whole number >= 1")
    return raw


@dataclass
class Snapshot:
    models: dict[str, Model] = field(default_factory=dict)  # by task
    refused: list[dict] = field(default_factory=list)
    generation: int = 0

    def get(self, name: str) -> Model | None:
        m = self.models.get(name)
        if m is None:  # also by model name, as OIP clients may use it
            m = next((v for v in self.models.values() if v.name == name), None)
        return m


def load_folder(folder: Path, previous: Snapshot | None = None) -> Snapshot:
    """Every bundle under ``folder``; a refused bundle keeps its previous version serving, if any."""
    prev = previous or Snapshot()
    snap = Snapshot(generation=prev.generation + 1)
    if not folder.is_dir():
        snap.refused.append({"path": str(folder), "reason": "models folder does not exist"})
        return snap
    candidates = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (folder / MANIFEST_FILE).is_file():
        candidates.insert(0, folder)
    by_path = {m.path: m for m in prev.models.values()}
    for path in candidates:
        if not (path / MANIFEST_FILE).exists() and not (path / MODEL_FILE).exists():
            continue
        try:
            model = load_model(path, by_path.get(str(path)))
        except (BundleRefused, OSError) as err:
            kept = by_path.get(str(path))
            entry = {"path": str(path), "reason": str(err)}
            if kept is not None and kept.task not in snap.models:
                snap.models[kept.task] = kept
                entry["kept"] = {"task": kept.task, "version": kept.version, "sha256": kept.sha256}
            log.error(
                "bundle refused: %s: %s%s", path, err, " (previous version keeps serving)" if kept else ""
            )
            snap.refused.append(entry)
            continue
        if model.task in snap.models:
            reason = f"task {model.task!r} is already served from {snap.models[model.task].path}"
            log.error("bundle refused: %s: %s", path, reason)
            snap.refused.append({"path": str(path), "reason": reason})
            continue
        snap.models[model.task] = model
        log.info(
            "bundle loaded: %s task=%s version=%s sha256=%s",
            path,
            model.task,
            model.version,
            model.sha256[:16],
        )
    return snap
