"""``distal status``: every cycle of a run directory with its state, counts, labels pending and metrics."""

from __future__ import annotations

from typing import Any

from distal.labels import pending_labels
from distal.lease import RunLease
from distal.rundir import SCORES_MARKER, RunDirectory, read_json

# Marker files in the order a cycle writes them; the last one present names the state.
STEPS = (
    ("start.json", "started"),
    ("train.json", "trained"),
    (f"scores/{SCORES_MARKER}", "scored"),
    ("selected.parquet", "selected"),
    ("_COMPLETE", "complete"),
)


def cycle_rows(run: RunDirectory) -> list[dict[str, Any]]:
    """Return one row per cycle folder: state, counts, labels pending, metrics and timings."""
    base = run.path("cycles")
    if not run.fs.exists(base):
        return []
    numbers = sorted(int(entry.rstrip("/").rsplit("/", 1)[-1]) for entry in run.fs.ls(base, detail=False) if entry.rstrip("/").rsplit("/", 1)[-1].isdigit())
    rows = []
    for cycle in numbers:
        state = "empty"
        for marker, name in STEPS:
            if run.fs.exists(run.cycle_path(cycle, marker)):
                state = name
        row: dict[str, Any] = {"cycle": cycle, "state": state}
        if state == "complete":
            manifest = read_json(run.fs, run.cycle_path(cycle, "manifest.json"))
            counts, metrics, timings = manifest["counts"], manifest["metrics"], manifest["timings"]
            selected, labeled = pending_labels(run.uri, cycle)
            row.update(
                labeled=counts["labeled"],
                scored=counts["scored"],
                skipped=counts["skipped"],
                selected=selected,
                pending=selected - labeled,
                eval_accuracy=metrics.get("eval_accuracy"),
                train_s=timings.get("train_s"),
                score_s=timings.get("score_s"),
                finished_at=manifest.get("finished_at"),
            )
        rows.append(row)
    return rows


def format_status(run: RunDirectory) -> str:
    """Return the status report of a run directory as text."""
    holder, _ = RunLease(run).read()
    lines = [f"run directory: {run.uri}", f"lease: {holder.describe() if holder else 'free'}"]
    rows = cycle_rows(run)
    if not rows:
        lines.append("no cycles yet")
        return "\n".join(lines)
    header = f"{'cycle':>5} {'state':<9} {'labeled':>7} {'scored':>7} {'skipped':>7} {'selected':>8} {'pending':>7} {'eval_acc':>8} {'train_s':>8} {'score_s':>8}  finished_at"
    lines += [header, "-" * len(header)]
    for row in rows:
        def cell(key: str, width: int, spec: str = "") -> str:
            value = row.get(key)
            return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

        lines.append(
            f"{row['cycle']:>5} {row['state']:<9} {cell('labeled', 7)} {cell('scored', 7)} {cell('skipped', 7)} "
            f"{cell('selected', 8)} {cell('pending', 7)} {cell('eval_accuracy', 8, '.4f')} {cell('train_s', 8, '.1f')} "
            f"{cell('score_s', 8, '.1f')}  {row.get('finished_at') or '-'}"
        )
    return "\n".join(lines)
