"""Training: DDP training of the target model and its loss prediction module on Ray Train.

The labeled set is read through Ray Data (pool joined with the label table),
decoded once and materialized in the object store; each epoch every worker
streams its equal share of it. The ranking loss pairs samples inside each
worker's local batch, which is always even (the last batch of an epoch loses
one sample when it is odd). Held-out accuracy is measured at the final epoch,
never at the best one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from distal import config as config_module
from distal.config import Config, ModelConfig, TrainConfig
from distal.datasets import decode_rows, keep_ids, read_pool
from distal.pool import PoolInfo

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
THROUGHPUT_KEY = "train_images_per_second"


@dataclass(frozen=True)
class TaskSpec:
    """Settings needed to rebuild the learner from a checkpoint."""

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one training run.

    Attributes:
        checkpoint_uri: directory holding ``model.pt`` (both modules).
        metrics: final-epoch metrics (target_loss, ranking_loss, eval_accuracy, ...).
        labeled_used: labeled images trained on.
        skipped: (id, reason) of labeled images that could not be decoded.
        seconds: wall time of the training run.
        images_per_second: training images per second over all workers,
            counting training batches only (0 when resumed after the last epoch).
    """

    checkpoint_uri: str
    metrics: dict[str, float]
    labeled_used: int
    skipped: list[tuple[str, str]]
    seconds: float
    images_per_second: float = 0.0


def resolve_use_gpu(requested: bool | None) -> bool:
    """Use GPUs when asked, or when None and the Ray cluster has any."""
    if requested is not None:
        return requested
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def build_learner(model_config: ModelConfig, spec: TaskSpec, loss_module: bool = True):
    from distal.model import build_learner as attach_loss_module
    from distal.model import build_task

    task = build_task(model_config, num_classes=spec.num_classes, in_channels=spec.in_channels)
    return task, attach_loss_module(task, model_config, loss_module=loss_module)


def save_checkpoint(
    directory: str,
    learner: torch.nn.Module,
    model_config: ModelConfig,
    spec: TaskSpec,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> None:
    """Write ``model.pt``: both modules, what rebuilds them, and the optimizer state for a resume."""
    state = {
        "state_dict": learner.state_dict(),
        "model_config": dataclasses.asdict(model_config),
        "task_spec": dataclasses.asdict(spec),
        "loss_module": learner.loss_module is not None,
        "epoch": epoch,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))


def _model_file(uri: str) -> str:
    return uri if uri.endswith(".pt") else f"{uri.rstrip('/')}/{CHECKPOINT_FILE}"


def load_checkpoint(checkpoint_uri: str, device: torch.device | str = "cpu"):
    """Load a learner saved by training; return (task, learner in eval mode, spec).

    Args:
        checkpoint_uri: a ``.pt`` file or a checkpoint directory holding ``model.pt``.
    """
    import fsspec

    with fsspec.open(_model_file(checkpoint_uri), "rb") as handle:
        state = torch.load(handle, map_location=device, weights_only=True)
    model_config = ModelConfig(**state["model_config"])
    spec_data = state["task_spec"]
    spec = TaskSpec(spec_data["num_classes"], spec_data["in_channels"], tuple(spec_data["image_size"]))
    task, learner = build_learner(model_config, spec, loss_module=state.get("loss_module", True))
    learner.load_state_dict(state["state_dict"])
    learner.to(device).eval()
    return task, learner, spec


def publish_model(checkpoint_uri: str, destination_uri: str) -> None:
    """Copy a checkpoint's modules, without optimizer state, to a stable path such as ``cycles/0001/model.pt``."""
    import io

    import fsspec

    from distal.rundir import write_bytes_atomic

    with fsspec.open(_model_file(checkpoint_uri), "rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    state.pop("optimizer", None)
    state.pop("scheduler", None)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs, path = fsspec.core.url_to_fs(destination_uri)
    write_bytes_atomic(fs, path, buffer.getvalue())


def labeled_dataset(info: PoolInfo, labels: pa.Table):
    """Return the decoded labeled set as a materialized Ray Dataset and the skipped (id, reason) pairs."""
    size = tuple(info.image_size)
    dataset = read_pool(info, ["id", "image"]).map_batches(
        keep_ids,
        batch_format="pyarrow",
        fn_kwargs={"ids": labels.column("id").combine_chunks(), "labels": labels.column("label").combine_chunks()},
    )
    return _decode_and_split(dataset, info.channels, size)


def eval_dataset(info: PoolInfo):
    """Return the decoded held-out set (needs a label column) and its skipped (id, reason) pairs."""
    dataset = read_pool(info, ["id", "image", "label"])
    return _decode_and_split(dataset, info.channels, tuple(info.image_size))


def _decode_and_split(dataset, channels: int, size: tuple[int, int]):
    from ray.data.expressions import col

    # Keep block order fixed, so the same labels give the same batches and a
    # rerun or a resume trains the same model. A dataset carries its own copy
    # of the Ray Data context, so the option is set on each one.
    decoded = _ordered(dataset.map_batches(decode_rows, batch_format="pyarrow", fn_kwargs={"channels": channels, "image_size": size}))
    decoded = decoded.materialize()
    skipped_rows = _ordered(decoded.filter(expr=col("skip_reason") != "").select_columns(["id", "skip_reason"])).take_all()
    good = _ordered(decoded.filter(expr=col("skip_reason") == "").select_columns(["image", "label"])).materialize()
    skipped = sorted((row["id"], row["skip_reason"]) for row in skipped_rows)
    return good, skipped


def _ordered(dataset):
    dataset.context.execution_options.preserve_order = True
    return dataset


def train(
    config: Config,
    info: PoolInfo,
    labels: pa.Table,
    eval_info: PoolInfo | None,
    storage_uri: str,
    name: str,
    seed: int,
    init_uri: str | None = None,
) -> TrainResult:
    """Train the target model (and its loss module, for ``learning_loss``) on the labeled set with Ray Train.

    Strategies other than ``learning_loss`` train the target model alone: no
    loss prediction module and no ranking loss, every other setting the same.

    Args:
        config: resolved run configuration.
        info: the pool.
        labels: table with ``id`` and ``label`` of the labeled set.
        eval_info: the held-out set, or None to skip evaluation.
        storage_uri: Ray Train storage path (local directory or ``s3://...``).
        name: Ray Train run name inside storage_uri.
        seed: seed of this cycle's training.
        init_uri: a model to start from (warm start); None initializes afresh.
    """
    from distal.acquisition import uses_loss_module

    import ray.train
    from ray.train.torch import TorchTrainer

    start = time.monotonic()
    train_ds, skipped = labeled_dataset(info, labels)
    labeled_used = train_ds.count()
    if skipped:
        log.warning("stage=train skipped_labeled=%d first_id=%s reason=%s", len(skipped), skipped[0][0], skipped[0][1])
    train_cfg = config.train
    if labeled_used < train_cfg.num_workers * 2:
        raise ValueError(
            f"The labeled set has {labeled_used} decodable images; training needs at least "
            f"{train_cfg.num_workers * 2} (two per worker). Add labels or lower train.num_workers."
        )
    datasets = {"train": train_ds}
    if eval_info is not None:
        datasets["eval"], eval_skipped = eval_dataset(eval_info)
        if eval_skipped:
            log.warning("stage=train eval_skipped=%d first_id=%s", len(eval_skipped), eval_skipped[0][0])
    num_classes = len(info.classes) if info.classes else int(pa.compute.max(labels.column("label")).as_py()) + 1
    spec = TaskSpec(num_classes=num_classes, in_channels=info.channels, image_size=tuple(info.image_size))
    use_gpu = resolve_use_gpu(train_cfg.use_gpu)
    storage_fs, storage_path = _storage(storage_uri)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "train": dataclasses.asdict(train_cfg),
            "model": dataclasses.asdict(config.model),
            "spec": dataclasses.asdict(spec),
            "seed": seed,
            "labeled": labeled_used,
            "has_eval": "eval" in datasets,
            "loss_module": uses_loss_module(config.select.strategy),
            "init_uri": init_uri,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all", execution_options=_ingest_options()),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Training run {name} in {storage_uri} ended without a checkpoint; see the worker logs above.")
    checkpoint_uri = _checkpoint_uri(result.checkpoint, storage_uri, storage_path)
    metrics = {key: value if isinstance(value, int) else float(value) for key, value in result.metrics.items() if isinstance(value, (int, float))}
    rate = metrics.pop(THROUGHPUT_KEY, 0.0)
    return TrainResult(checkpoint_uri, metrics, labeled_used, skipped, time.monotonic() - start, rate)


def _ingest_options():
    """Return Ray Train's ingest options with block order preserved, for reproducible batches."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _storage(storage_uri: str):
    """Return (pyarrow filesystem or None, path) for Ray Train's storage; fsspec remote stores are wrapped."""
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(storage_uri)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return None, os.path.abspath(path)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def _checkpoint_uri(checkpoint, storage_uri: str, storage_path: str) -> str:
    path = checkpoint.path
    if "://" in storage_uri:
        scheme = storage_uri.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path


def train_loop(loop_config: dict[str, Any]) -> None:
    """Per-worker training loop run by Ray Train (one DDP process per worker)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from distal.train_step import augment_batch, build_optimizer, compute_losses, normalize

    train_cfg = config_module._build(TrainConfig, loop_config["train"], prefix="train.", source="train loop")
    model_config = ModelConfig(**loop_config["model"])
    spec_data = loop_config["spec"]
    spec = TaskSpec(spec_data["num_classes"], spec_data["in_channels"], tuple(spec_data["image_size"]))
    _quiet_train_reports()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    world = context.get_world_size()
    seed = loop_config["seed"]
    torch.manual_seed(seed * 1000 + rank)

    with_loss_module = loop_config["loss_module"]
    task, model = build_learner(model_config, spec, loss_module=with_loss_module)
    optimizer, scheduler = build_optimizer(model, train_cfg)
    first_epoch = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler)
    if first_epoch and rank == 0:
        log.info("stage=train action=resume epoch=%d/%d", first_epoch, train_cfg.epochs)
    elif loop_config["init_uri"]:
        _warm_start(model, loop_config["init_uri"])
        if rank == 0:
            log.info("stage=train action=warm_start from=%s", loop_config["init_uri"])
    device = ray.train.torch.get_device()
    bf16 = train_cfg.bf16 and device.type == "cuda"
    if train_cfg.bf16 and not bf16 and rank == 0:
        log.warning("stage=train train.bf16=true is ignored: the workers have no CUDA device, so training runs in float32")
    learner = ray.train.torch.prepare_model(model)
    local_batch = train_cfg.batch_size // world
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop_config["has_eval"] else None
    shard_bytes = loop_config["labeled"] * int(np.prod(spec.image_size)) * spec.in_channels / world
    in_memory = _load_shard(train_shard) if shard_bytes <= train_cfg.in_memory_mb * 2**20 else None
    if rank == 0:
        log.info("stage=train labeled_shard=%s shard_mb=%.1f", "in_memory" if in_memory else "streamed", shard_bytes / 2**20)
    epoch_start = time.monotonic()
    loop_seconds, loop_samples = 0.0, 0.0  # training batches only: no eval, no checkpoint

    for epoch in range(first_epoch, train_cfg.epochs):
        loop_start = time.monotonic()
        learner.train()
        # Seeding per epoch and rank makes augmentation and batch order
        # reproducible after a resume without saving generator states.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # target loss sum, ranking loss sum, samples
        for batch in _epoch_batches(train_shard, in_memory, local_batch, seed * 100_003 + epoch * 101 + rank, device):
            images, targets = batch["image"], batch["label"]
            usable = images.shape[0] - images.shape[0] % 2
            if usable == 0:
                continue
            images, targets = images[:usable], targets[:usable]
            if train_cfg.augment:
                images = augment_batch(images, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = compute_losses(learner, normalize(images), targets, task, epoch=epoch, config=train_cfg)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            rank_value = losses.ranking_loss.item() if losses.ranking_loss is not None else 0.0
            sums += torch.tensor(
                [losses.target_loss.item() * usable, rank_value * usable, usable],
                dtype=torch.float64,
                device=device,
            )
        scheduler.step()
        if world > 1:
            dist.all_reduce(sums)
        loop_seconds += time.monotonic() - loop_start
        loop_samples += sums[2].item()
        samples = max(sums[2].item(), 1.0)
        metrics = {"epoch": epoch + 1, "target_loss": sums[0].item() / samples}
        if with_loss_module:
            metrics["ranking_loss"] = sums[1].item() / samples
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        final = epoch == train_cfg.epochs - 1
        if final:
            # All workers' images per second of training batches; it varies
            # from run to run, so cycle.py records it with the timings.
            metrics[THROUGHPUT_KEY] = loop_samples / max(loop_seconds, 1e-9)
        if final and eval_shard is not None:
            metrics.update(_evaluate(learner, task, eval_shard, device, world))
        if rank == 0:
            _log_epoch(metrics, train_cfg.epochs, epoch_start, first_epoch)
        # NOTE: report only with a checkpoint. ray.train.report waits until
        # Ray Train's controller collects the previous report, and the
        # controller polls every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a
        # report per epoch made each short epoch last 2 s. Rank 0 logs every
        # epoch's metrics itself.
        if final or (epoch + 1) % train_cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(directory, model, model_config, spec, epoch + 1, optimizer, scheduler)
                    checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=checkpoint)


def _load_shard(shard) -> dict[str, torch.Tensor]:
    """Read a worker's whole labeled shard once, in its fixed block order, as uint8 images and int64 labels on the CPU."""
    images, labels = [], []
    for batch in shard.iter_torch_batches(batch_size=4096, dtypes={"image": torch.uint8, "label": torch.int64}):
        images.append(batch["image"])  # [b, C, H, W]
        labels.append(batch["label"])  # [b]
    return {"image": torch.cat(images), "label": torch.cat(labels)}


def _epoch_batches(shard, in_memory: dict[str, torch.Tensor] | None, batch_size: int, seed: int, device):
    """Yield one epoch of shuffled batches on ``device``.

    A shard held in memory is permuted with a generator seeded by epoch and
    rank, which costs nothing per epoch. A shard too large for
    ``train.in_memory_mb`` streams from Ray Data through a seeded local
    shuffle buffer, which restarts the stream every epoch.
    """
    if in_memory is None:
        yield from shard.iter_torch_batches(
            batch_size=batch_size,
            local_shuffle_buffer_size=max(4 * batch_size, 256),
            local_shuffle_seed=seed,
            dtypes={"image": torch.uint8, "label": torch.int64},
            device=device,
        )
        return
    order = torch.randperm(len(in_memory["label"]), generator=torch.Generator().manual_seed(seed))  # [N]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]  # [b]
        yield {name: values[rows].to(device, non_blocking=True) for name, values in in_memory.items()}


def _quiet_train_reports() -> None:
    """Silence Ray Train's per-report INFO line in this worker; distal logs each epoch itself."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # Another Ray version: its logs stay as they are.
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _restore(checkpoint, model, optimizer, scheduler) -> int:
    """Load a mid-training checkpoint into the modules and return the epoch to start from (0 without one)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])


def _warm_start(model: torch.nn.Module, init_uri: str) -> None:
    """Load a previous cycle's modules into a freshly built learner (optimizer and schedule start anew)."""
    import fsspec

    with fsspec.open(_model_file(init_uri), "rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise RuntimeError(
            f"Cannot warm start from {init_uri}: its modules do not match this run's model settings. "
            "Set train.warm_start=false or keep model settings and strategy unchanged between cycles."
        ) from err


def _log_epoch(metrics: dict[str, float], epochs: int, start: float, first_epoch: int) -> None:
    epoch = int(metrics["epoch"])
    elapsed = time.monotonic() - start
    if epoch == first_epoch + 1 or epoch == epochs or epoch % max(1, epochs // 10) == 0:
        eta = elapsed / (epoch - first_epoch) * (epochs - epoch)
        fields = " ".join(f"{key}={value:.4g}" for key, value in metrics.items() if key != "epoch")
        log.info("stage=train epoch=%d/%d %s elapsed=%.0fs eta=%.0fs", epoch, epochs, fields, elapsed, eta)


@torch.no_grad()
def _evaluate(learner, task, eval_shard, device, world: int) -> dict[str, float]:
    """Return held-out accuracy and, with a loss module, its ranking accuracy over held-out pairs."""
    import torch.distributed as dist

    from distal.acquisition import ranking_accuracy
    from distal.train_step import normalize

    # Evaluate the unwrapped module: DDP would sync buffers on every forward,
    # and the workers' eval shards may need different numbers of batches.
    model = learner.module if hasattr(learner, "module") else learner
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # correct, samples
    predicted_parts, true_parts = [], []
    for batch in eval_shard.iter_torch_batches(batch_size=512, dtypes={"image": torch.uint8, "label": torch.int64}, device=device):
        outputs, predicted = model(normalize(batch["image"]), detach_features=True)
        correct, count = task.metric(outputs, batch["label"])
        totals += torch.tensor([correct, count], dtype=torch.float64, device=device)
        if predicted is not None:
            predicted_parts.append(predicted.double().cpu().numpy())  # [B]
            true_parts.append(task.per_sample_loss(outputs, batch["label"]).double().cpu().numpy())  # [B]
    if world > 1:
        dist.all_reduce(totals)
    metrics = {"eval_accuracy": totals[0].item() / max(totals[1].item(), 1.0), "eval_samples": int(totals[1].item())}
    if model.loss_module is None:
        return metrics
    pairs = (np.concatenate(predicted_parts or [np.zeros(0)]), np.concatenate(true_parts or [np.zeros(0)]))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, pairs)
        pairs = (np.concatenate([part[0] for part in gathered]), np.concatenate([part[1] for part in gathered]))
    # Pairs are taken over the whole held-out set, as in the paper; the
    # chunked count keeps memory at O(chunk x N).
    finite = np.isfinite(pairs[0]) & np.isfinite(pairs[1])
    if not finite.all():
        log.warning("stage=train ranking_accuracy non_finite=%d: those held-out samples are left out", int((~finite).sum()))
    metrics["ranking_accuracy"] = ranking_accuracy(pairs[0][finite], pairs[1][finite])
    return metrics
