"""Synthetic pools for scale benchmarks: real encoded images, sharded Parquet, written in parallel.

The images are random, so a synthetic pool tells nothing about accuracy. It
exists to measure reading, decoding, scoring and selection at sizes the real
data in ``../shared/data`` does not reach (a million rows and more). Each
image is a smooth class-dependent gradient plus noise, so PNG and JPEG sizes
sit near those of natural images of the same size rather than of pure noise.

Shards are generated in worker processes (encoding is CPU-bound) and written
by one writer in shard order, so the same arguments always give the same pool.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa

from distal.pool import PoolError, PoolInfo, PoolWriter
from distal.progress import Progress

log = logging.getLogger(__name__)

FORMATS = ("png", "jpeg")


def synthesize_pool(
    out: str,
    rows: int,
    *,
    image_size: int = 32,
    channels: int = 3,
    image_format: str = "png",
    classes: int = 10,
    seed: int = 0,
    rows_per_shard: int = 1000,
    workers: int | None = None,
    overwrite: bool = False,
) -> PoolInfo:
    """Write a pool of ``rows`` synthetic labeled images to ``out``.

    Args:
        out: pool URI (local path or ``s3://...``).
        rows: images to write.
        image_size: height and width in pixels.
        channels: 1 (grayscale) or 3 (RGB).
        image_format: ``png`` or ``jpeg``.
        classes: number of classes; labels are drawn uniformly.
        seed: seed of the images and labels; shard ``s`` uses ``(seed, s)``.
        rows_per_shard: rows per shard file.
        workers: encoding processes; None uses every CPU.
        overwrite: replace an existing complete pool at ``out``.

    Raises:
        PoolError: for invalid sizes or an existing pool without ``overwrite``.
    """
    for name, value in (("rows", rows), ("image_size", image_size), ("classes", classes)):
        if value < 1:
            raise PoolError(f"Invalid {name}={value} (--{name.replace('_', '-')}): expected an integer >= 1.")
    if image_format not in FORMATS:
        raise PoolError(f"Expected an image format in {', '.join(FORMATS)}, but got {image_format!r}.")
    if channels not in (1, 3):
        raise PoolError(f"Expected 1 or 3 channels, but got {channels}.")
    start = time.monotonic()
    shards = [(index, first, min(rows_per_shard, rows - first)) for index, first in enumerate(range(0, rows, rows_per_shard))]
    workers = workers or os.cpu_count() or 1
    progress = Progress(log, "synth", total=rows)
    with PoolWriter(
        out,
        image_size=(image_size, image_size),
        channels=channels,
        classes=[f"class-{index}" for index in range(classes)],
        source=f"distal pool synth: {rows} synthetic {image_format} images, seed {seed} (benchmarks only)",
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
    ) as writer:
        arguments = [(seed, index, first, count, image_size, channels, image_format, classes) for index, first, count in shards]
        with ProcessPoolExecutor(max_workers=workers) as executor:
            # At most two shards per worker are in flight, so memory stays
            # bounded however many rows are asked for; results are written in
            # shard order.
            in_flight: deque = deque()
            for argument in arguments:
                in_flight.append(executor.submit(_shard_table, argument))
                if len(in_flight) >= 2 * workers:
                    _write_next(in_flight, writer, progress)
            while in_flight:
                _write_next(in_flight, writer, progress)
        info = writer.close()
    progress.finish()
    log.info("stage=synth done rows=%d shards=%d seconds=%.1f out=%s", rows, len(shards), time.monotonic() - start, out)
    return info


def _write_next(in_flight: deque, writer: PoolWriter, progress: Progress) -> None:
    table = in_flight.popleft().result()
    writer.write(table)
    progress.update(table.num_rows)


def _shard_table(arguments: tuple) -> pa.Table:
    """Generate and encode one shard's rows (runs in a worker process)."""
    seed, index, first, count, size, channels, image_format, classes = arguments
    rng = np.random.default_rng([seed, index])
    labels = rng.integers(0, classes, size=count)
    images = synthetic_images(rng, labels, size, channels, classes)  # [n, H, W, C]
    encoded = [_encode(image, image_format) for image in images]
    return pa.table(
        {
            "id": pa.array([f"synth-{first + offset:08d}" for offset in range(count)], pa.string()),
            "image": pa.array(encoded, pa.binary()),
            "label": pa.array(labels, pa.int64()),
        }
    )


def synthetic_images(rng: np.random.Generator, labels: np.ndarray, size: int, channels: int, classes: int) -> np.ndarray:
    """Return uint8 images [n, size, size, channels]: a gradient whose angle follows the class, plus noise."""
    axis = np.linspace(0.0, 1.0, size)
    grid_y, grid_x = np.meshgrid(axis, axis, indexing="ij")  # [H, W]
    angles = 2 * np.pi * labels / classes  # [n]
    ramp = np.cos(angles)[:, None, None] * grid_x + np.sin(angles)[:, None, None] * grid_y  # [n, H, W]
    tint = rng.uniform(0.3, 1.0, size=(len(labels), 1, 1, channels))  # [n, 1, 1, C]
    noise = rng.normal(0.0, 0.08, size=(len(labels), size, size, channels))  # [n, H, W, C]
    images = 0.5 + 0.35 * ramp[..., None] * tint + noise  # [n, H, W, C]
    return (np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def _encode(image: np.ndarray, image_format: str) -> bytes:
    from PIL import Image

    array = image[:, :, 0] if image.shape[2] == 1 else image
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(array).save(buffer, format="PNG")
    else:
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
