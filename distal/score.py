"""Scoring: stream the unlabeled pool through actors that score each image in one forward pass.

Pipeline (Ray Data): one loader task per shard reads it, keeps the candidates
(unlabeled, optionally a seeded random subset) and decodes them -> one
forward pass per image in an actor pool (one GPU per actor when CUDA is
present) -> the driver streams the rows into score files. A row holds the predicted loss (when the model has
a loss prediction module), the entropy, least confidence and margin of the
softmax, and, for core-set selection, the penultimate-layer features. Every
score carries its id; positions in a batch are never used to attach a score
to a sample.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distal import failpoints
from distal.acquisition import hash_ids
from distal.config import ScoreConfig
from distal.datasets import load_shards
from distal.pool import PoolInfo, open_fs
from distal.progress import Progress
from distal.rundir import RunDirectory, SCORES_MARKER, write_bytes_atomic, write_json_atomic
from distal.selection import StreamingTopK

log = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("predicted_loss", pa.float64()),
        ("entropy", pa.float64()),
        ("least_confidence", pa.float64()),
        ("margin", pa.float64()),
        ("shard", pa.string()),
        ("skip_reason", pa.string()),
        ("conversion", pa.string()),
    ]
)
FEATURES_COLUMN = "features"


def score_schema(features: bool) -> pa.Schema:
    """Return the score-file schema, with the penultimate features column when ``features`` is True."""
    return SCORE_SCHEMA.append(pa.field(FEATURES_COLUMN, pa.list_(pa.float32()))) if features else SCORE_SCHEMA


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
    first_batch: tuple[float, int] | None = None  # seconds from the start of the pipeline to its first scored rows, and their count


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
    """Ray Data actor: one forward pass per decoded image yields its predicted loss, uncertainty and features."""

    def __init__(self, checkpoint_uri: str, use_gpu: bool, features: bool = False) -> None:
        import torch

        from distal.train import load_checkpoint

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.task, self.learner, _ = load_checkpoint(checkpoint_uri, self.device)
        self.features = features
        if self.device.type == "cuda":
            self.learner = self.learner.to(memory_format=torch.channels_last)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from distal.acquisition import uncertainty_scores

        ok = batch["skip_reason"] == ""  # [B] rows that decoded
        has_loss_module = self.learner.loss_module is not None
        columns = {name: np.full(len(ok), np.nan) for name in ("predicted_loss", "entropy", "least_confidence", "margin")}
        embeddings = None
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))  # [n_ok, C, H, W] uint8
            logits, predicted, embedding = forward_batch(self.learner, images, self.device)  # [n_ok, C'], [n_ok], [n_ok, D]
            for name, values in uncertainty_scores(logits.double().cpu().numpy()).items():
                columns[name][ok] = values
            if has_loss_module:
                columns["predicted_loss"][ok] = predicted.double().cpu().numpy()
            if self.features:
                embeddings = embedding.cpu().numpy()  # [n_ok, D]
        table = {"id": pa.array(batch["id"].tolist(), pa.string())}
        for name, values in columns.items():
            missing = ~ok if name != "predicted_loss" or has_loss_module else np.ones(len(ok), dtype=bool)
            table[name] = pa.array(values, pa.float64(), mask=missing)
        table["shard"] = pa.array(batch["shard"].tolist(), pa.string())
        table["skip_reason"] = pa.array([reason or None for reason in batch["skip_reason"].tolist()], pa.string())
        table["conversion"] = pa.array([note or None for note in batch["conversion"].tolist()], pa.string())
        if self.features:
            table[FEATURES_COLUMN] = _features_array(embeddings, ok)
        return pa.table(table, schema=score_schema(self.features))


def forward_batch(learner, images, device):
    """Run one scoring forward pass on uint8 images [B, C, H, W]; return float32 logits, predicted loss (or None) and features.

    On CUDA the images go channels-last and the model runs under bfloat16
    autocast; on the CPU it runs in float32. The benchmarks call this too,
    so they measure the scorer's own forward pass.
    """
    import torch

    from distal.train_step import normalize

    with torch.inference_mode():
        inputs = normalize(images.to(device, non_blocking=True))  # [B, C, H, W] float32
        if device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, predicted, embedding = learner.predict(inputs)
        else:
            logits, predicted, embedding = learner.predict(inputs)
        return logits.float(), None if predicted is None else predicted.float(), embedding.float()


def _features_array(embeddings: np.ndarray | None, ok: np.ndarray) -> pa.Array:
    """Return a list<float32> column with one feature vector per decoded row and null for skipped rows."""
    rows: list[list[float] | None] = [None] * len(ok)
    if embeddings is not None:
        for position, vector in zip(np.flatnonzero(ok), embeddings):
            rows[position] = vector.tolist()
    return pa.array(rows, pa.list_(pa.float32()))


def score_pool(
    info: PoolInfo,
    candidates: Candidates,
    labeled_ids: pa.Array,
    checkpoint_uri: str,
    run: RunDirectory,
    cycle: int,
    config: ScoreConfig,
    strategy: str = "learning_loss",
) -> ScoreSummary:
    """Score the candidates into one score file per pool shard, then write the scores marker.

    A shard's score file (``scores/<shard name>``) is written once all of its
    candidates are scored, so a rerun after a crash scores only the shards
    without one.

    Raises:
        ScoringError: when more than ``config.max_skip_fraction`` of the
            candidates cannot be decoded.
    """
    from distal.acquisition import SCORE_COLUMNS

    features = strategy == "coreset"
    start = time.monotonic()
    scores_dir = run.cycle_path(cycle, "scores")
    run.fs.makedirs(scores_dir, exist_ok=True)
    expected = {shard_name(shard): candidates.per_shard.get(shard_name(shard), 0) for shard in info.shards}
    done = _finished_shards(run, scores_dir, expected)
    todo = [shard for shard in info.shards if shard_name(shard) not in done]
    for shard in [shard for shard in todo if expected[shard_name(shard)] == 0]:
        _write_score_file(run, scores_dir, shard_name(shard), score_schema(features).empty_table())
    todo = [shard for shard in todo if expected[shard_name(shard)] > 0]
    log.info("stage=score shards=%d already_scored=%d to_score=%d candidates=%d", len(expected), len(done), len(todo), candidates.count)
    first_batch = None
    if todo:
        first_batch = _score_shards(info, todo, expected, candidates, labeled_ids, checkpoint_uri, run, scores_dir, config, features)
    files = [f"{scores_dir}/{name}" for name in expected]
    summary = summarize_scores(run, files, column=SCORE_COLUMNS.get(strategy))
    summary.seconds = time.monotonic() - start
    summary.first_batch = first_batch

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
    try:
        entries = run.fs.ls(scores_dir, detail=False)
    except FileNotFoundError:  # an object store has no empty folders
        entries = []
    for path in entries:
        name = shard_name(path)
        if name in expected:
            done.add(name)
        else:
            run.fs.rm(path, recursive=True)
    return done


def _scoring_dataset(info: PoolInfo, shards: list[str], keep: pa.Array | None, drop: pa.Array | None, checkpoint_uri: str, config: ScoreConfig, features: bool):
    """Build the Ray Data pipeline load (read, keep or drop ids, decode) -> score for some shards."""
    import ray.data

    from distal.train import resolve_use_gpu

    use_gpu = resolve_use_gpu(config.use_gpu)
    return load_shards(info, shards, keep=keep, drop=drop).map_batches(
        LossScorer,
        batch_format="numpy",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "use_gpu": use_gpu, "features": features},
    )


def _score_shards(info, shards, expected, candidates, labeled_ids, checkpoint_uri, run, scores_dir, config, features) -> tuple[float, int] | None:
    """Stream the scores of some shards into their score files; return the seconds until the first scored rows, and their count."""
    start = time.monotonic()
    first_batch = None
    dataset = _scoring_dataset(info, shards, candidates.ids, labeled_ids, checkpoint_uri, config, features)
    pending: dict[str, list[pa.Table]] = {}
    received: Counter[str] = Counter()
    progress = Progress(log, "score", total=sum(expected[shard_name(shard)] for shard in shards))
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first_batch is None:
            first_batch = (time.monotonic() - start, table.num_rows)
            log.info("stage=score first_rows=%d seconds=%.1f", table.num_rows, first_batch[0])
        skipped = table.num_rows - table.column("skip_reason").null_count
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
    return first_batch


def _write_score_file(run: RunDirectory, scores_dir: str, name: str, table: pa.Table) -> None:
    # Rows arrive in any order; sorting by id makes the file, and the sums
    # taken over it, the same on every run.
    buffer = io.BytesIO()
    pq.write_table(table.cast(score_schema(FEATURES_COLUMN in table.column_names)).sort_by("id"), buffer)
    write_bytes_atomic(run.fs, f"{scores_dir}/{name}", buffer.getvalue())


def labeled_features(info: PoolInfo, labeled_ids: pa.Array, checkpoint_uri: str, config: ScoreConfig) -> np.ndarray:
    """Return the penultimate-layer features [M, D] of the decodable labeled images, in id order.

    Core-set selection uses them as the initial centres; the pass reuses the
    scoring pipeline, so the features come from the same model and transforms.
    """
    dataset = _scoring_dataset(info, list(info.shards), labeled_ids, None, checkpoint_uri, config, features=True)
    parts = []
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts.append(table.filter(pc.is_null(table.column("skip_reason"))).select(["id", FEATURES_COLUMN]))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    table = pa.concat_tables(parts).sort_by("id")
    return _features_matrix(table.column(FEATURES_COLUMN))


def _features_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """Stack a list<float32> column of equal-length vectors into a float32 matrix [N, D]."""
    flat = column.combine_chunks()
    if len(flat) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    values = flat.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(flat), -1).astype(np.float32, copy=False)


def summarize_scores(run: RunDirectory, files: list[str], column: str | None = "predicted_loss") -> ScoreSummary:
    """Count scored and skipped rows, conversions and statistics of ``column`` by streaming the score files.

    ``column`` None (random and core-set selection) records counts only.
    """
    skipped: list[tuple[str, str, str]] = []
    conversions: Counter[str] = Counter()
    chunks = []
    scored = 0
    for path in files:
        with run.fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["id", "shard", "skip_reason", "conversion", *([column] if column else [])])
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
        scored += table.column("skip_reason").null_count
        if column is not None:
            chunks.append(_summarize_chunk(table.column(column).drop_null().to_numpy()))
    skipped.sort()
    stats = {"column": column, **_merge_stats(chunks)} if column is not None else {}
    return ScoreSummary(files, scored, skipped, dict(conversions), 0.0, stats)


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
