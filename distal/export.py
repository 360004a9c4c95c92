"""Export a cycle's selection for labeling, and read labels back from Label Studio.

:func:`export_selection` writes three files for the images of one completed
cycle's ``selected.parquet``, by default into ``cycles/NNNN/export/``::

    selected.csv         id, rank, predicted_loss, shard, row, [image_uri], label (empty)
    selected.jsonl       the same fields except label, one JSON object per line
    label-studio.json    Label Studio import tasks, one per selected image

Each selected id is located in the pool by streaming the pool's ``id`` column
shard by shard, and image bytes are read only for the row groups that contain
selected rows. Annotators fill in the CSV's ``label`` column, or label the
tasks in Label Studio and convert its JSON export with
:func:`labels_from_label_studio`. Either file goes back through
``distal labels import``. The workflow is described in ``docs/labeling.md``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distal.pool import PoolError, PoolInfo, full_uri, open_fs, read_pool_info
from distal.progress import Progress
from distal.rundir import COMPLETE_MARKER, RunDirectory, read_json, read_parquet, write_bytes_atomic

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
CSV_FILE = "selected.csv"
JSONL_FILE = "selected.jsonl"
LABEL_STUDIO_FILE = "label-studio.json"

SELECTED_COLUMNS = {"rank": pa.int64(), "id": pa.string(), "predicted_loss": pa.float64()}
# Rows of a shard's id column read at a time while locating the selected ids.
ID_BATCH_ROWS = 65536
# Label Studio's import guide (docs/source/guide/tasks.md in its repository)
# gives 50 MB as the largest import file, so a bigger label-studio.json is logged.
LABEL_STUDIO_WARN_BYTES = 50 * 1024 * 1024
MAX_LISTED_IDS = 20

# (leading bytes, offset of those bytes, file extension, MIME type). WebP files
# start with "RIFF", a 4-byte size, then "WEBP".
IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", 0, ".png", "image/png"),
    (b"\xff\xd8\xff", 0, ".jpg", "image/jpeg"),
    (b"GIF87a", 0, ".gif", "image/gif"),
    (b"GIF89a", 0, ".gif", "image/gif"),
    (b"WEBP", 8, ".webp", "image/webp"),
    (b"BM", 0, ".bmp", "image/bmp"),
)


class ExportError(ValueError):
    """A selection that cannot be exported: incomplete or unknown cycle, changed pool, bad output folder."""


class LabelStudioExportError(ValueError):
    """A Label Studio JSON export that cannot be turned into a label file. Nothing was written.

    Attributes:
        problems: one line per problem, each naming the task and the distal id where known.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


@dataclass(frozen=True)
class _SelectedImage:
    """One selected image with its place in the pool and its encoded bytes."""

    rank: int
    id: str
    predicted_loss: float | None
    shard: str
    row: int
    data: bytes
    extension: str
    mime_type: str


@dataclass(frozen=True)
class LabelStudioConversion:
    """The outcome of :func:`labels_from_label_studio`.

    Attributes:
        out_csv: URI of the label file written (an absolute path for local files).
        tasks: tasks in the Label Studio export.
        labeled: rows written, one per labeled distal id.
        unlabeled: tasks without an annotation that counts (none, or all cancelled); not written.
    """

    out_csv: str
    tasks: int
    labeled: int
    unlabeled: int


# --- export ------------------------------------------------------------------------------


def export_selection(
    run_dir_uri: str,
    cycle: int,
    *,
    out_dir: str | None = None,
    image_uri_base: str | None = None,
    embed_images: bool = False,
    pool_uri: str | None = None,
) -> dict[str, str]:
    """Write a completed cycle's selection as CSV, JSON Lines and Label Studio tasks.

    Every row carries the id, rank, predicted loss, the pool shard file and
    the 0-based row in that shard. With ``image_uri_base``, each row also has
    ``image_uri = image_uri_base + id + extension``, where the extension comes
    from the image bytes (``.png``, ``.jpg``, ``.gif``, ``.webp``, ``.bmp``).
    The id is percent-encoded (``/`` kept) when the base starts with
    ``http://`` or ``https://``, and used as it is otherwise. distal does not
    upload images to that location.

    A Label Studio task's ``data.image`` is that URI, or a base64 data URI of
    the pool's bytes (``data:image/png;base64,...``) without a base or with
    ``embed_images``. A warning is logged when ``label-studio.json`` with
    embedded images exceeds 50 MB, the largest import file in Label Studio's
    import guide.

    Files are written atomically and replace an earlier export in the same folder.

    Args:
        run_dir_uri: run directory (local path or fsspec URI).
        cycle: cycle number, from 1; the cycle must be complete.
        out_dir: folder for the files (local path or fsspec URI); created when
            missing. Default: ``cycles/NNNN/export/`` in the run directory.
        image_uri_base: prefix of the image URIs in the user's own image store,
            such as ``s3://bucket/images/`` or ``https://cdn.example.com/images/``.
        embed_images: give Label Studio data URIs even when ``image_uri_base`` is set.
        pool_uri: pool to locate the ids in. Default: the pool path recorded in
            the cycle's ``manifest.json``. Pass it when the pool has moved.

    Returns:
        URIs of the files written, under the keys ``csv``, ``jsonl`` and ``label_studio``.

    Raises:
        ExportError: the run directory or cycle does not exist, or the cycle
            is not complete. Its ``selected.parquet`` or ``manifest.json`` is
            invalid, or selected ids are missing from the pool. An image is
            empty or of an unknown format, or ``out_dir`` cannot be used.
        PoolError: the pool given as ``pool_uri`` is missing or invalid.
        ValueError: ``cycle`` is not a whole number from 1, or
            ``image_uri_base`` is empty.
    """
    start = time.perf_counter()
    _check_arguments(cycle, image_uri_base, out_dir)
    run_dir = RunDirectory(run_dir_uri)
    _check_cycle(run_dir, cycle)
    selected = _read_selected(run_dir, cycle)
    pool = _read_pool(run_dir, cycle, pool_uri)

    out_fs, out_path = _out_location(run_dir, cycle, out_dir)

    shard_index, rows = _locate(pool, selected.column("id"), cycle)
    images = _read_images(pool, selected, shard_index, rows)

    files = {
        "csv": (CSV_FILE, _csv_bytes(images, image_uri_base)),
        "jsonl": (JSONL_FILE, _jsonl_bytes(images, image_uri_base)),
        "label_studio": (LABEL_STUDIO_FILE, _label_studio_bytes(images, image_uri_base, embed_images)),
    }
    _warn_large_label_studio_file(files["label_studio"][1], image_uri_base, embed_images, cycle)

    _make_out_dir(out_fs, out_path)
    written = {}
    for key, (name, data) in files.items():
        path = posixpath.join(out_path, name)
        write_bytes_atomic(out_fs, path, data)
        written[key] = full_uri(out_fs, path)
    logger.info(
        "export done cycle=%d selected=%d image_bytes=%d pool=%s out_dir=%s seconds=%.2f",
        cycle, len(images), sum(len(image.data) for image in images), pool.path,
        full_uri(out_fs, out_path), time.perf_counter() - start,
    )
    return written


def _check_arguments(cycle: Any, image_uri_base: str | None, out_dir: str | None) -> None:
    if isinstance(cycle, bool) or not isinstance(cycle, (int, np.integer)) or cycle < 1:
        raise ValueError(f"Expected a cycle number from 1, but got {cycle!r}.")
    if image_uri_base is not None and (not isinstance(image_uri_base, str) or not image_uri_base.strip()):
        raise ValueError(
            f"Expected image_uri_base as a URI prefix such as 's3://bucket/images/', but got {image_uri_base!r}. "
            "Leave it out to embed the images in label-studio.json."
        )
    if out_dir is not None and (not isinstance(out_dir, str) or not out_dir.strip()):
        raise ValueError(f"Expected out_dir as a folder path or URI, but got {out_dir!r}. Leave it out to write into the cycle.")


def _check_cycle(run_dir: RunDirectory, cycle: int) -> None:
    # Object store listings are cached per process, and the job that finished the cycle may be another process.
    run_dir.fs.invalidate_cache(run_dir.root)
    if not run_dir.fs.isdir(run_dir.root):
        raise ExportError(f"Run directory {run_dir.uri} not found. Check the path or URI.")
    if run_dir.is_complete(cycle):
        return
    if run_dir.fs.exists(run_dir.cycle_path(cycle)):
        raise ExportError(
            f"Cycle {cycle} of {run_dir.uri} is not complete (no {COMPLETE_MARKER} marker), so its selection may "
            "still change. Wait until the cycle finishes, or run the job again to finish it, then export."
        )
    completed = run_dir.completed_cycles()
    raise ExportError(
        f"Cycle {cycle} not found in {run_dir.uri}; completed cycles: {completed or 'none'}. "
        "Pass the number of a completed cycle."
    )


def _read_selected(run_dir: RunDirectory, cycle: int) -> pa.Table:
    """Read ``selected.parquet`` as rank, id and predicted_loss columns, sorted by rank."""
    uri = run_dir.uri_of("cycles", f"{cycle:04d}", "selected.parquet")
    try:
        table = read_parquet(run_dir.fs, run_dir.cycle_path(cycle, "selected.parquet"))
    except FileNotFoundError as err:
        raise ExportError(f"Cycle {cycle} is marked complete, but {uri} is missing. Restore it from a backup.") from err
    except (pa.ArrowException, OSError) as err:
        raise ExportError(f"{uri} is not a readable Parquet file: {err}. Restore it from a backup.") from err

    expected = "expected the columns rank (int64), id (string) and predicted_loss (float64)"
    missing = [name for name in SELECTED_COLUMNS if name not in table.column_names]
    if missing:
        raise ExportError(f"{uri}: {expected}, but got {table.column_names}.")
    try:
        table = table.select(list(SELECTED_COLUMNS)).cast(pa.schema(SELECTED_COLUMNS))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ExportError(f"{uri}: {expected}, but casting failed: {err}.") from err
    # A baseline strategy trains no loss module, so its predicted_loss is null.
    nulls = [name for name in ("rank", "id") if table.column(name).null_count]
    if nulls:
        raise ExportError(f"{uri} has null values in the columns {nulls}. Restore it from a backup.")
    if len(pc.unique(table.column("id"))) != table.num_rows:
        raise ExportError(f"{uri} lists an id more than once. Restore it from a backup.")
    return table.sort_by("rank")


def _read_pool(run_dir: RunDirectory, cycle: int, pool_uri: str | None) -> PoolInfo:
    if pool_uri is not None:
        return read_pool_info(pool_uri)

    manifest_uri = run_dir.uri_of("cycles", f"{cycle:04d}", "manifest.json")
    try:
        manifest = read_json(run_dir.fs, run_dir.cycle_path(cycle, "manifest.json"))
        recorded = manifest["pool"]["path"]
    except FileNotFoundError as err:
        raise ExportError(f"Cycle {cycle} is marked complete, but {manifest_uri} is missing. Pass pool_uri.") from err
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{manifest_uri} has no readable pool path ({err!r}). Pass pool_uri.") from err
    if not isinstance(recorded, str) or not recorded:
        raise ExportError(f"{manifest_uri}: expected the pool path as text, but got {recorded!r}. Pass pool_uri.")
    try:
        return read_pool_info(recorded)
    except PoolError as err:
        raise ExportError(
            f"Cycle {cycle} scored the pool {recorded} (recorded in {manifest_uri}), but it cannot be read: {err} "
            "A relative path is resolved from the current folder; pass --pool (pool_uri in Python) when the pool has moved."
        ) from err


def _out_location(run_dir: RunDirectory, cycle: int, out_dir: str | None) -> tuple[Any, str]:
    """Return the file system and path of the output folder, rejecting a path that is a file."""
    if out_dir is None:
        return run_dir.fs, run_dir.cycle_path(cycle, EXPORT_DIR)
    fs, path = open_fs(out_dir)
    if fs.exists(path) and not fs.isdir(path):
        raise ExportError(f"out_dir {full_uri(fs, path)} is a file, not a folder. Pass a folder path or URI.")
    return fs, path


def _make_out_dir(fs: Any, path: str) -> None:
    try:
        fs.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ExportError(f"Cannot create the output folder {full_uri(fs, path)}: {err}. Pass an out_dir that can be written.") from err


# --- locating the selected ids in the pool ----------------------------------------------------


def _locate(pool: PoolInfo, ids: pa.ChunkedArray, cycle: int) -> tuple[np.ndarray, np.ndarray]:
    """Find each selected id's shard and row by streaming the pool's id column.

    Memory is bounded by the selected ids and the id column of one row group
    of a shard. The scan stops once every id is found.

    Returns:
        (shard index into ``pool.shards``, row in that shard), one pair per
        selected id in the order of ``ids``.

    Raises:
        ExportError: some ids are in no shard.
    """
    value_set = ids.combine_chunks()
    shard_index = np.full(len(value_set), -1, dtype=np.int64)  # [selected]
    rows = np.full(len(value_set), -1, dtype=np.int64)  # [selected]
    remaining = len(value_set)
    progress = Progress(logger, "export-locate", total=pool.num_rows)
    for index, shard in enumerate(pool.shards):
        if remaining == 0:
            break
        offset = 0
        for batch in _open_shard(shard, pool).iter_batches(batch_size=ID_BATCH_ROWS, columns=["id"]):
            positions = pc.index_in(batch.column(0).cast(pa.string()), value_set=value_set)  # [batch] selected index or null
            found = pc.is_valid(positions).to_numpy(zero_copy_only=False)
            batch_rows = np.flatnonzero(found)  # [matches]
            selected_index = positions.filter(pa.array(found)).to_numpy()  # [matches]
            # Validated pools have no duplicate ids. In any other pool the first row of an id is kept.
            selected_index, first = np.unique(selected_index, return_index=True)
            batch_rows = batch_rows[first]
            new = shard_index[selected_index] < 0
            shard_index[selected_index[new]] = index
            rows[selected_index[new]] = offset + batch_rows[new]
            remaining -= int(new.sum())
            offset += batch.num_rows
            progress.update(batch.num_rows)
    progress.finish()

    if remaining:
        missing = [value_set[int(i)].as_py() for i in np.flatnonzero(shard_index < 0)]
        listed = ", ".join(repr(sample_id) for sample_id in missing[:MAX_LISTED_IDS])
        more = f" and {len(missing) - MAX_LISTED_IDS} more" if len(missing) > MAX_LISTED_IDS else ""
        raise ExportError(
            f"{len(missing)} of the {len(value_set)} ids selected in cycle {cycle} are in no shard of pool "
            f"{pool.path}: {listed}{more}. The pool changed after the cycle ran. Export against the pool the cycle "
            "scored (restore it, or pass its location as pool_uri), or run a new cycle on the current pool."
        )
    return shard_index, rows


def _open_shard(shard: str, pool: PoolInfo) -> pq.ParquetFile:
    fs, path = open_fs(shard)
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except (OSError, pa.ArrowException) as err:
        raise ExportError(f"Pool {pool.path}: shard {shard} cannot be read: {err}. Restore the pool.") from err


def _read_images(pool: PoolInfo, selected: pa.Table, shard_index: np.ndarray, rows: np.ndarray) -> list[_SelectedImage]:
    """Read the image bytes of the selected rows, one row group at a time, and return them in rank order."""
    data: list[bytes | None] = [None] * selected.num_rows
    for index in np.unique(shard_index).tolist():
        shard = pool.shards[index]
        members = np.flatnonzero(shard_index == index)  # [selected in this shard]
        parquet_file = _open_shard(shard, pool)
        group_starts = np.cumsum([0] + [parquet_file.metadata.row_group(g).num_rows for g in range(parquet_file.num_row_groups)])
        groups = np.searchsorted(group_starts, rows[members], side="right") - 1  # [selected in this shard]
        for group in np.unique(groups).tolist():
            in_group = members[groups == group]
            try:
                column = parquet_file.read_row_group(group, columns=["image"]).column("image")
            except (KeyError, pa.ArrowException) as err:
                raise ExportError(f"Pool {pool.path}: cannot read the image column of shard {shard}: {err}.") from err
            group_images = column.take(pa.array(rows[in_group] - group_starts[group])).to_pylist()
            for position, value in zip(in_group.tolist(), group_images):
                data[position] = value

    ids = selected.column("id").to_pylist()
    formats, bad = [], []
    for sample_id, value in zip(ids, data):
        image_format = _image_format(value)
        formats.append(image_format)
        if image_format is None:
            bad.append(f"{sample_id!r} ({'empty' if not value else 'unknown format'})")
    if bad:
        raise ExportError(
            f"Pool {pool.path}: {len(bad)} selected images are empty or not PNG, JPEG, GIF, WebP or BMP: "
            f"{', '.join(bad[:MAX_LISTED_IDS])}. Replace them in the pool with PNG or JPEG images (distal pool import "
            "re-encodes other formats as PNG), then export again."
        )

    ranks = selected.column("rank").to_pylist()
    losses = selected.column("predicted_loss").to_pylist()
    return [
        _SelectedImage(ranks[k], ids[k], losses[k], pool.shards[shard_index[k]], int(rows[k]), data[k], *formats[k])
        for k in range(selected.num_rows)
    ]


def _image_format(data: bytes | None) -> tuple[str, str] | None:
    """Return (extension, MIME type) of encoded image bytes from their signature, or None."""
    if not data:
        return None
    for signature, offset, extension, mime_type in IMAGE_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            if mime_type == "image/webp" and not data.startswith(b"RIFF"):
                continue
            return extension, mime_type
    return None


# --- writing the files ---------------------------------------------------------------------------


def _image_uri(image: _SelectedImage, base: str) -> str:
    name = image.id + image.extension
    if base.startswith(("http://", "https://")):
        name = quote(name, safe="/")
    return base + name


def _records(images: list[_SelectedImage], image_uri_base: str | None) -> list[dict[str, Any]]:
    records = []
    for image in images:
        record = {"id": image.id, "rank": image.rank, "predicted_loss": image.predicted_loss, "shard": image.shard, "row": image.row}
        if image_uri_base is not None:
            record["image_uri"] = _image_uri(image, image_uri_base)
        records.append(record)
    return records


def _csv_bytes(images: list[_SelectedImage], image_uri_base: str | None) -> bytes:
    """Format the selection as CSV with an empty label column for annotators to fill in."""
    records = _records(images, image_uri_base)
    buffer = io.StringIO(newline="")
    fields = ["id", "rank", "predicted_loss", "shard", "row", *(["image_uri"] if image_uri_base is not None else []), "label"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for record in records:
        # repr() keeps every digit of the float, so the CSV matches selected.parquet exactly.
        loss = record["predicted_loss"]
        writer.writerow({**record, "predicted_loss": "" if loss is None else repr(loss), "label": ""})
    return buffer.getvalue().encode("utf-8")


def _jsonl_bytes(images: list[_SelectedImage], image_uri_base: str | None) -> bytes:
    lines = [json.dumps(record, ensure_ascii=False, allow_nan=False) for record in _records(images, image_uri_base)]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _label_studio_bytes(images: list[_SelectedImage], image_uri_base: str | None, embed_images: bool) -> bytes:
    """Format the selection as a JSON list of Label Studio tasks, in rank order."""
    tasks = []
    for image in images:
        if image_uri_base is None or embed_images:
            source = f"data:{image.mime_type};base64,{base64.b64encode(image.data).decode('ascii')}"
        else:
            source = _image_uri(image, image_uri_base)
        tasks.append({"data": {"image": source, "distal_id": image.id, "rank": image.rank, "predicted_loss": image.predicted_loss}})
    return (json.dumps(tasks, ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode("utf-8")


def _warn_large_label_studio_file(data: bytes, image_uri_base: str | None, embed_images: bool, cycle: int) -> None:
    if len(data) <= LABEL_STUDIO_WARN_BYTES or (image_uri_base is not None and not embed_images):
        return
    logger.warning(
        "export label-studio.json with embedded images is large cycle=%d bytes=%d limit=%d; Label Studio's import "
        "guide gives 50 MB as the largest import file. Put the images in an image store and pass "
        "image_uri_base, so the tasks hold URLs instead of image data",
        cycle, len(data), LABEL_STUDIO_WARN_BYTES,
    )


# --- Label Studio export -> label file -----------------------------------------------------------


def labels_from_label_studio(
    export_json_path: str,
    out_csv: str,
    classes: Sequence[str] | None = None,
    *,
    from_name: str | None = None,
) -> LabelStudioConversion:
    """Convert a Label Studio JSON export of distal tasks into a CSV label file (id, label).

    The input is Label Studio's ``JSON`` export format: a list of tasks, each
    with the ``data`` it was imported with (so ``data.distal_id``) and a list
    of ``annotations``. An annotation's ``result`` contains a ``choices`` result
    whose ``value.choices`` lists the chosen class name (Label Studio's
    ``Choices`` tag).

    Per task, annotations with ``was_cancelled`` true are ignored. When an
    annotation is marked ``ground_truth``, ground-truth annotations decide.
    Otherwise every remaining annotation must choose the same class. A task
    without a remaining annotation is counted as unlabeled and left out, so
    the CSV imports cleanly.

    Args:
        export_json_path: the Label Studio export (local path or fsspec URI).
        out_csv: the CSV file to write (local path or fsspec URI), written atomically.
        classes: class names, index = label, such as the pool's classes. With
            them, every choice must be one of them and the CSV holds class
            indexes. Without them, the CSV holds the chosen names as they are.
        from_name: name of the ``Choices`` tag to read; needed only when the
            labeling configuration has more than one.

    Returns:
        The counts of tasks, labeled rows and unlabeled tasks.

    Raises:
        LabelStudioExportError: the file is not a JSON list of tasks, or
            tasks lack a distal id, repeat one, choose no class or several,
            name a class not in ``classes``, or have annotations that disagree.
            The message lists every problem; nothing is written.
    """
    tasks = _read_label_studio_export(export_json_path)
    class_index = None if classes is None else {str(name): index for index, name in enumerate(classes)}
    labels: dict[str, Any] = {}
    problems: list[str] = []
    unlabeled = 0
    for number, task in enumerate(tasks, start=1):
        where = f"task {number}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            problems.append(f"{where}: expected an object with a 'data' object")
            continue
        if isinstance(task.get("id"), int):
            where = f"task {number} (Label Studio id {task['id']})"
        sample_id = task["data"].get("distal_id")
        if not isinstance(sample_id, str) or not sample_id:
            problems.append(f"{where}: no distal_id in data; import only tasks from distal's label-studio.json into the project")
            continue
        where += f", id {sample_id!r}"
        if sample_id in labels:
            problems.append(f"{where}: the id appears in more than one task")
            continue

        choice, problem = _task_choice(task, from_name)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        if choice is None:
            unlabeled += 1
            continue
        if class_index is not None:
            if choice not in class_index:
                problems.append(f"{where}: choice {choice!r} is not a class (valid: {', '.join(class_index)[:300]})")
                continue
            choice = class_index[choice]
        labels[sample_id] = choice

    if problems:
        listed = "\n".join(f"  {problem}" for problem in problems[:MAX_LISTED_IDS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_IDS} more" if len(problems) > MAX_LISTED_IDS else ""
        raise LabelStudioExportError(
            f"Label Studio export {export_json_path} has {len(problems)} problem{'s' if len(problems) > 1 else ''}; "
            f"nothing was written:\n{listed}{more}\n"
            "Fix the annotations in Label Studio, export again and convert the new file.",
            problems,
        )

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["id", "label"])
    writer.writerows(labels.items())
    fs, path = open_fs(out_csv)
    write_bytes_atomic(fs, path, buffer.getvalue().encode("utf-8"))
    result = LabelStudioConversion(full_uri(fs, path), len(tasks), len(labels), unlabeled)
    logger.info(
        "label studio export converted file=%s tasks=%d labeled=%d unlabeled=%d out=%s",
        export_json_path, result.tasks, result.labeled, result.unlabeled, result.out_csv,
    )
    return result


def _read_label_studio_export(path: str) -> list[Any]:
    fs, local = open_fs(path)
    try:
        with fs.open(local, "rb") as handle:
            tasks = json.loads(handle.read().decode("utf-8-sig"))
    except FileNotFoundError as err:
        raise LabelStudioExportError(f"Label Studio export {path} not found. Check the path.") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelStudioExportError(
            f"Label Studio export {path} is not JSON: {err}. Export the project in the 'JSON' format."
        ) from err
    if not isinstance(tasks, list):
        raise LabelStudioExportError(
            f"Label Studio export {path}: expected a JSON list of tasks, but got {type(tasks).__name__}. "
            "Export the project in the 'JSON' format, not 'JSON-MIN' or a single task."
        )
    return tasks


def _task_choice(task: dict[str, Any], from_name: str | None) -> tuple[str | None, str | None]:
    """Return (chosen class name or None when unlabeled, None), or (None, the problem)."""
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        return None, "'annotations' is not a list"
    submitted = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    ground_truth = [a for a in submitted if a.get("ground_truth")]
    deciding = ground_truth or submitted

    choices = []
    for annotation in deciding:
        choice, problem = _annotation_choice(annotation, from_name)
        if problem:
            return None, problem
        if choice is not None:
            choices.append(choice)
    if not choices:
        return None, None
    if len(set(choices)) > 1:
        kind = "ground-truth annotations" if ground_truth else "annotations"
        return None, f"{kind} disagree ({sorted(set(choices))}); mark one annotation as ground truth or delete the wrong ones"
    return choices[0], None


def _annotation_choice(annotation: dict[str, Any], from_name: str | None) -> tuple[str | None, str | None]:
    results = annotation.get("result") or []
    if not isinstance(results, list):
        return None, "an annotation's 'result' is not a list"
    choice_results = [
        r for r in results
        if isinstance(r, dict) and r.get("type") == "choices" and (from_name is None or r.get("from_name") == from_name)
    ]
    names = sorted({str(r.get("from_name")) for r in choice_results})
    if len(names) > 1:
        return None, f"an annotation has choices from several tags {names}; pass from_name to pick one"
    if not choice_results:
        return None, None
    values = choice_results[0].get("value")
    chosen = values.get("choices") if isinstance(values, dict) else None
    if not isinstance(chosen, list) or not all(isinstance(name, str) for name in chosen):
        return None, f"expected value.choices as a list of class names, but got {values!r:.80}"
    if len(chosen) != 1:
        return None, f"expected one chosen class, but the annotation has {len(chosen)}: {chosen}"
    return chosen[0], None
