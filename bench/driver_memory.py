"""Driver memory against pool size: score whole synthetic pools of 10k, 100k and 1M rows and select K.

For each size, a fresh process validates the pool, streams its ids to find
the candidates, scores every row through the Ray Data pipeline (a narrow
untrained model; speed does not depend on the weights) and selects the
global top-K from the score files. The result line gives the driver's peak
resident memory (``ru_maxrss``) and the wall time. Memory should stay flat:
the driver holds one shard's ids, one batch of scores and K entries.

Synthetic pools are made with ``distal pool synth`` under ``--pools-dir``
when missing. Run from the repository root:

    .venv/bin/python bench/driver_memory.py --rows 10000,100000,1000000 --k 10000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as bench

HERE = Path(__file__).resolve()


def measure(pool: str, k: int, width: int, batch_size: int) -> dict:
    """Score and select one pool in this process; return wall time and peak driver memory."""
    import pyarrow as pa

    from distal.config import ScoreConfig
    from distal.pool import validate_pool
    from distal.rundir import RunDirectory
    from distal.score import choose_candidates, score_pool
    from distal.selection import select_from_score_files

    start = time.perf_counter()
    info = validate_pool(pool)
    checkpoint = bench.write_checkpoint(info, width)
    bench.start_local_ray()
    empty = pa.array([], pa.string())
    candidates = choose_candidates(info, empty, None, seed=0)
    with tempfile.TemporaryDirectory(prefix="distal-bench-memory-") as run_dir:
        run = RunDirectory(run_dir)
        summary = score_pool(info, candidates, empty, checkpoint, run, 1, ScoreConfig(subset_size=None, batch_size=batch_size))
        score_seconds = time.perf_counter() - start
        selection = select_from_score_files(summary.files, k, filesystem=run.fs)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"rows": info.num_rows, "scored": summary.scored, "selected": selection.table.num_rows, "seconds": seconds, "score_seconds": score_seconds, "driver_peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=bench.positive_ints, default=[10_000, 100_000, 1_000_000], help="comma-separated pool sizes (default: 10000,100000,1000000)")
    parser.add_argument("--k", type=bench.positive_int, default=10_000, help="selection size (default: 10000)")
    parser.add_argument("--width", type=bench.positive_int, default=4, help="ResNet-18 width (default: 4, a narrow model)")
    parser.add_argument("--batch-size", type=bench.positive_int, default=512, help="images per model batch (default: 512)")
    parser.add_argument("--pools-dir", default="pools/synth", help="where synthetic pools live (default: pools/synth)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        from distal.progress import configure_logging

        configure_logging()
        print("RESULT " + json.dumps(measure(args.child, args.k, args.width, args.batch_size)), flush=True)
        return

    bench.emit("driver_memory", mode="machine", **bench.machine())
    for rows in args.rows:
        pool = os.path.join(args.pools_dir, f"synth-{rows}")
        if not os.path.exists(os.path.join(pool, "_distal_pool.json")):
            subprocess.run([sys.executable, "-m", "distal.cli", "pool", "synth", "--out", pool, "--rows", str(rows), "--overwrite"], check=True)
        child = subprocess.run(
            [sys.executable, str(HERE), "--child", pool, "--k", str(args.k), "--width", str(args.width), "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=False,
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            sys.exit(f"The measurement of {pool} failed:\n{child.stdout[-4000:]}\n{child.stderr[-4000:]}")
        bench.emit("driver_memory", mode="score_and_select", k=args.k, width=args.width, **json.loads(lines[-1][len("RESULT "):]))


if __name__ == "__main__":
    main()
