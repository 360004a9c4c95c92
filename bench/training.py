"""Training throughput with 1 and 2 Ray Train workers on the same labeled set.

Trains the target model and its loss module (the learning_loss recipe) on
``--labeled`` images of a pool for ``--epochs`` epochs, once per worker
count. Each run reports training images per second over all workers,
counting training batches only, and the wall time of the whole run: Ray
Train start, reading and decoding the labeled set, and checkpoints. On a CPU
machine the workers share its cores, so with two or more workers
``--cpus-per-worker`` defaults to half a CPU and Ray Data keeps CPUs to feed
them.

    .venv/bin/python bench/training.py --pool pools/cifar10/pool --labeled 5000 --workers 1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import common as bench
import pyarrow as pa

from distal import config as config_module
from distal.cycle import oracle_lookup
from distal.progress import configure_logging
from distal.score import choose_candidates
from distal.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="pool URI with a label column, for example pools/cifar10/pool")
    parser.add_argument("--labeled", type=bench.positive_int, default=5000, help="labeled images to train on (default: 5000)")
    parser.add_argument("--epochs", type=bench.positive_int, default=3, help="epochs per run (default: 3)")
    parser.add_argument("--width", type=bench.positive_int, default=16, help="ResNet-18 width (default: 16)")
    parser.add_argument("--batch-size", type=bench.positive_int, default=128, help="global batch size (default: 128)")
    parser.add_argument("--workers", type=bench.positive_ints, default=[1, 2], help="comma-separated worker counts (default: 1,2)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker (default: 1 for one worker, else 0.5)")
    parser.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (CUDA workers only)")
    args = parser.parse_args()
    configure_logging()

    bench.emit("training", mode="machine", **bench.machine())
    info = bench.open_pool(parser, args.pool, require_label=True)
    chosen = choose_candidates(info, pa.array([], pa.string()), args.labeled, seed=0)
    labels = oracle_lookup(info, chosen.ids, source="bench")
    bench.start_local_ray()
    for workers in args.workers:
        cpus = args.cpus_per_worker or (1.0 if workers == 1 else 0.5)
        config = config_module.from_dict(
            {
                "model": {"width": args.width},
                "train": {
                    "epochs": args.epochs, "batch_size": args.batch_size, "milestones": [], "gradient_stop_epoch": args.epochs,
                    "num_workers": workers, "cpus_per_worker": cpus, "checkpoint_every": args.epochs, "bf16": args.bf16,
                },
            }
        )
        with tempfile.TemporaryDirectory(prefix="distal-bench-train-") as storage:
            result = train(config, info, labels, None, storage, "bench", seed=0)
        bench.emit(
            "training", mode="train", workers=workers, cpus_per_worker=cpus, labeled=result.labeled_used, epochs=args.epochs,
            width=args.width, batch_size=args.batch_size, bf16=args.bf16, images_per_second=result.images_per_second, seconds=result.seconds,
        )


if __name__ == "__main__":
    main()
