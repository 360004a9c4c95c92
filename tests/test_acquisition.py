"""Known answers of the acquisition functions on hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distal import acquisition


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_entropy_of_uniform_is_log_c(classes):
    probs = np.full((3, classes), 1.0 / classes)
    np.testing.assert_allclose(acquisition.entropy(probs), math.log(classes))


def test_entropy_of_one_hot_is_zero():
    probs = np.eye(4)
    np.testing.assert_allclose(acquisition.entropy(probs), 0.0, atol=1e-12)


def test_least_confidence_and_margin_on_hand_made_logits():
    # Row 0 is sure of class 0; row 1 hesitates between classes 1 and 2;
    # row 2 is uniform over three classes.
    logits = np.array([[10.0, 0.0, 0.0], [0.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    probs = acquisition.softmax(logits)
    confident = 1.0 / (1.0 + 2.0 * math.exp(-10.0))
    np.testing.assert_allclose(acquisition.least_confidence(probs), [1.0 - confident, 1.0 - probs[1, 1], 2.0 / 3.0])
    np.testing.assert_allclose(acquisition.margin(probs), [confident - math.exp(-10.0) * confident, 0.0, 0.0], atol=1e-12)


def test_margin_strategy_ranks_the_smallest_gap_first():
    logits = np.array([[5.0, 0.0], [0.1, 0.0], [1.0, 0.0]])
    scores = acquisition.strategy_scores("margin", acquisition.uncertainty_scores(logits))
    assert list(np.argsort(-scores)) == [1, 2, 0]


@pytest.mark.parametrize("strategy", ["entropy", "least_confidence", "margin"])
def test_uncertainty_strategies_rank_the_uniform_row_first(strategy):
    logits = np.array([[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0]])
    scores = acquisition.strategy_scores(strategy, acquisition.uncertainty_scores(logits))
    assert int(np.argmax(scores)) == 1
    assert int(np.argmin(scores)) == 0


def test_softmax_is_stable_for_large_logits():
    probs = acquisition.softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0]])


def test_k_center_greedy_picks_the_farthest_points():
    centres = np.array([[0.0, 0.0]])
    candidates = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 5.0], [9.0, 1.0], [0.5, 0.5]])
    picks, distances = acquisition.k_center_greedy(centres, candidates, 3)
    # (10, 0) is farthest from the origin. Next comes (0, 5): 5 from the origin
    # and about 11.2 from (10, 0). Last, the nearest centre of (9, 1) is
    # (10, 0) at about 1.41, and (1, 0) is only 1.0 from the origin.
    assert picks.tolist() == [1, 2, 3]
    np.testing.assert_allclose(distances, [10.0, 5.0, math.sqrt(2.0)])
    assert np.all(np.diff(distances) <= 0)


def test_k_center_greedy_without_centres_starts_at_the_first_candidate():
    candidates = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    picks, distances = acquisition.k_center_greedy(np.zeros((0, 2)), candidates, 2)
    assert picks.tolist() == [0, 1]
    assert distances[1] == pytest.approx(5.0)


def test_k_center_greedy_returns_every_candidate_at_most_once():
    candidates = np.zeros((4, 3))  # duplicates: all distances are 0
    picks, _ = acquisition.k_center_greedy(np.ones((1, 3)), candidates, 10)
    assert sorted(picks.tolist()) == [0, 1, 2, 3]


def test_k_center_greedy_chunking_does_not_change_the_result():
    rng = np.random.default_rng(0)
    centres, candidates = rng.normal(size=(50, 8)), rng.normal(size=(300, 8))
    whole = acquisition.k_center_greedy(centres, candidates, 20, chunk_rows=10_000)
    chunked = acquisition.k_center_greedy(centres, candidates, 20, chunk_rows=7)
    assert whole[0].tolist() == chunked[0].tolist()
    np.testing.assert_allclose(whole[1], chunked[1])


@pytest.mark.parametrize(
    ("centres", "candidates", "message"),
    [
        (np.zeros((2, 3)), np.zeros((4, 2)), "one feature size"),
        (np.zeros((2, 2)), np.array([[np.nan, 0.0]]), "finite"),
        (np.zeros((2, 2)), np.zeros(4), "shape"),
    ],
)
def test_k_center_greedy_rejects_bad_features(centres, candidates, message):
    with pytest.raises(ValueError, match=message):
        acquisition.k_center_greedy(centres, candidates, 1)


def test_ranking_accuracy_known_answers():
    true_loss = np.arange(200, dtype=np.float64)
    assert acquisition.ranking_accuracy(true_loss * 3 + 1, true_loss) == 1.0
    assert acquisition.ranking_accuracy(-true_loss, true_loss) == 0.0
    noise = np.random.default_rng(0).normal(size=true_loss.shape)
    assert acquisition.ranking_accuracy(noise, true_loss) == pytest.approx(0.5, abs=0.05)


def test_ranking_accuracy_counts_pairs_and_ties():
    # Pairs with distinct true losses: (0,1), (0,2), (1,2) -> 3 pairs.
    # Predicted orders (0,1) right, (0,2) as a tie (half), (1,2) wrong.
    true_loss = np.array([0.0, 1.0, 2.0])
    predicted = np.array([0.0, 5.0, 0.0])
    assert acquisition.ranking_accuracy(predicted, true_loss, chunk_rows=1) == pytest.approx(1.5 / 3)
    assert math.isnan(acquisition.ranking_accuracy(np.array([1.0, 2.0]), np.array([3.0, 3.0])))


def test_ranking_accuracy_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="one length"):
        acquisition.ranking_accuracy(np.zeros(3), np.zeros(4))


def test_random_scores_are_uniform_in_unit_interval():
    hashes = np.random.default_rng(1).integers(0, 2**63, size=20_000, dtype=np.uint64) * np.uint64(2)
    scores = acquisition.random_scores(hashes)
    assert scores.min() >= 0.0
    assert scores.max() < 1.0
    assert abs(scores.mean() - 0.5) < 0.01


def test_only_learning_loss_uses_the_loss_module():
    assert [s for s in acquisition.STRATEGIES if acquisition.uses_loss_module(s)] == ["learning_loss"]
    with pytest.raises(ValueError, match="learning_loss, random"):
        acquisition.uses_loss_module("bald")
