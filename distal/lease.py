"""A lease in the run directory: one writer at a time, on local disk and on S3.

The lease is the file ``_LEASE.json`` (owner, host, pid, acquisition time,
expiry, a random token). Creating it is atomic: ``O_CREAT | O_EXCL`` on local
disk, a conditional PUT (``If-None-Match: *``) on S3. A live lease makes a
second job exit with a message that names the owner. An expired lease, left
by a crashed job, is taken over (at once when that job ran on this host and
its process is gone): on local disk by renaming the stale file
away first (only one renamer wins), on S3 by a PUT conditional on the stale
file's ETag (``If-Match``). The holder renews the lease from a background
thread well before it expires.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from distal.pool import is_local
from distal.rundir import RunDirectory

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
DEFAULT_TTL_S = 600.0


class LeaseHeldError(RuntimeError):
    """Another live job holds the run directory's lease."""


@dataclass(frozen=True)
class LeaseRecord:
    """Contents of the lease file."""

    owner: str
    host: str
    pid: int
    acquired_at: str
    expires_at: float
    token: str

    def describe(self) -> str:
        expires = datetime.fromtimestamp(self.expires_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"owner={self.owner} host={self.host} pid={self.pid} acquired_at={self.acquired_at} expires_at={expires}"


def _is_stale(lease: LeaseRecord) -> bool:
    """Return whether the lease has expired, or its owner ran on this host and has exited."""
    if lease.expires_at <= time.time():
        return True
    if lease.host != socket.gethostname():
        return False
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunLease:
    """Hold the lease of a run directory for the duration of a ``with`` block.

    Args:
        run: the run directory.
        ttl_s: seconds a lease stays valid without renewal; renewal happens
            every third of it.
        owner: free text naming the job (for example a Ray job submission id).
    """

    def __init__(self, run: RunDirectory, ttl_s: float = DEFAULT_TTL_S, owner: str | None = None) -> None:
        self.run = run
        self.ttl_s = ttl_s
        self.owner = owner or os.environ.get("RAY_JOB_SUBMISSION_ID") or f"distal-{os.getpid()}"
        self.path = run.path(LEASE_FILE)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _record(self) -> LeaseRecord:
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), _utc_now(), time.time() + self.ttl_s, self.token)

    def read(self) -> tuple[LeaseRecord | None, str | None]:
        """Return the current lease and its version tag (ETag on S3, None locally), or (None, None)."""
        try:
            info = self.run.fs.info(self.path)
            with self.run.fs.open(self.path, "rb") as handle:
                data = json.loads(handle.read())
        except FileNotFoundError:
            return None, None
        return LeaseRecord(**data), info.get("ETag")

    def acquire(self) -> None:
        """Take the lease, or take over an expired one.

        Raises:
            LeaseHeldError: when another job holds a live lease.
        """
        self.run.fs.makedirs(self.run.root, exist_ok=True)
        if not self._create():
            current, version = self.read()
            if current is not None and not _is_stale(current):
                raise LeaseHeldError(
                    f"Run directory {self.run.uri} is in use by another job ({current.describe()}). "
                    "Wait for it to finish; a crashed job's lease expires by itself and is then taken over."
                )
            if current is not None:
                log.warning("stage=lease action=takeover run_dir=%s stale_lease=%s", self.run.uri, current.describe())
            if not self._replace_stale(version):
                raise LeaseHeldError(f"Run directory {self.run.uri}: another job took over the expired lease first. Try again later.")
        log.info("stage=lease action=acquired run_dir=%s owner=%s ttl_s=%.0f", self.run.uri, self.owner, self.ttl_s)
        self._thread = threading.Thread(target=self._renew_loop, name="distal-lease", daemon=True)
        self._thread.start()

    def _payload(self) -> bytes:
        return json.dumps(asdict(self._record())).encode()

    def _create(self) -> bool:
        """Create the lease file if none exists; return whether this call created it."""
        if is_local(self.run.fs):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(self._payload())
            return True
        try:
            self.run.fs.pipe_file(self.path, self._payload(), IfNoneMatch="*")
        except FileExistsError:
            return False
        return True

    def _replace_stale(self, version: str | None) -> bool:
        if is_local(self.run.fs):
            stale = f"{self.path}.stale-{self.token}"
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                pass  # Someone removed it meanwhile; competing creators race on O_EXCL below.
            else:
                os.remove(stale)
            return self._create()
        if version is None:
            return self._create()
        try:
            self.run.fs.pipe_file(self.path, self._payload(), IfMatch=version)
        except OSError:
            return False
        return True

    def renew(self) -> None:
        """Extend the expiry, unless another job has taken the lease (then mark it lost)."""
        current, version = self.read()
        if current is None or current.token != self.token:
            if not self.lost:
                log.error("stage=lease action=lost run_dir=%s holder=%s", self.run.uri, current.describe() if current else "none")
            self.lost = True
            return
        if is_local(self.run.fs):
            temporary = f"{self.path}.renew-{self.token}"
            with open(temporary, "wb") as handle:
                handle.write(self._payload())
            os.replace(temporary, self.path)
        else:
            self.run.fs.pipe_file(self.path, self._payload(), **({"IfMatch": version} if version else {}))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - a failed renewal must not kill the job; the next try may work.
                log.warning("stage=lease action=renew_failed run_dir=%s error=%s", self.run.uri, err)

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current, _ = self.read()
        if current is not None and current.token == self.token:
            self.run.fs.rm(self.path)
            log.info("stage=lease action=released run_dir=%s", self.run.uri)
