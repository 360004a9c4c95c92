"""Known-answer tests of the pairwise ranking loss."""

from __future__ import annotations

import pytest
import torch

from distal.losses import ranking_loss

pytestmark = pytest.mark.timeout(30)


def test_ranking_loss_pairs_batch_halves() -> None:
    predicted = torch.tensor([0.5, 1.0, 2.0, 0.25])
    target_loss = torch.tensor([3.0, 1.0, 1.0, 5.0])

    pair_losses = ranking_loss(predicted, target_loss, reduction="none")

    # Pair (0, 2): l0 > l2, so sign +1: max(0, -(0.5 - 2.0) + 1) = 2.5.
    # Pair (1, 3): l1 < l3, so sign -1: max(0, (1.0 - 0.25) + 1) = 1.75.
    # Pairing 0 with 3 and 1 with 2 instead would give 1.25 and 0.0.
    assert pair_losses.shape == (2,)
    assert pair_losses[0].item() == pytest.approx(2.5)
    assert pair_losses[1].item() == pytest.approx(1.75)
    assert ranking_loss(predicted, target_loss).item() == pytest.approx(2.125)
    assert ranking_loss(predicted, target_loss, reduction="sum").item() == pytest.approx(4.25)


@pytest.mark.parametrize(
    ("predicted", "target_loss", "margin", "expected"),
    [
        # Tie: sign is -1, so the first prediction should be the lower one.
        ([0.75, 0.25], [2.0, 2.0], 1.0, 1.5),
        ([0.25, 0.75], [2.0, 2.0], 1.0, 0.5),
        # l_i > l_j (sign +1) with the order already right by more than the margin.
        ([3.0, 0.0], [5.0, 1.0], 1.0, 0.0),
        # Same pair, order right but inside the margin.
        ([3.0, 2.5], [5.0, 1.0], 1.0, 0.5),
        # l_i < l_j (sign -1) with the order wrong.
        ([3.0, 2.5], [1.0, 5.0], 1.0, 1.5),
        # Another margin.
        ([0.75, 0.25], [2.0, 2.0], 0.5, 1.0),
        ([3.0, 2.5], [5.0, 1.0], 0.25, 0.0),
        ([3.0, 2.5], [1.0, 5.0], 0.0, 0.5),
    ],
)
def test_ranking_loss_single_pair(
    predicted: list[float], target_loss: list[float], margin: float, expected: float
) -> None:
    loss = ranking_loss(torch.tensor(predicted), torch.tensor(target_loss), margin=margin)

    assert loss.item() == pytest.approx(expected)


def test_ranking_loss_gradient_reaches_predictions_only() -> None:
    predicted = torch.tensor([0.5, 1.0, 2.0, 0.25], requires_grad=True)
    target_loss = torch.tensor([3.0, 1.0, 1.0, 5.0], requires_grad=True)

    ranking_loss(predicted, target_loss).backward()

    # Both hinges are active, so with the mean over 2 pairs d/dp_i = -sign / 2 and d/dp_j = +sign / 2.
    expected = torch.tensor([-0.5, 0.5, 0.5, -0.5])
    assert torch.allclose(predicted.grad, expected)
    assert target_loss.grad is None


def test_ranking_loss_inactive_hinge_has_zero_gradient() -> None:
    predicted = torch.tensor([3.0, 0.0], requires_grad=True)

    ranking_loss(predicted, torch.tensor([5.0, 1.0])).backward()

    assert torch.equal(predicted.grad, torch.zeros(2))


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_ranking_loss_rejects_odd_batch(batch_size: int) -> None:
    values = torch.zeros(batch_size)

    with pytest.raises(ValueError, match=f"even.*B={batch_size}"):
        ranking_loss(values, values)


def test_ranking_loss_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="B=0"):
        ranking_loss(torch.zeros(0), torch.zeros(0))


def test_ranking_loss_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ranking_loss(torch.zeros(4), torch.zeros(2))


def test_ranking_loss_rejects_unreduced_predictions() -> None:
    with pytest.raises(ValueError, match="1-D"):
        ranking_loss(torch.zeros(4, 1), torch.zeros(4))


def test_ranking_loss_rejects_unknown_reduction() -> None:
    with pytest.raises(ValueError, match="'max'"):
        ranking_loss(torch.zeros(2), torch.zeros(2), reduction="max")
