"""End to end: ``ray job submit`` runs jobs/cycle.py on a token-authenticated head node.

The test starts its own head node (``ray start --head --block``) on free
ports, with its own ``--temp-dir``, so it neither finds nor disturbs another
Ray instance on the machine. Token authentication uses a fresh
``RAY_AUTH_TOKEN`` in the environment of the head and of the client. In Ray
2.60 that variable takes precedence over ``~/.ray/auth_token``, so the
developer's token file is neither used nor written. ``ray stop`` would stop
every Ray process on the machine, so teardown signals only the processes in
the head's session.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import write_mnist_pool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="teardown finds the head's processes through /proc"),
]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
STOP_GRACE_S = 5


@dataclass(frozen=True)
class HeadNode:
    """A running head node and the client environment that can reach it."""

    dashboard_url: str
    env: dict[str, str]
    temp_dir: Path
    log_path: Path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(session_id: int) -> list[int]:
    """Return the ids of the live processes in session ``session_id``, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so split after its closing bracket.
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            pids.append(int(entry.name))
    return pids


def signal_pids(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_session(head: subprocess.Popen) -> None:
    """Stop every process in the head's session: SIGTERM, then SIGKILL after STOP_GRACE_S.

    Ray workers get their own process group but stay in the session of
    ``ray start``, so the session id finds them all. A job's driver runs in a
    session of its own, and a watcher process started by Ray's job supervisor
    kills it once the supervisor process is gone.
    """
    signal_pids(session_pids(head.pid), signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while session_pids(head.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    signal_pids(session_pids(head.pid), signal.SIGKILL)
    try:
        head.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + STOP_GRACE_S
    while session_pids(head.pid) and time.monotonic() < deadline:
        time.sleep(0.5)


def dashboard_responds(url: str) -> bool:
    """Return True once the dashboard's HTTP server responds, even with 401 for a missing token."""
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, chars: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output file)"
    return text[-chars:]


def head_environment() -> dict[str, str]:
    """Build the environment of the head node and of the ``ray job submit`` client."""
    env = dict(os.environ)
    # A developer's address, token path or upload settings must not change what the test runs against.
    overridden = (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_RUNTIME_ENV_IGNORE_GITIGNORE",
        "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES",
    )
    for name in overridden:
        env.pop(name, None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # The job supervisor runs the entrypoint through a shell with the head node's environment,
    # so `python` resolves on the head's PATH, as it does after activating the venv.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A 2-CPU head node with token authentication and a dashboard on 127.0.0.1."""
    # Unix socket paths are limited to about 107 bytes, so the temp dir sits directly under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="distal-ray-", dir="/tmp"))
    log_path = temp_dir / "ray-start.log"
    env = head_environment()
    dashboard_port = free_port()
    command = [
        str(RAY), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # The default ports (52365 and 10001) would collide with another head node on this machine.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    with open(log_path, "wb") as log_file:
        head = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        # `ray start` writes ray_current_cluster into the temp dir once the node is up.
        while not ((temp_dir / "ray_current_cluster").exists() and dashboard_responds(url)):
            if head.poll() is not None:
                pytest.fail(f"ray start exited with status {head.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"The head node did not start within {HEAD_START_TIMEOUT_S} s:\n{tail(log_path)}")
            time.sleep(1)
        yield HeadNode(dashboard_url=url, env=env, temp_dir=temp_dir, log_path=log_path)
    finally:
        stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_config(path: Path, run_dir: Path, pool: Path, eval_pool: Path, changes: dict | None = None) -> Path:
    """Write a tiny one-cycle configuration (about 60 s as a job on a 2-core CPU machine).

    ``changes`` maps a section to the keys it updates, or a top-level key to its value.
    """
    config = {
        "run_dir": str(run_dir),
        "seed": 0,
        "cycles": 1,
        "initial_labels": 40,
        "oracle": True,
        "pool": {"path": str(pool), "eval_path": str(eval_pool)},
        "model": {"width": 8},
        # 0.5 CPU per worker leaves CPUs for the Ray Data tasks that feed training.
        "train": {
            "epochs": 3,
            "batch_size": 16,
            "milestones": [2],
            "gradient_stop_epoch": 2,
            "num_workers": 1,
            "cpus_per_worker": 0.5,
        },
        "score": {"subset_size": 300, "batch_size": 64, "num_actors": 1},
        "select": {"k": 20},
    }
    for section, values in (changes or {}).items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def submit(head: HeadNode, config: Path, output_path: Path) -> subprocess.CompletedProcess:
    """Run the user-facing ``ray job submit`` command and wait for the job to end."""
    command = [
        str(RAY), "job", "submit",
        "--address", head.dashboard_url,
        "--working-dir", str(REPO),
        "--", "python", "jobs/cycle.py", "--config", str(config),
    ]
    try:
        with open(output_path, "wb") as output:
            return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=head.env, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ray job submit timed out after {JOB_TIMEOUT_S} s:\n{tail(output_path)}")


def uploaded_working_dirs(head: HeadNode) -> list[Path]:
    """Return the working directories that jobs unpacked on the head node."""
    unpacked = head.temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    return sorted(path for path in unpacked if path.is_dir())


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("job-pools")
    write_mnist_pool(root / "pool", 400, offset=0, rows_per_shard=100)
    write_mnist_pool(root / "eval", 100, offset=400, rows_per_shard=100, prefix="mnist-eval")
    return root / "pool", root / "eval"


def test_submit_runs_one_cycle(ray_head, pools, tmp_path):
    pool, eval_pool = pools
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cycle.yaml", run_dir, pool, eval_pool)
    output = tmp_path / "submit.log"

    started = time.monotonic()
    result = submit(ray_head, config, output)
    print(f"ray job submit: exit={result.returncode} seconds={time.monotonic() - started:.1f}")

    assert result.returncode == 0, f"ray job submit failed:\n{tail(output)}"
    cycle_dir = run_dir / "cycles" / "0001"
    assert (cycle_dir / "_COMPLETE").is_file(), f"no completion marker in {cycle_dir}:\n{tail(output)}"
    assert (cycle_dir / "selected.parquet").is_file()

    manifest = json.loads((cycle_dir / "manifest.json").read_text())
    selected_ids = manifest["selected"]
    assert manifest["cycle"] == 1
    assert len(selected_ids) == 20
    assert len(set(selected_ids)) == 20
    assert manifest["counts"]["selected"] == 20

    pool_ids = set(pq.read_table(pool, columns=["id"]).column("id").to_pylist())
    assert set(selected_ids) <= pool_ids
    initial_ids = set(pq.read_table(run_dir / "labels" / "initial.parquet").column("id").to_pylist())
    assert not set(selected_ids) & initial_ids

    selected = pq.read_table(cycle_dir / "selected.parquet")
    assert selected.column("id").to_pylist() == selected_ids
    predicted_loss = selected.column("predicted_loss").to_numpy()
    assert np.all(np.isfinite(predicted_loss))
    assert np.all(np.diff(predicted_loss) <= 0), f"not ordered by predicted loss descending: {predicted_loss}"

    # Ray 2.60 leaves .venv out of the working dir package by default, and .gitignore lists it too.
    unpacked = uploaded_working_dirs(ray_head)
    assert unpacked, f"no unpacked working dir under {ray_head.temp_dir}"
    for directory in unpacked:
        assert (directory / "jobs" / "cycle.py").is_file()
        assert not (directory / ".venv").exists()


@pytest.mark.parametrize(
    ("changes", "expected_message"),
    [
        pytest.param({"train": {"epoch": 3}}, "unknown configuration key(s) train.epoch", id="unknown-key"),
        pytest.param({"pool": {"path": "/nonexistent/distal-pool"}}, "Pool /nonexistent/distal-pool not found", id="missing-pool"),
    ],
)
def test_submit_fails_on_bad_input(ray_head, pools, tmp_path, changes, expected_message):
    pool, eval_pool = pools
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cycle.yaml", run_dir, pool, eval_pool, changes)
    output = tmp_path / "submit.log"

    result = submit(ray_head, config, output)

    assert result.returncode != 0, f"ray job submit exited 0 for {changes}:\n{tail(output)}"
    assert expected_message in output.read_text(errors="replace"), f"expected {expected_message!r} in:\n{tail(output)}"
    assert not (run_dir / "cycles").exists()
