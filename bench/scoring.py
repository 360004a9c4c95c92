"""Scoring throughput: distal's Ray Data pipeline against the pure forward pass and a DataLoader loop.

Three measurements on the same pool, model, batch size and torch threads:

- ``forward``: the model alone on images already decoded into one tensor
  (the ceiling for this model and thread count);
- ``end_to_end``: ``distal.score.score_pool``: Parquet read, PNG/JPEG decode
  in Ray tasks, the model in an actor pool, score files written;
- ``dataloader``: one process scoring with a PyTorch ``DataLoader`` whose
  worker processes read the same Parquet shards and decode them, as
  single-GPU active-learning tools score today.

Run from the repository root, for example on the real CIFAR-10 pool:

    .venv/bin/python bench/scoring.py --pool pools/cifar10/pool --width 16

Each measurement prints a ``BENCH {...}`` line; the last line gives the ratios.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import common as bench  # also puts the repository on sys.path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distal.config import ScoreConfig
from distal.images import decode_batch
from distal.pool import open_fs
from distal.progress import configure_logging
from distal.score import forward_batch
from distal.train import load_checkpoint

log = logging.getLogger("bench.scoring")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_learner(checkpoint: str):
    _, learner, _ = load_checkpoint(checkpoint, device())
    return learner.to(memory_format=torch.channels_last) if device().type == "cuda" else learner


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_rate(checkpoint: str, info, rows: int, batch_size: int, threads: int, repeats: int = 3) -> float:
    """Images per second of the scorer's forward pass (``forward_batch``) on preloaded, decoded images.

    The fastest of ``repeats`` passes over the images is returned.
    """
    torch.set_num_threads(threads)
    learner = load_learner(checkpoint)
    pixels = []
    for shard in info.shards:
        fs, path = open_fs(shard)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["id", "image"])
        pixels.append(decode_batch(table.column("id").to_pylist(), table.column("image").to_pylist(), info.channels, tuple(info.image_size)).pixels)
        if sum(len(part) for part in pixels) >= rows:
            break
    images = torch.from_numpy(np.concatenate(pixels)[:rows])  # [N, C, H, W] uint8
    if device().type == "cuda":
        images = images.pin_memory()  # as preloaded as host memory allows; the copy is part of scoring
    forward_batch(learner, images[:batch_size], device())  # warm-up
    best = 0.0
    for _ in range(repeats):  # the best pass: a ceiling, not an average
        synchronize()
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            forward_batch(learner, images[first : first + batch_size], device())
        synchronize()
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def end_to_end_rate(checkpoint: str, info, batch_size: int, actors: int, threads: int) -> tuple[float, float, tuple[float, int]]:
    """Images per second, seconds, and (seconds, rows) of the first scored rows of distal's scoring pipeline over every row of ``info``."""
    from distal.rundir import RunDirectory
    from distal.score import choose_candidates, score_pool

    empty = pa.array([], pa.string())
    candidates = choose_candidates(info, empty, None, seed=0)
    config = ScoreConfig(subset_size=None, batch_size=batch_size, num_actors=actors, cpus_per_actor=threads, use_gpu=None)
    with tempfile.TemporaryDirectory(prefix="distal-bench-run-") as run_dir:
        start = time.perf_counter()
        summary = score_pool(info, candidates, empty, checkpoint, RunDirectory(run_dir), 1, config)
        seconds = time.perf_counter() - start
    return summary.scored / seconds, seconds, summary.first_batch


class ParquetImages(torch.utils.data.IterableDataset):
    """Decoded batches of a pool's shards; DataLoader workers split the shards between them."""

    def __init__(self, info, batch_size: int) -> None:
        self.info, self.batch_size = info, batch_size

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        shards = self.info.shards[worker.id :: worker.num_workers] if worker else self.info.shards
        for shard in shards:
            fs, path = open_fs(shard)
            with fs.open(path, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=self.batch_size, columns=["id", "image"]):
                    ids = batch.column("id").to_pylist()
                    decoded = decode_batch(ids, batch.column("image").to_pylist(), self.info.channels, tuple(self.info.image_size))
                    yield decoded.ok_ids, torch.from_numpy(decoded.pixels)


def dataloader_rate(checkpoint: str, info, batch_size: int, workers: int, threads: int) -> tuple[float, float, tuple[float, int]]:
    """Images per second, seconds, and (seconds, rows) of the first scored batch of a single-process DataLoader loop writing one score file."""
    torch.set_num_threads(threads)
    learner = load_learner(checkpoint)
    loader = torch.utils.data.DataLoader(
        ParquetImages(info, batch_size), batch_size=None, num_workers=workers, pin_memory=device().type == "cuda"
    )
    ids, scores = [], []
    first = None
    start = time.perf_counter()
    for batch_ids, pixels in loader:
        _, predicted, _ = forward_batch(learner, pixels, device())  # [B]
        ids.extend(batch_ids)
        scores.append(predicted.double().cpu().numpy())
        first = first or (time.perf_counter() - start, len(batch_ids))
    with tempfile.TemporaryDirectory(prefix="distal-bench-loader-") as folder:
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "predicted_loss": np.concatenate(scores)}), f"{folder}/scores.parquet")
    seconds = time.perf_counter() - start
    return len(ids) / seconds, seconds, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="pool URI, for example pools/cifar10/pool")
    parser.add_argument("--rows", type=bench.positive_int, help="score only the first shards holding this many rows (default: all)")
    parser.add_argument("--width", type=bench.positive_int, default=16, help="ResNet-18 width (default: 16)")
    parser.add_argument("--batch-size", type=bench.positive_int, default=256, help="images per model batch (default: 256)")
    parser.add_argument("--threads", type=bench.positive_int, default=1, help="torch threads of the model, and CPUs per scoring actor (default: 1)")
    parser.add_argument("--actors", type=bench.positive_int, default=1, help="scoring actors in the end-to-end run (default: 1)")
    parser.add_argument("--loader-workers", type=bench.positive_int, default=1, help="DataLoader worker processes (default: 1)")
    parser.add_argument("--forward-rows", type=bench.positive_int, default=10_000, help="preloaded images for the forward pass (default: 10000)")
    args = parser.parse_args()
    configure_logging()

    info = bench.limit_pool(bench.open_pool(parser, args.pool), args.rows)
    checkpoint = bench.write_checkpoint(info, args.width)
    shared = {"pool": args.pool, "rows": info.num_rows, "image_size": list(info.image_size), "width": args.width, "batch_size": args.batch_size, "threads": args.threads}
    bench.emit("scoring", mode="machine", **bench.machine())

    forward = forward_rate(checkpoint, info, min(args.forward_rows, info.num_rows), args.batch_size, args.threads)
    bench.emit("scoring", mode="forward", images_per_second=forward, **shared)

    loader, loader_seconds, loader_first = dataloader_rate(checkpoint, info, args.batch_size, args.loader_workers, args.threads)
    loader_steady = steady_rate(info.num_rows, loader_seconds, loader_first)
    bench.emit(
        "scoring", mode="dataloader", images_per_second=loader, seconds=loader_seconds, first_batch_seconds=loader_first[0],
        steady_images_per_second=loader_steady, loader_workers=args.loader_workers, **shared,
    )

    bench.start_local_ray()
    end_to_end, seconds, first = end_to_end_rate(checkpoint, info, args.batch_size, args.actors, args.threads)
    steady = steady_rate(info.num_rows, seconds, first)
    bench.emit(
        "scoring", mode="end_to_end", images_per_second=end_to_end, seconds=seconds, first_batch_seconds=first[0],
        steady_images_per_second=steady, actors=args.actors, **shared,
    )

    bench.emit(
        "scoring", mode="ratios", end_to_end_over_forward=end_to_end / forward, end_to_end_over_dataloader=end_to_end / loader,
        steady_end_to_end_over_dataloader=steady / loader_steady, **shared,
    )


def steady_rate(rows: int, seconds: float, first_batch: tuple[float, int]) -> float:
    """Images per second after the first scored rows: the rate once start-up (processes, imports, model load) is over."""
    first_seconds, first_rows = first_batch
    return (rows - first_rows) / max(seconds - first_seconds, 1e-9)


if __name__ == "__main__":
    main()
