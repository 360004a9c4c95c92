"""Target model, loss prediction module and the task interface that joins them.

The loss prediction module follows Yoo and Kweon, "Learning Loss for Active
Learning" (CVPR 2019, arXiv:1905.03677). It reads the feature maps of several
stages of the target network and pools each one globally. Each pooled vector
goes through a fully connected layer and a ReLU, and a last layer maps their
concatenation to one scalar per image, the predicted loss.

A task supplies the target network and its per-sample loss. Classification is
the only task so far; another task (detection, pose) only needs a network that
returns multi-stage features and a per-sample loss without reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distal.config import ModelConfig


class Task(Protocol):
    """A learning task that the loss prediction module can be attached to.

    ``build_model`` returns a network whose ``forward(x)`` returns
    ``(outputs, features)``, where ``features`` is a list of stage feature maps
    ``[B, C_s, H_s, W_s]``. ``feature_channels`` lists the channels ``C_s`` of
    those maps, in the same order.
    """

    name: str

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the stage feature maps that the network returns."""
        ...

    def build_model(self) -> nn.Module:
        """Build a freshly initialized target network."""
        ...

    def per_sample_loss(self, outputs: Any, targets: Tensor) -> Tensor:
        """Return the loss of every sample, shape [B], without reduction."""
        ...

    def metric(self, outputs: Any, targets: Tensor) -> tuple[float, int]:
        """Return ``(total, count)`` of a metric, so workers reduce it by summing."""
        ...


@dataclass(frozen=True)
class ClassificationTask:
    """Image classification with a CIFAR-style ResNet-18 and cross-entropy loss.

    Attributes:
        num_classes: number of classes; targets are class indices in
            ``[0, num_classes)``.
        in_channels: image channels (1 for MNIST-like pools, 3 for RGB).
        width: channels of the first ResNet stage (64 in the paper).
    """

    num_classes: int
    in_channels: int
    width: int = 64
    name: str = "classification"

    def __post_init__(self) -> None:
        _require_positive("num_classes", self.num_classes)
        _require_positive("in_channels", self.in_channels)
        _require_positive("width", self.width)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the four ResNet stage outputs: width, 2x, 4x and 8x."""
        return (self.width, 2 * self.width, 4 * self.width, 8 * self.width)

    def build_model(self) -> ResNet18:
        return ResNet18(num_classes=self.num_classes, in_channels=self.in_channels, width=self.width)

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Return the cross-entropy of every sample, shape [B]."""
        return F.cross_entropy(outputs, targets, reduction="none")  # [B]

    def metric(self, outputs: Tensor, targets: Tensor) -> tuple[float, int]:
        """Return ``(correct predictions, samples)`` of the batch."""
        correct = (outputs.argmax(dim=1) == targets).sum()
        return float(correct.item()), int(targets.numel())


def build_task(model_config: ModelConfig, num_classes: int, in_channels: int) -> Task:
    """Build the classification task that ``model_config`` describes.

    Raises:
        ValueError: for an architecture other than ``resnet18``, or for
            non-positive ``num_classes``, ``in_channels`` or width.
    """
    if model_config.arch != "resnet18":
        raise ValueError(f"Expected model.arch 'resnet18', but got {model_config.arch!r}.")
    return ClassificationTask(num_classes=num_classes, in_channels=in_channels, width=model_config.width)


def build_learner(task: Task, model_config: ModelConfig, loss_module: bool = True) -> LossLearner:
    """Build the task's target network, with a loss prediction module attached unless ``loss_module`` is False."""
    return LossLearner(task.build_model(), task.feature_channels, dim=model_config.loss_module_dim, loss_module=loss_module)


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions (He et al., CVPR 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

        # A 1x1 projection matches the shortcut to the output when the block
        # changes resolution or channels.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 that also returns the output of each residual stage.

    The stem is a single 3x3 convolution with stride 1 and no max-pool, as
    used for 32x32 CIFAR images. Four stages of two basic blocks have
    ``width``, 2x, 4x and 8x channels, and stages 2-4 halve the resolution.
    Adaptive average pooling before the classifier accepts any input size
    (28x28, 32x32, 64x64, ...).

    Attributes:
        feature_channels: channels of the four stage outputs.
        embedding_dim: size of the pooled penultimate features (8 x width).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        _require_positive("num_classes", num_classes)
        _require_positive("in_channels", in_channels)
        _require_positive("width", width)
        self.feature_channels: tuple[int, ...] = (width, 2 * width, 4 * width, 8 * width)
        self.embedding_dim = 8 * width

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        previous = width
        for index, channels in enumerate(self.feature_channels):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(previous, channels, stride), BasicBlock(channels, channels, 1)))
            previous = channels
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.embedding_dim, num_classes)

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return the pooled penultimate features [B, 8w] and the four stage outputs."""
        out = self.stem(x)  # [B, w, H, W]
        features = []
        for stage in self.stages:
            out = stage(out)  # [B, C_s, H_s, W_s]
            features.append(out)
        embedding = torch.flatten(self.pool(out), 1)  # [B, 8w]
        return embedding, features

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return the logits [B, num_classes] and the four stage outputs."""
        embedding, features = self.encode(x)
        return self.classifier(embedding), features


class LossPredictionModule(nn.Module):
    """Predict each sample's loss from the target network's stage features.

    Every stage map goes through global average pooling, a fully connected
    layer to ``dim`` units and a ReLU. The concatenated vectors go through a
    last fully connected layer to one scalar (Yoo and Kweon, CVPR 2019).
    Pooling is adaptive, so any spatial size works.
    """

    def __init__(self, feature_channels: Sequence[int], dim: int = 128) -> None:
        super().__init__()
        if len(feature_channels) == 0:
            raise ValueError("Expected at least one stage in feature_channels, but got none.")
        _require_positive("dim", dim)
        self.feature_channels = tuple(int(channels) for channels in feature_channels)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, dim), nn.ReLU())
            for channels in self.feature_channels
        )
        self.head = nn.Linear(dim * len(self.feature_channels), 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Return the predicted loss of every sample, shape [B]."""
        if len(features) != len(self.branches):
            raise ValueError(
                f"Expected {len(self.branches)} feature maps with channels {self.feature_channels}, "
                f"but got {len(features)}."
            )
        pooled = [branch(feature) for branch, feature in zip(self.branches, features)]  # each [B, dim]
        return self.head(torch.cat(pooled, dim=1)).squeeze(1)  # [B]


class LossLearner(nn.Module):
    """Target network and loss prediction module as one module.

    Holding both as submodules lets one DDP wrapper and one optimizer cover
    every parameter, so the loss prediction module keeps training after the
    gradient stop.

    Args:
        target: network whose ``forward(x)`` returns ``(outputs, features)``.
        feature_channels: channels of the maps in ``features``, in order.
        dim: units of each stage's fully connected layer in the loss
            prediction module (128 in the paper).
        loss_module: False builds the target network alone, for baselines
            that must train without the module; the predicted loss is then None.
    """

    def __init__(self, target: nn.Module, feature_channels: Sequence[int], dim: int = 128, loss_module: bool = True) -> None:
        super().__init__()
        self.target = target
        self.loss_module = LossPredictionModule(feature_channels, dim=dim) if loss_module else None

    def forward(self, x: Tensor, detach_features: bool = False) -> tuple[Any, Tensor]:
        """Run the target network and predict each sample's loss.

        Args:
            x: input images [B, C, H, W].
            detach_features: detach the stage features before the loss
                prediction module, so its loss sends no gradient into the
                target network (the gradient stop).

        Returns:
            The target network's outputs and the predicted loss [B] (None
            without a loss prediction module).
        """
        outputs, features = self.target(x)
        if self.loss_module is None:
            return outputs, None
        if detach_features:
            features = [feature.detach() for feature in features]
        return outputs, self.loss_module(features)

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Return what one scoring pass needs: outputs, predicted loss [B] (or None) and penultimate features.

        The target network must provide ``encode(x)`` returning the pooled
        penultimate features and the stage maps, and a ``classifier`` head,
        as ``ResNet18`` does.
        """
        embedding, features = self.target.encode(x)  # [B, D], stage maps
        outputs = self.target.classifier(embedding)  # [B, num_classes]
        predicted = self.loss_module(features) if self.loss_module is not None else None  # [B]
        return outputs, predicted, embedding


def device_for(use_gpu: bool | None) -> torch.device:
    """Return the CUDA device when ``use_gpu`` requests it, else the CPU.

    ``None`` picks CUDA when it is available.

    Raises:
        RuntimeError: when ``use_gpu`` is True and CUDA is not available.
    """
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is true, but CUDA is not available; set use_gpu to false or null.")
    return torch.device("cuda", torch.cuda.current_device())


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"Expected {name} to be an integer >= 1, but got {value!r}.")
