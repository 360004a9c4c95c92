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

from distal import failpoints
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
        per_shard: rows to score in each pool shard, by shard file name.
    """

    ids: pa.Array | None
    pool_rows: int
    labeled_in_pool: int
    unlabeled: int
    count: int
    per_shard: dict[str, int] = field(default_factory=dict)


@dataclass
class ScoreSummary:
    """Files and counts of one scoring pass."""

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
    unlabeled_per_shard: dict[str, int] = {}
    sampler = StreamingTopK(subset_size) if subset_size is not None else None
    for shard, ids in _shard_ids(info):
        pool_rows += len(ids)
        ids = ids.filter(pc.invert(pc.is_in(ids, value_set=labeled_ids)))
        unlabeled_per_shard[shard] = len(ids)
        if sampler is not None and len(ids):
            # Smallest hash first: rank by the negated hash.
            sampler.update(ids.to_numpy(zero_copy_only=False), -hash_ids(ids, seed).astype(np.float64))
    unlabeled = sum(unlabeled_per_shard.values())
    labeled_in_pool = pool_rows - unlabeled
    if sampler is None:
        return Candidates(None, pool_rows, labeled_in_pool, unlabeled, unlabeled, unlabeled_per_shard)
    chosen = pa.array(sampler.result()[0].tolist(), pa.string())
    per_shard = {shard: int(pc.sum(pc.is_in(ids, value_set=chosen)).as_py() or 0) for shard, ids in _shard_ids(info)}
    return Candidates(chosen, pool_rows, labeled_in_pool, unlabeled, len(chosen), per_shard)


def _shard_ids(info: PoolInfo):
    """Yield (shard file name, id column) for each shard of the pool, one shard in memory at a time."""
    for shard in info.shards:
        fs, path = open_fs(shard)
        with fs.open(path, "rb") as handle:
            ids = pq.read_table(handle, columns=["id"]).column("id").combine_chunks()
        yield shard_name(shard), ids


def shard_name(shard: str) -> str:
    return shard.rstrip("/").rsplit("/", 1)[-1]


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
) -> ScoreSummary:
    """Score the candidates into one score file per pool shard, then write the scores marker.

    A shard's score file (``scores/<shard name>``) is written once all of its
    candidates are scored, so a rerun after a crash scores only the shards
    without one.

    Raises:
        ScoringError: when more than ``config.max_skip_fraction`` of the
            candidates cannot be decoded.
    """
    start = time.monotonic()
    scores_dir = run.cycle_path(cycle, "scores")
    run.fs.makedirs(scores_dir, exist_ok=True)
    expected = {shard_name(shard): candidates.per_shard.get(shard_name(shard), 0) for shard in info.shards}
    done = _finished_shards(run, scores_dir, expected)
    todo = [shard for shard in info.shards if shard_name(shard) not in done]
    for shard in [shard for shard in todo if expected[shard_name(shard)] == 0]:
        _write_score_file(run, scores_dir, shard_name(shard), SCORE_SCHEMA.empty_table())
    todo = [shard for shard in todo if expected[shard_name(shard)] > 0]
    log.info("stage=score shards=%d already_scored=%d to_score=%d candidates=%d", len(expected), len(done), len(todo), candidates.count)
    if todo:
        _score_shards(info, todo, expected, candidates, labeled_ids, checkpoint_uri, run, scores_dir, config)
    files = [f"{scores_dir}/{name}" for name in expected]
    summary = summarize_scores(run, files)
    summary.seconds = time.monotonic() - start

    total = summary.scored + len(summary.skipped)
    if total and len(summary.skipped) / total > config.max_skip_fraction:
        first = summary.skipped[0]
        raise ScoringError(
            f"{len(summary.skipped)} of {total} candidate images could not be decoded "
            f"({len(summary.skipped) / total:.2%}, above score.max_skip_fraction={config.max_skip_fraction}). "
            f"First: id={first[0]} shard={first[1]} reason={first[2]}. "
            "Fix or remove these images in the pool, or raise score.max_skip_fraction."
        )
    write_json_atomic(run.fs, f"{scores_dir}/{SCORES_MARKER}", {"files": len(files), "scored": summary.scored, "skipped": len(summary.skipped)})
    return summary


def _finished_shards(run: RunDirectory, scores_dir: str, expected: dict[str, int]) -> set[str]:
    """Return shards whose score file exists; delete anything else left in the scores folder."""
    done = set()
    for path in run.fs.ls(scores_dir, detail=False):
        name = shard_name(path)
        if name in expected:
            done.add(name)
        else:
            run.fs.rm(path, recursive=True)
    return done


def _score_shards(info, shards, expected, candidates, labeled_ids, checkpoint_uri, run, scores_dir, config) -> None:
    import ray.data

    from distal.train import resolve_use_gpu

    use_gpu = resolve_use_gpu(config.use_gpu)
    dataset = read_pool(info, ["id", "image"], shards=shards)
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

    pending: dict[str, list[pa.Table]] = {}
    received: Counter[str] = Counter()
    progress = Progress(log, "score", total=sum(expected[shard_name(shard)] for shard in shards))
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        skipped = table.column("predicted_loss").null_count
        for name in pc.unique(table.column("shard")).to_pylist():
            part = table.filter(pc.equal(table.column("shard"), name))
            pending.setdefault(name, []).append(part)
            received[name] += part.num_rows
            if received[name] == expected[name]:
                _write_score_file(run, scores_dir, name, pa.concat_tables(pending.pop(name)))
                failpoints.hit("after_score_file")
        progress.update(table.num_rows - skipped, skipped=skipped)
    progress.finish()
    unfinished = {name: (received[name], expected[name]) for name in pending}
    if unfinished:
        name, (got, want) = next(iter(unfinished.items()))
        raise ScoringError(
            f"Scoring returned {got} rows for shard {name} but {want} were expected; the pool changed while "
            "this cycle ran. Rerun the job; shards already scored are kept."
        )


def _write_score_file(run: RunDirectory, scores_dir: str, name: str, table: pa.Table) -> None:
    # Rows arrive in any order; sorting by id makes the file, and the sums
    # taken over it, the same on every run.
    buffer = io.BytesIO()
    pq.write_table(table.cast(SCORE_SCHEMA).sort_by("id"), buffer)
    write_bytes_atomic(run.fs, f"{scores_dir}/{name}", buffer.getvalue())


def summarize_scores(run: RunDirectory, files: list[str]) -> ScoreSummary:
    """Count scored and skipped rows, conversions and score statistics by streaming the score files."""
    skipped: list[tuple[str, str, str]] = []
    conversions: Counter[str] = Counter()
    chunks = []
    scored = 0
    for path in files:
        with run.fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        bad = table.filter(pc.is_valid(table.column("skip_reason")))
        for row in bad.select(["id", "shard", "skip_reason"]).to_pylist():
            if len(skipped) < 5:
                log.warning(
                    "stage=score skipped id=%s shard=%s reason=%s: the image cannot be decoded; "
                    "fix or remove it in the pool (it is recorded in this cycle's skipped.parquet)",
                    row["id"], row["shard"], row["skip_reason"],
                )
            skipped.append((row["id"], row["shard"], row["skip_reason"]))
        _count_conversions(table, conversions)
        values = table.column("predicted_loss").drop_null().to_numpy()
        scored += len(values)
        chunks.append(_summarize_chunk(values))
    skipped.sort()
    return ScoreSummary(files, scored, skipped, dict(conversions), 0.0, _merge_stats(chunks))


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
    # NOTE: a rescored shard meets the model in other batches, and CPU kernels
    # chosen by batch size can change a score in its last bits. Rounding keeps
    # this summary identical across reruns; a selection could differ only
    # where two scores tie within that noise.
    return {
        "count": count,
        "mean": round(mean, 6),
        "std": round(float(np.sqrt(max(squares / count - mean**2, 0.0))), 6),
        "min": round(min(chunk[3] for chunk in chunks), 6),
        "max": round(max(chunk[4] for chunk in chunks), 6),
    }
