"""Scoring pipeline layout: the same images give the same scores however the pool is sharded and chunked."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_mnist_pool

from distal.config import ModelConfig, ScoreConfig
from distal.datasets import LOAD_ROWS
from distal.rundir import RunDirectory
from distal.score import _scoring_dataset, choose_candidates, score_pool
from distal.train import TaskSpec, build_learner, save_checkpoint

pytestmark = pytest.mark.slow

ROWS = 1_500  # more than LOAD_ROWS, so the one-shard pool is read in two chunks
SCORE_COLUMNS = ["predicted_loss", "entropy", "least_confidence", "margin"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained narrow learner for 28x28 grayscale images: scores only need to be deterministic."""
    torch.manual_seed(0)
    model_config = ModelConfig(width=4, loss_module_dim=16)
    spec = TaskSpec(num_classes=10, in_channels=1, image_size=(28, 28))
    _, learner = build_learner(model_config, spec)
    directory = tmp_path_factory.mktemp("model")
    save_checkpoint(str(directory), learner, model_config, spec, epoch=0)
    return str(directory / "model.pt")


def score_all(pool, checkpoint: str, run_dir, batch_size: int, num_actors: int = 1) -> pa.Table:
    empty = pa.array([], pa.string())
    candidates = choose_candidates(pool, empty, None, seed=0)
    config = ScoreConfig(subset_size=None, batch_size=batch_size, num_actors=num_actors, cpus_per_actor=0.5)
    summary = score_pool(pool, candidates, empty, checkpoint, RunDirectory(str(run_dir)), 1, config)
    return pa.concat_tables(pq.read_table(path) for path in summary.files).sort_by("id")


def test_sharded_pool_matches_single_shard(ray_cluster, checkpoint, tmp_path):
    assert ROWS > LOAD_ROWS
    single = write_mnist_pool(tmp_path / "single", ROWS, rows_per_shard=ROWS)
    sharded = write_mnist_pool(tmp_path / "sharded", ROWS, rows_per_shard=70)
    assert len(single.shards) == 1
    assert len(sharded.shards) == 22

    one = score_all(single, checkpoint, tmp_path / "run-single", batch_size=256)
    many = score_all(sharded, checkpoint, tmp_path / "run-sharded", batch_size=64, num_actors=2)

    assert one.num_rows == many.num_rows == ROWS
    assert one.column("id").to_pylist() == many.column("id").to_pylist()
    for name in SCORE_COLUMNS:
        # Batches of other sizes may pick other CPU kernels: equal up to rounding.
        np.testing.assert_allclose(one.column(name).to_numpy(), many.column(name).to_numpy(), rtol=1e-5, atol=1e-6)
    assert set(many.column("shard").to_pylist()) == {shard.rsplit("/", 1)[-1] for shard in sharded.shards}


def test_loader_not_fused_into_scorer(ray_cluster, checkpoint, tmp_path):
    """Decoding must not be fused into the scoring actor, where it would run in series with the model."""
    pool = write_mnist_pool(tmp_path / "pool", 300, rows_per_shard=50)
    empty = pa.array([], pa.string())
    dataset = _scoring_dataset(pool, list(pool.shards), None, empty, checkpoint, ScoreConfig(subset_size=None), False)
    rows = sum(table.num_rows for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    operators = [line.split(" ", 2)[2] for line in dataset.stats().splitlines() if line.startswith("Operator ")]

    assert rows == 300
    assert len(operators) == 3, operators
    assert operators[1].startswith("MapBatches(_load_shard): 6 tasks executed, 6 blocks produced"), operators
    assert operators[2].startswith("MapBatches(LossScorer): "), operators
