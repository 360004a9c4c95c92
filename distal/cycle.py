"""One active-learning cycle, end to end: train, score, select, write the manifest.

A run directory contains cycles ``1..config.cycles``. Running the job again is
safe: completed cycles (those with a completion marker) are left untouched
and reported, and an incomplete cycle resumes from its last finished step.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import distal
from distal import config as config_module
from distal import failpoints
from distal.config import Config
from distal.datasets import keep_ids
from distal.labels import INITIAL_FILE, LABELS_SCHEMA, current_labels, label_files, pending_labels
from distal.lease import RunLease
from distal.pool import PoolInfo, open_fs, validate_pool
from distal.rundir import RunDirectory, read_json, read_parquet, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from distal.acquisition import uses_loss_module
from distal.score import choose_candidates, labeled_features, score_pool
from distal.selection import Selection, select_coreset, select_from_score_files
from distal.train import publish_model, train

log = logging.getLogger(__name__)

START_FILE = "start.json"
TRAIN_RECORD = "train.json"
MODEL_FILE = "model.pt"
SELECTION_RECORD = "selection.json"


class CycleError(RuntimeError):
    """A cycle cannot run or produced an inconsistent result; the message states what to do."""


def cycle_seed(seed: int, cycle: int) -> int:
    """Derive a cycle's seed from the run seed and the cycle number."""
    return int(np.random.SeedSequence([seed, cycle]).generate_state(1)[0])


@dataclass(frozen=True)
class CycleRecord:
    """The summary of one completed cycle, as read back from its manifest."""

    cycle: int
    manifest: dict[str, Any]

    @property
    def eval_accuracy(self) -> float | None:
        return self.manifest["metrics"].get("eval_accuracy")


def run(config: Config) -> list[CycleRecord]:
    """Run every cycle of the run directory that is not complete yet; return all cycles' records."""
    pool = validate_pool(config.pool.path, require_label=config.oracle)
    eval_pool = validate_pool(config.pool.eval_path, require_label=True) if config.pool.eval_path else None
    _warn_schedule(config)
    init_ray(config.ray_address)
    run_dir = RunDirectory(config.run_dir)
    with RunLease(run_dir, ttl_s=config.lease_ttl_s) as lease:
        write_bytes_atomic(run_dir.fs, run_dir.path("config.yaml"), config_module.dump_yaml(config).encode())
        log.info("stage=start run_dir=%s pool=%s pool_rows=%d cycles=%s", config.run_dir, config.pool.path, pool.num_rows, config.cycles)
        _ensure_initial_labels(config, pool, run_dir)
        last = _last_cycle_to_run(config, run_dir)
        records = []
        for cycle in range(1, last + 1):
            if run_dir.is_complete(cycle):
                manifest = read_json(run_dir.fs, run_dir.cycle_path(cycle, "manifest.json"))
                log.info("stage=cycle cycle=%d state=complete action=skip", cycle)
                _warn_settings_differ(config, manifest, cycle)
            else:
                _check_lease(lease, cycle)
                manifest = run_cycle(config, pool, eval_pool, run_dir, cycle)
            records.append(CycleRecord(cycle, manifest))
    print(format_summary(records), flush=True)
    return records


def _warn_schedule(config: Config) -> None:
    """Warn about schedule settings that silently never take effect."""
    train_config = config.train
    late = [epoch for epoch in train_config.milestones if epoch >= train_config.epochs]
    if late:
        log.warning(
            "train.milestones=%s include epochs >= train.epochs=%d: the learning rate never drops there. "
            "Scale the milestones with the epochs.", list(train_config.milestones), train_config.epochs,
        )
    if train_config.gradient_stop_epoch >= train_config.epochs:
        log.warning(
            "train.gradient_stop_epoch=%d >= train.epochs=%d: the loss module keeps moving the backbone in every "
            "epoch. The paper stops it after 60%% of the epochs.", train_config.gradient_stop_epoch, train_config.epochs,
        )


def _warn_settings_differ(config: Config, manifest: dict[str, Any], cycle: int) -> None:
    before = _cycle_settings(manifest["config"])
    now = _cycle_settings(config_module.to_dict(config))
    changed = sorted(_changed_keys(before, now))
    if changed:
        log.warning(
            "stage=cycle cycle=%d ran with other settings (%s); completed cycles are kept as they are. "
            "Use a new run_dir to run with the new settings.", cycle, ", ".join(changed),
        )


def _changed_keys(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            keys += _changed_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            keys.append(f"{prefix}{key}")
    return keys


def _last_cycle_to_run(config: Config, run_dir: RunDirectory) -> int:
    """Return the last cycle this job runs; new cycles stop where labels are still missing."""
    last_complete = max(run_dir.completed_cycles(), default=0)
    target = config.cycles if config.cycles is not None else last_complete + 1
    for cycle in range(last_complete + 1, target + 1):
        if cycle == 1 or config.oracle or run_dir.fs.exists(run_dir.cycle_path(cycle, START_FILE)):
            continue
        if cycle > last_complete + 1:
            # The previous selection is made by this very job, so people cannot have labeled it yet.
            return cycle - 1
        if not _labels_ready(config, run_dir, cycle - 1):
            return cycle - 1
    return target


def _labels_ready(config: Config, run_dir: RunDirectory, previous: int) -> bool:
    """Apply the waiting policy to the labels of the previous cycle's selection."""
    if config.labels.wait == "proceed":
        return True
    selected, labeled = pending_labels(run_dir.uri, previous)
    needed = selected if config.labels.wait == "all" else int(np.ceil(config.labels.min_fraction * selected))
    ready = labeled >= needed
    log.info(
        "stage=labels cycle=%d waits_for=cycle-%d labeled=%d/%d needed=%d policy=%s ready=%s",
        previous + 1, previous, labeled, selected, needed, config.labels.wait, ready,
    )
    if not ready:
        print(
            f"Nothing to do: cycle {previous + 1} waits for labels of cycle {previous}'s selection "
            f"({labeled} of {selected} labeled, {needed} needed under labels.wait={config.labels.wait}). "
            f"Import them with: distal labels import {config.run_dir} FILE",
            flush=True,
        )
    return ready


def _check_lease(lease: RunLease, cycle: int) -> None:
    if lease.lost:
        raise CycleError(
            f"The lease of {lease.run.uri} was taken by another job before cycle {cycle}; stopping so two jobs "
            "never write one run directory. Raise lease_ttl_s if this job was only slow."
        )


def labeled_set(run_dir: RunDirectory, cycle: int) -> pa.Table:
    """Return the labels a cycle starts from (as recorded in its ``start.json`` once it has started)."""
    start_path = run_dir.cycle_path(cycle, START_FILE)
    if run_dir.fs.exists(start_path):
        files = read_json(run_dir.fs, start_path)["label_files"]
    else:
        files = label_files(run_dir.uri, before_cycle=cycle)
    return current_labels(run_dir.uri, files=files)


def _start_cycle(config: Config, run_dir: RunDirectory, cycle: int) -> dict[str, Any]:
    """Return the cycle's start record, writing it first when the cycle is new.

    An incomplete cycle started with the same configuration resumes; one
    started with another configuration is deleted and started again.
    """
    path = run_dir.cycle_path(cycle, START_FILE)
    resolved = config_module.to_dict(config)
    if run_dir.fs.exists(path):
        start = read_json(run_dir.fs, path)
        if _cycle_settings(start["config"]) == _cycle_settings(resolved):
            start["state"] = "resume"
            return start
        log.warning("stage=cycle cycle=%d action=restart reason=config_changed", cycle)
    run_dir.reset_cycle(cycle)
    write_bytes_atomic(run_dir.fs, run_dir.cycle_path(cycle, "config.yaml"), config_module.dump_yaml(config).encode())
    start = {
        "cycle": cycle,
        "seed": cycle_seed(config.seed, cycle),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label_files": label_files(run_dir.uri, before_cycle=cycle),
        "config": resolved,
    }
    write_json_atomic(run_dir.fs, path, start)
    start["state"] = "start"
    return start


def _cycle_settings(resolved: dict[str, Any]) -> dict[str, Any]:
    """Return the settings that shape a cycle's result; the cycle count, address and lease do not."""
    return {key: value for key, value in resolved.items() if key not in ("cycles", "ray_address", "lease_ttl_s")}


def _train_step(config, pool, eval_pool, run_dir: RunDirectory, cycle: int, labels: pa.Table, seed: int) -> dict[str, Any]:
    """Train (resuming from Ray Train's last checkpoint) unless ``train.json`` marks it done."""
    record_path = run_dir.cycle_path(cycle, TRAIN_RECORD)
    if run_dir.fs.exists(record_path):
        log.info("stage=train cycle=%d action=skip reason=already_trained", cycle)
        return read_json(run_dir.fs, record_path)
    init_uri = _warm_start_model(config, run_dir, cycle)
    result = train(config, pool, labels, eval_pool, run_dir.uri_of("cycles", f"{cycle:04d}"), "train", seed, init_uri=init_uri)
    publish_model(result.checkpoint_uri, run_dir.uri_of("cycles", f"{cycle:04d}", MODEL_FILE))
    record = {
        "init": f"cycles/{cycle - 1:04d}/{MODEL_FILE}" if init_uri else "scratch",
        "loss_module": uses_loss_module(config.select.strategy),
        "metrics": result.metrics,
        "labeled_used": result.labeled_used,
        "skipped": [list(pair) for pair in result.skipped],
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
    }
    write_json_atomic(run_dir.fs, record_path, record)
    log.info("stage=train cycle=%d done seconds=%.1f %s", cycle, result.seconds, " ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    return record


def _warm_start_model(config: Config, run_dir: RunDirectory, cycle: int) -> str | None:
    """Return the previous cycle's model when ``train.warm_start`` is on, else None (train from scratch)."""
    if not config.train.warm_start or cycle == 1:
        return None
    uri = run_dir.uri_of("cycles", f"{cycle - 1:04d}", MODEL_FILE)
    if not run_dir.fs.exists(run_dir.cycle_path(cycle - 1, MODEL_FILE)):
        raise CycleError(f"train.warm_start is on, but the previous cycle's model {uri} is missing. Restore it, or set train.warm_start=false.")
    return uri


def _select_step(config: Config, pool: PoolInfo, run_dir: RunDirectory, cycle: int, seed: int, files: list[str], labeled_ids: pa.Array, model_uri: str) -> Selection:
    """Apply the configured strategy to the cycle's score files."""
    strategy = config.select.strategy
    if strategy == "coreset":
        centres = labeled_features(pool, labeled_ids, model_uri, config.score)
        return select_coreset(files, centres, config.select.k, filesystem=run_dir.fs)
    # The random strategy draws with its own seed, apart from the subset's draw.
    return select_from_score_files(files, config.select.k, filesystem=run_dir.fs, strategy=strategy, seed=seed + 1)


def run_cycle(config: Config, pool: PoolInfo, eval_pool: PoolInfo | None, run_dir: RunDirectory, cycle: int) -> dict[str, Any]:
    """Run one cycle, resuming it from its last finished step, and return its manifest.

    Steps and the files that mark them done: ``start.json`` (seed and the
    label files the cycle starts from), ``train.json`` (training finished,
    ``model.pt`` published), one score file per pool shard plus
    ``scores/_SUCCESS``, ``selected.parquet``, then ``manifest.json`` and
    ``_COMPLETE``. A rerun skips finished steps, so a selection once written
    never changes.
    """
    start = _start_cycle(config, run_dir, cycle)
    seed = start["seed"]
    timings: dict[str, float] = {}
    labels = current_labels(run_dir.uri, files=start["label_files"])
    if labels.num_rows == 0:
        raise CycleError(f"Cycle {cycle} has no labeled images. Import labels with: distal labels import {config.run_dir} FILE")
    labeled_ids = labels.column("id").combine_chunks()
    log.info("stage=cycle cycle=%d state=%s labeled=%d seed=%d", cycle, start["state"], labels.num_rows, seed)

    trained = _train_step(config, pool, eval_pool, run_dir, cycle, labels, seed)
    timings["train_s"] = trained["seconds"]
    timings["train_images_per_second"] = trained.get("images_per_second", 0.0)
    model_uri = run_dir.uri_of("cycles", f"{cycle:04d}", MODEL_FILE)

    step = time.monotonic()
    candidates = choose_candidates(pool, labeled_ids, config.score.subset_size, seed)
    timings["candidates_s"] = time.monotonic() - step
    summary = score_pool(pool, candidates, labeled_ids, model_uri, run_dir, cycle, config.score, strategy=config.select.strategy)
    timings["score_s"] = summary.seconds

    step = time.monotonic()
    selected_path = run_dir.cycle_path(cycle, "selected.parquet")
    selection_record_path = run_dir.cycle_path(cycle, SELECTION_RECORD)
    if run_dir.fs.exists(selected_path):
        selected = read_parquet(run_dir.fs, selected_path)
        selection_details = read_json(run_dir.fs, selection_record_path)
        log.info("stage=select cycle=%d action=keep reason=already_written", cycle)
    else:
        selection = _select_step(config, pool, run_dir, cycle, seed, summary.files, labeled_ids, model_uri)
        selected, selection_details = selection.table, selection.details
        _check_selection(selected, labeled_ids, cycle)
        write_json_atomic(run_dir.fs, selection_record_path, selection_details)
        skipped_table = pa.table(
            {
                "id": pa.array([row[0] for row in summary.skipped], pa.string()),
                "shard": pa.array([row[1] for row in summary.skipped], pa.string()),
                "reason": pa.array([row[2] for row in summary.skipped], pa.string()),
            }
        )
        write_parquet_atomic(run_dir.fs, run_dir.cycle_path(cycle, "skipped.parquet"), skipped_table)
        write_parquet_atomic(run_dir.fs, selected_path, selected)
        failpoints.hit("after_select")
    timings["select_s"] = time.monotonic() - step

    oracle_labels = 0
    if config.oracle:
        new_labels = oracle_lookup(pool, selected.column("id").combine_chunks(), source=f"oracle-cycle-{cycle:04d}")
        write_parquet_atomic(run_dir.fs, run_dir.path("labels", f"cycle-{cycle:04d}.parquet"), new_labels)
        oracle_labels = new_labels.num_rows

    skip_reasons = dict(sorted(Counter(row[2] for row in summary.skipped).items()))
    manifest = {
        "cycle": cycle,
        "run_dir": config.run_dir,
        "seed": seed,
        "run_seed": config.seed,
        "started_at": start["started_at"],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "config": config_module.to_dict(config),
        "pool": {"path": config.pool.path, "shards": len(pool.shards), "image_size": list(pool.image_size), "channels": pool.channels},
        "counts": {
            "pool_rows": candidates.pool_rows,
            "labeled": labels.num_rows,
            "labeled_in_pool": candidates.labeled_in_pool,
            "labeled_missing_from_pool": labels.num_rows - candidates.labeled_in_pool,
            "labeled_trained": trained["labeled_used"],
            "labeled_skipped": len(trained["skipped"]),
            "unlabeled": candidates.unlabeled,
            "candidates": candidates.count,
            "scored": summary.scored,
            "skipped": len(summary.skipped),
            "skip_reasons": skip_reasons,
            "converted": summary.conversions,
            "selected": selected.num_rows,
            "oracle_labels": oracle_labels,
        },
        "label_files": start["label_files"],
        "train": {"init": trained.get("init", "scratch"), "loss_module": trained.get("loss_module", True)},
        "selection": selection_details,
        "metrics": trained["metrics"],
        "score_stats": summary.score_stats,
        "timings": {key: round(value, 3) for key, value in timings.items()},
        "files": {
            "model": MODEL_FILE,
            "scores": ["scores/" + path.rsplit("/", 1)[-1] for path in summary.files],
            "selected": "selected.parquet",
            "selection": SELECTION_RECORD,
            "skipped": "skipped.parquet",
        },
        "selected": selected.column("id").to_pylist(),
    }
    write_json_atomic(run_dir.fs, run_dir.cycle_path(cycle, "manifest.json"), manifest)
    run_dir.mark_complete(cycle, {"cycle": cycle, "selected": selected.num_rows, "finished_at": manifest["finished_at"]})
    log.info(
        "stage=cycle cycle=%d state=complete labeled=%d scored=%d skipped=%d selected=%d eval_accuracy=%s",
        cycle, labels.num_rows, summary.scored, len(summary.skipped), selected.num_rows,
        _format_optional(trained["metrics"].get("eval_accuracy")),
    )
    return manifest


def _check_selection(selected: pa.Table, labeled_ids: pa.Array, cycle: int) -> None:
    ids = selected.column("id")
    if len(pc.unique(ids)) != len(ids):
        raise CycleError(f"Cycle {cycle} selected an id twice; the score files hold duplicate ids.")
    overlap = pc.sum(pc.is_in(ids, value_set=labeled_ids)).as_py() or 0
    if overlap:
        raise CycleError(f"Cycle {cycle} selected {overlap} already labeled ids; the score files are stale. Rerun the cycle.")
    scores = selected.column("score").to_numpy()
    if np.any(np.diff(scores) > 0):
        raise CycleError(f"Cycle {cycle}'s selection is not ordered by score descending.")


def _ensure_initial_labels(config: Config, pool: PoolInfo, run_dir: RunDirectory) -> None:
    path = run_dir.path("labels", INITIAL_FILE)
    if run_dir.fs.exists(path):
        return
    if not config.oracle:
        if label_files(run_dir.uri):
            return
        raise CycleError(
            f"The run directory {config.run_dir} has no labels yet. Import the initial labels with "
            f"'distal labels import {config.run_dir} FILE', or run with oracle=true to draw a seeded "
            "initial labeled set from the pool's label column (simulation)."
        )
    if config.initial_labels < 2:
        raise CycleError(f"initial_labels={config.initial_labels}: training needs at least 2 labeled images.")
    chosen = choose_candidates(pool, pa.array([], pa.string()), config.initial_labels, cycle_seed(config.seed, 0))
    labels = oracle_lookup(pool, chosen.ids, source="oracle-initial")
    write_parquet_atomic(run_dir.fs, path, labels)
    log.info("stage=labels initial=%d seed=%d path=%s", labels.num_rows, config.seed, path)


def oracle_lookup(pool: PoolInfo, ids: pa.Array, source: str) -> pa.Table:
    """Read the labels of ``ids`` from the pool's ``label`` column (simulation only), shard by shard."""
    found = []
    for shard in pool.shards:
        fs, path = open_fs(shard)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["id", "label"])
        found.append(keep_ids(table, ids))
    labels = pa.concat_tables(found).select(["id", "label"]).cast(pa.schema([("id", pa.string()), ("label", pa.int64())]))
    if labels.num_rows != len(ids):
        missing = set(ids.to_pylist()) - set(labels.column("id").to_pylist())
        raise CycleError(f"The pool {pool.path} has no label for {len(missing)} selected ids (first: {sorted(missing)[0]}).")
    return labels.append_column("source", pa.array([source] * labels.num_rows, pa.string())).cast(LABELS_SCHEMA)


def versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import torchvision

    return {
        "distal": distal.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _format_optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_summary(records: list[CycleRecord]) -> str:
    """Return a plain-text table with one row per cycle."""
    header = (
        f"{'cycle':>5} {'labeled':>8} {'scored':>8} {'skipped':>7} {'selected':>8} {'target_loss':>11} {'rank_loss':>9} "
        f"{'eval_acc':>8} {'rank_acc':>8} {'train_s':>8} {'score_s':>8}"
    )
    lines = [header, "-" * len(header)]
    for record in records:
        m = record.manifest
        counts, metrics, timings = m["counts"], m["metrics"], m["timings"]
        lines.append(
            f"{record.cycle:>5} {counts['labeled']:>8} {counts['scored']:>8} {counts['skipped']:>7} {counts['selected']:>8} "
            f"{metrics.get('target_loss', float('nan')):>11.4f} {metrics.get('ranking_loss', float('nan')):>9.4f} "
            f"{_format_optional(metrics.get('eval_accuracy')):>8} {_format_optional(metrics.get('ranking_accuracy')):>8} "
            f"{timings.get('train_s', 0):>8.1f} {timings.get('score_s', 0):>8.1f}"
        )
    return "\n".join(lines)


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray when neither is set."""
    import ray
    import ray.data

    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            log.info("stage=start ray=local")
            # Workers inherit this environment: Ray Data's per-dataset INFO
            # lines in them would bury distal's own progress lines.
            os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
            # "local" starts a new Ray even when a `ray start` cluster runs on
            # this machine, which plain ray.init() would join. The dashboard
            # (on 127.0.0.1) also serves the state API that Ray Train's
            # placement-group cleaner polls.
            ray.init(address="local")
        else:
            ray.init(address=address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    # distal logs each stage's progress itself; Ray Data's per-dataset INFO
    # lines would bury it.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
