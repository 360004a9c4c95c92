"""A whole job with its pool, labels, run directory and Ray Train checkpoints on S3 (moto on 127.0.0.1).

The job runs as a user runs it, ``python jobs/cycle.py`` in its own process
with its own local Ray, so every Ray worker gets the S3 endpoint and the
credentials from the environment (the standard AWS chain).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, write_mnist_pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# A secret no file or log line may contain.
SECRET = "distal-test-secret-7b41c9"
VOLATILE = ("started_at", "finished_at", "timings", "run_dir")


def job_config(path: Path, run_dir: str, pool: str, eval_pool: str) -> Path:
    config = {
        "run_dir": run_dir,
        "cycles": 2,
        "initial_labels": 40,
        "oracle": True,
        "pool": {"path": pool, "eval_path": eval_pool},
        "model": {"width": 8},
        "train": {"epochs": 3, "batch_size": 16, "milestones": [2], "gradient_stop_epoch": 2, "checkpoint_every": 1},
        "score": {"subset_size": 300, "batch_size": 64},
        "select": {"k": 20},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_job(config: Path) -> str:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["AWS_SECRET_ACCESS_KEY"] = SECRET
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "cycle.py"), "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=800,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def comparable(manifest: dict) -> dict:
    for key in VOLATILE:
        manifest.pop(key, None)
    manifest["config"].pop("run_dir")
    manifest["config"].pop("pool")  # s3:// against local paths; the rows are the same
    manifest["pool"].pop("path")
    return manifest


def test_cycle_on_s3_matches_the_same_cycle_on_local_disk(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    local_pool = write_mnist_pool(tmp_path / "pool", 600, rows_per_shard=100)
    local_eval = write_mnist_pool(tmp_path / "eval", 200, offset=600, rows_per_shard=100, prefix="mnist-eval")
    fs.put(str(tmp_path / "pool"), f"{s3_bucket}/pools/pool", recursive=True)
    fs.put(str(tmp_path / "eval"), f"{s3_bucket}/pools/eval", recursive=True)

    s3_run = f"s3://{s3_bucket}/runs/demo"
    s3_output = run_job(job_config(tmp_path / "s3.yaml", s3_run, f"s3://{s3_bucket}/pools/pool", f"s3://{s3_bucket}/pools/eval"))
    local_run = tmp_path / "local-run"
    run_job(job_config(tmp_path / "local.yaml", str(local_run), local_pool.path, local_eval.path))

    for cycle in ("0001", "0002"):
        assert fs.exists(f"{s3_bucket}/runs/demo/cycles/{cycle}/_COMPLETE")
        with fs.open(f"{s3_bucket}/runs/demo/cycles/{cycle}/manifest.json") as handle:
            on_s3 = json.load(handle)
        on_disk = json.loads((local_run / "cycles" / cycle / "manifest.json").read_text())
        assert comparable(on_s3) == comparable(on_disk)
        with fs.open(f"{s3_bucket}/runs/demo/cycles/{cycle}/selected.parquet") as handle:
            assert pq.read_table(handle).equals(pq.read_table(local_run / "cycles" / cycle / "selected.parquet"))

    # Ray Train wrote its checkpoints into the run directory on S3.
    checkpoints = fs.glob(f"{s3_bucket}/runs/demo/cycles/0001/train/**/model.pt")
    assert checkpoints, fs.find(f"{s3_bucket}/runs/demo/cycles/0001")

    # Credentials come from the environment and are written nowhere.
    assert SECRET not in s3_output
    for key in fs.find(f"{s3_bucket}/runs/demo"):
        if key.endswith((".json", ".yaml", ".txt", ".log")):
            assert SECRET not in fs.cat(key).decode("utf-8", "replace"), key
