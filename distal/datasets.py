"""Ray Data pipelines over a pool: read shards, keep the wanted ids, decode images.

Decoding runs in CPU tasks apart from the model, so scoring actors only run
the model. A row whose image cannot be decoded is kept with zero pixels and a
``skip_reason``, so its id is recorded instead of vanishing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distal.images import decode_batch
from distal.pool import PoolInfo, open_fs

SHARD_COLUMN = "path"
LOAD_ROWS = 1024  # rows a loader task reads and decodes at a time
# A Ray worker with pyarrow and numpy loaded used about 135 MiB, and a reused
# worker that had imported torch about 670 MiB.
LOADER_BASE_BYTES = 2**30


def read_pool(info: PoolInfo, columns: list[str], shards: list[str] | None = None) -> Any:
    """Return a Ray Dataset over the pool's shards (or the given subset) with the given columns and the shard path."""
    import ray.data

    shards = list(info.shards) if shards is None else shards
    # One block per shard keeps blocks near the shard size (about a thousand
    # images) and lets every shard be decoded in parallel.
    dataset = ray.data.read_parquet(shards, include_paths=True, override_num_blocks=len(shards))
    return dataset.select_columns([*columns, SHARD_COLUMN])


def load_shards(info: PoolInfo, shards: list[str], keep: pa.Array | None = None, drop: pa.Array | None = None) -> Any:
    """Return a Ray Dataset of the decoded rows of some shards, with one loader task per shard.

    Each task reads its shard ``LOAD_ROWS`` rows at a time, keeps the ids in
    ``keep`` (or drops those in ``drop``) and decodes what is left, so memory
    per task is bounded by a chunk, not by the shard. The rows of a shard
    arrive together in one block: enough blocks to keep every scoring actor
    busy, and score files that complete one by one as the pool streams.
    ``ray.data.read_parquet`` would instead merge shards into blocks of up
    to 128 MiB, which on CIFAR-10's 50,000 images is one block for one actor.
    """
    import ray.data

    height, width = info.image_size
    chunk_bytes = LOAD_ROWS * info.channels * height * width  # decoded uint8 pixels of one chunk
    items = [{"shard": shard} for shard in shards]
    return ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
        _load_shard,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"channels": info.channels, "image_size": tuple(info.image_size), "keep": keep, "drop": drop},
        # Ray Data fuses a task stage into the actor stage after it when
        # their resource requests are equal, and would then decode inside the
        # scoring actor, in series with the model. Declaring the loader's
        # memory (the worker, plus encoded and decoded chunk and the block it
        # builds) keeps the two apart, so decoding runs beside the model.
        memory=LOADER_BASE_BYTES + 4 * chunk_bytes,
    )


def _load_shard(
    batch: dict[str, np.ndarray], channels: int, image_size: tuple[int, int], keep: pa.Array | None, drop: pa.Array | None
) -> Iterator[dict[str, np.ndarray]]:
    for shard in batch["shard"]:
        fs, path = open_fs(str(shard))
        with fs.open(path, "rb") as handle:
            for chunk in pq.ParquetFile(handle).iter_batches(batch_size=LOAD_ROWS, columns=["id", "image"]):
                table = pa.Table.from_batches([chunk])
                if keep is not None:
                    table = keep_ids(table, keep)
                if drop is not None:
                    table = drop_ids(table, drop)
                if table.num_rows:
                    table = table.append_column(SHARD_COLUMN, pa.array([str(shard)] * table.num_rows, pa.string()))
                    yield decode_rows(table, channels, image_size)


def keep_ids(batch: pa.Table, ids: pa.Array, labels: pa.Array | None = None) -> pa.Table:
    """Keep rows whose id is in ``ids``; with ``labels`` (aligned with ids) add a ``label`` column."""
    position = pc.index_in(batch.column("id"), value_set=ids)
    mask = pc.is_valid(position)
    kept = batch.filter(mask)
    if labels is not None:
        kept_position = position.filter(mask)
        kept = kept.drop_columns([name for name in ("label",) if name in kept.column_names])
        kept = kept.append_column("label", labels.take(kept_position))
    return kept


def drop_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """Drop rows whose id is in ``ids``."""
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=ids)))


def decode_rows(batch: pa.Table, channels: int, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Decode a batch of encoded images into a fixed-shape uint8 tensor column.

    Returns columns: id, image [n, C, H, W] uint8 (zeros where skipped),
    skip_reason ("" when decoded), conversion ("" when the image already
    had the pool's mode and size), shard, and label when present.
    """
    ids = batch.column("id").to_pylist()
    images = batch.column("image").to_pylist()
    decoded = decode_batch(ids, images, channels, image_size)
    height, width = image_size
    pixels = np.zeros((len(ids), channels, height, width), dtype=np.uint8)  # [n, C, H, W]
    position = {sample_id: row for row, sample_id in enumerate(ids)}
    for row_ok, sample_id in enumerate(decoded.ok_ids):
        pixels[position[sample_id]] = decoded.pixels[row_ok]
    skip_reason = np.full(len(ids), "", dtype=object)
    for sample_id, reason in decoded.skipped:
        skip_reason[position[sample_id]] = reason
    conversion = np.full(len(ids), "", dtype=object)
    for note, note_ids in decoded.conversions.items():
        for sample_id in note_ids:
            conversion[position[sample_id]] = note
    shards = batch.column(SHARD_COLUMN).to_pylist() if SHARD_COLUMN in batch.column_names else [""] * len(ids)
    out = {
        "id": np.asarray(ids, dtype=object),
        "image": pixels,
        "skip_reason": skip_reason.astype(str),
        "conversion": conversion.astype(str),
        "shard": np.asarray([shard.rsplit("/", 1)[-1] for shard in shards], dtype=str),
    }
    if "label" in batch.column_names:
        out["label"] = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return out
