"""Shared pieces of the benchmarks: the machine record, result lines, an untrained model checkpoint.

Every benchmark prints one machine-readable line per measurement:

    BENCH {"bench": "scoring", "mode": "end_to_end", "images_per_second": 512.3, ...}

so results can be collected with ``grep '^BENCH '`` and pasted into
docs/benchmarks.md together with the command and the ``machine`` record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> dict:
    """Describe the machine: CPU model and count, memory, GPU, library versions."""
    import pyarrow
    import ray
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(memory_gb, 1) if memory_gb else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


def positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1 (an argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """Parse a comma-separated list of integers >= 1, such as ``10000,100000``."""
    return [positive_int(part) for part in text.split(",")]


def open_pool(parser: argparse.ArgumentParser, uri: str, require_label: bool = False):
    """Validate the pool at ``uri``; a missing or invalid pool ends the script with the parser's usage error."""
    from distal.pool import PoolError, validate_pool

    try:
        return validate_pool(uri, require_label=require_label)
    except PoolError as err:
        parser.error(str(err))


def emit(bench: str, **fields) -> dict:
    """Print one ``BENCH {...}`` result line and return its record."""
    record = {"bench": bench, **{key: round(value, 4) if isinstance(value, float) else value for key, value in fields.items()}}
    print("BENCH " + json.dumps(record), flush=True)
    return record


def write_checkpoint(info, width: int, directory: str | None = None) -> str:
    """Save an untrained learner (target model and loss module) sized for a pool; return the ``model.pt`` path.

    Speed does not depend on the weights, so benchmarks score with an
    untrained model and need no training run.
    """
    import torch

    from distal.config import ModelConfig
    from distal.train import TaskSpec, build_learner, save_checkpoint

    torch.manual_seed(0)
    num_classes = len(info.classes) if info.classes else 10
    spec = TaskSpec(num_classes=num_classes, in_channels=info.channels, image_size=tuple(info.image_size))
    model_config = ModelConfig(width=width)
    _, learner = build_learner(model_config, spec)
    directory = directory or tempfile.mkdtemp(prefix="distal-bench-model-")
    save_checkpoint(directory, learner, model_config, spec, epoch=0)
    return os.path.join(directory, "model.pt")


def limit_pool(info, rows: int | None):
    """Return the pool restricted to its first shards holding at least ``rows`` rows (all shards for None)."""
    import dataclasses

    import pyarrow.parquet as pq

    from distal.pool import open_fs

    if rows is None or rows >= info.num_rows:
        return info
    shards, count = [], 0
    for shard in info.shards:
        fs, path = open_fs(shard)
        with fs.open(path, "rb") as handle:
            count += pq.ParquetFile(handle).metadata.num_rows
        shards.append(shard)
        if count >= rows:
            break
    return dataclasses.replace(info, shards=tuple(shards), num_rows=count)


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start an in-process Ray on this machine's CPUs, quiet as distal's jobs keep it."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray

    from distal.cycle import init_ray

    if num_cpus is not None:
        ray.init(address="local", num_cpus=num_cpus, configure_logging=False)
    init_ray(None)
