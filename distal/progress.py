"""Logging setup and progress reports with rate and ETA for long stages."""

from __future__ import annotations

import logging
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Send distal's log records to stderr as one line each; quiet chatty libraries."""
    root = logging.getLogger("distal")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Log ``rows=done/total rate=... eta=...`` for a stage at most every ``interval`` seconds.

    Args:
        logger: where the lines go.
        stage: stage name in each line.
        total: expected rows, or None when unknown (no ETA then).
        interval: minimum seconds between lines.
    """

    def __init__(self, logger: logging.Logger, stage: str, total: int | None, interval: float = 5.0) -> None:
        self.logger = logger
        self.stage = stage
        self.total = total
        self.interval = interval
        self.done = 0
        self.skipped = 0
        self.start = time.monotonic()
        self._last = self.start

    def update(self, rows: int, skipped: int = 0) -> None:
        self.done += rows
        self.skipped += skipped
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.logger.info("stage=%s progress %s", self.stage, self._fields(now))

    def finish(self) -> float:
        """Log the closing line and return the elapsed seconds."""
        now = time.monotonic()
        self.logger.info("stage=%s done %s", self.stage, self._fields(now))
        return now - self.start

    def _fields(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        total = "?" if self.total is None else str(self.total)
        fields = f"rows={self.done}/{total} rate={rate:.1f}rows/s elapsed={format_seconds(elapsed)}"
        if self.total and rate > 0:
            fields += f" eta={format_seconds(max(self.total - self.done, 0) / rate)}"
        if self.skipped:
            fields += f" skipped={self.skipped}"
        return fields
