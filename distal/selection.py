"""Selection: the global top-K of predicted loss, streamed in memory bounded by K.

The images worth labeling are those with the highest predicted loss (Yoo and
Kweon, CVPR 2019). Ranking is by score descending, ties broken by id
ascending, so a selection never depends on the order in which blocks arrive.
Non-finite scores never rank: they are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

ID_COLUMN = "id"
SCORE_COLUMN = "predicted_loss"


def top_k(ids: Sequence[str] | np.ndarray, scores: Sequence[float] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the k highest finite scores and their ids, highest first, ties by id.

    Args:
        ids: sample ids, one per score.
        scores: scores to rank; NaN and infinite values are ignored.
        k: how many to keep; fewer come back when fewer are finite.

    Returns:
        (ids, scores) as numpy arrays of length min(k, finite count).

    Raises:
        ValueError: when ids and scores differ in length or k < 0.
    """
    ids = np.asarray(ids, dtype=str)
    scores = np.asarray(scores, dtype=np.float64)
    if ids.shape != scores.shape or ids.ndim != 1:
        raise ValueError(f"Expected ids and scores as 1-D arrays of one length, got shapes {ids.shape} and {scores.shape}.")
    if k < 0:
        raise ValueError(f"Expected k >= 0, got {k}.")
    finite = np.isfinite(scores)
    ids, scores = ids[finite], scores[finite]
    if len(scores) > k > 0:
        # Keep everything at or above the k-th largest score: ties at the
        # threshold stay, so the id tie-break below sees all of them.
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = scores >= threshold
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


class StreamingTopK:
    """Running top-K over batches that arrive in any order.

    Memory holds at most K entries plus one batch. The result equals a full
    sort of all scores by (score descending, id ascending) cut at K.
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"Expected k >= 1, got {k}.")
        self.k = k
        self._ids = np.array([], dtype=str)
        self._scores = np.array([], dtype=np.float64)
        self.rows_seen = 0
        self.non_finite = 0

    def update(self, ids: Sequence[str] | np.ndarray, scores: Sequence[float] | np.ndarray) -> None:
        """Merge one batch of (id, score) pairs into the running top-K."""
        scores = np.asarray(scores, dtype=np.float64)
        self.rows_seen += len(scores)
        self.non_finite += int(np.count_nonzero(~np.isfinite(scores)))
        batch_ids, batch_scores = top_k(ids, scores, self.k)
        merged_ids = np.concatenate([self._ids, batch_ids])
        merged_scores = np.concatenate([self._scores, batch_scores])
        self._ids, self._scores = top_k(merged_ids, merged_scores, self.k)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (ids, scores) ranked highest first."""
        return self._ids.copy(), self._scores.copy()


@dataclass(frozen=True)
class Selection:
    """The selected images and how they were found.

    Attributes:
        table: columns rank (1-based), id, score (the strategy's value,
            highest first) and predicted_loss (null for strategies trained
            without the loss module).
        rows_read: score rows read, skipped rows included.
        non_finite: rows whose score was null, NaN or infinite.
        details: what the manifest records about the selection (strategy,
            candidates, core-set centres).
    """

    table: pa.Table
    rows_read: int
    non_finite: int
    details: dict = field(default_factory=dict)


def select_from_score_files(
    files: Iterable[str],
    k: int,
    filesystem=None,
    batch_rows: int = 65_536,
    strategy: str = "learning_loss",
    seed: int = 0,
) -> Selection:
    """Stream score Parquet files and return the global top-K of a per-image strategy.

    Each file is read batch by batch (only the columns needed), so the driver
    keeps at most K entries plus one batch however large the pool.

    Args:
        files: score files with an ``id`` column and the strategy's column.
        k: selection size.
        filesystem: fsspec filesystem for the files; None means local.
        batch_rows: rows per read batch.
        strategy: ``learning_loss``, ``entropy``, ``least_confidence``,
            ``margin`` or ``random`` (a seeded uniform draw per scored id).
        seed: seed of the random strategy's draw.
    """
    from distal.acquisition import SCORE_COLUMNS, hash_ids, random_scores, strategy_scores

    if strategy != "random" and strategy not in SCORE_COLUMNS:
        raise ValueError(f"Expected a top-K strategy ({', '.join([*SCORE_COLUMNS, 'random'])}), but got {strategy!r}.")
    column = "skip_reason" if strategy == "random" else SCORE_COLUMNS[strategy]
    accumulator = StreamingTopK(k)
    for batch in _iter_score_batches(files, [ID_COLUMN, column], filesystem, batch_rows):
        ids = batch.column(ID_COLUMN).to_numpy(zero_copy_only=False)
        if strategy == "random":
            # Rows that could not be decoded are never drawn.
            scores = np.where(batch.column(column).is_null().to_numpy(zero_copy_only=False), random_scores(hash_ids(ids, seed)), np.nan)
        else:
            values = np.asarray(batch.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
            scores = strategy_scores(strategy, {column: values})
        accumulator.update(ids, scores)
    ids, scores = accumulator.result()
    details = {"strategy": strategy, "rows_read": accumulator.rows_seen, "non_finite": accumulator.non_finite}
    return Selection(_selection_table(ids, scores, strategy), accumulator.rows_seen, accumulator.non_finite, details)


def select_coreset(files: Iterable[str], centres: np.ndarray, k: int, filesystem=None, batch_rows: int = 65_536) -> Selection:
    """Select ``k`` scored candidates by k-center greedy on their penultimate-layer features.

    Core-set selection (Sener and Savarese, ICLR 2018) needs every
    candidate's features at once, so it runs on the scored subset only. Its
    memory grows as candidates x feature size.

    Args:
        files: score files with ``id``, ``skip_reason`` and ``features`` columns.
        centres: features [M, D] of the labeled set, the initial centres.
        k: selection size.
        filesystem: fsspec filesystem for the files; None means local.
        batch_rows: rows per read batch.
    """
    from distal.acquisition import k_center_greedy

    id_parts, feature_parts, rows_read = [], [], 0
    for batch in _iter_score_batches(files, [ID_COLUMN, "skip_reason", "features"], filesystem, batch_rows):
        rows_read += batch.num_rows
        decoded = batch.filter(batch.column("skip_reason").is_null())
        id_parts.append(decoded.column(ID_COLUMN).to_numpy(zero_copy_only=False))
        flat = decoded.column("features").flatten().to_numpy(zero_copy_only=False)
        feature_parts.append(flat.reshape(decoded.num_rows, -1) if decoded.num_rows else flat.reshape(0, max(centres.shape[1], 1)))
    ids = np.concatenate(id_parts) if id_parts else np.array([], dtype=str)
    features = np.concatenate(feature_parts) if feature_parts else np.zeros((0, centres.shape[1]))
    picks, distances = k_center_greedy(centres, features, k)
    details = {"strategy": "coreset", "rows_read": rows_read, "candidates": len(ids), "centres": int(centres.shape[0]), "feature_dim": int(features.shape[1]) if features.ndim == 2 else 0}
    log.info("stage=select strategy=coreset candidates=%d centres=%d feature_dim=%d k=%d", len(ids), centres.shape[0], details["feature_dim"], k)
    return Selection(_selection_table(ids[picks], distances, "coreset"), rows_read, rows_read - len(ids), details)


def _iter_score_batches(files: Iterable[str], columns: list[str], filesystem, batch_rows: int):
    for path in files:
        handle = filesystem.open(path, "rb") if filesystem is not None else open(path, "rb")
        with handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)


def _selection_table(ids: np.ndarray, scores: np.ndarray, strategy: str) -> pa.Table:
    predicted = pa.array(scores, pa.float64()) if strategy == "learning_loss" else pa.nulls(len(ids), pa.float64())
    return pa.table(
        {
            "rank": pa.array(np.arange(1, len(ids) + 1), pa.int64()),
            ID_COLUMN: pa.array(np.asarray(ids).tolist(), pa.string()),
            "score": pa.array(scores, pa.float64()),
            SCORE_COLUMN: predicted,
        }
    )
