"""Two nightly cycles outside simulation: labels come back as CSV files between the nights."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import mnist_arrays, write_mnist_pool
from distal import config as config_module
from distal import cycle as cycle_module
from distal.rundir import RunDirectory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def distal_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distal.cli", *args], capture_output=True, text=True, timeout=300)


def write_labels_csv(path: Path, ids: list[str]) -> Path:
    """Label ``ids`` with their true MNIST digits, as annotators would return them."""
    _, labels = mnist_arrays(600)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        for sample_id in ids:
            writer.writerow([sample_id, int(labels[int(sample_id.split("-")[1])])])
    return path


def nightly_config(run_dir: Path, pool, eval_pool):
    overrides = {
        "run_dir": str(run_dir),
        "pool.path": pool.path,
        "pool.eval_path": eval_pool.path,
        "cycles": "null",
        "oracle": "false",
        "model.width": "8",
        "train.epochs": "2",
        "train.batch_size": "16",
        "train.milestones": "[1]",
        "train.gradient_stop_epoch": "1",
        "score.subset_size": "200",
        "select.k": "20",
    }
    return config_module.load(None, [f"{key}={value}" for key, value in overrides.items()])


def test_two_nights_with_labels_from_csv(ray_cluster, mnist_pools, tmp_path):
    pool, eval_pool = mnist_pools
    run_dir = tmp_path / "run"
    config = nightly_config(run_dir, pool, eval_pool)

    with pytest.raises(cycle_module.CycleError, match="distal labels import"):
        cycle_module.run(config)

    initial = write_labels_csv(tmp_path / "initial.csv", [f"mnist-{i:05d}" for i in range(0, 400, 10)])
    imported = distal_cli("labels", "import", str(run_dir), str(initial), "--pool", pool.path)
    assert imported.returncode == 0, imported.stderr
    assert "40 new labels" in imported.stdout

    first_night = cycle_module.run(config)
    assert [record.cycle for record in first_night] == [1]
    selected = pq.read_table(run_dir / "cycles" / "0001" / "selected.parquet").column("id").to_pylist()
    assert len(selected) == 20

    # The next night comes before the labels: nothing to do, nothing written.
    waiting = cycle_module.run(config)
    assert [record.cycle for record in waiting] == [1]
    assert not (run_dir / "cycles" / "0002").exists()

    returned = write_labels_csv(tmp_path / "batch-1.csv", selected)
    imported = distal_cli("labels", "import", str(run_dir), str(returned))
    assert imported.returncode == 0, imported.stderr
    again = distal_cli("labels", "import", str(run_dir), str(returned))
    assert "nothing changed" in again.stdout

    second_night = cycle_module.run(config)
    assert [record.cycle for record in second_night] == [1, 2]
    assert second_night[1].manifest["counts"]["labeled"] == 60
    assert not set(second_night[1].manifest["selected"]) & set(selected)

    status = distal_cli("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("1", "complete"), ("2", "complete")]
    assert rows[0][6] == "0"
    assert rows[1][6] == "20"


def test_fraction_policy_starts_with_most_labels(ray_cluster, mnist_pools, tmp_path):
    pool, eval_pool = mnist_pools
    run_dir = tmp_path / "run"
    config = config_module.from_dict(
        {**config_module.to_dict(nightly_config(run_dir, pool, eval_pool)), "labels": {"wait": "fraction", "min_fraction": 0.5}}
    )
    write = write_labels_csv(tmp_path / "initial.csv", [f"mnist-{i:05d}" for i in range(40)])
    assert distal_cli("labels", "import", str(run_dir), str(write), "--pool", pool.path).returncode == 0
    cycle_module.run(config)
    selected = pq.read_table(run_dir / "cycles" / "0001" / "selected.parquet").column("id").to_pylist()

    few = write_labels_csv(tmp_path / "few.csv", selected[:5])
    assert distal_cli("labels", "import", str(run_dir), str(few)).returncode == 0
    assert [record.cycle for record in cycle_module.run(config)] == [1]

    more = write_labels_csv(tmp_path / "more.csv", selected[5:12])
    assert distal_cli("labels", "import", str(run_dir), str(more)).returncode == 0
    assert [record.cycle for record in cycle_module.run(config)] == [1, 2]


def test_pool_changes_between_nights(ray_cluster, tmp_path):
    eval_pool = write_mnist_pool(tmp_path / "eval", 100, offset=900, prefix="eval")
    pool = write_mnist_pool(tmp_path / "pool", 400, offset=0, rows_per_shard=100)
    run_dir = tmp_path / "run"
    overrides = {
        **config_module.to_dict(nightly_config(run_dir, pool, eval_pool)),
        "oracle": True,
        "initial_labels": 40,
        "score": {"subset_size": None, "batch_size": 64},
    }
    night_one = config_module.from_dict({**overrides, "cycles": 1})
    cycle_module.run(night_one)
    labeled_before = set(cycle_module.labeled_set(RunDirectory(str(run_dir)), 2).column("id").to_pylist())

    # Overnight the pool lost ids mnist-00000..00099 and gained mnist-00400..00599 in new shards.
    write_mnist_pool(tmp_path / "pool", 500, offset=100, rows_per_shard=100, overwrite=True)
    night_two = cycle_module.run(config_module.from_dict({**overrides, "cycles": 2}))[1].manifest

    gone = {sample_id for sample_id in labeled_before if int(sample_id.split("-")[1]) < 100}
    assert night_two["counts"]["pool_rows"] == 500
    assert night_two["counts"]["labeled_missing_from_pool"] == len(gone)
    assert night_two["counts"]["candidates"] == 500 - (len(labeled_before) - len(gone))
    scored = set()
    for path in (run_dir / "cycles" / "0002" / "scores").glob("*.parquet"):
        scored |= set(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    assert {f"mnist-{i:05d}" for i in range(400, 600)} <= scored
    assert not {sample_id for sample_id in scored if int(sample_id.split("-")[1]) < 100}
