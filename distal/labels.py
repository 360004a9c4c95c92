"""Labels of a run directory: importing labels from people, and the labeled set they form.

Label files live under ``labels/`` in the run directory. Import files are never rewritten::

    labels/initial.parquet            initial labeled set (simulation oracle)
    labels/cycle-0001.parquet         oracle labels of cycle 1's selection (simulation)
    labels/import-20250301T091500.123456Z-3f2a9c0d1e4b.parquet
                                      one file per import: UTC time, first 12 hex digits of the
                                      imported file's SHA-256

Every file has the columns ``id``, ``label`` (class index) and ``source``. An
import file adds ``sha256`` and ``imported_at`` (the same for every row), and
``relabel``, which is true on the rows that replace an earlier label.

The labeled set applies the files in the order of :func:`label_files`:
initial, cycle files by number, then imports by time. An id takes the label of
its first row, and a later row changes it only when that row has ``relabel``
set. A later row without ``relabel`` that gives another label is a conflict
(two imports that ran at the same time can cause one). It stays an error until
a later relabel row settles the id. The rules are described in
``docs/labels.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import posixpath
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distal.pool import full_uri, open_fs, read_pool_info
from distal.rundir import COMPLETE_MARKER, RunDirectory, read_parquet, write_parquet_atomic

logger = logging.getLogger(__name__)

LABELS_DIR = "labels"
INITIAL_FILE = "initial.parquet"
CYCLE_FILE = re.compile(r"cycle-(\d{4,})\.parquet")
IMPORT_FILE = re.compile(r"import-(\d{8}T\d{6}\.\d{6}Z)-([0-9a-f]{12})\.parquet")
IMPORT_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"

LABELS_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()), ("source", pa.string())])
IMPORT_SCHEMA = pa.schema(
    [
        *LABELS_SCHEMA,
        ("sha256", pa.string()),
        ("imported_at", pa.string()),
        ("relabel", pa.bool_()),
    ]
)

INPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
MAX_LISTED_PROBLEMS = 20
MAX_LISTED_CLASSES = 10
# Rows of the pool's id column read at a time while looking up the file's ids.
POOL_ID_BATCH_ROWS = 65536

# Problem kinds, also used to count the problems left out of a message.
MALFORMED = "malformed row"
MISSING_COLUMN = "missing column"
EMPTY_FILE = "empty file"
INVALID_ID = "invalid id"
INVALID_LABEL = "invalid label"
DUPLICATE = "duplicate row"
CONFLICT = "conflicting labels"
UNKNOWN_ID = "unknown id"
ALREADY_LABELED = "already labeled"

ROW_NOTES = {
    "csv": "Rows are data rows counted from 1 (the header is not a row); lines are lines of the file.",
    "jsonl": "Rows are JSON objects counted from 1, blank lines skipped; lines are lines of the file.",
    "parquet": "Rows are counted from 1.",
}


class LabelError(ValueError):
    """Label files of a run directory that are unreadable or disagree with each other."""


class LabelImportError(LabelError):
    """A label file that cannot be imported. Nothing was written.

    Attributes:
        file: the label file as given to :func:`import_labels`.
        problems: every problem found, in row order.
    """

    def __init__(self, message: str, file: str, problems: Sequence[LabelProblem] = ()) -> None:
        super().__init__(message)
        self.file = file
        self.problems = tuple(problems)


@dataclass(frozen=True)
class LabelProblem:
    """One problem in a label file.

    Attributes:
        kind: category such as ``"unknown id"``, used to count the problems a message leaves out.
        message: what is wrong, in words.
        row: data row counted from 1, where a CSV header is not a row; None for the whole file.
        line: line of a CSV or JSON Lines file counted from 1; None for Parquet files and the whole file.
        id: the row's id as read; None when the row has none.
    """

    kind: str
    message: str
    row: int | None = None
    line: int | None = None
    id: str | None = None

    def describe(self) -> str:
        """Format the problem as one line: where it is, then what is wrong."""
        places = []
        if self.row is not None:
            place = f"row {self.row}"
            if self.line is not None and self.line != self.row:
                place += f" (line {self.line})"
            places.append(place)
        if self.id is not None:
            places.append(f"id {_quote(self.id)}")
        return f"{', '.join(places) or 'file'}: {self.message}"


@dataclass(frozen=True)
class ImportResult:
    """The outcome of one :func:`import_labels` call.

    Attributes:
        source: URI of the imported file (an absolute path for local files).
        sha256: SHA-256 of the file's bytes, as hex.
        already_imported: the same bytes were imported before, so nothing changed.
        label_file: the import file, relative to the run directory: the one written,
            or the earlier one when ``already_imported``; None when every row
            was unchanged and nothing was written.
        rows: data rows in the file; None when ``already_imported`` (the file is not read then).
        added: ids that had no label before.
        relabeled: ids whose label the import replaced.
        unchanged: ids that already had the same label, which are not written again.
    """

    source: str
    sha256: str
    already_imported: bool
    label_file: str | None
    rows: int | None
    added: int
    relabeled: int
    unchanged: int


@dataclass(frozen=True)
class _Row:
    """A data row as read from a label file, before its values are checked."""

    row: int
    line: int | None
    id: Any
    label: Any


@dataclass(frozen=True)
class _Label:
    """A checked row: a valid id and class index."""

    row: int
    line: int | None
    id: str
    label: int


# --- public API -------------------------------------------------------------------------


def import_labels(
    run_dir_uri: str,
    file: str,
    *,
    pool_uri: str,
    classes: Sequence[str] | None = None,
    relabel: bool = False,
    now: datetime | None = None,
) -> ImportResult:
    """Import labels from people into the run directory, all or nothing.

    The file is CSV, JSON Lines or Parquet, chosen by extension (``.csv``,
    ``.jsonl`` or ``.ndjson``, ``.parquet``), at a local path or any fsspec
    URI. It needs the columns ``id`` and ``label``, and other columns are
    ignored. A label is a class index or a class name. A text label that
    names a class is that class, and other text holding a whole number is an
    index. Text that names a class while its number would be another index
    (``"5"`` when class ``"5"`` has index 1) is rejected as ambiguous.

    Every row is checked before anything is written, and one new file
    ``labels/import-<UTC time>-<sha256[:12]>.parquet`` contains the rows that
    add or change a label. An id that already has the same label is counted
    as unchanged and not written again. Importing bytes that were imported
    before changes nothing.

    Args:
        run_dir_uri: run directory (local path or fsspec URI); created when missing.
        file: the label file to import.
        pool_uri: the run's pool; every id must be one of its ids.
        classes: class names, index = label; default: the pool's classes.
            Without either, labels must be class indexes and only negative
            ones are rejected.
        relabel: allow rows to replace an existing, different label.
        now: import time recorded in the file name and ``imported_at``
            (default: the current time); must be timezone-aware.

    Returns:
        What the import added, replaced and left unchanged.

    Raises:
        LabelImportError: the file cannot be read or has problems. Problems
            are no rows, a missing column, a missing or empty id or label, an
            id not in the pool, a label outside the classes, or the same id
            twice. An id that already has another label is one too, unless
            ``relabel`` is True. The message lists the problems with row
            numbers and ids.
        LabelError: an existing label file of the run directory is unreadable.
        PoolError: the pool is missing or invalid.
    """
    imported_at = _utc(now)
    file_format = _input_format(file)
    run_dir = RunDirectory(run_dir_uri)
    data, source = _read_bytes(file)
    sha256 = hashlib.sha256(data).hexdigest()

    # One listing serves both checks, so they see the same files.
    files = label_files(run_dir.uri)
    earlier = _find_import(run_dir, files, sha256)
    if earlier is not None:
        logger.info("labels import skipped file=%s sha256=%s already_imported=%s", source, sha256[:12], earlier)
        return ImportResult(source, sha256, True, earlier, None, 0, 0, 0)

    rows, changes, unchanged = _validate(run_dir, files, file, file_format, data, pool_uri, classes, relabel)
    result = ImportResult(
        source=source,
        sha256=sha256,
        already_imported=False,
        label_file=None,
        rows=rows,
        added=sum(1 for _, replaces in changes if not replaces),
        relabeled=sum(1 for _, replaces in changes if replaces),
        unchanged=unchanged,
    )
    if changes:
        name = _write_import(run_dir, changes, source, sha256, imported_at)
        result = dataclasses.replace(result, label_file=name)
    logger.info(
        "labels import done file=%s sha256=%s rows=%d added=%d relabeled=%d unchanged=%d label_file=%s",
        source, sha256[:12], result.rows, result.added, result.relabeled, result.unchanged, result.label_file,
    )
    return result


def label_files(run_dir_uri: str, *, before_cycle: int | None = None) -> list[str]:
    """List the run directory's label files in the order they are applied.

    The order is ``labels/initial.parquet``, then ``labels/cycle-NNNN.parquet``
    by cycle number, then ``labels/import-*.parquet`` by import time. Other
    ``.parquet`` files under ``labels/`` are skipped with a warning.

    Args:
        run_dir_uri: run directory (local path or fsspec URI).
        before_cycle: leave out the oracle files of this cycle and later
            ones, as a redone cycle must not see its own earlier oracle labels.

    Returns:
        Paths relative to the run directory, such as ``labels/initial.parquet``;
        empty when there is no ``labels/`` folder.
    """
    run_dir = RunDirectory(run_dir_uri)
    base = run_dir.path(LABELS_DIR)
    run_dir.fs.invalidate_cache(base)
    try:
        entries = run_dir.fs.ls(base, detail=False)
    except FileNotFoundError:
        return []

    keyed = []
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        key = _application_key(name)
        if key is None:
            if name.endswith(".parquet"):
                logger.warning("labels file skipped path=%s reason=unknown_name", run_dir.uri_of(LABELS_DIR, name))
            continue
        if before_cycle is not None and key[0] == 1 and key[1] >= before_cycle:
            continue
        keyed.append((key, f"{LABELS_DIR}/{name}"))
    return [name for _, name in sorted(keyed)]


def current_labels(run_dir_uri: str, *, files: Sequence[str] | None = None) -> pa.Table:
    """Return the labeled set: one row per labeled id, with its effective label.

    Args:
        run_dir_uri: run directory (local path or fsspec URI).
        files: label files relative to the run directory, as returned by
            :func:`label_files`; default: all of them. They are applied in
            :func:`label_files` order whatever order they are given in.

    Returns:
        A table with the columns ``id``, ``label`` and ``source``
        (:data:`LABELS_SCHEMA`), ids in order of their first label, each
        with the source of the row that set its label.

    Raises:
        LabelError: a label file is missing or unreadable, has the wrong
            columns, or two files give an id different labels and no later
            relabel row settles it.
        ValueError: a name in ``files`` is not a label file name.
    """
    run_dir = RunDirectory(run_dir_uri)
    names = label_files(run_dir.uri) if files is None else _order_files(files)
    labels, conflicts = _labeled_set(run_dir, names)
    if conflicts:
        raise LabelError(_format_conflicts(run_dir, conflicts))
    return labels.select(LABELS_SCHEMA.names)


def pending_labels(run_dir_uri: str, cycle: int) -> tuple[int, int]:
    """Count how many of a completed cycle's selected ids have a label now.

    Returns:
        (selected ids, selected ids that have a label).

    Raises:
        FileNotFoundError: the cycle is not complete, so its selection may still change.
        LabelError: as :func:`current_labels`.
    """
    run_dir = RunDirectory(run_dir_uri)
    if not run_dir.is_complete(cycle):
        raise FileNotFoundError(
            f"Cycle {cycle} of {run_dir.uri} is not complete (no {COMPLETE_MARKER} marker), so its selection "
            "may still change. Wait until the cycle finishes."
        )
    selected = read_parquet(run_dir.fs, run_dir.cycle_path(cycle, "selected.parquet"), columns=["id"]).column("id")
    labeled_ids = current_labels(run_dir_uri).column("id")
    labeled = pc.sum(pc.is_in(selected, value_set=labeled_ids.combine_chunks())).as_py() or 0
    return len(selected), labeled


def _validate(
    run_dir: RunDirectory,
    label_file_names: list[str],
    file: str,
    file_format: str,
    data: bytes,
    pool_uri: str,
    classes: Sequence[str] | None,
    relabel: bool,
) -> tuple[int, list[tuple[_Label, bool]], int]:
    """Check a label file against the pool and the labeled set.

    Returns:
        (data rows, changes as (row, replaces an earlier label), unchanged rows).

    Raises:
        LabelImportError: listing every problem found.
    """
    rows, problems = _READERS[file_format](data, file)
    pool = read_pool_info(pool_uri)
    if classes is None:
        classes = pool.classes
    elif pool.classes is not None and tuple(classes) != pool.classes:
        logger.warning("labels import classes differ from the pool's classes pool=%s classes=%s", pool.path, list(classes))
    parser = _LabelParser(classes)

    labels, row_problems = _check_rows(rows, parser)
    problems += row_problems
    unknown = _find_unknown_ids(pool.shards, [label.id for label in labels])
    problems += [_problem(UNKNOWN_ID, f"unknown id, not in pool {pool.path}", label) for label in labels if label.id in unknown]
    known = [label for label in labels if label.id not in unknown]
    changes, unchanged, existing_problems = _compare_with_labeled_set(run_dir, label_file_names, known, parser, relabel)
    problems += existing_problems

    if problems:
        all_unknown = bool(labels) and len(unknown) == len(labels)
        raise LabelImportError(_format_problems(file, file_format, problems, pool.path, all_unknown), file, _sorted(problems))
    return len(rows), changes, unchanged


# --- reading the input file ----------------------------------------------------------------


def _read_bytes(file: str) -> tuple[bytes, str]:
    fs, path = open_fs(file)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read(), full_uri(fs, path)
    except FileNotFoundError as err:
        raise LabelImportError(f"Label file {file} not found. Check the path and import it again.", file) from err
    except OSError as err:
        raise LabelImportError(f"Cannot read label file {file}: {err}. Check the path and import it again.", file) from err


def _input_format(file: str) -> str:
    extension = posixpath.splitext(file.lower().rstrip("/"))[1]
    if extension not in INPUT_FORMATS:
        raise LabelImportError(
            f"Label file {file}: expected the extension .csv, .jsonl, .ndjson or .parquet, but got "
            f"{extension or 'none'!r}. Save the labels in one of these formats and import them again.",
            file,
        )
    return INPUT_FORMATS[extension]


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelImportError(
            f"Label file {file} is not UTF-8 text (invalid byte at offset {err.start}). Save it as UTF-8 and import it again.",
            file,
        ) from err


def _read_csv(data: bytes, file: str) -> tuple[list[_Row], list[LabelProblem]]:
    """Read a comma-separated file with a header row, skipping blank lines."""
    # With strict=True an unclosed or stray quote raises csv.Error instead of swallowing the next lines.
    reader = csv.reader(io.StringIO(_decode(data, file), newline=""), strict=True)
    try:
        header = next((fields for fields in reader if fields), None)
        if header is None:
            return [], [LabelProblem(EMPTY_FILE, "the file is empty (no header and no rows)")]
        columns = [name.strip() for name in header]
        problems = _check_columns(columns)
        if problems:
            if len(columns) == 1 and (";" in columns[0] or "\t" in columns[0]):
                separator = "';'" if ";" in columns[0] else "a tab"
                problems.append(LabelProblem(
                    MISSING_COLUMN, f"the header {_quote(header[0])} seems to use {separator} between columns, but CSV files need commas"
                ))
            return [], problems

        id_index, label_index = columns.index("id"), columns.index("label")
        rows: list[_Row] = []
        last_line = reader.line_num
        for fields in reader:
            line, last_line = last_line + 1, reader.line_num
            if not fields:
                continue
            number = len(rows) + 1
            if len(fields) == len(columns):
                rows.append(_Row(number, line, fields[id_index], fields[label_index]))
                continue
            row_id = fields[id_index] if id_index < len(fields) else None
            problems.append(LabelProblem(
                MALFORMED,
                f"the row has {_count(len(fields), 'field')}, but the header has {len(columns)} columns; "
                "quote values that contain commas",
                number, line, row_id,
            ))
            rows.append(_Row(number, line, None, None))
    except csv.Error as err:
        raise LabelImportError(
            f"Label file {file} is not valid CSV at line {reader.line_num}: {err}. Fix the file and import it again.", file
        ) from err
    return _without_malformed(rows, problems, "the file has a header but no data rows")


def _read_jsonl(data: bytes, file: str) -> tuple[list[_Row], list[LabelProblem]]:
    """Read one JSON object per line, skipping blank lines."""
    rows: list[_Row] = []
    problems: list[LabelProblem] = []
    seen = {"id": False, "label": False}
    for line, text in enumerate(_decode(data, file).split("\n"), start=1):
        if not text.strip():
            continue
        number = len(rows) + 1
        rows.append(_Row(number, line, None, None))
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(LabelProblem(MALFORMED, f"not valid JSON: {err.msg} at column {err.colno}", number, line))
            continue
        if not isinstance(value, dict):
            problems.append(LabelProblem(MALFORMED, f"expected a JSON object with id and label, but got {type(value).__name__}", number, line))
            continue
        for key in seen:
            seen[key] = seen[key] or key in value
        rows[-1] = _Row(number, line, value.get("id"), value.get("label"))

    missing = [LabelProblem(MISSING_COLUMN, f"no row has the field {key!r}") for key, present in seen.items() if not present]
    if rows and missing:
        return [], problems + missing
    return _without_malformed(rows, problems, "the file has no rows")


def _read_parquet(data: bytes, file: str) -> tuple[list[_Row], list[LabelProblem]]:
    try:
        parquet_file = pq.ParquetFile(io.BytesIO(data))
        problems = _check_columns(parquet_file.schema_arrow.names)
        if problems:
            return [], problems
        # Only id and label are read, because exports from labeling tools can carry large extra columns.
        table = parquet_file.read(columns=["id", "label"])
    except (pa.ArrowException, OSError) as err:
        raise LabelImportError(f"Label file {file} is not a readable Parquet file: {err}. Fix the file and import it again.", file) from err
    ids, labels = table.column("id").to_pylist(), table.column("label").to_pylist()
    rows = [_Row(index + 1, None, ids[index], labels[index]) for index in range(table.num_rows)]
    return _without_malformed(rows, [], "the file has no rows")


_READERS = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}


def _check_columns(columns: Sequence[str]) -> list[LabelProblem]:
    problems = []
    for name in ("id", "label"):
        count = list(columns).count(name)
        if count == 0:
            problems.append(LabelProblem(MISSING_COLUMN, f"no {name!r} column (found: {list(columns)}); the file needs the columns id and label"))
        elif count > 1:
            problems.append(LabelProblem(MISSING_COLUMN, f"the column {name!r} appears {count} times; keep one"))
    return problems


def _without_malformed(rows: list[_Row], problems: list[LabelProblem], empty: str) -> tuple[list[_Row], list[LabelProblem]]:
    """Drop rows already reported as malformed, so they are not reported twice. Add a problem for a file without rows."""
    if not rows:
        return [], [*problems, LabelProblem(EMPTY_FILE, empty)]
    malformed = {problem.row for problem in problems if problem.kind == MALFORMED}
    return [row for row in rows if row.row not in malformed], problems


# --- checking rows --------------------------------------------------------------------------


class _LabelParser:
    """Parser from label values (class index or class name) to class indexes."""

    def __init__(self, classes: Sequence[str] | None) -> None:
        if isinstance(classes, str):
            raise ValueError(f"Expected classes as a sequence of class names, but got the string {classes!r}.")
        self.classes = None if classes is None else tuple(str(name) for name in classes)
        self.index = {} if self.classes is None else {name: index for index, name in enumerate(self.classes)}
        if self.classes is not None and len(self.index) != len(self.classes):
            repeated = sorted(name for name, count in Counter(self.classes).items() if count > 1)
            raise ValueError(f"Expected distinct class names, but {repeated} appear more than once.")

    def parse(self, value: Any) -> tuple[int | None, str | None]:
        """Return (class index, None), or (None, the problem) for an invalid value."""
        # Parquet writers such as pandas store a missing number as NaN.
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value)):
            return None, "label is missing"
        if isinstance(value, bool):
            return None, f"label {_quote(value)} is not a class index or name"
        if isinstance(value, float):
            if not value.is_integer():
                return None, f"label {_quote(value)} is not a whole number"
            value = int(value)
        if isinstance(value, int):
            return self._check_index(value, value)
        if not isinstance(value, str):
            return None, f"label {_quote(value)} is not a class index or name"

        text = value.strip()
        as_number = int(text) if re.fullmatch(r"[+-]?\d+", text) else None
        if text in self.index:
            named = self.index[text]
            if as_number is not None and as_number != named and self.classes is not None and 0 <= as_number < len(self.classes):
                return None, (
                    f"label {_quote(value)} is ambiguous: it names class index {named}, but read as an index it is class "
                    f"{self.classes[as_number]!r}; give integer indexes in a JSON Lines or Parquet file instead"
                )
            return named, None
        if as_number is not None:
            return self._check_index(as_number, value)
        if self.classes is None:
            return None, f"label {_quote(value)} is a name, but the pool has no class names; give class indexes or pass classes"
        return None, f"label {_quote(value)} is not a class (valid: {self.valid_classes()})"

    def _check_index(self, index: int, value: Any) -> tuple[int | None, str | None]:
        if index < 0:
            return None, f"label {_quote(value)} is negative; class indexes start at 0"
        if self.classes is not None and index >= len(self.classes):
            return None, f"label {_quote(value)} is out of range: there are {len(self.classes)} classes, so indexes are 0 to {len(self.classes) - 1}"
        return index, None

    def valid_classes(self) -> str:
        listed = ", ".join(self.classes[:MAX_LISTED_CLASSES])
        rest = len(self.classes) - MAX_LISTED_CLASSES
        return f"{listed}, ... {rest} more" if rest > 0 else listed

    def describe(self, index: int) -> str:
        """Format a class index with its name, such as ``3 ('cat')``."""
        if self.classes is None or index >= len(self.classes) or self.classes[index] == str(index):
            return str(index)
        return f"{index} ({self.classes[index]!r})"


def _parse_id(value: Any) -> tuple[str | None, str | None]:
    """Return (id, None), or (None, the problem) for an invalid value."""
    if value is None:
        return None, "id is missing"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if not isinstance(value, str):
        return None, f"id {_quote(value)} is not text"
    if not value.strip():
        return None, "id is empty"
    return value, None


def _check_rows(rows: list[_Row], parser: _LabelParser) -> tuple[list[_Label], list[LabelProblem]]:
    """Check ids, labels and repeated ids. Return the first valid row of each id, and the problems."""
    first: dict[str, _Label] = {}
    problems = []
    for row in rows:
        sample_id, id_problem = _parse_id(row.id)
        label, label_problem = parser.parse(row.label)
        if id_problem:
            problems.append(LabelProblem(INVALID_ID, id_problem, row.row, row.line))
        if label_problem:
            problems.append(LabelProblem(INVALID_LABEL, label_problem, row.row, row.line, sample_id))
        if sample_id is None or label is None:
            continue

        earlier = first.get(sample_id)
        if earlier is None:
            first[sample_id] = _Label(row.row, row.line, sample_id, label)
        elif earlier.label == label:
            problems.append(LabelProblem(DUPLICATE, f"duplicate of row {earlier.row} (same id and label); remove one", row.row, row.line, sample_id))
        else:
            problems.append(LabelProblem(
                CONFLICT,
                f"label {parser.describe(label)} conflicts with label {parser.describe(earlier.label)} in row {earlier.row}; keep one",
                row.row, row.line, sample_id,
            ))
    return list(first.values()), problems


def _find_unknown_ids(shards: Sequence[str], ids: Sequence[str]) -> set[str]:
    """Return the ids that no shard of the pool contains.

    It reads only the pool's ``id`` column, one batch of :data:`POOL_ID_BATCH_ROWS`
    rows at a time, so memory stays bounded by the label file and one batch.
    """
    if not ids:
        return set()
    file_ids = pa.array(ids, pa.string())
    found = np.zeros(len(file_ids), dtype=bool)  # [file ids] seen in the pool so far
    started = time.perf_counter()
    pool_rows = 0
    for shard in shards:
        fs, path = open_fs(shard)
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=POOL_ID_BATCH_ROWS, columns=["id"]):
                pool_ids = batch.column(0).cast(pa.string())
                found |= pc.is_in(file_ids, value_set=pool_ids).to_numpy(zero_copy_only=False)
                pool_rows += batch.num_rows
        if found.all():
            break
    logger.info(
        "labels pool lookup ids=%d unknown=%d pool_rows_read=%d seconds=%.2f",
        len(ids), int((~found).sum()), pool_rows, time.perf_counter() - started,
    )
    return {sample_id for sample_id, present in zip(ids, found.tolist()) if not present}


def _compare_with_labeled_set(
    run_dir: RunDirectory, label_file_names: list[str], labels: list[_Label], parser: _LabelParser, relabel: bool
) -> tuple[list[tuple[_Label, bool]], int, list[LabelProblem]]:
    """Split checked rows into changes (row, replaces an earlier label) and unchanged ones."""
    existing, conflicts = _labeled_set(run_dir, label_file_names)
    if labels and existing.num_rows:
        file_ids = pa.array([label.id for label in labels], pa.string())
        existing = existing.filter(pc.is_in(existing.column("id"), value_set=file_ids))
    else:
        existing = existing.slice(0, 0)
    earlier = {row["id"]: row for row in existing.to_pylist()}

    changes, unchanged, problems = [], 0, []
    for label in labels:
        if label.id in conflicts:
            if relabel:
                changes.append((label, True))
            else:
                problems.append(_problem(ALREADY_LABELED, f"label files disagree on this id ({_describe_conflict(conflicts[label.id])}); to settle it with this label, import with --relabel (relabel=True in Python)", label))
            continue
        previous = earlier.get(label.id)
        if previous is None:
            changes.append((label, False))
        elif previous["label"] == label.label:
            unchanged += 1
        elif relabel:
            changes.append((label, True))
        else:
            problems.append(_problem(
                ALREADY_LABELED,
                f"already labeled {parser.describe(previous['label'])} in {previous['file']}, "
                f"the file gives {parser.describe(label.label)}; to replace the label, import with --relabel (relabel=True in Python)",
                label,
            ))
    return changes, unchanged, problems


def _problem(kind: str, message: str, label: _Label) -> LabelProblem:
    return LabelProblem(kind, message, label.row, label.line, label.id)


# --- the labeled set ----------------------------------------------------------------------


def _application_key(name: str) -> tuple[int, int, str] | None:
    """Return the sort key that orders label files for application, or None for other names."""
    if name == INITIAL_FILE:
        return (0, 0, "")
    match = CYCLE_FILE.fullmatch(name)
    if match:
        return (1, int(match.group(1)), "")
    match = IMPORT_FILE.fullmatch(name)
    if match:
        return (2, 0, f"{match.group(1)}-{match.group(2)}")
    return None


def _labeled_set(run_dir: RunDirectory, names: list[str]) -> tuple[pa.Table, dict[str, list[tuple[str, int]]]]:
    """Apply label files in order. Return one (id, label, source, file) row per id, and the unsettled conflicts.

    A conflict maps an id to the (file, label) pairs that disagree, the label in effect first.
    """
    parts = [_read_label_file(run_dir, name) for name in names]
    if not parts:
        return LABELS_SCHEMA.append(pa.field("file", pa.string())).empty_table(), {}
    rows = pa.concat_tables(parts)

    ids = rows.column("id").combine_chunks()
    codes = pc.index_in(ids, value_set=pc.unique(ids)).to_numpy()  # [rows] index of the row's id, in order of first appearance
    _, first_rows = np.unique(codes, return_index=True)  # [ids] first row of each id, ascending
    counts = np.bincount(codes)  # [ids] rows per id
    effective = rows.take(pa.array(first_rows)).select(["id", "label", "source", "file"])
    repeated = np.flatnonzero(counts[codes] > 1)  # [rows of ids that occur more than once]
    if repeated.size == 0:
        return effective, {}

    latest: dict[int, dict[str, Any]] = {}
    disagreeing: dict[int, list[tuple[str, int]]] = {}
    repeated_rows = rows.take(pa.array(repeated)).to_pylist()
    for code, row in zip(codes[repeated].tolist(), repeated_rows):
        current = latest.get(code)
        if current is None:
            latest[code] = row
        elif row["relabel"]:
            latest[code] = row
            disagreeing.pop(code, None)
        elif row["label"] != current["label"]:
            disagreeing.setdefault(code, [(current["file"], current["label"])]).append((row["file"], row["label"]))

    label_column = effective.column("label").to_numpy().copy()
    sources = effective.column("source").to_pylist()
    file_column = effective.column("file").to_pylist()
    for code, row in latest.items():
        label_column[code], sources[code], file_column[code] = row["label"], row["source"], row["file"]
    effective = pa.table(
        {"id": effective.column("id"), "label": pa.array(label_column, pa.int64()), "source": pa.array(sources, pa.string()), "file": pa.array(file_column, pa.string())}
    )
    conflicts = {effective.column("id")[code].as_py(): pairs for code, pairs in disagreeing.items()}
    return effective, conflicts


def _order_files(files: Sequence[str]) -> list[str]:
    keyed = []
    for name in files:
        folder, _, base = name.rpartition("/")
        key = _application_key(base)
        if folder != LABELS_DIR or key is None:
            raise ValueError(
                f"Expected label files as returned by label_files(), such as 'labels/initial.parquet', but got {name!r}."
            )
        keyed.append((key, name))
    return [name for _, name in sorted(keyed)]


def _read_label_file(run_dir: RunDirectory, name: str) -> pa.Table:
    """Read one label file as id, label, source, relabel and file columns."""
    uri = run_dir.uri_of(name)
    try:
        table = read_parquet(run_dir.fs, run_dir.path(name))
    except FileNotFoundError as err:
        raise LabelError(f"Label file {uri} not found. distal never deletes label files, so restore it from a backup.") from err
    except (pa.ArrowException, OSError) as err:
        raise LabelError(f"Label file {uri} is not a readable Parquet file: {err}. Restore it from a backup.") from err

    expected = "expected the columns id (string), label (integer) and source (string)"
    missing = [column for column in LABELS_SCHEMA.names if column not in table.column_names]
    if missing:
        raise LabelError(f"Label file {uri}: {expected}, but got {table.column_names}. Restore it from a backup.")
    try:
        labels = table.select(LABELS_SCHEMA.names).cast(LABELS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        found = {name: str(table.schema.field(name).type) for name in LABELS_SCHEMA.names}
        raise LabelError(f"Label file {uri}: {expected}, but got {found}: {err}. Restore it from a backup.") from err
    if labels.column("id").null_count or labels.column("label").null_count:
        raise LabelError(f"Label file {uri} has rows with a null id or label. Restore it from a backup.")

    if "relabel" in table.column_names:
        relabel = table.column("relabel").cast(pa.bool_()).fill_null(False)
    else:
        relabel = pa.array(np.zeros(table.num_rows, dtype=bool))
    return labels.append_column("relabel", relabel).append_column("file", pa.array([name] * table.num_rows, pa.string()))


def _find_import(run_dir: RunDirectory, names: list[str], sha256: str) -> str | None:
    """Return the import file that recorded these bytes, or None.

    Import file names carry the first 12 hex digits of the hash, so only
    files with that prefix are read to compare the whole hash.
    """
    for name in names:
        match = IMPORT_FILE.fullmatch(name.rpartition("/")[2])
        if match is None or match.group(2) != sha256[:12]:
            continue
        hashes = read_parquet(run_dir.fs, run_dir.path(name), columns=["sha256"]).column("sha256")
        if pc.any(pc.equal(hashes, sha256)).as_py():
            return name
    return None


def _write_import(run_dir: RunDirectory, changes: list[tuple[_Label, bool]], source: str, sha256: str, imported_at: datetime) -> str:
    name = f"{LABELS_DIR}/import-{imported_at.strftime(IMPORT_TIME_FORMAT)}-{sha256[:12]}.parquet"
    path = run_dir.path(name)
    # NOTE: two imports into one run directory at the same time both check
    # against the labeled set before either writes, so both can label one
    # id. current_labels() then reports the conflict until a relabel settles it.
    if run_dir.fs.exists(path):
        raise FileExistsError(f"Label file {run_dir.uri_of(name)} already exists. Import again, which picks a new time stamp.")
    count = len(changes)
    table = pa.table(
        {
            "id": [label.id for label, _ in changes],
            "label": [label.label for label, _ in changes],
            "source": [source] * count,
            "sha256": [sha256] * count,
            "imported_at": [imported_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")] * count,
            "relabel": [replaces for _, replaces in changes],
        },
        schema=IMPORT_SCHEMA,
    )
    write_parquet_atomic(run_dir.fs, path, table)
    return name


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"Expected a timezone-aware import time, but got {now!r}. Pass, for example, datetime.now(timezone.utc).")
    return now.astimezone(timezone.utc)


# --- messages ----------------------------------------------------------------------------


def _sorted(problems: list[LabelProblem]) -> list[LabelProblem]:
    """Order problems of the whole file first, then by row."""
    return sorted(problems, key=lambda problem: -1 if problem.row is None else problem.row)


def _format_problems(file: str, file_format: str, problems: list[LabelProblem], pool: str, all_unknown: bool) -> str:
    problems = _sorted(problems)
    lines = [f"Label file {file} has {_count(len(problems), 'problem')}; nothing was imported:"]
    lines += [f"  {problem.describe()}" for problem in problems[:MAX_LISTED_PROBLEMS]]
    rest = problems[MAX_LISTED_PROBLEMS:]
    if rest:
        counts = ", ".join(f"{count} {kind}" for kind, count in Counter(problem.kind for problem in rest).most_common())
        lines.append(f"  ... and {len(rest)} more ({counts})")

    if any(problem.row is not None for problem in problems):
        lines.append(ROW_NOTES[file_format])
    if all_unknown:
        lines.append(f"None of the file's ids is in pool {pool}; check that this is the run's pool.")
    if any(problem.kind == ALREADY_LABELED for problem in problems):
        lines.append("To replace existing labels on purpose, import the file with --relabel (relabel=True in Python).")
    lines.append("Fix the file and import it again.")
    return "\n".join(lines)


def _quote(value: Any, limit: int = 60) -> str:
    """Format a value as repr(), cut to ``limit`` characters so that one bad cell cannot flood a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _describe_conflict(pairs: list[tuple[str, int]]) -> str:
    return ", ".join(f"{label} in {file}" for file, label in pairs)


def _format_conflicts(run_dir: RunDirectory, conflicts: dict[str, list[tuple[str, int]]]) -> str:
    lines = [f"The label files of {run_dir.uri} disagree on {_count(len(conflicts), 'id')}, and no later relabel settles them:"]
    for sample_id, pairs in list(conflicts.items())[:MAX_LISTED_PROBLEMS]:
        lines.append(f"  id {sample_id!r}: {_describe_conflict(pairs)}")
    if len(conflicts) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(conflicts) - MAX_LISTED_PROBLEMS} more ids")
    lines.append("Two imports probably ran at the same time. Import a file with the right labels with --relabel (relabel=True in Python).")
    return "\n".join(lines)
