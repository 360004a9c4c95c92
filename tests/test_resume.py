"""SIGKILL a job during training, during scoring and after selection; the rerun must match an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Fields that record when and where a cycle ran, not what it computed.
VOLATILE = ("started_at", "finished_at", "timings", "run_dir")


def job_config(tmp_path: Path, pool, eval_pool, run_dir: Path) -> Path:
    config = {
        "run_dir": str(run_dir),
        "cycles": 1,
        "initial_labels": 40,
        "oracle": True,
        "pool": {"path": pool.path, "eval_path": eval_pool.path},
        "model": {"width": 8},
        "train": {"epochs": 6, "batch_size": 16, "milestones": [4], "gradient_stop_epoch": 3, "checkpoint_every": 1},
        "score": {"subset_size": 300, "batch_size": 32},
        "select": {"k": 20},
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_job(config: Path, failpoint: str | None = None) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    if failpoint:
        env["DISTAL_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "cycle.py"), "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def comparable(manifest_path: Path) -> dict:
    manifest = json.loads(manifest_path.read_text())
    for key in VOLATILE:
        manifest.pop(key, None)
    manifest["config"].pop("run_dir")
    return manifest


@pytest.fixture(scope="module")
def baseline(mnist_pools, tmp_path_factory):
    pool, eval_pool = mnist_pools
    tmp_path = tmp_path_factory.mktemp("baseline")
    config = job_config(tmp_path, pool, eval_pool, tmp_path / "uninterrupted")
    code, output = finish(start_job(config))
    assert code == 0, output
    return tmp_path / "uninterrupted"


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the job's process group as soon as ``ready()`` is true."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the job never reached the point to kill it at"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def assert_same_result(run_dir: Path, baseline: Path) -> None:
    cycle, expected = run_dir / "cycles" / "0001", baseline / "cycles" / "0001"
    assert (cycle / "_COMPLETE").exists()
    assert comparable(cycle / "manifest.json") == comparable(expected / "manifest.json")
    got, want = pq.read_table(cycle / "selected.parquet"), pq.read_table(expected / "selected.parquet")
    assert got.select(["rank", "id"]).equals(want.select(["rank", "id"]))
    # A rescored shard meets the model in other batches, and CPU kernels
    # chosen by batch size can change a score in its last bits.
    np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), rtol=1e-6)
    for labels in ("initial.parquet", "cycle-0001.parquet"):
        assert pq.read_table(run_dir / "labels" / labels).equals(pq.read_table(baseline / "labels" / labels))


def registered_epoch(train_dir: Path) -> int:
    """Return the epoch of the latest checkpoint Ray Train has registered (0 before the first).

    A checkpoint folder appears before Ray Train's controller registers it,
    and a resume only sees registered checkpoints.
    """
    try:
        snapshot = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("epoch", 0))


def test_kill_during_training_resumes(mnist_pools, baseline, tmp_path):
    pool, eval_pool = mnist_pools
    run_dir = tmp_path / "killed-training"
    config = job_config(tmp_path, pool, eval_pool, run_dir)
    train_dir = run_dir / "cycles" / "0001" / "train"
    process = start_job(config)
    kill_when(process, lambda: registered_epoch(train_dir) >= 2)
    assert not (run_dir / "cycles" / "0001" / "train.json").exists()

    code, output = finish(start_job(config))
    assert code == 0, output
    assert "action=resume" in output
    assert_same_result(run_dir, baseline)


def test_kill_during_scoring_rescores_missing_shards(mnist_pools, baseline, tmp_path):
    pool, eval_pool = mnist_pools
    run_dir = tmp_path / "killed-scoring"
    config = job_config(tmp_path, pool, eval_pool, run_dir)
    code, _ = finish(start_job(config, failpoint="after_score_file"))
    assert code == -signal.SIGKILL
    scores = run_dir / "cycles" / "0001" / "scores"
    kept = {path.name: path.stat().st_mtime_ns for path in scores.glob("*.parquet")}
    assert 1 <= len(kept) < 6
    assert not (scores / "_SUCCESS").exists()

    code, output = finish(start_job(config))
    assert code == 0, output
    assert "already_trained" in output
    assert {name: (scores / name).stat().st_mtime_ns for name in kept} == kept
    assert_same_result(run_dir, baseline)


def test_kill_after_selection_keeps_selection(mnist_pools, baseline, tmp_path):
    pool, eval_pool = mnist_pools
    run_dir = tmp_path / "killed-selection"
    config = job_config(tmp_path, pool, eval_pool, run_dir)
    code, _ = finish(start_job(config, failpoint="after_select"))
    assert code == -signal.SIGKILL
    cycle = run_dir / "cycles" / "0001"
    selected = (cycle / "selected.parquet").read_bytes()
    assert not (cycle / "_COMPLETE").exists()

    code, output = finish(start_job(config))
    assert code == 0, output
    assert "action=keep" in output
    assert (cycle / "selected.parquet").read_bytes() == selected
    assert_same_result(run_dir, baseline)


def test_second_job_on_same_run_dir_exits(mnist_pools, tmp_path):
    pool, eval_pool = mnist_pools
    run_dir = tmp_path / "busy"
    config = job_config(tmp_path, pool, eval_pool, run_dir)
    first = start_job(config)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "_LEASE.json").exists():
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        code, output = finish(start_job(config), timeout=120)
        assert code == 3, output
        assert "is in use by another job" in output
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
