"""Batch scoring on a cluster: every partition scored through the bundle's ONNX graph where it lies.

Why the bundle and not the booster: it is what the service runs, so a batch scored here agrees with
the service to the bit. Each worker opens one onnxruntime session per bundle and scores its partitions;
only the output files' paths and row counts come back. Output: one Parquet file per input partition
(``part-00000.parquet``, ...) holding ``patient_id`` and the bundle's outputs. It is written into a
hidden folder and moved into place only when every partition has succeeded, so a failed job leaves no
half-written output. The output folder must be reachable by every worker under the same path (a
shared file system on a real cluster; the local disk for a LocalCluster).

A worker that dies mid-job costs nothing but time: scoring a partition has no side effect besides its
own file, so Dask recomputes the lost partitions on the surviving workers (a partition whose worker
died three times in a row fails the job with Dask's ``KilledWorker``).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from masml.bundle import read_bundle
from masml.distributed.data import load_partitioned

# one onnxruntime session per bundle per worker process, keyed by the graph's sha256
_SESSIONS: dict[str, object] = {}


@dataclass
class BatchResult:
    out_dir: Path
    files: list[Path]
    rows: int
    partitions: int
    notes: list[str]


def _score_partition(frame: pd.DataFrame, path: str, bundle: tuple[dict, bytes]) -> tuple[str, int]:
    from masml.predict import onnx_session, score_frame

    manifest, model = bundle
    key = manifest["model_sha256"]
    if key not in _SESSIONS:
        _SESSIONS[key] = onnx_session(model)
    scored = score_frame(manifest, _SESSIONS[key], frame).drop(columns=["margin"], errors="ignore")
    scored.to_parquet(path, index=False)
    return path, len(scored)


def predict_partitioned(client, bundle_dir: str | Path, data: str | Path, out_dir: str | Path,
                        units: str | Path | None = None) -> BatchResult:  # fmt: skip
    """Validate ``data`` (partitioned Parquet) on the cluster, score it, write ``out_dir``."""
    manifest, model = read_bundle(bundle_dir)  # a broken bundle stops the job before any worker reads
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out {out_dir} exists and is not an empty folder; choose a new folder")
    loaded = load_partitioned(client, data, units)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir(parents=True)
    try:
        # one object, shipped once to every worker (a dict argument would be read as a task graph)
        [shipped] = client.scatter([(manifest, model)], broadcast=True)
        paths = [str(staging / f"part-{i:05d}.parquet") for i in range(len(loaded.pieces))]
        futures = client.map(
            _score_partition, loaded.partitions, paths, bundle=shipped, pure=False
        )
        written = client.gather(futures)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for path, _ in written:
            target = out_dir / Path(path).name
            Path(path).rename(target)
            files.append(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BatchResult(out_dir, files, sum(n for _, n in written), len(files), loaded.notes)

