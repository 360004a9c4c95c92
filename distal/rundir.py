"""The run directory: layout, atomic writes and completion markers.

Layout under the run directory URI (local path or ``s3://...``)::

    config.yaml                  resolved configuration of the latest job
    _LEASE.json                  present while a job writes the run directory
    labels/                      append-only label files (see distal.labels)
    cycles/0001/
        config.yaml              resolved configuration of this cycle
        start.json               seed and label files the cycle started from
        train/                   Ray Train storage: checkpoints of both modules
        train.json               training finished: metrics, images used
        model.pt                 the trained modules, loaded by scoring
        scores/<shard>.parquet   one per pool shard: id, predicted_loss, entropy, ...
        scores/_SUCCESS          written once every score file is complete
        selection.json           strategy and counts of the selection
        selected.parquet         rank, id, score, predicted_loss (highest score first)
        skipped.parquet          undecodable images: id, shard, reason
        manifest.json            the record of the cycle
        _COMPLETE                written last; a cycle with it is never redone

Every file is written atomically: a local file goes to a temporary name and
is renamed into place; an object store upload only becomes visible whole.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from distal.pool import full_uri, is_local, open_fs

COMPLETE_MARKER = "_COMPLETE"
SCORES_MARKER = "_SUCCESS"


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    else:
        # A single object PUT becomes visible only once complete.
        fs.pipe_file(path, data)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, value: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def write_parquet_atomic(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(fs, path, buffer.getvalue())


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


class RunDirectory:
    """Paths and state of one run directory.

    Args:
        uri: local path or fsspec URI of the run directory.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = open_fs(uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """Return a URI (with scheme for remote storage) for a path inside the run directory."""
        return full_uri(self.fs, self.path(*parts))

    def cycle_path(self, cycle: int, *parts: str) -> str:
        return self.path("cycles", f"{cycle:04d}", *parts)

    def is_complete(self, cycle: int) -> bool:
        return self.fs.exists(self.cycle_path(cycle, COMPLETE_MARKER))

    def completed_cycles(self) -> list[int]:
        """Return the numbers of cycles that carry a completion marker, ascending."""
        base = self.path("cycles")
        if not self.fs.exists(base):
            return []
        numbers = []
        for entry in self.fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.isdigit() and self.is_complete(int(name)):
                numbers.append(int(name))
        return sorted(numbers)

    def reset_cycle(self, cycle: int) -> None:
        """Delete an incomplete cycle's files so it can be redone from the start.

        Raises:
            RuntimeError: when the cycle is complete; completed cycles are never touched.
        """
        if self.is_complete(cycle):
            raise RuntimeError(f"Cycle {cycle} in {self.uri} is complete and must not be reset.")
        path = self.cycle_path(cycle)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def mark_complete(self, cycle: int, summary: dict[str, Any]) -> None:
        write_json_atomic(self.fs, self.cycle_path(cycle, COMPLETE_MARKER), summary)
