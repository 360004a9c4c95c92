"""The command line: clear one-line errors and exit codes, no tracebacks for user mistakes."""

import subprocess
import sys

from conftest import REPO, shared_data


def run_job(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "cycle.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_unknown_key_exits_2_with_message(tmp_path):
    result = run_job("--set", "train.epoch=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown configuration key(s) train.epoch" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_pool_exits_1_naming_it(tmp_path):
    result = run_job("--set", f"pool.path={tmp_path / 'nowhere'}", "--oracle", cwd=tmp_path)
    assert result.returncode == 1
    assert "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


def test_pool_import_if_missing_is_rerunnable(tmp_path):
    data = shared_data() / "mnist"
    command = [
        sys.executable, "-m", "distal.cli", "pool", "import", "idx",
        "--images", str(data / "t10k-images-idx3-ubyte.gz"),
        "--labels", str(data / "t10k-labels-idx1-ubyte.gz"),
        "--out", str(tmp_path / "pool"), "--eval-out", str(tmp_path / "eval"), "--eval-size", "2000", "--if-missing",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    shard = tmp_path / "pool" / "part-00000.parquet"
    written = shard.stat().st_mtime_ns
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "action=skip" in second.stderr
    assert shard.stat().st_mtime_ns == written
    without_flag = subprocess.run(command[:-1], capture_output=True, text=True, timeout=300)
    assert without_flag.returncode == 1
    assert "Traceback" not in without_flag.stderr
