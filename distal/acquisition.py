"""Acquisition strategies as pure functions on arrays: no Ray, no I/O.

Every strategy turns what one forward pass gives for each candidate (logits,
penultimate-layer features, predicted loss) into a score where higher means
"label this first". The scorer actors and the driver call these functions,
and the tests call them on hand-made arrays.

Strategies:

- ``learning_loss``: the predicted loss (Yoo and Kweon, CVPR 2019).
- ``random``: a seeded uniform draw per id (the baseline every paper plots).
- ``entropy``: Shannon entropy of the softmax, ``-sum p log p``.
- ``least_confidence``: ``1 - max p``.
- ``margin``: the gap between the two largest probabilities; the smallest gap
  ranks first, so its score is the negated gap.
- ``coreset``: k-center greedy on penultimate-layer features (Sener and
  Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
  Approach", ICLR 2018). It is a set selection, not a per-image score.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

STRATEGIES = ("learning_loss", "random", "entropy", "least_confidence", "margin", "coreset")
UNCERTAINTY_STRATEGIES = ("entropy", "least_confidence", "margin")

# Columns of a score file that hold each strategy's per-image value.
SCORE_COLUMNS = {
    "learning_loss": "predicted_loss",
    "entropy": "entropy",
    "least_confidence": "least_confidence",
    "margin": "margin",
}


def uses_loss_module(strategy: str) -> bool:
    """Return whether a strategy needs the loss prediction module (and its ranking loss) in training."""
    check_strategy(strategy)
    return strategy == "learning_loss"


def check_strategy(strategy: str) -> None:
    """Raise ValueError naming the valid strategies when ``strategy`` is unknown."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Expected a strategy in {', '.join(STRATEGIES)}, but got {strategy!r}.")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Return row-wise softmax probabilities [N, C] of logits [N, C], stable for large logits."""
    logits = _as_2d("logits", logits)
    shifted = logits - logits.max(axis=1, keepdims=True)  # [N, C], max 0 per row
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Return the Shannon entropy (natural log) of each row of probabilities [N, C]; log C for a uniform row."""
    probs = _as_2d("probs", probs)
    safe = np.where(probs > 0, probs, 1.0)  # 0 * log 0 counts as 0
    return -(probs * np.log(safe)).sum(axis=1)  # [N]


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """Return ``1 - max p`` per row [N]: 0 for a one-hot row, ``1 - 1/C`` for a uniform one."""
    probs = _as_2d("probs", probs)
    return 1.0 - probs.max(axis=1)


def margin(probs: np.ndarray) -> np.ndarray:
    """Return the gap between the largest and second-largest probability per row [N].

    A small gap means the model hesitates between two classes; the margin
    strategy ranks by ``-margin`` so the smallest gap is selected first.
    """
    probs = _as_2d("probs", probs)
    if probs.shape[1] < 2:
        raise ValueError(f"Expected at least 2 classes for the margin, but got probabilities of shape {probs.shape}.")
    top_two = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]  # [N, 2], second largest then largest
    return top_two[:, 1] - top_two[:, 0]


def uncertainty_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Return entropy, least confidence and margin [N] of logits [N, C] from one softmax."""
    probs = softmax(logits)
    return {"entropy": entropy(probs), "least_confidence": least_confidence(probs), "margin": margin(probs)}


def strategy_scores(strategy: str, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Return the per-image score of a top-K strategy from score-file columns; higher ranks first.

    Args:
        strategy: ``learning_loss``, ``entropy``, ``least_confidence`` or ``margin``.
        columns: arrays by column name, as written by the scorer.

    Raises:
        ValueError: for ``random``, ``coreset`` or an unknown strategy, which
            have no per-image column.
    """
    if strategy not in SCORE_COLUMNS:
        raise ValueError(f"Strategy {strategy!r} has no per-image score column; expected one of {', '.join(SCORE_COLUMNS)}.")
    values = np.asarray(columns[SCORE_COLUMNS[strategy]], dtype=np.float64)
    return -values if strategy == "margin" else values


def hash_ids(ids: pa.Array | list[str], seed: int) -> np.ndarray:
    """Return a seeded uint64 hash per id; the same id and seed always give the same value."""
    key = f"distal{seed:010d}"[-16:]
    values = np.asarray(ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids, dtype=object)
    return pd.util.hash_array(values, hash_key=key, categorize=False)


def random_scores(hashes: np.ndarray) -> np.ndarray:
    """Map seeded uint64 hashes of ids (``hash_ids``) to uniform scores in [0, 1)."""
    return (np.asarray(hashes, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def k_center_greedy(
    centres: np.ndarray, candidates: np.ndarray, k: int, chunk_rows: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``k`` candidates by k-center greedy (Sener and Savarese, ICLR 2018).

    Each step picks the candidate farthest (Euclidean) from its nearest centre
    and makes it a centre. Ties go to the lowest candidate index.

    Args:
        centres: features [M, D] of the labeled set; M may be 0, in which case
            the first pick is candidate 0 (lowest index).
        candidates: features [N, D] of the scored candidates.
        k: picks to make; fewer come back when N < k.
        chunk_rows: candidate rows per distance block, to bound memory.

    Returns:
        (indices into ``candidates`` in pick order, the distance of each pick
        to its nearest centre when it was picked; non-increasing).

    Raises:
        ValueError: for arrays that are not 2-D, feature sizes that differ,
            non-finite features, or k < 0.
    """
    candidates = _as_2d("candidates", candidates)
    centres = np.asarray(centres, dtype=np.float64)
    centres = _as_2d("centres", centres.reshape(0, candidates.shape[1]) if centres.size == 0 else centres)
    if centres.shape[1] != candidates.shape[1]:
        raise ValueError(f"Expected centres and candidates with one feature size, but got {centres.shape} and {candidates.shape}.")
    if k < 0:
        raise ValueError(f"Expected k >= 0, but got {k}.")
    if not (np.isfinite(centres).all() and np.isfinite(candidates).all()):
        raise ValueError("Expected finite features, but some are NaN or infinite; the model produced non-finite outputs.")
    count = candidates.shape[0]
    nearest = _nearest_distances(centres, candidates, chunk_rows)  # [N], inf when there are no centres
    picks, distances = [], []
    for _ in range(min(k, count)):
        index = int(np.argmax(nearest))  # first maximum: the lowest index among ties
        picks.append(index)
        distances.append(nearest[index] if np.isfinite(nearest[index]) else np.inf)
        step = np.sqrt(((candidates - candidates[index]) ** 2).sum(axis=1))  # [N]
        np.minimum(nearest, step, out=nearest)
        nearest[index] = -1.0  # never picked twice, even with duplicate features
    return np.asarray(picks, dtype=np.int64), np.asarray(distances, dtype=np.float64)


def _nearest_distances(centres: np.ndarray, candidates: np.ndarray, chunk_rows: int) -> np.ndarray:
    """Return each candidate's Euclidean distance to its nearest centre [N]; inf without centres."""
    nearest = np.full(candidates.shape[0], np.inf)
    if centres.shape[0] == 0:
        return nearest
    centre_norms = (centres**2).sum(axis=1)  # [M]
    for start in range(0, candidates.shape[0], chunk_rows):
        block = candidates[start : start + chunk_rows]  # [n, D]
        squared = (block**2).sum(axis=1)[:, None] - 2.0 * block @ centres.T + centre_norms[None, :]  # [n, M]
        nearest[start : start + len(block)] = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
    return nearest


def ranking_accuracy(predicted: np.ndarray, true_loss: np.ndarray, chunk_rows: int = 512) -> float:
    """Return the fraction of sample pairs whose predicted-loss order matches their true-loss order.

    This is the loss-prediction accuracy of Yoo and Kweon (CVPR 2019): over
    all pairs (i, j) with ``true_loss[i] != true_loss[j]``, the share where
    ``predicted`` orders i and j the same way. A tie in ``predicted`` counts
    as half right. 1.0 is a perfect predictor, 0.0 a reversed one, and
    noise gives about 0.5.

    Args:
        predicted: predicted losses [N].
        true_loss: true per-sample losses [N] of the same samples.
        chunk_rows: rows per pair block, to bound memory at O(chunk_rows * N).

    Returns:
        The accuracy, or NaN when no pair has distinct true losses.

    Raises:
        ValueError: for arrays of other shapes or non-finite values.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    true_loss = np.asarray(true_loss, dtype=np.float64)
    if predicted.ndim != 1 or predicted.shape != true_loss.shape:
        raise ValueError(f"Expected two 1-D arrays of one length, but got shapes {predicted.shape} and {true_loss.shape}.")
    if not (np.isfinite(predicted).all() and np.isfinite(true_loss).all()):
        raise ValueError("Expected finite predicted and true losses, but some are NaN or infinite.")
    right = 0.0
    pairs = 0
    for start in range(0, len(predicted), chunk_rows):
        true_sign = np.sign(true_loss[start : start + chunk_rows, None] - true_loss[None, :])  # [n, N]
        predicted_sign = np.sign(predicted[start : start + chunk_rows, None] - predicted[None, :])  # [n, N]
        counted = true_sign != 0
        pairs += int(counted.sum())
        right += float((predicted_sign == true_sign)[counted].sum()) + 0.5 * float((predicted_sign == 0)[counted].sum())
    # Each unordered pair appears twice, as (i, j) and (j, i); the ratio is unchanged.
    return right / pairs if pairs else float("nan")


def _as_2d(name: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"Expected {name} of shape [N, C] with C >= 1, but got shape {array.shape}.")
    return array
