"""benchmarks/gpu_checks.sh, the one prepared call that runs every GPU check on a lent machine:
its run, time budget and logs are checked here as a dry run (no GPU: the CUDA tests skip and the
loss benchmark says it measured nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_checks.sh"


def _run(tmp_path: Path, *args: str, run_seconds: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env["RUN_SECONDS"] = str(run_seconds)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_a_dry_run_of_the_loss_checks_writes_a_log_per_check_and_a_summary(tmp_path):
    done = _run(tmp_path, "run", "losses", run_seconds=150)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["cuda-tests", "bench-gpu"]
    assert all(line.split()[1:3] == ["exit", "0"] for line in summary), summary
    machine = (tmp_path / "machine.txt").read_text()
    assert "torch" in machine and "GPU: False" in machine
    assert "skipped" in (tmp_path / "cuda-tests.log").read_text()  # every test there needs CUDA
    assert "nothing measured" in (tmp_path / "bench-gpu.log").read_text()


def test_checks_the_time_left_cannot_hold_are_skipped_and_said_so(tmp_path):
    done = _run(tmp_path, "run", "loop", run_seconds=20)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [
        ["loop-tests", "skipped:"],
        ["bench-gpu-loop", "skipped:"],
    ]
    assert not (tmp_path / "loop-tests.log").exists()


def test_an_unknown_part_is_a_usage_error(tmp_path):
    done = _run(tmp_path, "run", "everything", run_seconds=60)
    assert done.returncode == 2
    assert "usage: bash benchmarks/gpu_checks.sh run [all|losses|loop]" in done.stderr
