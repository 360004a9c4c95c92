"""Scoring: stream the unlabeled pool through actors that predict each image's loss.

Pipeline (Ray Data): read shards -> keep candidates (unlabeled, optionally a
seeded random subset) -> decode in CPU tasks -> predict loss in an actor pool
(one GPU per actor when CUDA is present) -> the driver streams the
``(id, predicted_loss)`` rows into score files. Every score carries its id;
positions in a batch are never used to attach a score to a sample.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distal.config import ScoreConfig
from distal.datasets import decode_rows, drop_ids, keep_ids, read_pool
from distal.pool import PoolInfo, open_fs
from distal.progress import Progress
from distal.rundir import RunDirectory, SCORES_MARKER, write_bytes_atomic, write_json_atomic
from distal.selection import StreamingTopK

log = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("predicted_loss", pa.float64()),
        ("shard", pa.string()),
        ("skip_reason", pa.string()),
        ("conversion", pa.string()),
    ]
)


class ScoringError(RuntimeError):
    """Scoring failed in a way the user must act on (too many undecodable images)."""


@dataclass
class Candidates:
    """The rows to score this cycle.

    Attributes:
        ids: candidate ids when a subset is drawn; None means every unlabeled row.
        pool_rows: rows in the pool.
        labeled_in_pool: labeled ids found in the pool (excluded).
        unlabeled: rows left after excluding labeled ids.
        count: rows to score.
    """

    ids: pa.Array | None
    pool_rows: int
    labeled_in_pool: int
    unlabeled: int
    count: int


@dataclass
class ScoreSummary:
    """What a scoring pass read and wrote."""

    files: list[str]
    scored: int
    skipped: list[tuple[str, str, str]]  # (id, shard, reason)
    conversions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    score_stats: dict[str, float] = field(default_factory=dict)


def hash_ids(ids: pa.Array | list[str], seed: int) -> np.ndarray:
    """Return a seeded uint64 hash per id; the same id and seed always give the same value."""
    key = f"distal{seed:010d}"[-16:]
    values = np.asarray(ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids, dtype=object)
    return pd.util.hash_array(values, hash_key=key, categorize=False)


def choose_candidates(info: PoolInfo, labeled_ids: pa.Array, subset_size: int | None, seed: int) -> Candidates:
    """Find this cycle's candidates by streaming the pool's id column shard by shard.

    The random subset is the ``subset_size`` unlabeled ids with the smallest
    seeded hash: exact in size, reproducible for a seed, and independent of
    shard order, with memory bounded by the subset size.
    """
    pool_rows = 0
    unlabeled = 0
    sampler = StreamingTopK(subset_size) if subset_size is not None else None
    for shard in info.shards:
        fs, path = open_fs(shard)
        with fs.open(path, "rb") as handle:
            ids = pq.read_table(handle, columns=["id"]).column("id").combine_chunks()
        pool_rows += len(ids)
        ids = ids.filter(pc.invert(pc.is_in(ids, value_set=labeled_ids)))
        unlabeled += len(ids)
        if sampler is not None and len(ids):
            # Smallest hash first: rank by the negated hash.
            sampler.update(ids.to_numpy(zero_copy_only=False), -hash_ids(ids, seed).astype(np.float64))
    labeled_in_pool = pool_rows - unlabeled
    if sampler is None:
        return Candidates(None, pool_rows, labeled_in_pool, unlabeled, unlabeled)
    chosen = pa.array(sampler.result()[0].tolist(), pa.string())
    return Candidates(chosen, pool_rows, labeled_in_pool, unlabeled, len(chosen))


class LossScorer:
    """Ray Data actor: predicts the loss of each decoded image with the trained loss module."""

    def __init__(self, checkpoint_uri: str, use_gpu: bool) -> None:
        import torch

        from distal.train import load_checkpoint

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.task, self.learner, _ = load_checkpoint(checkpoint_uri, self.device)
        if self.device.type == "cuda":
            self.learner = self.learner.to(memory_format=torch.channels_last)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from distal.train_step import normalize

        ok = batch["skip_reason"] == ""
        predicted = np.full(len(ok), np.nan)
        if ok.any():
            with torch.inference_mode():
                images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).to(self.device)  # [n_ok, C, H, W]
                _, loss = self.learner(normalize(images), detach_features=True)  # [n_ok]
                predicted[ok] = loss.float().cpu().numpy()
        return pa.table(
            {
                "id": pa.array(batch["id"].tolist(), pa.string()),
                "predicted_loss": pa.array(predicted, pa.float64(), mask=~ok),
                "shard": pa.array(batch["shard"].tolist(), pa.string()),
                "skip_reason": pa.array([reason or None for reason in batch["skip_reason"].tolist()], pa.string()),
                "conversion": pa.array([note or None for note in batch["conversion"].tolist()], pa.string()),
            },
            schema=SCORE_SCHEMA,
        )


def score_pool(
    info: PoolInfo,
    candidates: Candidates,
    labeled_ids: pa.Array,
    checkpoint_uri: str,
    run: RunDirectory,
    cycle: int,
    config: ScoreConfig,
    rows_per_file: int = 100_000,
) -> ScoreSummary:
    """Score the candidates and write ``scores/part-*.parquet`` and the scores marker.

    Raises:
        ScoringError: when more than ``config.max_skip_fraction`` of the
            candidates cannot be decoded.
    """
    import ray.data

    from distal.train import resolve_use_gpu

    start = time.monotonic()
    use_gpu = resolve_use_gpu(config.use_gpu)
    dataset = read_pool(info, ["id", "image"])
    if candidates.ids is not None:
        dataset = dataset.map_batches(keep_ids, batch_format="pyarrow", fn_kwargs={"ids": candidates.ids})
    else:
        dataset = dataset.map_batches(drop_ids, batch_format="pyarrow", fn_kwargs={"ids": labeled_ids})
    dataset = dataset.map_batches(
        decode_rows,
        batch_format="pyarrow",
        fn_kwargs={"channels": info.channels, "image_size": tuple(info.image_size)},
    )
    dataset = dataset.map_batches(
        LossScorer,
        batch_format="numpy",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "use_gpu": use_gpu},
    )

    progress = Progress(log, "score", total=candidates.count)
    writer = _ScoreFileWriter(run, cycle, rows_per_file)
    skipped: list[tuple[str, str, str]] = []
    conversions: Counter[str] = Counter()
    scores_seen = []
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add(table)
        reasons = table.column("skip_reason")
        bad = table.filter(pc.is_valid(reasons))
        for row in bad.select(["id", "shard", "skip_reason"]).to_pylist():
            skipped.append((row["id"], row["shard"], row["skip_reason"]))
            if len(skipped) <= 5:
                log.warning(
                    "stage=score skipped id=%s shard=%s reason=%s: the image cannot be decoded; "
                    "fix or remove it in the pool (it is recorded in this cycle's skipped.parquet)",
                    row["id"], row["shard"], row["skip_reason"],
                )
        _count_conversions(table, conversions)
        values = table.column("predicted_loss").drop_null().to_numpy()
        scores_seen.append(_summarize_chunk(values))
        progress.update(table.num_rows - bad.num_rows, skipped=bad.num_rows)
    files = writer.close()
    scored = progress.done
    seconds = progress.finish()

    total = scored + len(skipped)
    if total and len(skipped) / total > config.max_skip_fraction:
        raise ScoringError(
            f"{len(skipped)} of {total} candidate images could not be decoded "
            f"({len(skipped) / total:.2%}, above score.max_skip_fraction={config.max_skip_fraction}). "
            f"First: id={skipped[0][0]} shard={skipped[0][1]} reason={skipped[0][2]}. "
            "Fix or remove these images in the pool, or raise score.max_skip_fraction."
        )
    write_json_atomic(run.fs, run.cycle_path(cycle, "scores", SCORES_MARKER), {"files": files, "scored": scored, "skipped": len(skipped)})
    return ScoreSummary(files, scored, skipped, dict(conversions), time.monotonic() - start, _merge_stats(scores_seen))


def _count_conversions(table: pa.Table, conversions: Counter) -> None:
    notes = table.column("conversion")
    if notes.null_count == len(notes):
        return
    converted = table.filter(pc.is_valid(notes)).select(["id", "shard", "conversion"]).to_pylist()
    for row in converted:
        if conversions[row["conversion"]] == 0:
            log.warning(
                "stage=score converted id=%s shard=%s conversion=%s: images in this pool differ in mode or size; "
                "they are converted for the model. Re-import the pool with one mode and size to avoid this.",
                row["id"], row["shard"], row["conversion"],
            )
        conversions[row["conversion"]] += 1


def _summarize_chunk(values: np.ndarray) -> tuple[int, float, float, float, float]:
    if len(values) == 0:
        return (0, 0.0, 0.0, np.inf, -np.inf)
    return (len(values), float(values.sum()), float((values**2).sum()), float(values.min()), float(values.max()))


def _merge_stats(chunks: list[tuple[int, float, float, float, float]]) -> dict[str, float]:
    count = sum(chunk[0] for chunk in chunks)
    if count == 0:
        return {"count": 0}
    total = sum(chunk[1] for chunk in chunks)
    squares = sum(chunk[2] for chunk in chunks)
    mean = total / count
    return {
        "count": count,
        "mean": mean,
        "std": float(np.sqrt(max(squares / count - mean**2, 0.0))),
        "min": min(chunk[3] for chunk in chunks),
        "max": max(chunk[4] for chunk in chunks),
    }


class _ScoreFileWriter:
    """Buffer score rows and write them as atomic Parquet files of at most ``rows_per_file`` rows."""

    def __init__(self, run: RunDirectory, cycle: int, rows_per_file: int) -> None:
        self.run = run
        self.cycle = cycle
        self.rows_per_file = rows_per_file
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[str] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_file:
            self._flush()

    def close(self) -> list[str]:
        if self.pending_rows or not self.files:
            self._flush()
        return self.files

    def _flush(self) -> None:
        table = pa.concat_tables(self.pending) if self.pending else SCORE_SCHEMA.empty_table()
        name = f"part-{len(self.files):05d}.parquet"
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        write_bytes_atomic(self.run.fs, self.run.cycle_path(self.cycle, "scores", name), buffer.getvalue())
        self.files.append(self.run.cycle_path(self.cycle, "scores", name))
        self.pending, self.pending_rows = [], 0
