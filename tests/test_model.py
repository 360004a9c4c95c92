"""Shapes and wiring of the target network, the loss prediction module and the task."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from distal.config import ModelConfig
from distal.model import (
    ClassificationTask,
    LossLearner,
    LossPredictionModule,
    ResNet18,
    build_learner,
    build_task,
    device_for,
)

pytestmark = pytest.mark.timeout(60)

WIDTH = 4


@pytest.fixture(autouse=True)
def seeded_torch_rng() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.mark.parametrize(
    ("in_channels", "size", "stage_sizes"),
    [
        (1, 28, (28, 14, 7, 4)),
        (3, 32, (32, 16, 8, 4)),
        (3, 64, (64, 32, 16, 8)),
    ],
)
def test_learner_output_shapes(in_channels: int, size: int, stage_sizes: tuple[int, ...]) -> None:
    task = build_task(ModelConfig(width=WIDTH, loss_module_dim=16), num_classes=10, in_channels=in_channels)
    learner = build_learner(task, ModelConfig(width=WIDTH, loss_module_dim=16))
    images = torch.randn(6, in_channels, size, size)

    logits, features = learner.target(images)
    outputs, predicted = learner(images)

    assert logits.shape == (6, 10)
    assert outputs.shape == (6, 10)
    assert predicted.shape == (6,)
    assert len(features) == 4
    for feature, channels, stage_size in zip(features, (4, 8, 16, 32), stage_sizes):
        assert feature.shape == (6, channels, stage_size, stage_size)


def test_task_feature_channels_match_network() -> None:
    task = ClassificationTask(num_classes=10, in_channels=3, width=WIDTH)

    model = task.build_model()
    _, features = model(torch.randn(2, 3, 32, 32))

    assert task.feature_channels == (4, 8, 16, 32)
    assert model.feature_channels == task.feature_channels
    assert tuple(feature.shape[1] for feature in features) == task.feature_channels


def test_learner_builds_loss_module_from_channels() -> None:
    learner = LossLearner(ResNet18(num_classes=3, in_channels=1, width=WIDTH), (4, 8, 16, 32), dim=6)

    _, predicted = learner(torch.randn(2, 1, 28, 28))

    assert learner.loss_module.feature_channels == (4, 8, 16, 32)
    assert learner.loss_module.head.in_features == 4 * 6
    assert predicted.shape == (2,)


def test_resnet_encode_returns_penultimate_features() -> None:
    model = ResNet18(num_classes=3, in_channels=1, width=WIDTH).eval()
    images = torch.randn(2, 1, 28, 28)

    embedding, features = model.encode(images)
    logits, _ = model(images)

    assert embedding.shape == (2, model.embedding_dim)
    assert model.embedding_dim == 8 * WIDTH
    assert torch.allclose(model.classifier(embedding), logits)
    assert model.feature_channels == tuple(feature.shape[1] for feature in features)


def test_loss_module_accepts_any_spatial_size() -> None:
    module = LossPredictionModule([2, 3], dim=5)
    features = [torch.randn(4, 2, 7, 9), torch.randn(4, 3, 1, 1)]

    predicted = module(features)

    assert predicted.shape == (4,)


def test_loss_module_rejects_wrong_number_of_maps() -> None:
    module = LossPredictionModule([2, 3], dim=5)

    with pytest.raises(ValueError, match="Expected 2 feature maps"):
        module([torch.randn(4, 2, 3, 3)])


def test_loss_module_linear_layer_shapes() -> None:
    module = LossPredictionModule([4, 8, 16, 32], dim=128)

    linear_shapes = [tuple(layer.weight.shape) for layer in module.modules() if isinstance(layer, torch.nn.Linear)]

    assert linear_shapes == [(128, 4), (128, 8), (128, 16), (128, 32), (1, 512)]


def test_learner_parameters_cover_both_modules() -> None:
    learner = build_learner(ClassificationTask(10, 1, width=WIDTH), ModelConfig(width=WIDTH))

    learner_ids = {id(parameter) for parameter in learner.parameters()}
    target_ids = {id(parameter) for parameter in learner.target.parameters()}
    module_ids = {id(parameter) for parameter in learner.loss_module.parameters()}

    assert isinstance(learner, LossLearner)
    assert target_ids and module_ids
    assert learner_ids == target_ids | module_ids


@pytest.mark.parametrize("detach_features", [False, True])
def test_learner_detach_features_blocks_backbone_gradient(detach_features: bool) -> None:
    learner = build_learner(ClassificationTask(10, 1, width=WIDTH), ModelConfig(width=WIDTH, loss_module_dim=8))
    images = torch.randn(4, 1, 28, 28)

    _, predicted = learner(images, detach_features=detach_features)
    predicted.sum().backward()

    stem_grad = learner.target.stem[0].weight.grad
    head_grad = learner.loss_module.head.weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    if detach_features:
        assert stem_grad is None
    else:
        assert stem_grad is not None and stem_grad.abs().sum() > 0


def test_classification_per_sample_loss_and_metric() -> None:
    task = ClassificationTask(num_classes=3, in_channels=1)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 1])

    per_sample = task.per_sample_loss(logits, targets)
    correct, count = task.metric(logits, targets)

    expected_first = -torch.log_softmax(logits[0], dim=0)[0]
    assert per_sample.shape == (4,)
    assert per_sample[0].item() == pytest.approx(expected_first.item())
    assert per_sample[2].item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert correct == 2.0
    assert count == 4


def test_build_task_rejects_unknown_arch() -> None:
    config = ModelConfig(arch="vgg16", width=WIDTH)

    with pytest.raises(ValueError, match="'vgg16'"):
        build_task(config, num_classes=10, in_channels=3)


@pytest.mark.parametrize("field", ["num_classes", "in_channels", "width"])
def test_classification_task_rejects_nonpositive_sizes(field: str) -> None:
    sizes = {"num_classes": 10, "in_channels": 1, "width": WIDTH, field: 0}

    with pytest.raises(ValueError, match=field):
        ClassificationTask(**sizes)


def test_device_for_cpu() -> None:
    assert device_for(False) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_device_for_gpu_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        device_for(True)
