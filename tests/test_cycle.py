"""Whole cycles on a local Ray cluster with real MNIST images: selection, reruns, bad images."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import mnist_arrays
from distal import config as config_module
from distal import cycle as cycle_module
from distal.cycle import labeled_set, oracle_lookup
from distal.images import encode_png
from distal.pool import write_pool
from distal.rundir import RunDirectory
from distal.score import ScoringError, choose_candidates, score_pool
from distal.train import load_checkpoint, train
from distal.train_step import normalize

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

K = 20


def tiny_config(run_dir: Path, pool, eval_pool, **extra: str):
    overrides = {
        "run_dir": str(run_dir),
        "pool.path": pool.path,
        "pool.eval_path": eval_pool.path,
        "cycles": "2",
        "initial_labels": "40",
        "oracle": "true",
        "model.width": "8",
        "train.epochs": "3",
        "train.batch_size": "16",
        "train.milestones": "[2]",
        "train.gradient_stop_epoch": "2",
        "train.cpus_per_worker": "1",
        "score.subset_size": "300",
        "score.batch_size": "64",
        "select.k": str(K),
    }
    overrides.update(extra)
    return config_module.load(None, [f"{key}={value}" for key, value in overrides.items()])


@pytest.fixture(scope="module")
def finished_run(ray_cluster, mnist_pools, tmp_path_factory):
    pool, eval_pool = mnist_pools
    run_dir = tmp_path_factory.mktemp("run") / "run"
    config = tiny_config(run_dir, pool, eval_pool)
    records = cycle_module.run(config)
    return config, records, RunDirectory(str(run_dir))


def read_score_ids(run: RunDirectory, cycle: int) -> list[str]:
    ids = []
    for path in sorted(Path(run.cycle_path(cycle, "scores")).glob("*.parquet")):
        ids += pq.read_table(path, columns=["id"]).column("id").to_pylist()
    return ids


def test_selection_is_k_new_ids_by_loss(finished_run):
    _, records, run = finished_run
    for record in records:
        manifest = record.manifest
        labeled = set(labeled_set(run, record.cycle).column("id").to_pylist())
        selected = pq.read_table(run.cycle_path(record.cycle, "selected.parquet"))
        ids = selected.column("id").to_pylist()
        scores = selected.column("predicted_loss").to_pylist()
        assert len(ids) == K
        assert len(set(ids)) == K
        assert not labeled & set(ids)
        assert scores == sorted(scores, reverse=True)
        assert manifest["selected"] == ids
        assert manifest["counts"]["selected"] == K


def test_labeled_ids_are_never_scored(finished_run):
    _, records, run = finished_run
    for record in records:
        labeled = set(labeled_set(run, record.cycle).column("id").to_pylist())
        scored = read_score_ids(run, record.cycle)
        assert len(scored) == 300
        assert len(set(scored)) == 300
        assert not labeled & set(scored)


def test_oracle_labels_grow_the_labeled_set(finished_run):
    _, records, run = finished_run
    first, second = labeled_set(run, 1), labeled_set(run, 2)
    assert first.num_rows == 40
    assert second.num_rows == 40 + K
    added = set(second.column("id").to_pylist()) - set(first.column("id").to_pylist())
    assert added == set(records[0].manifest["selected"])


def test_manifest_records_counts_metrics_timings(finished_run):
    config, records, run = finished_run
    manifest = json.loads(Path(run.cycle_path(1, "manifest.json")).read_text())
    assert manifest["config"] == config_module.to_dict(config)
    assert manifest["counts"]["pool_rows"] == 600
    assert manifest["counts"]["labeled"] == 40
    assert manifest["counts"]["candidates"] == 300
    assert manifest["counts"]["skipped"] == 0
    assert 0.0 <= manifest["metrics"]["eval_accuracy"] <= 1.0
    assert manifest["metrics"]["eval_samples"] == 200
    assert {"target_loss", "ranking_loss"} <= set(manifest["metrics"])
    assert {"train_s", "score_s", "select_s"} <= set(manifest["timings"])
    assert {"torch", "ray", "pyarrow", "distal"} <= set(manifest["versions"])
    assert Path(run.cycle_path(1, "_COMPLETE")).exists()


def test_rerun_leaves_completed_cycles_untouched(finished_run):
    config, _, run = finished_run
    cycle_dir = Path(run.cycle_path(1))
    before = {path: path.stat().st_mtime_ns for path in cycle_dir.rglob("*") if path.is_file()}
    records = cycle_module.run(config)
    after = {path: path.stat().st_mtime_ns for path in cycle_dir.rglob("*") if path.is_file()}
    assert after == before
    assert [record.cycle for record in records] == [1, 2]
    assert records[0].manifest["selected"] == json.loads((cycle_dir / "manifest.json").read_text())["selected"]


def test_interrupted_cycle_is_redone(finished_run):
    config, _, run = finished_run
    cycle_dir = Path(run.cycle_path(2))
    # An interrupted cycle: no completion marker, a half-written score file left behind.
    (cycle_dir / "_COMPLETE").unlink()
    (cycle_dir / "manifest.json").unlink()
    leftover = cycle_dir / "scores" / "part-09999.parquet"
    leftover.write_bytes(b"half a file")
    first_cycle_manifest = Path(run.cycle_path(1, "manifest.json")).read_bytes()

    records = cycle_module.run(config)

    assert (cycle_dir / "_COMPLETE").exists()
    assert not leftover.exists()
    assert Path(run.cycle_path(1, "manifest.json")).read_bytes() == first_cycle_manifest
    assert len(records[1].manifest["selected"]) == K


def test_scores_stay_attached_to_ids(finished_run, mnist_pools, ray_cluster, tmp_path):
    """Two actors and small batches finish out of order; each score must match its own image."""
    config, _, run = finished_run
    pool, _ = mnist_pools
    checkpoint = run.cycle_path(1, "model.pt")
    labeled = labeled_set(run, 1).column("id").combine_chunks()
    candidates = choose_candidates(pool, labeled, 120, seed=7)
    scratch = RunDirectory(str(tmp_path / "scratch"))
    score_config = config_module.ScoreConfig(subset_size=120, batch_size=7, num_actors=2, cpus_per_actor=0.5)
    summary = score_pool(pool, candidates, labeled, checkpoint, scratch, 1, score_config)
    scored = pa.concat_tables(pq.read_table(path) for path in summary.files)
    assert scored.num_rows == 120

    _, learner, _ = load_checkpoint(checkpoint)
    images, _ = mnist_arrays(600)
    index = {f"mnist-{i:05d}": i for i in range(600)}
    ids = scored.column("id").to_pylist()
    pixels = torch.from_numpy(np.stack([images[index[sample_id]] for sample_id in ids]))[:, None]  # [n, 1, 28, 28]
    with torch.no_grad():
        _, expected = learner(normalize(pixels), detach_features=True)  # [n]
    got = np.asarray(scored.column("predicted_loss").to_pylist())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def write_pool_with_bad_images(path: Path, bad: dict[int, bytes]):
    images, labels = mnist_arrays(100)
    encoded = [encode_png(image) for image in images]
    for row, data in bad.items():
        encoded[row] = data
    table = pa.table(
        {
            "id": [f"img-{i:03d}" for i in range(100)],
            "image": pa.array(encoded, pa.binary()),
            "label": pa.array(labels.astype(np.int64)),
        }
    )
    return write_pool(str(path), [table], image_size=(28, 28), channels=1, classes=[str(d) for d in range(10)], source="test", rows_per_shard=50)


def test_undecodable_images_are_skipped_and_recorded(finished_run, ray_cluster, tmp_path):
    _, _, run = finished_run
    checkpoint = run.cycle_path(1, "model.pt")
    pool = write_pool_with_bad_images(tmp_path / "pool", {3: b"", 61: b"not an image at all"})
    empty = pa.array([], pa.string())
    candidates = choose_candidates(pool, empty, None, seed=0)
    scratch = RunDirectory(str(tmp_path / "scratch"))
    summary = score_pool(pool, candidates, empty, checkpoint, scratch, 1, config_module.ScoreConfig(subset_size=None, max_skip_fraction=0.05))
    assert summary.scored == 98
    assert sorted((sample_id, shard) for sample_id, shard, _ in summary.skipped) == [
        ("img-003", "part-00000.parquet"),
        ("img-061", "part-00001.parquet"),
    ]
    reasons = {sample_id: reason for sample_id, _, reason in summary.skipped}
    assert reasons["img-003"] == "empty"
    assert reasons["img-061"] == "undecodable"


def test_too_many_undecodable_images_fail_scoring(finished_run, ray_cluster, tmp_path):
    _, _, run = finished_run
    checkpoint = run.cycle_path(1, "model.pt")
    pool = write_pool_with_bad_images(tmp_path / "pool", {row: b"\x89PNG broken" for row in range(5)})
    empty = pa.array([], pa.string())
    candidates = choose_candidates(pool, empty, None, seed=0)
    scratch = RunDirectory(str(tmp_path / "scratch"))
    with pytest.raises(ScoringError, match="img-00") as error:
        score_pool(pool, candidates, empty, checkpoint, scratch, 1, config_module.ScoreConfig(subset_size=None, max_skip_fraction=0.01))
    assert "max_skip_fraction" in str(error.value)
    assert not os.path.exists(scratch.cycle_path(1, "scores", "_SUCCESS"))


def encode_mode(gray: np.ndarray, mode: str) -> bytes:
    """Encode a real grayscale digit as a PNG of another mode."""
    from PIL import Image

    image = Image.fromarray(gray, mode="L")
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "P":
        image = image.convert("RGB").convert("P")
    elif mode != "L":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_mixed_modes_are_converted_and_counted(finished_run, ray_cluster, tmp_path):
    _, _, run_dir = finished_run
    checkpoint = run_dir.cycle_path(1, "model.pt")
    images, _ = mnist_arrays(40)
    modes = ["L", "RGB", "RGBA", "P", "I;16"] * 8
    table = pa.table(
        {
            "id": [f"mode-{i:02d}" for i in range(40)],
            "image": pa.array([encode_mode(image, mode) for image, mode in zip(images, modes)], pa.binary()),
        }
    )
    pool = write_pool(str(tmp_path / "pool"), [table], image_size=(28, 28), channels=1, classes=None, source="test", rows_per_shard=20)
    empty = pa.array([], pa.string())
    candidates = choose_candidates(pool, empty, None, seed=0)
    summary = score_pool(pool, candidates, empty, checkpoint, RunDirectory(str(tmp_path / "scratch")), 1, config_module.ScoreConfig(subset_size=None))
    assert summary.scored == 40
    assert summary.skipped == []
    assert sum(summary.conversions.values()) == 32
    for mode in ("RGB", "RGBA", "P", "I;16"):
        assert summary.conversions[f"{mode}->L"] == 8


def test_two_ddp_workers_train_and_evaluate(ray_cluster, mnist_pools, tmp_path):
    pool, eval_pool = mnist_pools
    config = tiny_config(tmp_path / "run", pool, eval_pool, **{"train.num_workers": "2", "train.cpus_per_worker": "0.5"})
    # 65 labels: the equal split gives each worker 32, and every local batch stays even.
    labels = oracle_lookup(pool, pa.array([f"mnist-{i:05d}" for i in range(65)], pa.string()), source="test")
    result = train(config, pool, labels, eval_pool, str(tmp_path / "storage"), "train", seed=1)
    assert result.labeled_used == 65
    assert result.metrics["eval_samples"] == 200
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    assert np.isfinite(result.metrics["ranking_loss"])
    _, learner, spec = load_checkpoint(result.checkpoint_uri)
    assert spec.in_channels == 1
    assert not learner.training


def test_scorer_output_follows_ids_not_positions(finished_run):
    """A batch and its permutation give every id the same score."""
    from distal.datasets import decode_rows
    from distal.score import LossScorer

    _, _, run_dir = finished_run
    checkpoint = run_dir.cycle_path(1, "model.pt")
    images, _ = mnist_arrays(16)
    table = pa.table(
        {
            "id": [f"img-{i:02d}" for i in range(16)],
            "image": pa.array([encode_png(image) for image in images][:15] + [b""], pa.binary()),
            "path": ["part-00000.parquet"] * 16,
        }
    )
    scorer = LossScorer(checkpoint, use_gpu=False)
    forward = scorer(decode_rows(table, 1, (28, 28))).to_pydict()
    order = np.random.default_rng(0).permutation(16)
    backward = scorer(decode_rows(table.take(order), 1, (28, 28))).to_pydict()
    by_id = dict(zip(forward["id"], forward["predicted_loss"]))
    permuted = dict(zip(backward["id"], backward["predicted_loss"]))
    assert by_id.pop("img-15") is None
    assert permuted.pop("img-15") is None
    assert permuted == pytest.approx(by_id)
    assert len({round(score, 6) for score in by_id.values()}) > 1


def test_warm_start_continues_from_previous_model(ray_cluster, mnist_pools, tmp_path):
    pool, eval_pool = mnist_pools
    config = tiny_config(tmp_path / "run", pool, eval_pool, **{"train.warm_start": "true", "select.strategy": "margin"})
    records = cycle_module.run(config)
    assert [record.manifest["train"] for record in records] == [
        {"init": "scratch", "loss_module": False},
        {"init": "cycles/0001/model.pt", "loss_module": False},
    ]
    # A baseline's selection ranks the smallest softmax margin first.
    selected = pq.read_table(RunDirectory(str(tmp_path / "run")).cycle_path(2, "selected.parquet"))
    margins = -selected.column("score").to_numpy()
    assert np.all(margins >= 0)
    assert np.all(np.diff(margins) >= 0)
    assert selected.column("predicted_loss").null_count == selected.num_rows
    assert records[1].manifest["score_stats"]["column"] == "margin"


def test_warm_start_without_previous_model_fails(ray_cluster, mnist_pools, tmp_path):
    pool, eval_pool = mnist_pools
    config = tiny_config(tmp_path / "run", pool, eval_pool, **{"train.warm_start": "true", "cycles": "1"})
    cycle_module.run(config)
    run_dir = RunDirectory(str(tmp_path / "run"))
    run_dir.fs.rm(run_dir.cycle_path(1, "model.pt"))
    with pytest.raises(cycle_module.CycleError, match="previous cycle's model"):
        cycle_module.run_cycle(config, pool, eval_pool, run_dir, 2)
