"""Selection: the global top-K of predicted loss, streamed in memory bounded by K.

The images worth labeling are those with the highest predicted loss (Yoo and
Kweon, CVPR 2019). Ranking is by score descending, ties broken by id
ascending, so a selection never depends on the order in which blocks arrive.
Non-finite scores never rank: they are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
        table: columns rank (1-based), id, predicted_loss; highest first.
        rows_read: score rows read, skipped rows included.
        non_finite: rows whose score was null, NaN or infinite.
    """

    table: pa.Table
    rows_read: int
    non_finite: int


def select_from_score_files(files: Iterable[str], k: int, filesystem=None, batch_rows: int = 65_536) -> Selection:
    """Stream score Parquet files and return their global top-K.

    Each file is read batch by batch (only the id and score columns), so the
    driver holds at most K entries plus one batch however large the pool.

    Args:
        files: Parquet files with ``id`` and ``predicted_loss`` columns.
        k: selection size.
        filesystem: fsspec filesystem for the files; None means local.
        batch_rows: rows per read batch.
    """
    accumulator = StreamingTopK(k)
    for path in files:
        handle = filesystem.open(path, "rb") if filesystem is not None else open(path, "rb")
        with handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[ID_COLUMN, SCORE_COLUMN]):
                scores = batch.column(SCORE_COLUMN).to_numpy(zero_copy_only=False)
                ids = batch.column(ID_COLUMN).to_numpy(zero_copy_only=False)
                accumulator.update(ids, np.asarray(scores, dtype=np.float64))
    ids, scores = accumulator.result()
    table = pa.table(
        {
            "rank": pa.array(np.arange(1, len(ids) + 1), pa.int64()),
            ID_COLUMN: pa.array(ids.tolist(), pa.string()),
            SCORE_COLUMN: pa.array(scores, pa.float64()),
        }
    )
    return Selection(table=table, rows_read=accumulator.rows_seen, non_finite=accumulator.non_finite)
