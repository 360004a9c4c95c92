"""The pool format: a Parquet dataset of ids and encoded images.

A pool is a directory, local or behind any fsspec URI such as
``s3://bucket/prefix``, that contains shard files ``part-00000.parquet``,
``part-00001.parquet``, ... and a metadata file ``_distal_pool.json``. Each
shard has at most ``rows_per_shard`` rows in one row group and the columns of
:data:`POOL_SCHEMA`. The metadata file is written last, so a directory
without it is an incomplete import. The full format is described in
``docs/pool-format.md``.

Every file is written under a temporary name in the pool directory and then
renamed, so readers never see a partly written shard or metadata file.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Sequence

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distal.images import ImageDecodeError, channels_for_mode, open_image

logger = logging.getLogger(__name__)

POOL_METADATA = "_distal_pool.json"
POOL_FORMAT_VERSION = 1
DEFAULT_ROWS_PER_SHARD = 1000
SHARD_NAME = "part-{index:05d}.parquet"

POOL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("label", pa.int64()),
    ]
)

SHARD_PATTERN = re.compile(r"part-\d{5,}\.parquet")
TEMP_PATTERN = re.compile(r"\..+\.tmp-[0-9a-f]{32}")
ID_BATCH_ROWS = 65536
# Rows of the first shard tried when inferring image size and channels.
INFER_IMAGE_ROWS = 64
LARGE_SHARD_BYTES = 512 * 1024 * 1024


class PoolError(ValueError):
    """A pool that is missing, incomplete or violates the pool format."""


@dataclass(frozen=True)
class PoolInfo:
    """Summary of a pool, from its metadata file or inferred from its shards.

    Attributes:
        path: URI of the pool directory; an absolute path for local pools.
        num_rows: rows over all shards.
        image_size: (height, width) that every image is decoded to.
        channels: 1 (grayscale) or 3 (RGB).
        classes: class names, index = label; None when the pool has no
            class names.
        shards: full URIs of the shard files, sorted.
        has_label: whether the shards have a ``label`` column.
    """

    path: str
    num_rows: int
    image_size: tuple[int, int]
    channels: int
    classes: tuple[str, ...] | None
    shards: tuple[str, ...]
    has_label: bool


# --- file system helpers ---------------------------------------------------


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec file system of a URI and the path on it.

    Local paths come back absolute; remote paths lose their scheme
    (``s3://bucket/pool`` -> ``bucket/pool``). Trailing slashes are removed.
    """
    fs, path = fsspec.core.url_to_fs(str(uri))
    if is_local(fs):
        path = os.path.abspath(path)
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file under a temporary name in its directory, then rename it."""
    directory, name = posixpath.split(path)
    temp_path = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(temp_path, "wb") as file:
            write(file)
        if is_local(fs):
            os.replace(temp_path, path)
        else:
            fs.mv(temp_path, path)
    except BaseException:
        if fs.exists(temp_path):
            fs.rm(temp_path)
        raise


def _list_entries(fs: fsspec.AbstractFileSystem, root: str) -> list[dict[str, Any]]:
    fs.invalidate_cache(root)
    try:
        return fs.ls(root, detail=True)
    except FileNotFoundError:
        return []


def _find_parquet_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """List ``*.parquet`` files under root, at any depth, skipping hidden ones."""
    fs.invalidate_cache(root)
    found = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root)
        if path.endswith(".parquet") and not any(part.startswith((".", "_")) for part in relative.split("/")):
            found.append(path)
    return sorted(found)


def _open_parquet(fs: fsspec.AbstractFileSystem, path: str, pool: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError as err:
        raise PoolError(
            f"Pool {pool}: shard {posixpath.basename(path)} is listed in {POOL_METADATA} but not found. "
            "Re-import the pool."
        ) from err
    except (OSError, pa.ArrowException) as err:
        raise PoolError(
            f"Pool {pool}: shard {posixpath.basename(path)} is not a readable Parquet file: {err}. "
            "Re-import the pool or replace the shard."
        ) from err


# --- reading -----------------------------------------------------------------


def read_pool_info(uri: str) -> PoolInfo:
    """Read a pool's summary from its metadata file, or infer it from the shards.

    Without ``_distal_pool.json`` (a user's own Parquet dataset), the shards
    are all ``*.parquet`` files under the URI, the row count comes from their
    footers, and image size and channels come from the first decodable image
    of the first shard. Classes are then None.

    Raises:
        PoolError: the directory does not exist, has no shards, or its
            metadata file is invalid.
    """
    fs, root = open_fs(uri)
    pool = full_uri(fs, root)
    if not fs.isdir(root):
        raise PoolError(f"Pool {pool} not found: no directory at that path. Check the URI or import the pool first.")

    metadata_path = posixpath.join(root, POOL_METADATA)
    if fs.exists(metadata_path):
        return _info_from_metadata(fs, root, pool, _read_metadata(fs, metadata_path, pool))
    return _info_from_shards(fs, root, pool)


def _read_metadata(fs: fsspec.AbstractFileSystem, path: str, pool: str) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as file:
            metadata = json.load(file)
    except (OSError, ValueError) as err:
        raise PoolError(f"Pool {pool}: {POOL_METADATA} is not readable JSON: {err}. Re-import the pool.") from err
    if not isinstance(metadata, dict):
        raise PoolError(f"Pool {pool}: expected a JSON object in {POOL_METADATA}, but got {type(metadata).__name__}.")

    version = metadata.get("format_version")
    if version != POOL_FORMAT_VERSION:
        raise PoolError(
            f"Pool {pool}: expected format_version {POOL_FORMAT_VERSION} in {POOL_METADATA}, but got {version!r}. "
            "The pool was written by another version of distal; re-import it with this one."
        )
    missing = [key for key in ("num_rows", "image_size", "channels", "shards") if key not in metadata]
    if missing:
        raise PoolError(f"Pool {pool}: {POOL_METADATA} lacks the keys {missing}. Re-import the pool.")
    return metadata


def _info_from_metadata(fs: fsspec.AbstractFileSystem, root: str, pool: str, metadata: dict[str, Any]) -> PoolInfo:
    try:
        shard_files = sorted(str(entry["file"]) for entry in metadata["shards"])
        height, width = (int(n) for n in metadata["image_size"])
        channels = int(metadata["channels"])
        num_rows = int(metadata["num_rows"])
    except (KeyError, TypeError, ValueError) as err:
        raise PoolError(f"Pool {pool}: {POOL_METADATA} has an invalid value: {err!r}. Re-import the pool.") from err
    if not shard_files:
        raise PoolError(f"Pool {pool}: {POOL_METADATA} lists no shards. Re-import the pool.")

    classes = metadata.get("classes")
    shard_paths = [posixpath.join(root, name) for name in shard_files]
    schema = _open_parquet(fs, shard_paths[0], pool).schema_arrow
    return PoolInfo(
        path=pool,
        num_rows=num_rows,
        image_size=(height, width),
        channels=channels,
        classes=None if classes is None else tuple(str(name) for name in classes),
        shards=tuple(full_uri(fs, path) for path in shard_paths),
        has_label="label" in schema.names,
    )


def _info_from_shards(fs: fsspec.AbstractFileSystem, root: str, pool: str) -> PoolInfo:
    shard_paths = _find_parquet_files(fs, root)
    if not shard_paths:
        raise PoolError(
            f"Pool {pool} has no {POOL_METADATA} and no *.parquet shard files. "
            "Import a pool into this directory or point to a directory of Parquet files."
        )

    num_rows = sum(_open_parquet(fs, path, pool).metadata.num_rows for path in shard_paths)
    first = _open_parquet(fs, shard_paths[0], pool)
    first_name = posixpath.relpath(shard_paths[0], root)
    if "image" not in first.schema_arrow.names:
        raise PoolError(
            f"Pool {pool}: shard {first_name} has no 'image' column (columns: {first.schema_arrow.names}). "
            "A pool needs the columns id (string) and image (encoded PNG or JPEG bytes)."
        )
    height, width, channels = _infer_image_shape(first, pool, first_name)
    logger.info(
        "pool metadata inferred path=%s shards=%d rows=%d image_size=%dx%d channels=%d",
        pool, len(shard_paths), num_rows, height, width, channels,
    )
    return PoolInfo(
        path=pool,
        num_rows=num_rows,
        image_size=(height, width),
        channels=channels,
        classes=None,
        shards=tuple(full_uri(fs, path) for path in shard_paths),
        has_label="label" in first.schema_arrow.names,
    )


def _infer_image_shape(shard: pq.ParquetFile, pool: str, shard_name: str) -> tuple[int, int, int]:
    """Return (height, width, channels) of the first decodable image in a shard."""
    batch = next(shard.iter_batches(batch_size=INFER_IMAGE_ROWS, columns=["image"]), None)
    reasons = []
    for data in batch.column(0).to_pylist() if batch is not None else []:
        try:
            image = open_image(data)
        except ImageDecodeError as err:
            reasons.append(err.reason)
            continue
        width, height = image.size
        return height, width, channels_for_mode(image.mode)
    raise PoolError(
        f"Pool {pool} has no {POOL_METADATA}, and none of the first {len(reasons)} images of shard "
        f"{shard_name} decodes (reasons: {sorted(set(reasons))}), so image size and channels are unknown. "
        "Re-import the pool with distal."
    )


# --- validation ----------------------------------------------------------------


def validate_pool(uri: str, require_label: bool = False) -> PoolInfo:
    """Check a pool before any cluster work, reading only Parquet metadata and ids.

    Reads the ``id`` column (and ``label`` when required) shard by shard in
    batches. Duplicate ids are found with 8 bytes per row: ids are hashed to
    uint64, colliding hashes are found by sorting, and only rows with a
    colliding hash are read a second time to name the real duplicates.

    Args:
        uri: pool URI.
        require_label: also require a non-null ``label`` in every row, within
            the range of the pool's classes when it has class names.

    Returns:
        The pool's :class:`PoolInfo`.

    Raises:
        PoolError: a missing or mistyped column, a schema that differs
            between shards, null or duplicate ids, missing or out-of-range
            labels, or shards that disagree with the metadata file. The
            message names the shard and the id or row.
    """
    start = time.perf_counter()
    info = read_pool_info(uri)
    fs, root = open_fs(uri)
    metadata_path = posixpath.join(root, POOL_METADATA)
    listed_rows = None
    if fs.exists(metadata_path):
        metadata = _read_metadata(fs, metadata_path, info.path)
        try:
            listed_rows = {str(entry["file"]): int(entry["rows"]) for entry in metadata["shards"]}
        except (KeyError, TypeError, ValueError) as err:
            raise PoolError(
                f"Pool {info.path}: every entry of 'shards' in {POOL_METADATA} needs a file and a row count, "
                f"but reading them failed: {err!r}. Re-import the pool."
            ) from err
        _warn_unlisted_shards(fs, root, info.path, listed_rows)

    shard_paths = [open_fs(shard)[1] for shard in info.shards]
    rows = _check_shards(fs, root, info.path, shard_paths, require_label, info.classes)

    if listed_rows is not None:
        _check_listed_rows(info, root, shard_paths, rows, listed_rows)
    logger.info(
        "pool validated path=%s shards=%d rows=%d seconds=%.2f",
        info.path, len(shard_paths), sum(rows), time.perf_counter() - start,
    )
    return info


def _warn_unlisted_shards(fs: fsspec.AbstractFileSystem, root: str, pool: str, listed: dict[str, int]) -> None:
    unlisted = [
        posixpath.relpath(path, root) for path in _find_parquet_files(fs, root)
        if posixpath.relpath(path, root) not in listed
    ]
    if unlisted:
        logger.warning(
            "pool has Parquet files not listed in %s, which readers of the pool ignore path=%s files=%s",
            POOL_METADATA, pool, unlisted[:5],
        )


def _check_listed_rows(
    info: PoolInfo, root: str, shard_paths: Sequence[str], rows: Sequence[int], listed: dict[str, int]
) -> None:
    for path, count in zip(shard_paths, rows):
        name = posixpath.relpath(path, root)
        if listed[name] != count:
            raise PoolError(
                f"Pool {info.path}: {POOL_METADATA} lists {listed[name]} rows for shard {name}, "
                f"but the shard has {count}. Re-import the pool."
            )
    if sum(rows) != info.num_rows:
        raise PoolError(
            f"Pool {info.path}: {POOL_METADATA} records num_rows={info.num_rows}, but the shards contain "
            f"{sum(rows)} rows. Re-import the pool."
        )


def _check_shards(
    fs: fsspec.AbstractFileSystem,
    root: str,
    pool: str,
    shard_paths: Sequence[str],
    require_label: bool,
    classes: Sequence[str] | None,
) -> list[int]:
    """Check schemas, ids and labels of the shards; return rows per shard."""
    first: tuple[str, pa.Schema] | None = None
    rows = []
    hashes = []  # one uint64 array [rows of shard] per shard
    for index, path in enumerate(shard_paths):
        name = posixpath.relpath(path, root)
        shard = _open_parquet(fs, path, pool)
        schema = shard.schema_arrow
        _check_columns(pool, name, schema, require_label)
        if first is None:
            first = (name, schema)
        else:
            _compare_schemas(pool, first, (name, schema))

        rows.append(shard.metadata.num_rows)
        hashes.append(_hash_ids(shard, pool, name, require_label, classes))
        logger.debug("shard checked path=%s shard=%s [%d/%d]", pool, name, index + 1, len(shard_paths))

    _check_duplicate_ids(fs, root, pool, shard_paths, hashes)
    return rows


def _check_columns(pool: str, shard: str, schema: pa.Schema, require_label: bool) -> None:
    expected = "Expected columns id (string), image (binary) and optionally label (int64)"
    for column, type_ok, type_name in (
        ("id", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
        ("image", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    ):
        if column not in schema.names:
            raise PoolError(
                f"Pool {pool}: shard {shard} has no '{column}' column (columns: {schema.names}). "
                f"{expected}; re-import the pool or fix the shard."
            )
        if not type_ok(schema.field(column).type):
            raise PoolError(
                f"Pool {pool}: shard {shard}: expected column '{column}' of type {type_name}, "
                f"but got {schema.field(column).type}. {expected}; re-import the pool or fix the shard."
            )
    if "label" in schema.names and not pa.types.is_integer(schema.field("label").type):
        raise PoolError(
            f"Pool {pool}: shard {shard}: expected column 'label' of an integer type, "
            f"but got {schema.field('label').type}. Labels are class indexes; re-import the pool or fix the shard."
        )
    if require_label and "label" not in schema.names:
        raise PoolError(
            f"Pool {pool}: shard {shard} has no 'label' column, but this step needs labels "
            "(the simulation oracle or evaluation). Import the pool with labels."
        )


def _compare_schemas(pool: str, first: tuple[str, pa.Schema], other: tuple[str, pa.Schema]) -> None:
    (first_name, first_schema), (other_name, other_schema) = first, other
    first_types = {field.name: field.type for field in first_schema}
    other_types = {field.name: field.type for field in other_schema}
    differing = sorted(
        name for name in first_types.keys() | other_types.keys() if first_types.get(name) != other_types.get(name)
    )
    if differing:
        details = ", ".join(f"{name}: {first_types.get(name)} vs {other_types.get(name)}" for name in differing)
        raise PoolError(
            f"Pool {pool}: the schema of shard {other_name} differs from shard {first_name} in columns "
            f"{differing} ({details}; None = column missing). All shards need the same columns and types; "
            "re-import the pool or fix the shard."
        )


def _hash_ids(
    shard: pq.ParquetFile, pool: str, name: str, require_label: bool, classes: Sequence[str] | None
) -> np.ndarray:
    """Check ids (and labels) of one shard and return the uint64 hashes of its ids."""
    columns = ["id", "label"] if require_label else ["id"]
    hashes = []
    offset = 0
    for batch in shard.iter_batches(batch_size=ID_BATCH_ROWS, columns=columns):
        ids = batch.column("id")
        _check_no_nulls(ids, pool, name, offset, "a null id", "Every row needs a unique string id")
        empty = pc.equal(ids, "")
        _check_no_true(empty, pool, name, offset, "an empty id", "Every row needs a unique, non-empty id")
        if require_label:
            _check_labels(batch.column("label"), pool, name, offset, classes)
        hashes.append(pd.util.hash_array(ids.to_numpy(zero_copy_only=False)))  # [batch rows] uint64
        offset += batch.num_rows
    return np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)


def _check_labels(labels: pa.Array, pool: str, name: str, offset: int, classes: Sequence[str] | None) -> None:
    _check_no_nulls(labels, pool, name, offset, "a null label", "Every row needs a label for this step")
    if classes is not None:
        out_of_range = pc.or_(pc.less(labels, 0), pc.greater_equal(labels, len(classes)))
        reason = f"The pool has {len(classes)} classes, so labels must be in [0, {len(classes) - 1}]"
    else:
        out_of_range = pc.less(labels, 0)
        reason = "Labels are class indexes and must not be negative"
    _check_no_true(out_of_range, pool, name, offset, "a label out of range", reason)


def _check_no_nulls(values: pa.Array, pool: str, name: str, offset: int, what: str, rule: str) -> None:
    if values.null_count:
        _check_no_true(values.is_null(), pool, name, offset, what, rule)


def _check_no_true(mask: pa.Array, pool: str, name: str, offset: int, what: str, rule: str) -> None:
    flags = mask.fill_null(False).to_numpy(zero_copy_only=False)  # [batch rows] bool
    count = int(flags.sum())
    if count:
        first = offset + int(np.argmax(flags))
        raise PoolError(
            f"Pool {pool}: shard {name} has {count} rows with {what} (first at row {first}). "
            f"{rule}; re-import the pool or fix the shard."
        )


def _check_duplicate_ids(
    fs: fsspec.AbstractFileSystem, root: str, pool: str, shard_paths: Sequence[str], hashes: Sequence[np.ndarray]
) -> None:
    all_hashes = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)  # [num_rows] uint64
    sorted_hashes = np.sort(all_hashes)
    colliding = np.unique(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]])
    if colliding.size == 0:
        return

    # Second pass: read the ids whose hash collides and look for real duplicates.
    places: dict[str, list[tuple[str, int]]] = {}
    for path, shard_hashes in zip(shard_paths, hashes):
        rows = np.flatnonzero(np.isin(shard_hashes, colliding))
        if rows.size == 0:
            continue
        name = posixpath.relpath(path, root)
        ids = _open_parquet(fs, path, pool).read(columns=["id"]).column("id").take(pa.array(rows))
        for row, sample_id in zip(rows.tolist(), ids.to_pylist()):
            places.setdefault(sample_id, []).append((name, row))

    duplicates = {sample_id: where for sample_id, where in places.items() if len(where) > 1}
    if duplicates:
        sample_id, where = next(iter(duplicates.items()))
        (first_shard, first_row), (second_shard, second_row) = where[0], where[1]
        raise PoolError(
            f"Pool {pool}: id {sample_id!r} appears in shard {first_shard} (row {first_row}) and in shard "
            f"{second_shard} (row {second_row}); ids that occur more than once: {len(duplicates)}. "
            "Ids must be unique across the pool; re-import the pool or remove the duplicate rows."
        )


# --- writing -------------------------------------------------------------------


def check_pool_destination(uri: str, overwrite: bool = False) -> None:
    """Check that a pool can be written at a URI, without changing anything.

    A missing or empty directory, or an incomplete import (shards without a
    metadata file), can be written. A complete pool can be written only with
    ``overwrite=True``. A directory with files that are not part of a pool is
    never written, so a mistyped path cannot delete a user's files.

    Raises:
        PoolError: the destination is a file, contains other files, or is a
            complete pool and ``overwrite`` is False.
    """
    fs, root = open_fs(uri)
    pool = full_uri(fs, root)
    if fs.isfile(root):
        raise PoolError(f"Cannot write pool {pool}: the path is a file. Choose a directory path.")

    entries = _list_entries(fs, root)
    names = [posixpath.basename(entry["name"].rstrip("/")) for entry in entries]
    foreign = sorted(
        name for entry, name in zip(entries, names) if entry["type"] != "file" or not _is_pool_file(name)
    )
    if foreign:
        raise PoolError(
            f"Cannot write pool {pool}: the directory contains entries that are not part of a pool "
            f"({foreign[:5]}). Choose an empty or new directory."
        )
    if POOL_METADATA in names and not overwrite:
        raise PoolError(
            f"Cannot write pool {pool}: a complete pool already exists there. "
            "Pass --overwrite (overwrite=True in Python) to replace it, or choose another directory."
        )


class PoolWriter:
    """Streams rows into the shards of a new pool and writes its metadata last.

    Rows arrive as Arrow record batches or tables with the columns ``id``,
    ``image`` and optionally ``label``; every ``rows_per_shard`` rows become
    one shard. :meth:`close` checks ids across all shards, then writes the
    metadata file; :meth:`abort` removes what was written. Used as a context
    manager, it closes on success and aborts on an exception.

    Example:
        >>> with PoolWriter("pools/demo", image_size=(28, 28), channels=1,
        ...                 classes=None, source="demo") as writer:
        ...     writer.write(table)
        >>> writer.info.num_rows
    """

    def __init__(
        self,
        uri: str,
        *,
        image_size: tuple[int, int],
        channels: int,
        classes: Sequence[str] | None,
        source: str,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        overwrite: bool = False,
    ) -> None:
        self._image_size = _check_image_size(image_size)
        if channels not in (1, 3):
            raise PoolError(f"Expected channels of 1 or 3, but got {channels!r}.")
        if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise PoolError(f"Expected rows_per_shard to be a positive integer, but got {rows_per_shard!r}.")
        self._channels = channels
        self._classes = None if classes is None else tuple(str(name) for name in classes)
        self._source = source
        self._rows_per_shard = rows_per_shard

        check_pool_destination(uri, overwrite)
        self._fs, self._root = open_fs(uri)
        self.path = full_uri(self._fs, self._root)
        self._clear_destination()

        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._has_label: bool | None = None
        self._shards: list[tuple[str, int]] = []
        self._start = time.perf_counter()
        self.info: PoolInfo | None = None

    def __enter__(self) -> PoolWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            if self.info is None:
                self.close()
        else:
            self.abort()

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add rows; full shards are written as soon as they fill up.

        Raises:
            PoolError: a missing, extra or mistyped column, a null id or
                image, a label out of range, or a label column that comes
                and goes between batches.
        """
        table = self._normalise(batch)
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._rows_per_shard:
            pending = pa.concat_tables(self._pending)
            self._write_shard(pending.slice(0, self._rows_per_shard))
            rest = pending.slice(self._rows_per_shard)
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows

    def close(self) -> PoolInfo:
        """Write the last shard, check ids across shards, then write the metadata.

        Raises:
            PoolError: no rows were written, or ids are duplicated.
        """
        if self._pending_rows:
            self._write_shard(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0
        if not self._shards:
            raise PoolError(f"Cannot write pool {self.path}: no rows were given. Check the import source.")

        shard_paths = [posixpath.join(self._root, name) for name, _ in self._shards]
        _check_shards(self._fs, self._root, self.path, shard_paths, False, self._classes)
        num_rows = sum(rows for _, rows in self._shards)
        metadata = {
            "format_version": POOL_FORMAT_VERSION,
            "num_rows": num_rows,
            "image_size": list(self._image_size),
            "channels": self._channels,
            "classes": None if self._classes is None else list(self._classes),
            "shards": [{"file": name, "rows": rows} for name, rows in self._shards],
            "source": self._source,
        }
        payload = json.dumps(metadata, indent=2).encode() + b"\n"
        _atomic_write(self._fs, posixpath.join(self._root, POOL_METADATA), lambda file: file.write(payload))

        self.info = PoolInfo(
            path=self.path,
            num_rows=num_rows,
            image_size=self._image_size,
            channels=self._channels,
            classes=self._classes,
            shards=tuple(full_uri(self._fs, path) for path in shard_paths),
            has_label=bool(self._has_label),
        )
        logger.info(
            "pool written path=%s rows=%d shards=%d seconds=%.2f",
            self.path, num_rows, len(self._shards), time.perf_counter() - self._start,
        )
        return self.info

    def abort(self) -> None:
        """Remove the shards written so far; the directory stays an incomplete pool."""
        self._pending, self._pending_rows = [], 0
        try:
            self._clear_destination()
        except OSError as err:
            logger.warning("could not remove shards of an aborted pool path=%s error=%s", self.path, err)
        self._shards = []

    def _clear_destination(self) -> None:
        # The metadata file goes first, so a crash midway leaves an incomplete pool.
        metadata_path = posixpath.join(self._root, POOL_METADATA)
        if self._fs.exists(metadata_path):
            self._fs.rm(metadata_path)
        for entry in _list_entries(self._fs, self._root):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if name != POOL_METADATA and _is_pool_file(name):
                self._fs.rm(entry["name"])
        self._fs.makedirs(self._root, exist_ok=True)

    def _normalise(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        names = set(table.column_names)
        missing = {"id", "image"} - names
        extra = names - {"id", "image", "label"}
        if missing or extra:
            raise PoolError(
                f"Cannot write pool {self.path}: expected columns id, image and optionally label, but got "
                f"{table.column_names}."
            )
        has_label = "label" in names
        if self._has_label is None:
            self._has_label = has_label
        elif has_label != self._has_label:
            raise PoolError(
                f"Cannot write pool {self.path}: some batches have a label column and others do not. "
                "Give labels for every row or for none."
            )

        where = f"rows {self._written_rows()} to {self._written_rows() + table.num_rows - 1} of the input"
        for column in ("id", "image"):
            if table.column(column).null_count:
                raise PoolError(f"Cannot write pool {self.path}: a null {column} among {where}. Every row needs both.")

        schema = POOL_SCHEMA if has_label else pa.schema([POOL_SCHEMA.field("id"), POOL_SCHEMA.field("image")])
        try:
            table = table.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
            raise PoolError(
                f"Cannot write pool {self.path}: expected id (string), image (binary) and label (int64) columns, "
                f"but got {table.schema.types}: {err}"
            ) from err
        if has_label and table.num_rows:
            self._check_labels(table.column("label"), where)
        return table

    def _check_labels(self, labels: pa.ChunkedArray, where: str) -> None:
        if labels.null_count:
            raise PoolError(
                f"Cannot write pool {self.path}: a null label among {where}. Give every row a label or drop the column."
            )
        if self._classes is None:
            low, high = 0, None
        else:
            low, high = 0, len(self._classes) - 1
        extrema = pc.min_max(labels).as_py()
        if extrema["min"] < low or (high is not None and extrema["max"] > high):
            allowed = f"[0, {high}] for {len(self._classes)} classes" if high is not None else "0 or more"
            raise PoolError(
                f"Cannot write pool {self.path}: labels among {where} range from {extrema['min']} to "
                f"{extrema['max']}, but they must be {allowed}. Check the classes and labels given."
            )

    def _written_rows(self) -> int:
        return sum(rows for _, rows in self._shards) + self._pending_rows

    def _write_shard(self, table: pa.Table) -> None:
        name = SHARD_NAME.format(index=len(self._shards))
        image_bytes = pc.sum(pc.binary_length(table.column("image"))).as_py() or 0
        if image_bytes > LARGE_SHARD_BYTES:
            logger.warning(
                "large shard path=%s shard=%s image_bytes=%d; a smaller rows_per_shard keeps blocks small",
                self.path, name, image_bytes,
            )

        def write(file: IO[bytes]) -> None:
            pq.write_table(
                table,
                file,
                row_group_size=table.num_rows,
                use_dictionary=["label"] if "label" in table.column_names else False,
                write_statistics=["id", "label"] if "label" in table.column_names else ["id"],
            )

        _atomic_write(self._fs, posixpath.join(self._root, name), write)
        self._shards.append((name, table.num_rows))


def write_pool(
    uri: str,
    batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    image_size: tuple[int, int],
    channels: int,
    classes: Sequence[str] | None,
    source: str,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
) -> PoolInfo:
    """Write a pool from a stream of Arrow batches.

    Args:
        uri: pool directory (local path or fsspec URI).
        batches: record batches or tables with the columns ``id`` (string),
            ``image`` (encoded PNG or JPEG bytes) and optionally ``label``.
        image_size: (height, width) images are decoded to.
        channels: 1 or 3.
        classes: class names, index = label; None for unlabeled pools.
        source: free text describing where the rows came from.
        rows_per_shard: rows per shard file (one row group each).
        overwrite: replace a complete pool at ``uri``.

    Returns:
        The written pool's :class:`PoolInfo`.

    Raises:
        PoolError: the destination contains a complete pool and
            ``overwrite`` is False, or contains other files, or the rows
            break the pool format. On error the shards written so far are
            removed.
    """
    with PoolWriter(
        uri,
        image_size=image_size,
        channels=channels,
        classes=classes,
        source=source,
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
    ) as writer:
        for batch in batches:
            writer.write(batch)
        return writer.close()


def _is_pool_file(name: str) -> bool:
    """Return whether a file name is the metadata file, a shard or a temporary file of a pool."""
    return name == POOL_METADATA or bool(SHARD_PATTERN.fullmatch(name) or TEMP_PATTERN.fullmatch(name))


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in image_size):
        raise PoolError(f"Expected image_size as (height, width) of positive integers, but got {image_size!r}.")
    return int(image_size[0]), int(image_size[1])
