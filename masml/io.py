"""Reading and writing datasets, and ``load_dataset``: raw file → canonical, validated frame.

* CSV is read with every column as text (only the empty field is missing: ``"NA"``, ``"null"`` or
  ``"None"`` stay text and are reported by validation as values that are not numbers), so nothing is
  coerced before validation sees it. Parquet keeps its types.
* CSV is written without the index, missing values as empty fields and floats at full precision
  (shortest repr that round-trips exactly).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa

from masml.units import to_canonical
from masml.validation import validate

__all__ = ["CSV_EXTENSIONS", "PARQUET_EXTENSIONS", "load_dataset", "read_table", "write_table"]

CSV_EXTENSIONS: tuple[str, ...] = (".csv",)
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet", ".pq")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_EXTENSIONS:
        return "csv"
    if suffix in PARQUET_EXTENSIONS:
        return "parquet"
    accepted = ", ".join((*CSV_EXTENSIONS, *PARQUET_EXTENSIONS))
    raise ValueError(f"unsupported file type for {str(path)!r}: expected one of {accepted}")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV (all columns as text) or Parquet (types kept) file as a DataFrame, by extension."""
    path = Path(path)
    fmt = _format(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if fmt == "parquet":
        df = pd.read_parquet(path)
    else:
        df = _read_csv_as_text(path)
        header = _csv_header(path)
        if header is not None and len(header) == df.shape[1] and len(set(header)) < len(header):
            df.columns = header  # pandas renamed duplicates to "x.1": restore them so validation reports them
    df.attrs = {}  # attrs stored by an earlier write (e.g. validation notes) must not leak into a new run
    return df


def _read_csv_as_text(path: Path) -> pd.DataFrame:
    """Every column as text; only the empty field is missing.

    The pyarrow parser is used on purpose: it is ~3x faster than pandas' C parser and strict, so a row
    with too many or too few fields is an error instead of silently becoming an index or padded with
    missing values. It also drops a UTF-8 byte-order mark (Excel) from the first column's name.
    """
    try:
        return pd.read_csv(path, engine="pyarrow", dtype=str, keep_default_na=False, na_values=[""])
    except (pa.ArrowInvalid, ValueError, UnicodeDecodeError) as err:
        expected = "UTF-8, comma-separated, one header row, the same number of fields in every row"
        raise ValueError(f"cannot parse {path} as CSV ({expected}): {err}") from None


def _csv_header(path: Path) -> list[str] | None:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return next(csv.reader(fh), None)


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV (no index, empty = missing, exact floats) or Parquet, by extension."""
    path = Path(path)
    fmt = _format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy(deep=False)
    out.attrs = {}  # run notes are not data
    if fmt == "parquet":
        out.to_parquet(path, index=False)
    else:
        out.to_csv(path, index=False, na_rep="")
    return path


def load_dataset(
    path: str | Path,
    units: str | Path | Mapping[str, str] | None = None,
    *,
    require_labels: Iterable[str] = (),
) -> pd.DataFrame:
    """Read → convert declared units → parse and validate: the entry point of every later command.

    ``units``: a YAML units file or a ``{column: unit}`` mapping (see ``masml.units``). Raises
    ``UnitError`` for an unusable units declaration and ``SchemaValidationError`` (with every problem)
    for data that do not match the schema; returns the canonical frame described in
    ``masml.validation``, with notes in ``frame.attrs["validation_notes"]``.
    """
    raw = read_table(path)
    converted = to_canonical(raw, units) if units is not None else raw
    return validate(converted, require_labels=require_labels, source=str(path))
