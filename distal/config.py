"""Typed, frozen configuration of a distal run, loaded from YAML plus overrides.

Every field has a default; defaults follow the CIFAR-10 protocol of Yoo and
Kweon, "Learning Loss for Active Learning" (CVPR 2019): SGD with lr 0.1,
momentum 0.9, weight decay 5e-4, 200 epochs, lr x0.1 at epoch 160, gradient
stop at epoch 120, margin 1, lambda 1, batch 128, 1,000 initial labels,
K = 1,000 and a random subset of 10,000 scored candidates per cycle.

Unknown keys are an error, both in YAML and in ``--set`` overrides, so a typo
never falls back to a default silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from distal.acquisition import STRATEGIES


class ConfigError(ValueError):
    """Invalid configuration: unknown key, wrong type or inconsistent values."""


@dataclass(frozen=True)
class PoolConfig:
    """Locations of the pool and its held-out evaluation set.

    Attributes:
        path: URI of the pool's Parquet dataset (local path or ``s3://...``).
        eval_path: URI of the held-out evaluation set; None skips evaluation.
    """

    path: str = "pools/mnist/pool"
    eval_path: str | None = "pools/mnist/eval"


@dataclass(frozen=True)
class ModelConfig:
    """Target model and loss prediction module.

    Attributes:
        arch: backbone name; ``resnet18`` is the CIFAR-style ResNet-18.
        width: channels of the first stage (64 in the paper); stages use
            width, 2x, 4x and 8x. A narrow width such as 16 suits CPU runs.
        loss_module_dim: units of each stage's fully connected layer in the
            loss prediction module (128 in the paper).
    """

    arch: str = "resnet18"
    width: int = 64
    loss_module_dim: int = 128


@dataclass(frozen=True)
class TrainConfig:
    """Training of the target model and its loss prediction module.

    Attributes:
        epochs: epochs per cycle.
        batch_size: global batch size, split evenly across workers; each
            worker's share must be even because the ranking loss pairs the
            first half of a local batch with the second half.
        lr, momentum, weight_decay: SGD settings, shared by both modules.
        milestones: epochs at which the learning rate is multiplied by gamma.
        gamma: learning-rate decay factor.
        loss_weight: lambda, the weight of the ranking loss.
        margin: margin of the ranking loss.
        gradient_stop_epoch: from this epoch on (0-based), features fed to
            the loss module are detached, so it no longer moves the backbone.
        augment: random crop (padding 4) and horizontal flip on training
            batches; scoring and evaluation never augment.
        num_workers: Ray Train workers (DDP processes).
        cpus_per_worker: CPUs reserved per worker; keep the total below the
            cluster's CPUs so Ray Data has CPUs left to feed the workers.
        use_gpu: one GPU per worker; None uses CUDA when the cluster has GPUs.
        checkpoint_every: epochs between checkpoints; a job killed during
            training resumes from the last one. The final epoch always
            writes one.
        in_memory_mb: each worker keeps its share of the decoded labeled set
            in memory when it is at most this many MB, and shuffles it
            there every epoch; a larger share streams from Ray Data every
            epoch, which costs a restart of the stream per epoch.
        bf16: train under bfloat16 autocast on CUDA workers (ignored on
            the CPU). Scoring always uses bfloat16 autocast on CUDA.
        warm_start: start each cycle after the first from the previous
            cycle's model (both modules) instead of a fresh initialization.
            The paper retrains from scratch; the manifest records which.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (160,)
    gamma: float = 0.1
    loss_weight: float = 1.0
    margin: float = 1.0
    gradient_stop_epoch: int = 120
    augment: bool = True
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None
    checkpoint_every: int = 10
    in_memory_mb: float = 4096.0
    bf16: bool = False
    warm_start: bool = False


@dataclass(frozen=True)
class ScoreConfig:
    """Scoring of the unlabeled pool.

    Attributes:
        subset_size: score a seeded random subset of this many unlabeled
            images per cycle (10,000 in the paper); None scores all of them.
        batch_size: images per model batch in a scoring actor.
        num_actors: scoring actors; each takes one GPU when use_gpu is on.
        cpus_per_actor: CPUs reserved per scoring actor.
        use_gpu: one GPU per actor; None uses CUDA when the cluster has GPUs.
        max_skip_fraction: the cycle fails when more than this fraction of
            candidates cannot be decoded.
    """

    subset_size: int | None = 10_000
    batch_size: int = 256
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    use_gpu: bool | None = None
    max_skip_fraction: float = 0.01


@dataclass(frozen=True)
class SelectConfig:
    """Selection of the next images to label.

    Attributes:
        k: images selected per cycle (the query size).
        strategy: acquisition strategy: ``learning_loss`` (highest predicted
            loss), ``random``, ``entropy``, ``least_confidence``, ``margin``
            or ``coreset`` (k-center greedy on penultimate features). Every
            strategy but ``learning_loss`` trains without the loss
            prediction module, so baselines get no ranking term.
    """

    k: int = 1_000
    strategy: str = "learning_loss"


@dataclass(frozen=True)
class LabelsConfig:
    """When a cycle may start outside simulation.

    Attributes:
        wait: before a new cycle, require labels for the previous cycle's
            selection: ``all`` of them, at least ``min_fraction`` of them
            (``fraction``), or none (``proceed``). A job that must wait exits
            0 and prints why, so a nightly scheduler can simply try again.
        min_fraction: the share of the selection that must be labeled when
            wait is ``fraction``.
    """

    wait: str = "all"
    min_fraction: float = 0.9


@dataclass(frozen=True)
class Config:
    """A whole run: where it lives, how many cycles, and every stage's settings.

    Attributes:
        run_dir: URI of the run directory that holds labels and cycles.
        seed: run seed; per-cycle seeds derive from it and the cycle number.
        cycles: the run directory should hold cycles 1..cycles when the job
            ends; null runs one new cycle after the last complete one (or
            finishes an interrupted one), as a nightly job does.
        initial_labels: size of the seeded random initial labeled set, drawn
            when the run directory has no labels yet (simulation only).
        oracle: simulation mode: labels of selected images come from the
            pool's ``label`` column and join the next cycle's labeled set.
        ray_address: Ray cluster address; None starts a local Ray (or uses
            ``RAY_ADDRESS`` when it is set).
        lease_ttl_s: seconds the run directory's lease lives without renewal;
            a crashed job's lease is taken over after this long.
    """

    run_dir: str = "runs/mnist-demo"
    seed: int = 0
    cycles: int | None = 1
    initial_labels: int = 1_000
    oracle: bool = False
    ray_address: str | None = None
    lease_ttl_s: float = 600.0
    pool: PoolConfig = field(default_factory=PoolConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)

    def __post_init__(self) -> None:
        validate(self)


def validate(config: Config) -> None:
    """Check values that the types alone do not constrain.

    Raises:
        ConfigError: on the first invalid value, naming its key.
    """
    train = config.train
    _require(config.cycles is None or config.cycles >= 1, "cycles", config.cycles, "an integer >= 1, or null for one new cycle")
    _require(config.labels.wait in ("all", "fraction", "proceed"), "labels.wait", config.labels.wait, "one of all, fraction, proceed")
    _require(0.0 <= config.labels.min_fraction <= 1.0, "labels.min_fraction", config.labels.min_fraction, "a fraction between 0 and 1")
    _require(config.lease_ttl_s >= 10, "lease_ttl_s", config.lease_ttl_s, "a number of seconds >= 10")
    _require(config.initial_labels >= 0, "initial_labels", config.initial_labels, "an integer >= 0")
    _require(train.epochs >= 1, "train.epochs", train.epochs, "an integer >= 1")
    _require(train.num_workers >= 1, "train.num_workers", train.num_workers, "an integer >= 1")
    _require(train.checkpoint_every >= 1, "train.checkpoint_every", train.checkpoint_every, "an integer >= 1")
    _require(train.in_memory_mb >= 0, "train.in_memory_mb", train.in_memory_mb, "a number of MB >= 0 (0 streams every epoch)")
    _require(train.cpus_per_worker > 0, "train.cpus_per_worker", train.cpus_per_worker, "a number > 0")
    local_batch, remainder = divmod(train.batch_size, train.num_workers)
    _require(
        remainder == 0 and local_batch >= 2 and local_batch % 2 == 0,
        "train.batch_size",
        train.batch_size,
        f"a multiple of 2 x train.num_workers ({2 * train.num_workers}), so every "
        "worker's local batch is even for the ranking-loss pairs",
    )
    _require(train.lr > 0, "train.lr", train.lr, "a number > 0")
    _require(train.margin >= 0, "train.margin", train.margin, "a number >= 0")
    _require(train.loss_weight >= 0, "train.loss_weight", train.loss_weight, "a number >= 0")
    _require(
        0 <= train.gradient_stop_epoch,
        "train.gradient_stop_epoch",
        train.gradient_stop_epoch,
        "an integer >= 0 (use a value >= train.epochs to never stop the gradient)",
    )
    _require(
        list(train.milestones) == sorted(train.milestones),
        "train.milestones",
        train.milestones,
        "epochs in increasing order",
    )
    _require(config.model.width >= 1, "model.width", config.model.width, "an integer >= 1")
    _require(config.model.arch == "resnet18", "model.arch", config.model.arch, "'resnet18'")
    score = config.score
    _require(
        score.subset_size is None or score.subset_size >= 1,
        "score.subset_size",
        score.subset_size,
        "an integer >= 1, or null to score the whole unlabeled pool",
    )
    _require(score.batch_size >= 1, "score.batch_size", score.batch_size, "an integer >= 1")
    _require(score.num_actors >= 1, "score.num_actors", score.num_actors, "an integer >= 1")
    _require(
        0.0 <= score.max_skip_fraction <= 1.0,
        "score.max_skip_fraction",
        score.max_skip_fraction,
        "a fraction between 0 and 1",
    )
    _require(config.select.k >= 1, "select.k", config.select.k, "an integer >= 1")
    _require(config.select.strategy in STRATEGIES, "select.strategy", config.select.strategy, "one of " + ", ".join(STRATEGIES))
    _require(
        config.select.strategy != "coreset" or score.subset_size is not None,
        "score.subset_size",
        score.subset_size,
        "an integer for select.strategy=coreset, which holds every candidate's features in memory",
    )


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid configuration value {key}={value!r}: expected {expected}.")


def load(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the configuration from an optional YAML file and ``key=value`` overrides.

    Overrides use dotted keys (``train.epochs=5``) and YAML values
    (``score.subset_size=null``, ``train.milestones=[30,40]``); they win over
    the file.

    Raises:
        ConfigError: for an unreadable file, an unknown key or a wrong type.
    """
    data, source = read_mapping(path, overrides)
    return from_dict(data, source=source)


def read_mapping(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """Read a YAML mapping and apply dotted ``key=value`` overrides; return it and a description of its source.

    Raises:
        ConfigError: for an unreadable file, a file that is not a mapping, or a malformed override.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except OSError as err:
            raise ConfigError(f"Cannot read configuration file {path}: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"Configuration file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"Configuration file {path} must hold a mapping of keys to values, "
                f"got {type(loaded).__name__}."
            )
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Invalid override {item!r}: expected KEY=VALUE, a dotted key and a YAML value (see --help for an example).")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    source = path or "defaults"
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return data, source


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Invalid override {dotted!r}: {part!r} is not a section.")
        node = child
    node[parts[-1]] = value


def from_dict(data: Mapping[str, Any], source: str = "mapping") -> Config:
    """Build a Config from a nested mapping, rejecting unknown keys and wrong types."""
    return _build(Config, data, prefix="", source=source)


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: section {prefix.rstrip('.') or '(top)'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + key for key in unknown)
        valid = ", ".join(prefix + key for key in fields)
        raise ConfigError(f"{source}: unknown configuration key(s) {names}. Valid keys here: {valid}.")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=key + ".", source=source)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}.")
        return tuple(_coerce(args[0], item, key, source) for item in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}.")
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, hint)):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}.")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}.")
    return value


def to_dict(config: Config) -> dict[str, Any]:
    """Return the configuration as plain data (tuples become lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(config))


def dump_yaml(config: Config) -> str:
    """Serialise the resolved configuration as YAML text."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
