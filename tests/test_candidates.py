"""Candidate choice: exact, seeded subsets that never include labeled ids."""

import pyarrow as pa

from conftest import write_mnist_pool
from distal.score import choose_candidates


def test_subset_is_exact_seeded_and_unlabeled(tmp_path):
    pool = write_mnist_pool(tmp_path / "pool", 300, rows_per_shard=70)
    labeled = pa.array([f"mnist-{i:05d}" for i in range(0, 300, 3)], pa.string())
    first = choose_candidates(pool, labeled, 50, seed=11)
    again = choose_candidates(pool, labeled, 50, seed=11)
    other = choose_candidates(pool, labeled, 50, seed=12)
    chosen = set(first.ids.to_pylist())
    assert len(chosen) == 50
    assert first.ids.to_pylist() == again.ids.to_pylist()
    assert chosen != set(other.ids.to_pylist())
    assert not chosen & set(labeled.to_pylist())
    assert first.pool_rows == 300
    assert first.labeled_in_pool == 100
    assert first.unlabeled == 200


def test_subset_larger_than_pool_takes_all_unlabeled(tmp_path):
    pool = write_mnist_pool(tmp_path / "pool", 120, rows_per_shard=50)
    labeled = pa.array(["mnist-00000", "not-in-pool"], pa.string())
    candidates = choose_candidates(pool, labeled, 1000, seed=0)
    assert candidates.count == 119
    assert candidates.labeled_in_pool == 1


def test_no_subset_scores_every_unlabeled_row(tmp_path):
    pool = write_mnist_pool(tmp_path / "pool", 120, rows_per_shard=50)
    candidates = choose_candidates(pool, pa.array(["mnist-00005"], pa.string()), None, seed=0)
    assert candidates.ids is None
    assert candidates.count == 119
