"""Experiments: strategies x trials x cycles from one YAML file, a tidy results table and plots.

Every (strategy, trial) pair is one simulated run directory under
``<out_dir>/runs/<strategy>/trial-<n>``, run by the same cycle code as a
nightly job (``distal.cycle.run``) with oracle labels. Trial ``n`` uses run
seed ``seed + n`` for every strategy, so all strategies of a trial start from
the same initial labeled set and differ only in what they select. A rerun
skips runs whose cycles are all complete and finishes the others.

Outputs in ``out_dir``: ``experiment.yaml`` (the resolved configuration),
``results.parquet`` and ``results.csv`` (one row per strategy, trial and
cycle), ``summary.md`` (mean and min-max per cycle), ``accuracy.png`` and
``ranking_accuracy.png``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from distal import config as config_module
from distal.acquisition import STRATEGIES
from distal.config import Config, ConfigError
from distal.rundir import RunDirectory, read_json, write_bytes_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

# Keys of the shared cycle configuration that the experiment sets per run.
_SET_PER_RUN = {"run_dir": "out_dir", "seed": "seed", "oracle": None, "select.strategy": "strategies"}

RESULT_COLUMNS = [
    ("strategy", pa.string()),
    ("trial", pa.int64()),
    ("seed", pa.int64()),
    ("cycle", pa.int64()),
    ("labeled", pa.int64()),
    ("eval_accuracy", pa.float64()),
    ("ranking_accuracy", pa.float64()),
    ("target_loss", pa.float64()),
    ("train_s", pa.float64()),
    ("score_s", pa.float64()),
    ("select_s", pa.float64()),
    ("cycle_s", pa.float64()),
]


@dataclass(frozen=True)
class ExperimentConfig:
    """An experiment: which strategies, how many trials, and the cycle configuration they share.

    Attributes:
        name: a label for logs, tables and plot titles.
        out_dir: URI of the experiment folder (local path or ``s3://...``).
        strategies: acquisition strategies to compare; see ``distal.acquisition``.
        trials: trials per strategy; trial n uses run seed ``seed + n``.
        seed: seed of trial 0.
        run: the cycle configuration every run shares (same keys as
            ``distal cycle``). ``run_dir``, ``seed``, ``oracle`` and
            ``select.strategy`` are set per run and must not be given.
    """

    name: str = "experiment"
    out_dir: str = "experiments/default"
    strategies: tuple[str, ...] = ("learning_loss", "random", "entropy", "coreset")
    trials: int = 3
    seed: int = 0
    run: Config = field(default_factory=lambda: Config(oracle=True, cycles=10))

    def __post_init__(self) -> None:
        unknown = [name for name in self.strategies if name not in STRATEGIES]
        if unknown or not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(
                f"Invalid configuration value strategies={list(self.strategies)!r}: expected distinct names "
                f"from {', '.join(STRATEGIES)}."
            )
        if self.trials < 1:
            raise ConfigError(f"Invalid configuration value trials={self.trials!r}: expected an integer >= 1.")
        if self.run.cycles is None:
            raise ConfigError("Invalid configuration value run.cycles=None: an experiment needs a fixed number of cycles.")
        for strategy in self.strategies:
            run_config(self, strategy, 0)  # each strategy's run configuration must be valid before any run starts


def load(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Build an experiment configuration from a YAML file and dotted overrides (``run.train.epochs=5``).

    Raises:
        ConfigError: for unknown keys, wrong types, or run keys the experiment sets itself.
    """
    data, source = config_module.read_mapping(path, overrides)
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise ConfigError(f"{source}: section run must be a mapping of cycle settings, got {run!r}.")
    for dotted, owner in _SET_PER_RUN.items():
        section, _, key = dotted.rpartition(".")
        holder = run.get(section, {}) if section else run
        if isinstance(holder, dict) and key in holder:
            hint = f"set {owner} at the top level instead" if owner else "experiments always simulate labeling"
            raise ConfigError(f"{source}: run.{dotted} is set per run by the experiment; remove it ({hint}).")
    data = {**data, "run": {**run, "oracle": True}}
    return config_module._build(ExperimentConfig, data, prefix="", source=source)


def run_config(experiment: ExperimentConfig, strategy: str, trial: int) -> Config:
    """Return the cycle configuration of one (strategy, trial) run."""
    base = experiment.run
    return dataclasses.replace(
        base,
        run_dir=f"{experiment.out_dir.rstrip('/')}/runs/{strategy}/trial-{trial}",
        seed=experiment.seed + trial,
        oracle=True,
        select=dataclasses.replace(base.select, strategy=strategy),
    )


def run_experiment(experiment: ExperimentConfig, report_only: bool = False) -> pa.Table:
    """Run every unfinished (strategy, trial), then write the results table, summary and plots.

    Runs go trial by trial, so partial results stay balanced across
    strategies; the table and plots are rewritten after each run.

    Args:
        experiment: the resolved experiment.
        report_only: write the table, summary and plots from the runs found,
            without running anything.

    Returns:
        The results table.
    """
    from distal import cycle

    if not report_only:
        _check_pools(run_config(experiment, experiment.strategies[0], 0))
    out = RunDirectory(experiment.out_dir)
    write_bytes_atomic(out.fs, out.path("experiment.yaml"), _dump_yaml(experiment).encode())
    total = experiment.trials * len(experiment.strategies)
    done = 0
    start = time.monotonic()
    for trial in range(experiment.trials):
        for strategy in experiment.strategies:
            config = run_config(experiment, strategy, trial)
            if not report_only and not _finished(config):
                log.info("stage=experiment run=%s/trial-%d action=run seed=%d", strategy, trial, config.seed)
                cycle.run(config)
            done += 1
            elapsed = time.monotonic() - start
            log.info("stage=experiment runs=%d/%d elapsed=%.0fs last=%s/trial-%d", done, total, elapsed, strategy, trial)
            if not report_only:
                write_report(experiment, collect_results(experiment))
    table = collect_results(experiment)
    write_report(experiment, table)
    print(format_summary(table, experiment), flush=True)
    return table


def _check_pools(config: Config) -> None:
    """Raise PoolError before anything is written when the pool or the held-out set is missing."""
    from distal.pool import read_pool_info

    for uri in (config.pool.path, config.pool.eval_path):
        if uri is not None:
            read_pool_info(uri)


def _finished(config: Config) -> bool:
    run_dir = RunDirectory(config.run_dir)
    if not run_dir.fs.exists(run_dir.root):
        return False
    completed = set(run_dir.completed_cycles())
    if not set(range(1, config.cycles + 1)) <= completed:
        return False
    from distal.cycle import _warn_settings_differ

    manifest = read_json(run_dir.fs, run_dir.cycle_path(config.cycles, "manifest.json"))
    _warn_settings_differ(config, manifest, config.cycles)
    log.info("stage=experiment run=%s action=skip reason=complete", config.run_dir)
    return True


def collect_results(experiment: ExperimentConfig) -> pa.Table:
    """Read the manifests of every completed cycle of every run into one tidy table."""
    rows: list[dict[str, Any]] = []
    for trial in range(experiment.trials):
        for strategy in experiment.strategies:
            config = run_config(experiment, strategy, trial)
            run_dir = RunDirectory(config.run_dir)
            if not run_dir.fs.exists(run_dir.root):
                continue
            for number in sorted(run_dir.completed_cycles()):
                if number > config.cycles:
                    continue
                manifest = read_json(run_dir.fs, run_dir.cycle_path(number, "manifest.json"))
                rows.append(result_row(strategy, trial, manifest))
    columns = {name: pa.array([row[name] for row in rows], kind) for name, kind in RESULT_COLUMNS}
    return pa.table(columns)


def result_row(strategy: str, trial: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """Return one results row from a cycle manifest."""
    metrics, timings = manifest["metrics"], manifest["timings"]
    return {
        "strategy": strategy,
        "trial": trial,
        "seed": manifest["run_seed"],
        "cycle": manifest["cycle"],
        "labeled": manifest["counts"]["labeled"],
        "eval_accuracy": metrics.get("eval_accuracy"),
        "ranking_accuracy": metrics.get("ranking_accuracy"),
        "target_loss": metrics.get("target_loss"),
        "train_s": timings.get("train_s"),
        "score_s": timings.get("score_s"),
        "select_s": timings.get("select_s"),
        "cycle_s": float(sum(timings.get(key, 0.0) for key in ("train_s", "candidates_s", "score_s", "select_s"))),
    }


def aggregate(table: pa.Table, column: str) -> dict[str, list[tuple[int, int, float, float, float, int]]]:
    """Return per strategy, per cycle: (cycle, labeled, mean, min, max, trials) of a column, nulls left out."""
    result: dict[str, list[tuple[int, int, float, float, float, int]]] = {}
    rows = table.to_pylist()
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        lines = []
        for number in sorted({row["cycle"] for row in rows if row["strategy"] == strategy}):
            chosen = [row for row in rows if row["strategy"] == strategy and row["cycle"] == number]
            values = np.array([row[column] for row in chosen if row[column] is not None], dtype=np.float64)
            if len(values) == 0:
                continue
            labeled = int(round(np.mean([row["labeled"] for row in chosen])))
            lines.append((number, labeled, float(values.mean()), float(values.min()), float(values.max()), len(values)))
        if lines:
            result[strategy] = lines
    return result


def format_summary(table: pa.Table, experiment: ExperimentConfig) -> str:
    """Return Markdown tables: accuracy, ranking accuracy and wall time per cycle, mean (min-max) over trials."""
    runs = len({(row["strategy"], row["trial"]) for row in table.select(["strategy", "trial"]).to_pylist()})
    sections = [f"# {experiment.name}: {runs} runs, {table.num_rows} cycles in all, from {experiment.out_dir}\n"]
    for title, column, scale, digits in (
        ("Held-out accuracy (%), mean (min-max) over trials", "eval_accuracy", 100.0, 2),
        ("Loss-prediction ranking accuracy, mean (min-max)", "ranking_accuracy", 1.0, 3),
        ("Wall time per cycle (s), mean (min-max)", "cycle_s", 1.0, 0),
    ):
        stats = aggregate(table, column)
        if not stats:
            continue
        cycles = sorted({line[0] for lines in stats.values() for line in lines})
        labeled = {line[0]: line[1] for lines in stats.values() for line in lines}
        header = "| strategy | trials | " + " | ".join(f"cycle {c} ({labeled[c]})" for c in cycles) + " |"
        lines = [f"## {title}\n", header, "|---" * (len(cycles) + 2) + "|"]
        for strategy, entries in stats.items():
            by_cycle = {entry[0]: entry for entry in entries}
            cells = []
            for number in cycles:
                entry = by_cycle.get(number)
                cells.append("" if entry is None else f"{entry[2] * scale:.{digits}f} ({entry[3] * scale:.{digits}f}-{entry[4] * scale:.{digits}f})")
            trials = max(entry[5] for entry in entries)
            lines.append(f"| {strategy} | {trials} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines) + "\n")
    sections.append("Column headings give the cycle and, in brackets, the labeled images it trained on.\n")
    return "\n".join(sections)


def write_report(experiment: ExperimentConfig, table: pa.Table) -> None:
    """Write results.parquet, results.csv, summary.md and the two plots into the experiment folder."""
    out = RunDirectory(experiment.out_dir)
    write_parquet_atomic(out.fs, out.path("results.parquet"), table)
    buffer = io.BytesIO()
    pa_csv.write_csv(table, buffer)
    write_bytes_atomic(out.fs, out.path("results.csv"), buffer.getvalue())
    write_bytes_atomic(out.fs, out.path("summary.md"), format_summary(table, experiment).encode())
    if table.num_rows:
        write_bytes_atomic(out.fs, out.path("accuracy.png"), plot_accuracy(table, experiment.name))
        ranking = plot_ranking_accuracy(table, experiment.name)
        if ranking is not None:
            write_bytes_atomic(out.fs, out.path("ranking_accuracy.png"), ranking)


def plot_accuracy(table: pa.Table, name: str) -> bytes:
    """Return a PNG of held-out accuracy against labeled images: mean line and min-max band per strategy."""
    figure, axes = _figure()
    for strategy, entries in aggregate(table, "eval_accuracy").items():
        labeled = [entry[1] for entry in entries]
        mean = [100 * entry[2] for entry in entries]
        trials = max(entry[5] for entry in entries)
        axes.plot(labeled, mean, marker="o", markersize=3, label=f"{strategy} ({trials} trial{'s' if trials > 1 else ''})")
        axes.fill_between(labeled, [100 * entry[3] for entry in entries], [100 * entry[4] for entry in entries], alpha=0.2)
    axes.set_xlabel("labeled images")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_title(f"{name}: accuracy, mean and min-max over trials")
    return _png(figure, axes)


def plot_ranking_accuracy(table: pa.Table, name: str) -> bytes | None:
    """Return a PNG of loss-prediction ranking accuracy per cycle, or None when no run measured it."""
    stats = aggregate(table, "ranking_accuracy")
    if not stats:
        return None
    figure, axes = _figure()
    from matplotlib.ticker import MaxNLocator

    for strategy, entries in stats.items():
        cycles = [entry[0] for entry in entries]
        axes.plot(cycles, [entry[2] for entry in entries], marker="o", markersize=3, label=strategy)
        axes.fill_between(cycles, [entry[3] for entry in entries], [entry[4] for entry in entries], alpha=0.2)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="chance")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("cycle")
    axes.set_ylabel("ranking accuracy over held-out pairs")
    axes.set_title(f"{name}: loss-prediction ranking accuracy")
    return _png(figure, axes)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(figsize=(7, 4.5), dpi=110)


def _png(figure, axes) -> bytes:
    from matplotlib import pyplot

    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def _dump_yaml(experiment: ExperimentConfig) -> str:
    import yaml

    data = config_module.to_dict(experiment)  # dataclasses.asdict works on any dataclass
    for key in ("run_dir", "seed", "oracle"):
        data["run"].pop(key, None)
    data["run"]["select"].pop("strategy", None)
    return yaml.safe_dump(data, sort_keys=False)
