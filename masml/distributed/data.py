"""Partitioned Parquet → validated canonical partitions that stay on the workers.

Why per piece and not ``dask.dataframe.read_parquet``: a data scientist fixing a bad export needs to
know which file and which row hold the bad value, so each partition is one row group of one file and
remembers where it came from. Every piece is converted (units) and validated on a worker with the same
``masml.validation.validate`` as a single file; only the problem reports travel back, and every
problem of every file is reported at once, rows counted from 1 within each file. Patient ids are then
checked for uniqueness across all pieces (within a piece ``validate`` already does it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from masml.validation import Example, Problem, SchemaValidationError

PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Piece:
    """One partition: a row group of one Parquet file, and where its rows sit in that file."""

    file: str
    row_group: int
    first_row: int  # rows of the file before this row group
    rows: int


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or every Parquet file under a folder (sorted, so partition order is stable)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in PARQUET_SUFFIXES:
            raise ValueError(
                f"{path}: on a cluster masml reads Parquet (a .parquet file or a folder of them), "
                f"not {path.suffix or 'a file without extension'}; convert it with pandas or pyarrow first"
            )
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in PARQUET_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{path} holds no .parquet files")
    return files


def pieces(path: str | Path) -> list[Piece]:
    """The partitions of a dataset, from the Parquet footers only (no data is read here)."""
    import pyarrow.parquet as pq

    out = []
    for file in parquet_files(path):
        meta = pq.ParquetFile(file).metadata
        first = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            out.append(Piece(str(file), g, first, rows))
            first += rows
    return out


def read_piece(piece: Piece) -> pd.DataFrame:
    """The raw rows of one piece, as ``masml.io.read_table`` reads a Parquet file (types kept)."""
    import pyarrow.parquet as pq

    frame = pq.ParquetFile(piece.file).read_row_group(piece.row_group).to_pandas()
    frame.attrs = {}
    return frame


@dataclass
class PieceReport:
    """What validating one piece found: problems (rows counted within the piece) and notes."""

    piece: Piece
    rows: int
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_piece(
    piece: Piece, units: Mapping[str, str] | None, require_labels: tuple[str, ...]
) -> tuple[pd.DataFrame | None, PieceReport]:
    """Runs on a worker: read, convert units, validate. The canonical frame stays on the worker."""
    from masml.units import to_canonical
    from masml.validation import validate

    raw = read_piece(piece)
    try:
        converted = to_canonical(raw, units) if units else raw
        frame = validate(converted, require_labels=require_labels, source=piece.file)
    except SchemaValidationError as err:
        return None, PieceReport(piece, len(raw), problems=list(err.problems))
    return frame, PieceReport(piece, len(raw), notes=list(frame.attrs.get("validation_notes", [])))


class PartitionedSchemaError(SchemaValidationError):
    """Problems in a partitioned dataset; ``by_file`` maps each file to its problems (rows counted from
    1 within the file), ``problems`` lists them all."""

    def __init__(self, by_file: Mapping[str, list[Problem]], *, n_rows: int, n_files: int, source: str):
        self.by_file = dict(by_file)
        self.n_files = n_files
        super().__init__([p for ps in self.by_file.values() for p in ps], n_rows=n_rows, source=source)

    def _report(self) -> str:
        n = len(self.problems)
        lines = [
            f"schema validation failed for {self.source}: {n} problem{'s' if n != 1 else ''} in "
            f"{len(self.by_file)} of {self.n_files} file{'s' if self.n_files != 1 else ''} "
            f"({self.n_rows:,} rows in all; rows count data rows from 1 within each file)"
        ]
        for file, problems in self.by_file.items():
            lines.append(f"  {file}:")
            lines.extend(f"    - {p}" for p in problems)
        return "\n".join(lines)


def merge_reports(reports: Iterable[PieceReport]) -> dict[str, list[Problem]]:
    """Problems per file: a file's row groups merged per (column, check), rows shifted to file rows."""
    merged: dict[str, dict[tuple[str, str], Problem]] = {}
    for r in reports:
        per_file = merged.setdefault(r.piece.file, {})
        for p in r.problems:
            shifted = tuple(
                Example(e.row + r.piece.first_row, e.value, e.patient_id, e.in_file) for e in p.examples
            )
            key = (p.column, p.check)
            if key in per_file:
                old = per_file[key]
                per_file[key] = Problem(p.column, p.check, old.n_rows + p.n_rows,
                                       (old.examples + shifted)[:MAX_EXAMPLES], old.expected, old.detail)
            else:
                per_file[key] = Problem(p.column, p.check, p.n_rows, shifted[:MAX_EXAMPLES], p.expected,
                                        p.detail)  # fmt: skip
    return {file: list(problems.values()) for file, problems in merged.items() if problems}


@dataclass
class ClusterFrame:
    """A validated dataset on the cluster: a dask DataFrame of canonical partitions, and its pieces."""

    frame: object  # dask.dataframe.DataFrame, one partition per piece, in piece order
    partitions: list  # the same partitions as futures (pandas frames on the workers), in piece order
    pieces: list[Piece]
    rows: int
    notes: list[str]
    source: str


def load_partitioned(
    client,
    path: str | Path,
    units: str | Path | Mapping[str, str] | None = None,
    *,
    require_labels: Iterable[str] = (),
) -> ClusterFrame:
    """The cluster's ``masml.io.load_dataset``: read, convert and validate every piece on the workers.

    Raises ``UnitError`` for an unusable units file (checked here, before any worker starts) and
    ``PartitionedSchemaError`` listing every problem of every file.
    """
    import dask.dataframe as dd

    from masml.units import load_units, resolve_units

    parts = pieces(path)
    declared = None
    if units is not None:
        resolve_units(units)  # every problem of the units file, before the workers read anything
        declared = load_units(units)
    # pure=False: a file fixed and read again must be validated again, not served from the cache
    checked = client.map(check_piece, parts, units=declared, require_labels=tuple(require_labels), pure=False)
    reports: list[PieceReport] = client.gather(client.map(_report_of, checked, pure=False))
    n_rows = sum(r.rows for r in reports)
    n_files = len({p.file for p in parts})
    by_file = merge_reports(reports)
    if by_file:
        raise PartitionedSchemaError(by_file, n_rows=n_rows, n_files=n_files, source=str(path))
    frames = client.map(_frame_of, checked, pure=False)
    meta = client.submit(_empty_like, frames[0]).result()
    ddf = dd.from_delayed(frames, meta=meta, verify_meta=False)
    duplicates = _duplicate_ids(client, frames, parts)
    if duplicates:
        raise PartitionedSchemaError(duplicates, n_rows=n_rows, n_files=n_files, source=str(path))
    notes = list(dict.fromkeys(n for r in reports for n in r.notes))
    return ClusterFrame(ddf, frames, parts, n_rows, notes, str(path))


def _report_of(result: tuple) -> PieceReport:
    return result[1]


def _frame_of(result: tuple) -> pd.DataFrame:
    return result[0]


def _empty_like(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[:0]


def _rows_with(frame: pd.DataFrame, ids: frozenset) -> list[tuple[int, str]]:
    hit = frame["patient_id"].isin(ids).to_numpy()
    return [(int(r) + 1, str(v)) for r, v in zip(np.flatnonzero(hit), frame["patient_id"][hit], strict=True)]


def _duplicate_ids(client, frames: list, parts: list[Piece]) -> dict[str, list[Problem]]:
    """patient_id shared across pieces: counted with a tree reduction of per-piece id counts."""
    import dask.dataframe as dd

    meta = pd.DataFrame({"patient_id": pd.Series([], dtype="str")})
    ids = dd.from_delayed(client.map(_id_frame, frames, pure=False), meta=meta)
    counts = ids["patient_id"].value_counts()
    shared = counts[counts > 1].compute()
    if shared.empty:
        return {}
    wanted = frozenset(shared.index[:1000].astype(str))  # enough to locate and show examples
    hits = client.gather(client.map(_rows_with, frames, ids=wanted, pure=False))
    examples: dict[str, list[Example]] = {}
    rows: dict[str, int] = {}
    for piece, found in zip(parts, hits, strict=True):
        for row, pid in found:
            rows[piece.file] = rows.get(piece.file, 0) + 1
            examples.setdefault(piece.file, []).append(Example(row + piece.first_row, pid, pid))
    return {
        file: [Problem("patient_id", "duplicate_id", rows[file], tuple(ex[:MAX_EXAMPLES]),
                       expected="a unique patient_id in every row of the dataset (across all its files)",
                       detail=f"{len(shared):,} ids appear in more than one row")]  # fmt: skip
        for file, ex in examples.items()
    }


def _id_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["patient_id"]]
