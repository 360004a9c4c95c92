"""Pairwise ranking loss that trains the loss prediction module.

Yoo and Kweon, "Learning Loss for Active Learning" (CVPR 2019,
arXiv:1905.03677): the module learns the order of the true losses rather
than their values, because the scale of the target loss changes as training
goes on. A batch of B samples forms B/2 pairs, and each pair (i, j)
costs ``max(0, -sign(l_i, l_j) * (p_i - p_j) + margin)``. Here sign is +1 when
``l_i > l_j`` and -1 otherwise, so a tie counts as -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

_REDUCTIONS = ("mean", "sum", "none")


def ranking_loss(
    predicted: Tensor,
    target_loss: Tensor,
    margin: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Compute the margin ranking loss between predicted and true losses.

    Sample ``i`` of the first half of the batch is paired with sample
    ``i + B/2`` of the second half. Batches are shuffled, so these pairs are
    random pairs. The true losses are detached: they are targets, and no
    gradient flows through them.

    Args:
        predicted: predicted losses [B], with B even.
        target_loss: true per-sample losses [B] of the same samples.
        margin: required gap between the predictions of a pair (1.0 in the paper).
        reduction: ``"mean"`` over the B/2 pairs, ``"sum"``, or ``"none"``
            for the per-pair losses [B/2].

    Returns:
        The reduced loss (a scalar), or the per-pair losses [B/2].

    Raises:
        ValueError: for tensors that are not 1-D, different shapes, an odd or
            empty batch, or an unknown reduction.
    """
    _validate(predicted, target_loss, reduction)
    half = predicted.shape[0] // 2
    target_loss = target_loss.detach()

    predicted_diff = predicted[:half] - predicted[half:]  # [B/2]
    sign = torch.where(target_loss[:half] > target_loss[half:], 1.0, -1.0)  # [B/2]
    sign = sign.to(predicted_diff.dtype)
    pair_losses = torch.clamp(margin - sign * predicted_diff, min=0.0)  # [B/2]

    if reduction == "mean":
        return pair_losses.mean()
    if reduction == "sum":
        return pair_losses.sum()
    return pair_losses


def _validate(predicted: Tensor, target_loss: Tensor, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Expected reduction to be one of {_REDUCTIONS}, but got {reduction!r}.")
    if predicted.dim() != 1 or target_loss.dim() != 1:
        raise ValueError(
            "Expected 1-D predicted and target losses [B], but got shapes "
            f"{tuple(predicted.shape)} and {tuple(target_loss.shape)}; use a per-sample loss "
            "without reduction and squeeze the predictions."
        )
    if predicted.shape != target_loss.shape:
        raise ValueError(
            f"Expected predicted and target losses of the same shape, but got "
            f"{tuple(predicted.shape)} and {tuple(target_loss.shape)}."
        )
    batch_size = predicted.shape[0]
    if batch_size == 0 or batch_size % 2 != 0:
        raise ValueError(
            f"Expected an even, non-empty batch for the ranking-loss pairs, but got B={batch_size}; "
            "make every worker's local batch even, for example by dropping the last "
            "incomplete batch or trimming it to an even size."
        )
