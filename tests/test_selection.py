"""Streaming top-K: equal to a full sort, independent of batch order, NaN-safe."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distal.selection import StreamingTopK, select_coreset, select_from_score_files, top_k


def full_sort_top_k(ids, scores, k):
    rows = sorted(
        ((-s, i) for i, s in zip(ids, scores) if np.isfinite(s)),
    )[:k]
    return [i for _, i in rows], [-s for s, _ in rows]


def random_scores_with_ties(rng, n):
    # Scores drawn from few distinct values force many ties at every threshold.
    scores = rng.integers(0, 20, size=n).astype(np.float64) / 4
    ids = [f"img-{j:06d}" for j in rng.permutation(n)]
    return ids, scores


@pytest.mark.parametrize("k", [1, 7, 100, 999, 5000])
def test_streaming_equals_full_sort_with_ties(k):
    rng = np.random.default_rng(k)
    ids, scores = random_scores_with_ties(rng, 3000)
    accumulator = StreamingTopK(k)
    for start in range(0, len(ids), 128):
        accumulator.update(ids[start : start + 128], scores[start : start + 128])
    got_ids, got_scores = accumulator.result()
    want_ids, want_scores = full_sort_top_k(ids, scores, k)
    assert got_ids.tolist() == want_ids
    assert got_scores.tolist() == want_scores


def test_batch_order_does_not_change_selection():
    rng = np.random.default_rng(0)
    ids, scores = random_scores_with_ties(rng, 2000)
    batches = [(ids[s : s + 97], scores[s : s + 97]) for s in range(0, 2000, 97)]
    results = []
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(batches))
        accumulator = StreamingTopK(50)
        for index in order:
            accumulator.update(*batches[index])
        results.append(accumulator.result()[0].tolist())
    assert results[0] == results[1] == results[2]


def test_highest_scores_come_first():
    ids, scores = top_k(["a", "b", "c", "d"], [0.1, 3.0, 2.0, -1.0], 2)
    assert ids.tolist() == ["b", "c"]
    assert scores.tolist() == [3.0, 2.0]


def test_ties_break_by_id_ascending():
    ids, _ = top_k(["z", "m", "a", "q"], [1.0, 1.0, 1.0, 0.5], 2)
    assert ids.tolist() == ["a", "m"]


def test_non_finite_scores_never_rank():
    accumulator = StreamingTopK(3)
    accumulator.update(["nan", "inf", "ok", "neg"], [np.nan, np.inf, 0.5, -np.inf])
    ids, _ = accumulator.result()
    assert ids.tolist() == ["ok"]
    assert accumulator.non_finite == 3
    assert accumulator.rows_seen == 4


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one length"):
        top_k(["a", "b"], [1.0], 1)


def test_select_from_score_files_streams_all_files(tmp_path):
    rng = np.random.default_rng(3)
    ids, scores = random_scores_with_ties(rng, 2500)
    files = []
    for part, start in enumerate(range(0, 2500, 600)):
        chunk_scores = pa.array(scores[start : start + 600], pa.float64())
        if part == 1:
            # A skipped image has a null score and must not be selected.
            chunk_scores = pa.array([None] + scores[start + 1 : start + 600].tolist(), pa.float64())
        path = tmp_path / f"part-{part:05d}.parquet"
        pq.write_table(pa.table({"id": ids[start : start + 600], "predicted_loss": chunk_scores}), path, row_group_size=100)
        files.append(str(path))
    selection = select_from_score_files(files, k=300, batch_rows=64)
    masked = scores.copy()
    masked[600] = np.nan
    want_ids, _ = full_sort_top_k(ids, masked, 300)
    assert selection.table.column("id").to_pylist() == want_ids
    assert selection.table.column("rank").to_pylist() == list(range(1, 301))
    assert selection.rows_read == 2500
    assert selection.non_finite == 1


def write_score_file(path, ids, **columns):
    table = {"id": pa.array(ids, pa.string())}
    types = {"features": pa.list_(pa.float32()), "skip_reason": pa.string()}
    for name, values in columns.items():
        table[name] = pa.array(values, types.get(name, pa.float64()))
    pq.write_table(pa.table(table), path)
    return str(path)


@pytest.mark.parametrize(
    ("strategy", "column", "values", "want"),
    [
        ("entropy", "entropy", [0.1, 2.0, 1.0, None], ["b", "c"]),
        ("least_confidence", "least_confidence", [0.5, 0.2, 0.9, 0.1], ["c", "a"]),
        # margin: the smallest gap ranks first
        ("margin", "margin", [0.5, 0.05, 0.9, 0.01], ["d", "b"]),
        ("learning_loss", "predicted_loss", [3.0, 1.0, 2.0, float("nan")], ["a", "c"]),
    ],
)
def test_select_by_strategy_column(tmp_path, strategy, column, values, want):
    path = write_score_file(tmp_path / "scores.parquet", ["a", "b", "c", "d"], **{column: values})
    selection = select_from_score_files([path], k=2, strategy=strategy)
    assert selection.table.column("id").to_pylist() == want
    scores = selection.table.column("score").to_pylist()
    assert scores == sorted(scores, reverse=True)
    assert selection.details["strategy"] == strategy
    predicted = selection.table.column("predicted_loss")
    assert (predicted.null_count == 0) if strategy == "learning_loss" else (predicted.null_count == 2)


def test_random_selection_is_seeded_and_skips_undecodable_rows(tmp_path):
    ids = [f"id-{i:03d}" for i in range(100)]
    reasons = [None] * 100
    reasons[7] = "not an image"
    path = write_score_file(tmp_path / "scores.parquet", ids, skip_reason=reasons)
    first = select_from_score_files([path], k=99, strategy="random", seed=5).table.column("id").to_pylist()
    again = select_from_score_files([path], k=99, strategy="random", seed=5).table.column("id").to_pylist()
    other = select_from_score_files([path], k=10, strategy="random", seed=6).table.column("id").to_pylist()
    assert first == again
    assert sorted(first) == sorted(set(ids) - {"id-007"})
    assert other != first[:10]


def test_coreset_selection_picks_far_candidates_from_the_labeled_set(tmp_path):
    features = [[0.0, 0.1], [10.0, 0.0], [0.0, 5.0], [9.0, 1.0], None]
    path = write_score_file(
        tmp_path / "scores.parquet", ["a", "b", "c", "d", "e"], skip_reason=[None, None, None, None, "broken"], features=features
    )
    selection = select_coreset([path], np.zeros((1, 2)), k=2)
    assert selection.table.column("id").to_pylist() == ["b", "c"]
    assert selection.details == {"strategy": "coreset", "rows_read": 5, "candidates": 4, "centres": 1, "feature_dim": 2}
    assert selection.non_finite == 1


def test_unknown_strategy_is_rejected(tmp_path):
    path = write_score_file(tmp_path / "scores.parquet", ["a"], predicted_loss=[1.0])
    with pytest.raises(ValueError, match="top-K strategy"):
        select_from_score_files([path], k=1, strategy="coreset")
