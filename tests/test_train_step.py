"""Training step: joint loss, gradient stop, optimizer, augmentation and normalization."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from distal.config import ModelConfig, TrainConfig
from distal.model import ClassificationTask, LossLearner, build_learner
from distal.train_step import augment_batch, build_optimizer, compute_losses, normalize

pytestmark = pytest.mark.timeout(60)

STOP_EPOCH = 3
CONFIG = TrainConfig(
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    milestones=(2, 4),
    gamma=0.1,
    loss_weight=1.0,
    margin=1.0,
    gradient_stop_epoch=STOP_EPOCH,
)
TASK = ClassificationTask(num_classes=10, in_channels=1, width=4)


@pytest.fixture(autouse=True)
def seeded_torch_rng() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture
def learner() -> LossLearner:
    return build_learner(TASK, ModelConfig(width=4, loss_module_dim=8))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(8, 1, 28, 28)
    targets = torch.randint(0, 10, (8,))
    return images, targets


def backbone_gradients(learner: LossLearner) -> dict[str, torch.Tensor | None]:
    return {name: parameter.grad for name, parameter in learner.target.named_parameters()}


def module_gradients(learner: LossLearner) -> dict[str, torch.Tensor | None]:
    return {name: parameter.grad for name, parameter in learner.loss_module.named_parameters()}


def is_zero_or_none(gradient: torch.Tensor | None) -> bool:
    return gradient is None or bool((gradient == 0).all())


def test_total_is_target_plus_weighted_ranking(learner: LossLearner, batch: tuple) -> None:
    images, targets = batch
    config = dataclasses.replace(CONFIG, loss_weight=0.25)

    losses = compute_losses(learner, images, targets, TASK, epoch=0, config=config)

    expected = losses.target_loss + 0.25 * losses.ranking_loss
    assert torch.allclose(losses.total, expected)
    assert torch.allclose(losses.target_loss, losses.per_sample_loss.mean())
    assert losses.per_sample_loss.shape == (8,)
    assert losses.predicted_loss.shape == (8,)
    assert losses.outputs.shape == (8, 10)
    assert not losses.per_sample_loss.requires_grad
    assert not losses.predicted_loss.requires_grad
    assert not losses.outputs.requires_grad
    assert losses.ranking_loss.item() > 0


def test_gradient_stop_blocks_ranking_gradient(learner: LossLearner, batch: tuple) -> None:
    images, targets = batch

    losses = compute_losses(learner, images, targets, TASK, epoch=STOP_EPOCH, config=CONFIG)
    losses.ranking_loss.backward()

    backbone = backbone_gradients(learner)
    module = module_gradients(learner)
    assert losses.ranking_loss.item() > 0
    assert all(is_zero_or_none(gradient) for gradient in backbone.values())
    assert all(gradient is not None for gradient in module.values())
    assert module["head.weight"].abs().sum() > 0
    assert module["branches.3.2.weight"].abs().sum() > 0


def test_ranking_gradient_reaches_backbone_before_stop(learner: LossLearner, batch: tuple) -> None:
    images, targets = batch

    losses = compute_losses(learner, images, targets, TASK, epoch=STOP_EPOCH - 1, config=CONFIG)
    losses.ranking_loss.backward()

    backbone = backbone_gradients(learner)
    assert backbone["stem.0.weight"] is not None
    assert backbone["stem.0.weight"].abs().sum() > 0
    assert backbone["stages.3.1.conv2.weight"].abs().sum() > 0
    # The classifier is not on the path from the features to the loss module.
    assert is_zero_or_none(backbone["classifier.weight"])


@pytest.mark.parametrize(("epoch", "ranking_moves_backbone"), [(STOP_EPOCH - 1, True), (STOP_EPOCH, False)])
def test_ranking_changes_backbone_gradient_until_stop(
    learner: LossLearner, batch: tuple, epoch: int, ranking_moves_backbone: bool
) -> None:
    images, targets = batch

    compute_losses(learner, images, targets, TASK, epoch=epoch, config=CONFIG).total.backward()
    from_total = {name: gradient.clone() for name, gradient in backbone_gradients(learner).items()}
    learner.zero_grad(set_to_none=True)
    compute_losses(learner, images, targets, TASK, epoch=epoch, config=CONFIG).target_loss.backward()
    from_target = backbone_gradients(learner)

    same = all(torch.allclose(from_total[name], from_target[name], atol=1e-6) for name in from_total)
    assert same != ranking_moves_backbone


def test_loss_module_trains_after_gradient_stop(learner: LossLearner, batch: tuple) -> None:
    images, targets = batch
    optimizer, _ = build_optimizer(learner, CONFIG)
    module_before = {name: value.clone() for name, value in learner.loss_module.state_dict().items()}
    stem_before = learner.target.stem[0].weight.detach().clone()

    optimizer.zero_grad(set_to_none=True)
    compute_losses(learner, images, targets, TASK, epoch=STOP_EPOCH + 10, config=CONFIG).total.backward()
    optimizer.step()

    for name, value in learner.loss_module.state_dict().items():
        assert not torch.equal(value, module_before[name]), f"loss module {name} did not change"
    assert not torch.equal(learner.target.stem[0].weight, stem_before)


def test_optimizer_covers_all_parameters(learner: LossLearner) -> None:
    optimizer, _ = build_optimizer(learner, CONFIG)

    optimized = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    group = optimizer.param_groups[0]
    assert optimized == {id(parameter) for parameter in learner.parameters()}
    assert {id(parameter) for parameter in learner.loss_module.parameters()} <= optimized
    assert group["lr"] == pytest.approx(0.1)
    assert group["momentum"] == pytest.approx(0.9)
    assert group["weight_decay"] == pytest.approx(5e-4)


def test_scheduler_decays_at_milestones(learner: LossLearner) -> None:
    optimizer, scheduler = build_optimizer(learner, CONFIG)

    learning_rates = []
    for _ in range(5):
        learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    assert learning_rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_compute_losses_rejects_odd_batch(learner: LossLearner) -> None:
    images = torch.randn(5, 1, 28, 28)
    targets = torch.zeros(5, dtype=torch.long)

    with pytest.raises(ValueError, match="B=5"):
        compute_losses(learner, images, targets, TASK, epoch=0, config=CONFIG)


def candidate_views(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image, each with and without a horizontal flip."""
    _, height, width = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    views = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + height, left : left + width]
            views.extend([crop, crop.flip(2)])
    return views


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_keeps_shape_and_dtype(dtype: torch.dtype) -> None:
    images = torch.randint(1, 256, (6, 3, 32, 32)).to(dtype)

    augmented = augment_batch(images, torch.Generator().manual_seed(1))

    assert augmented.shape == images.shape
    assert augmented.dtype == dtype


def test_augment_outputs_are_crops_or_flips() -> None:
    images = torch.randint(1, 256, (16, 2, 12, 10), dtype=torch.uint8)

    augmented = augment_batch(images, torch.Generator().manual_seed(2), padding=4)

    changed = 0
    for image, output in zip(images, augmented):
        assert any(torch.equal(output, view) for view in candidate_views(image, 4))
        changed += int(not torch.equal(output, image))
    assert changed > 0


def test_augment_crop_exposes_zero_padding() -> None:
    images = torch.full((16, 1, 28, 28), 255, dtype=torch.uint8)

    augmented = augment_batch(images, torch.Generator().manual_seed(3))

    padded_images = (augmented == 0).flatten(1).any(dim=1)
    assert padded_images.sum() > 0


def test_augment_flips_without_padding() -> None:
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)

    augmented = augment_batch(images, torch.Generator().manual_seed(4), padding=0)

    flipped = [torch.equal(output, image.flip(2)) for image, output in zip(images, augmented)]
    unchanged = [torch.equal(output, image) for image, output in zip(images, augmented)]
    assert all(a or b for a, b in zip(flipped, unchanged))
    assert any(flipped)
    assert any(unchanged)


def test_augment_is_reproducible_with_seeded_generator() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)

    first = augment_batch(images, torch.Generator().manual_seed(5))
    second = augment_batch(images, torch.Generator().manual_seed(5))

    assert torch.equal(first, second)


def test_augment_rejects_unbatched_image() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        augment_batch(torch.zeros(3, 32, 32))


def test_normalize_known_values() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)

    normalized = normalize(images)

    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized, torch.tensor([-1.0, -0.6, 1.0]).view(1, 1, 1, 3))


def test_normalize_per_channel_statistics() -> None:
    images = torch.full((2, 2, 3, 3), 51, dtype=torch.uint8)

    normalized = normalize(images, mean=(0.2, 0.0), std=(0.5, 0.1))

    assert torch.allclose(normalized[:, 0], torch.zeros(2, 3, 3))
    assert torch.allclose(normalized[:, 1], torch.full((2, 3, 3), 2.0))


def test_normalize_rejects_float_images() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [((0.5, 0.5), 0.5, "one per channel"), (0.5, 0.0, "std > 0")],
)
def test_normalize_rejects_bad_statistics(mean: object, std: object, message: str) -> None:
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)

    with pytest.raises(ValueError, match=message):
        normalize(images, mean=mean, std=std)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_and_normalize_on_gpu() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    cpu_result = normalize(augment_batch(images, torch.Generator().manual_seed(6)))

    gpu_images = images.cuda()
    gpu_result = normalize(augment_batch(gpu_images, torch.Generator().manual_seed(6)))

    assert gpu_result.device.type == "cuda"
    assert torch.allclose(gpu_result.cpu(), cpu_result)


def test_baseline_objective_has_no_ranking_term(batch: tuple) -> None:
    images, targets = batch
    baseline = build_learner(TASK, ModelConfig(width=4, loss_module_dim=8), loss_module=False)
    config = dataclasses.replace(CONFIG, loss_weight=1.0)

    losses = compute_losses(baseline, images, targets, TASK, epoch=0, config=config)
    losses.total.backward()

    assert baseline.loss_module is None
    assert losses.ranking_loss is None
    assert losses.predicted_loss is None
    assert torch.equal(losses.total, losses.target_loss)
    # The gradient is that of the target loss alone: the same as a plain
    # network with the same weights trained on cross-entropy.
    plain = build_learner(TASK, ModelConfig(width=4, loss_module_dim=8), loss_module=False)
    plain.load_state_dict(baseline.state_dict())
    torch.nn.functional.cross_entropy(plain.target(images)[0], targets).backward()
    for (name, got), (_, want) in zip(baseline.target.named_parameters(), plain.target.named_parameters()):
        assert torch.allclose(got.grad, want.grad), name


def test_baseline_gradient_differs_from_learning_loss_before_the_stop(batch: tuple) -> None:
    images, targets = batch
    with_module = build_learner(TASK, ModelConfig(width=4, loss_module_dim=8))
    baseline = build_learner(TASK, ModelConfig(width=4, loss_module_dim=8), loss_module=False)
    baseline.target.load_state_dict(with_module.target.state_dict())

    compute_losses(with_module, images, targets, TASK, epoch=0, config=CONFIG).total.backward()
    compute_losses(baseline, images, targets, TASK, epoch=0, config=CONFIG).total.backward()

    stem_with = with_module.target.stem[0].weight.grad
    stem_without = baseline.target.stem[0].weight.grad
    assert not torch.allclose(stem_with, stem_without)


def test_predict_matches_forward(learner: LossLearner, batch: tuple) -> None:
    images, _ = batch
    learner.eval()
    with torch.no_grad():
        outputs, predicted = learner(images)
        logits, predicted_again, embedding = learner.predict(images)
    assert torch.allclose(outputs, logits)
    assert torch.allclose(predicted, predicted_again)
    assert embedding.shape == (8, learner.target.embedding_dim)
