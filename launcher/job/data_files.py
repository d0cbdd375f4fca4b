"""Reading the rows of a local data file the way the job's `datasets` loaders will, without them.

The launcher must stay light (no torch, no `datasets`), yet a typo in a field name or a broken
JSONL line should be found before a job waits hours for a GPU. This reads JSONL / JSON / CSV
with the standard library (Parquet through pyarrow, only where it is installed) and reports the
first problem with its line number.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

# The file types `dataset.path` may name, and the `datasets` loader each goes to.
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Rows read in full; past this many the row count is unknown (checks needing it are skipped).
MAX_ROWS = 100_000


@dataclass
class Rows:
    rows: list[tuple[int, dict]] = field(default_factory=list)  # (line number, row)
    fields: list[str] = field(default_factory=list)  # every field seen, in order of appearance
    complete: bool = True  # False: stopped at MAX_ROWS, so len(rows) is not the row count
    total: int | None = None  # the row count where known without reading every row (Parquet)
    error: str | None = None  # the first problem, naming the file (and line)
    unchecked: str | None = None  # why the rows could not be read here (not an error)

    @property
    def count(self) -> int | None:
        if self.total is not None:
            return self.total
        return len(self.rows) if self.complete else None

    def add(self, line: int, row: dict) -> None:
        self.rows.append((line, row))
        for name in row:
            if name not in self.fields:
                self.fields.append(name)


def read_rows(path: Path, limit: int = MAX_ROWS) -> Rows:
    """The rows of a .jsonl/.json/.csv/.parquet file; `error` says what a loader would refuse."""
    kind = LOCAL_FORMATS[path.suffix.lower()]
    try:
        if kind == "parquet":
            return _parquet(path, limit)
        with path.open(encoding="utf-8", newline="" if kind == "csv" else None) as handle:
            return _csv(path, handle, limit) if kind == "csv" else _json(path, handle, limit)
    except UnicodeDecodeError as exc:
        return Rows(error=f"{path}: not UTF-8 text (byte {exc.start})")
    except OSError as exc:
        return Rows(error=f"cannot read {path}: {exc.strerror}")


def _json(path: Path, handle, limit: int) -> Rows:
    """One JSON object per line, or (as `datasets` also accepts) one JSON array of objects."""
    result = Rows()
    first_error: str | None = None
    saw_text = False
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        saw_text = True
        if len(result.rows) >= limit:
            result.complete = False
            break
        try:
            row = json.loads(line)
        except ValueError as exc:
            first_error = f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})"
            break
        if not isinstance(row, dict):
            first_error = f"{path}:{number}: expected one JSON object per line, got {_kind(row)}"
            break
        result.add(number, row)
    if not saw_text:
        return Rows(error=f"{path} is empty")
    if first_error is None:
        return result
    # Not JSON Lines: maybe one JSON document (a pretty-printed array of records).
    handle.seek(0)
    try:
        document = json.load(handle)
    except ValueError:
        return Rows(error=first_error)
    if isinstance(document, dict):
        return Rows(
            error=f"{path}: one JSON object, not records (expected a JSON array of objects, or one object per line)"
        )
    if not isinstance(document, list):
        return Rows(error=first_error)
    records = Rows()
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            return Rows(error=f"{path}: item {index} of the JSON array is {_kind(row)}, not an object")
        if len(records.rows) >= limit:
            records.complete = False
            break
        records.add(index + 1, row)  # no line numbers inside one document: item numbers
    if not records.rows:
        records.error = f"{path} has no rows (an empty JSON array)"
    return records


def _kind(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _csv(path: Path, handle, limit: int) -> Rows:
    csv.field_size_limit(2**31 - 1)  # long text fields are normal in a dataset (pandas has no limit)
    reader = csv.reader(handle)
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)  # pandas skips blank lines before the header too
        if header is None:
            return Rows(error=f"{path} is empty")
        result = Rows(fields=list(header))
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                return Rows(
                    fields=list(header),
                    error=f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}",
                )
            if len(result.rows) >= limit:
                result.complete = False
                break
            result.rows.append((reader.line_num, dict(zip(header, row))))
    except csv.Error as exc:
        return Rows(error=f"{path}:{reader.line_num}: not valid CSV ({exc})")
    if not result.rows:
        result.error = f"{path} has no rows (only a header)"
    return result


def _parquet(path: Path, limit: int) -> Rows:
    if importlib.util.find_spec("pyarrow") is None:
        return Rows(unchecked="pyarrow is not installed here, so the Parquet file was not read")
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        fields = list(parquet.schema_arrow.names)
        total = parquet.metadata.num_rows
        sample = next(parquet.iter_batches(batch_size=min(limit, 1000)), None)
    except OSError as exc:
        return (
            Rows(error=f"cannot read {path}: {exc.strerror}")
            if exc.strerror
            else Rows(error=f"{path}: not a Parquet file ({exc})")
        )
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends
        return Rows(error=f"{path}: not a Parquet file ({exc})")
    result = Rows(fields=fields, total=total)
    for index, row in enumerate(sample.to_pylist() if sample is not None else []):
        result.rows.append((index + 1, row))
    if total == 0:
        result.error = f"{path} has no rows"
    return result
