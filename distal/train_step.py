"""One training step of the target model and its loss prediction module, in plain torch.

Nothing here depends on Ray, so the Ray Train loop, the scorer and the tests
share these functions. The recipe follows the CIFAR-10 protocol of Yoo and
Kweon, "Learning Loss for Active Learning" (CVPR 2019, arXiv:1905.03677):
``total = mean(per-sample loss) + lambda * ranking loss``, with the features
fed to the loss prediction module detached from ``gradient_stop_epoch`` on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from distal.config import TrainConfig
from distal.losses import ranking_loss
from distal.model import Task

# Per-channel statistics used by ``normalize``. With 0.5/0.5 every channel maps
# from [0, 1] to [-1, 1]. The same constants serve any pool (1 or 3 channels),
# so training, scoring and evaluation need no per-dataset statistics.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


@dataclass(frozen=True)
class StepLosses:
    """Losses of one training batch.

    Attributes:
        total: ``target_loss + loss_weight * ranking_loss``, the scalar to
            backpropagate; ``target_loss`` alone without a loss module.
        target_loss: mean of the per-sample target losses (scalar).
        ranking_loss: ranking loss of the predicted losses (scalar,
            unweighted); None without a loss prediction module.
        per_sample_loss: detached per-sample target losses [B].
        predicted_loss: detached predicted losses [B]; None without a loss
            prediction module.
        outputs: detached outputs of the target network, for ``Task.metric``.
    """

    total: Tensor
    target_loss: Tensor
    ranking_loss: Tensor | None
    per_sample_loss: Tensor
    predicted_loss: Tensor | None
    outputs: Any


def compute_losses(
    learner: nn.Module,
    images: Tensor,
    targets: Tensor,
    task: Task,
    *,
    epoch: int,
    config: TrainConfig,
) -> StepLosses:
    """Run the learner on a batch and compute the joint training loss.

    Args:
        learner: a ``LossLearner``, optionally wrapped in DDP.
        images: normalized images [B, C, H, W], B even.
        targets: the task's targets for the batch.
        task: supplies the per-sample target loss.
        epoch: 0-based epoch of this step. From ``config.gradient_stop_epoch``
            on, the loss prediction module gets detached features, so its
            ranking loss no longer changes the target network.
        config: supplies ``gradient_stop_epoch``, ``loss_weight`` and ``margin``.

    Returns:
        The losses of the batch; call ``backward()`` on ``total``.

    Raises:
        ValueError: when the batch size is odd (see ``ranking_loss``).
    """
    detach_features = epoch >= config.gradient_stop_epoch
    outputs, predicted = learner(images, detach_features=detach_features)  # predicted: [B] or None
    per_sample = task.per_sample_loss(outputs, targets)  # [B]
    target_loss = per_sample.mean()
    if predicted is None:
        # A baseline without the loss prediction module: its objective is the
        # target loss alone, with no ranking term at any weight.
        return StepLosses(
            total=target_loss,
            target_loss=target_loss,
            ranking_loss=None,
            per_sample_loss=per_sample.detach(),
            predicted_loss=None,
            outputs=_detach(outputs),
        )
    rank_loss = ranking_loss(predicted, per_sample.detach(), margin=config.margin)
    total = target_loss + config.loss_weight * rank_loss
    return StepLosses(
        total=total,
        target_loss=target_loss,
        ranking_loss=rank_loss,
        per_sample_loss=per_sample.detach(),
        predicted_loss=predicted.detach(),
        outputs=_detach(outputs),
    )


def build_optimizer(
    learner: nn.Module, config: TrainConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """Build SGD over every parameter of the learner and its learning-rate schedule.

    The target network and the loss prediction module share one optimizer,
    so the module keeps training after the gradient stop. Call
    ``scheduler.step()`` once per epoch: the learning rate is multiplied by
    ``config.gamma`` at each epoch in ``config.milestones``.
    """
    optimizer = torch.optim.SGD(
        learner.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.milestones), gamma=config.gamma
    )
    return optimizer, scheduler


def augment_batch(
    images: Tensor, generator: torch.Generator | None = None, padding: int = 4
) -> Tensor:
    """Randomly crop and horizontally flip every image of a batch.

    Each image is zero-padded by ``padding`` pixels on every side, then cropped
    back to its size at a random offset, and flipped with probability 0.5, as
    the CIFAR-10 recipe does. Zero means black on uint8 images, so augment
    before ``normalize``. The work is batched tensor indexing, so it runs on
    the images' device (CPU or GPU).

    Args:
        images: images [B, C, H, W] of any dtype; the output keeps the dtype.
        generator: source of the random offsets and flips. It may live on
            another device than the images. None uses the global torch RNG.
        padding: pixels of zero padding on each side; 0 only flips.

    Raises:
        ValueError: for images that are not [B, C, H, W] or a negative padding.
    """
    if images.dim() != 4:
        raise ValueError(f"Expected images of shape [B, C, H, W], but got {tuple(images.shape)}.")
    if padding < 0:
        raise ValueError(f"Expected padding >= 0, but got {padding}.")
    batch_size, _, height, width = images.shape
    draw_device = generator.device if generator is not None else torch.device("cpu")

    offset_y = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator, device=draw_device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator, device=draw_device)
    flip = torch.rand(batch_size, generator=generator, device=draw_device) < 0.5
    offset_y, offset_x, flip = offset_y.to(images.device), offset_x.to(images.device), flip.to(images.device)

    padded = nn.functional.pad(images, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
    rows = offset_y[:, None] + torch.arange(height, device=images.device)  # [B, H]
    columns = offset_x[:, None] + torch.arange(width, device=images.device)  # [B, W]
    columns = torch.where(flip[:, None], columns.flip(1), columns)  # [B, W]

    batch_index = torch.arange(batch_size, device=images.device)[:, None, None]  # [B, 1, 1]
    channels_last = padded.permute(0, 2, 3, 1)  # [B, H+2p, W+2p, C]
    cropped = channels_last[batch_index, rows[:, :, None], columns[:, None, :]]  # [B, H, W, C]
    return cropped.permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]


def normalize(
    images: Tensor,
    mean: float | Sequence[float] = DEFAULT_MEAN,
    std: float | Sequence[float] = DEFAULT_STD,
) -> Tensor:
    """Convert uint8 images to float32 in [0, 1], then standardize each channel.

    Training, scoring and evaluation all use this, with the same constants.
    The defaults (0.5, 0.5) map every channel to [-1, 1].

    Args:
        images: uint8 images [B, C, H, W].
        mean: one value for all channels, or one per channel.
        std: one value for all channels, or one per channel; all > 0.

    Returns:
        float32 images [B, C, H, W] on the same device.

    Raises:
        TypeError: for images that are not uint8.
        ValueError: for images that are not 4-D, a per-channel mean or std of
            the wrong length, or a std that is not positive.
    """
    if images.dtype != torch.uint8:
        raise TypeError(
            f"Expected uint8 images, but got {images.dtype}; pass the raw pixels, "
            "because normalize divides by 255 itself."
        )
    if images.dim() != 4:
        raise ValueError(f"Expected images of shape [B, C, H, W], but got {tuple(images.shape)}.")
    channels = images.shape[1]
    mean_tensor = _per_channel("mean", mean, channels, images.device)  # [1, C, 1, 1]
    std_tensor = _per_channel("std", std, channels, images.device)  # [1, C, 1, 1]
    if bool((std_tensor <= 0).any()):
        raise ValueError(f"Expected std > 0 for every channel, but got {std!r}.")
    scaled = images.to(torch.float32) / 255.0  # [B, C, H, W] in [0, 1]
    return (scaled - mean_tensor) / std_tensor


def _per_channel(name: str, value: float | Sequence[float], channels: int, device: torch.device) -> Tensor:
    values = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
    if values.numel() == 1:
        values = values.expand(channels)
    elif values.numel() != channels:
        raise ValueError(
            f"Expected {name} to be one value or {channels} values (one per channel), "
            f"but got {values.numel()} values: {value!r}."
        )
    return values.view(1, channels, 1, 1)


def _detach(outputs: Any) -> Any:
    if isinstance(outputs, Tensor):
        return outputs.detach()
    if isinstance(outputs, tuple) and hasattr(outputs, "_fields"):  # a namedtuple
        return type(outputs)(*(_detach(item) for item in outputs))
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_detach(item) for item in outputs)
    if isinstance(outputs, dict):
        return {key: _detach(item) for key, item in outputs.items()}
    return outputs
