"""The run-directory lease: one writer at a time, stale leases taken over, on disk and on S3."""

import json
import logging
import time

import pytest

from distal.lease import LEASE_FILE, LeaseHeldError, RunLease
from distal.rundir import RunDirectory


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return RunDirectory(str(tmp_path / "run"))
    bucket = request.getfixturevalue("s3_bucket")
    return RunDirectory(f"s3://{bucket}/run")


def test_second_holder_is_rejected_with_owner(run_dir):
    with RunLease(run_dir, owner="night-1"):
        with pytest.raises(LeaseHeldError, match="owner=night-1") as error:
            RunLease(run_dir, owner="night-1-retry").acquire()
        assert "Wait for it to finish" in str(error.value)


def test_release_lets_the_next_job_in(run_dir):
    with RunLease(run_dir, owner="first"):
        pass
    assert not run_dir.fs.exists(run_dir.path(LEASE_FILE))
    with RunLease(run_dir, owner="second") as lease:
        current, _ = lease.read()
        assert current.owner == "second"


def test_expired_lease_is_taken_over_and_logged(run_dir, caplog):
    stale = {"owner": "crashed", "host": "h", "pid": 1, "acquired_at": "2026-01-01T00:00:00Z", "expires_at": time.time() - 5, "token": "old"}
    run_dir.fs.makedirs(run_dir.root, exist_ok=True)
    run_dir.fs.pipe_file(run_dir.path(LEASE_FILE), json.dumps(stale).encode())
    with caplog.at_level(logging.WARNING, logger="distal.lease"):
        with RunLease(run_dir, owner="new") as lease:
            current, _ = lease.read()
            assert current.owner == "new"
    assert "action=takeover" in caplog.text
    assert "owner=crashed" in caplog.text


def test_renew_extends_expiry(run_dir):
    with RunLease(run_dir, ttl_s=60, owner="long") as lease:
        before, _ = lease.read()
        time.sleep(1.1)
        lease.renew()
        after, _ = lease.read()
        assert after.expires_at > before.expires_at
        assert not lease.lost


def test_lost_lease_is_noticed(run_dir):
    with RunLease(run_dir, ttl_s=60, owner="a") as lease:
        taken = json.loads(run_dir.fs.cat_file(run_dir.path(LEASE_FILE)))
        taken["token"] = "someone-else"
        run_dir.fs.pipe_file(run_dir.path(LEASE_FILE), json.dumps(taken).encode())
        lease.renew()
        assert lease.lost


def test_lease_of_exited_local_process_is_stale(run_dir):
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    with RunLease(run_dir, owner="crashed") as lease:
        record = json.loads(run_dir.fs.cat_file(run_dir.path(LEASE_FILE)))
        record["pid"] = dead_pid
        record["token"] = "crashed-token"
        run_dir.fs.pipe_file(run_dir.path(LEASE_FILE), json.dumps(record).encode())
        lease.token = "released-elsewhere"
    with RunLease(run_dir, owner="next") as lease:
        current, _ = lease.read()
        assert current.owner == "next"
