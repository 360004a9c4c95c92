"""Global top-K: distal's streaming top-K against Ray Data's ``sort(...).limit(K)`` on the same scores.

Writes ``--rows`` random scores (with ids) as score files, then times:

- ``streaming``: ``distal.selection.select_from_score_files``, which streams
  the files batch by batch on the driver and keeps K entries;
- ``sort_limit``: ``ray.data.read_parquet(files).sort("predicted_loss",
  descending=True).limit(K)``, a full distributed sort.

Both must return the same ids (ties in the random scores are vanishingly
rare; the result line reports whether one occurred). Run from the repository root:

    .venv/bin/python bench/topk.py --rows 1000000 --k 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import common as bench
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distal.progress import configure_logging
from distal.selection import select_from_score_files


def write_scores(folder: str, rows: int, files: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for index, first in enumerate(range(0, rows, -(-rows // files))):
        count = min(-(-rows // files), rows - first)
        table = pa.table(
            {
                "id": pa.array([f"synth-{first + offset:08d}" for offset in range(count)], pa.string()),
                "predicted_loss": pa.array(rng.standard_normal(count), pa.float64()),
            }
        )
        path = f"{folder}/part-{index:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=bench.positive_int, default=1_000_000, help="scores (default: 1000000)")
    parser.add_argument("--k", type=bench.positive_int, default=10_000, help="selection size (default: 10000)")
    parser.add_argument("--files", type=bench.positive_int, default=100, help="score files, as one per pool shard (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.k > args.rows:
        parser.error(f"--k {args.k} is larger than --rows {args.rows}: choose K at most the number of scores")
    if args.files > args.rows:
        parser.error(f"--files {args.files} is larger than --rows {args.rows}: each score file needs at least one score")
    configure_logging()

    bench.emit("topk", mode="machine", **bench.machine())
    with tempfile.TemporaryDirectory(prefix="distal-bench-topk-") as folder:
        files = write_scores(folder, args.rows, args.files, args.seed)

        start = time.perf_counter()
        streaming = select_from_score_files(files, args.k).table
        streaming_seconds = time.perf_counter() - start
        bench.emit("topk", mode="streaming", rows=args.rows, k=args.k, seconds=streaming_seconds)

        bench.start_local_ray()
        import ray.data

        ray.data.range(100).materialize()  # start Ray Data's executor before the clock
        start = time.perf_counter()
        sorted_rows = ray.data.read_parquet(files).sort("predicted_loss", descending=True).limit(args.k).to_arrow_refs()
        table = pa.concat_tables(ray.get(sorted_rows))
        sort_seconds = time.perf_counter() - start
        bench.emit("topk", mode="sort_limit", rows=args.rows, k=args.k, seconds=sort_seconds)

    same = streaming.column("id").to_pylist() == table.column("id").to_pylist()
    bench.emit("topk", mode="ratio", rows=args.rows, k=args.k, sort_over_streaming=sort_seconds / streaming_seconds, same_ids=same)


if __name__ == "__main__":
    main()
