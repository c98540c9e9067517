"""The experiment runner's executor: a spawned process per run and no Ray (checked with
`import ray` failing in every process, as on a machine without it), `--concurrency`, the device,
and a run whose process dies: it alone fails, the grid goes on, the next invocation retries it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch
import yaml

from jobs.experiment.config import load_config
from jobs.experiment.processes import RunProcesses
from jobs.experiment.runner import default_concurrency, run_experiment
from jobs.experiment.train_and_test import RECORD_FILE
from jobs.training.device import DEVICE_ENV
from jobs.training.worker import FAULT_INJECTION_ENV

REPO = Path(__file__).resolve().parents[3]
TOPK = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]
# Where the runs of this machine train when nothing says otherwise.
AUTO_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# A sitecustomize that makes this interpreter, and every process it spawns (they inherit
# PYTHONPATH), a machine without Ray: `import ray` fails before anything else can import it.
NO_RAY = """
import sys


class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (Ray is blocked)", name=name)
        return None


sys.meta_path.insert(0, _NoRay())
"""


def _config_file(tmp_path: Path, source: str = "omniglot.zip", **overrides) -> Path:
    """Two one-epoch cross-entropy runs (seeds 0 and 1) on a few Omniglot classes; `source`
    matters only where the grid is built."""
    config = {
        "name": "procs",
        "seeds": [0, 1],
        "losses": {"cross_entropy": {}},
        "training": {
            "model": {"arch": "convnet_small"},
            "epochs": 1,
            "batch_size": 32,
            "optim": {"name": "sgd", "lr": 0.05},
            "schedule": {"name": "constant"},
            "amp": False,
            "data": {
                "image_size": 16,
                "channels": 1,
                "loader_workers": 0,
                "augment": {"random_resized_crop": False, "hflip": False},
            },
        },
        "datasets": [
            {
                "name": "omni",
                "study": "long_tail",
                "source": source,
                "k": 3,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
                "max_per_class": 8,
                "max_size": 16,
                "image_format": "png",
            }
        ],
        **overrides,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (DEVICE_ENV, FAULT_INJECTION_ENV)}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_concurrency_defaults_to_two_on_the_cpu_and_four_on_a_gpu(tmp_path):
    config = load_config(_config_file(tmp_path))
    assert config.concurrency is None  # unset: the runner picks by device
    assert (default_concurrency("cpu"), default_concurrency("cuda")) == (2, 4)
    assert load_config(_config_file(tmp_path, concurrency=3)).concurrency == 3
    assert load_config(REPO / "experiments" / "paper.yaml").concurrency is None


def test_run_processes_use_a_process_per_slot_reuse_it_and_replace_a_dead_one():
    with RunProcesses(2) as processes:
        processes.submit("a", os.getpid)
        processes.submit("b", os.getpid)
        assert not processes.has_room and sorted(processes.running) == ["a", "b"]
        first = dict(_result(processes) for _ in range(2))
        assert len(set(first.values())) == 2 and os.getpid() not in first.values()

        processes.submit("reused", os.getpid)
        processes.submit("dies", os._exit, 3)
        ended = dict(_outcome(processes) for _ in range(2))
        assert ended["reused"] in first.values()  # a process trains run after run
        assert isinstance(ended["dies"], BrokenProcessPool)
        processes.submit("c", os.getpid)
        processes.submit("d", os.getpid)
        after = dict(_result(processes) for _ in range(2))
        # one in the live process, one in a new process in the dead one's place
        assert len({after["c"], after["d"]} - set(first.values())) == 1
        assert processes.has_room and processes.running == []


def _outcome(processes: RunProcesses) -> tuple[str, object]:
    run_id, future = processes.next_done()
    return run_id, future.exception() or future.result()


def _result(processes: RunProcesses) -> tuple[str, int]:
    run_id, future = processes.next_done()
    return run_id, future.result()


def test_a_grid_runs_where_ray_cannot_be_imported(tmp_path, omniglot_zip):
    site = tmp_path / "no-ray"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_RAY)
    env = _env(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    blocked = subprocess.run(
        [sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode == 1 and "Ray is blocked" in blocked.stderr

    out, report = tmp_path / "out", tmp_path / "docs" / "results.md"
    config = _config_file(tmp_path, str(omniglot_zip), concurrency=1)  # the flag overrides it
    command = [*TOPK, "experiment", str(config), "--out", str(out), "--report", str(report)]
    done = subprocess.run(
        [*command, "--concurrency", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "2 of 2 runs have records, 0 failed" in done.stdout
    assert f"2 runs to train, 2 at a time, on {AUTO_DEVICE}" in done.stderr
    assert "[1/2, " in done.stderr and "[2/2, " in done.stderr  # the progress lines

    paths = sorted((out / "runs").glob(f"*/{RECORD_FILE}"))
    records = [json.loads(path.read_text()) for path in paths]
    assert [r["seed"] for r in sorted(records, key=lambda r: r["seed"])] == [0, 1]
    for record in records:
        assert record["status"] == "succeeded", record["error"]
        assert record["device"] == AUTO_DEVICE and record["epochs"] == 1
        assert 0 <= record["test_best"]["top1"] <= record["test_best"]["top3"] <= 1
    text = report.read_text()
    where = "the GPU" if AUTO_DEVICE == "cuda" else "the CPU"
    assert f"(runs trained on {where})" in text and "2 runs at a time" in text
    assert "--concurrency 2" in text  # the command to regenerate it


def test_a_run_whose_process_dies_fails_alone_and_is_retried_next_time(
    tmp_path, monkeypatch, omniglot_zip
):
    marker = tmp_path / "kill-once"
    marker.touch()
    # the first run's process SIGKILLs itself as its epoch 1 starts (once: the marker goes)
    monkeypatch.setenv(FAULT_INJECTION_ENV, f"0:1:{marker}")
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    config = load_config(_config_file(tmp_path, str(omniglot_zip), concurrency=1))
    out = tmp_path / "out"
    lines: list[str] = []
    plan, records = run_experiment(config, out, log=lines.append)

    assert not marker.exists()
    by_status = {r["status"]: r for r in records.values()}
    assert len(records) == 2 and set(by_status) == {"failed", "succeeded"}
    dead, alive = by_status["failed"], by_status["succeeded"]
    assert dead["error"].startswith("its process died")
    assert any(line.startswith(f"run {dead['run_id']} crashed: its process died") for line in lines)
    assert any("FAILED" in line and dead["run_id"] in line for line in lines)
    # the grid went on in a fresh process; the crash left no record, so it is tried again
    assert not (out / "runs" / dead["run_id"] / RECORD_FILE).exists()
    alive_record = out / "runs" / alive["run_id"] / RECORD_FILE
    assert json.loads(alive_record.read_text())["status"] == "succeeded"
    stamp = alive_record.stat().st_mtime_ns

    monkeypatch.delenv(FAULT_INJECTION_ENV)
    lines.clear()
    plan, records = run_experiment(config, out, log=lines.append)
    assert {r["status"] for r in records.values()} == {"succeeded"}
    assert f"1 runs to train, 1 at a time, on {AUTO_DEVICE}" in lines
    assert json.loads((out / "runs" / dead["run_id"] / RECORD_FILE).read_text())["epochs"] == 1
    assert alive_record.stat().st_mtime_ns == stamp  # not trained again
    assert len(json.loads((out / "timing.json").read_text())) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    command = [*TOPK, "experiment", str(_config_file(tmp_path)), "--out", str(tmp_path / "o")]
    done = subprocess.run(
        command, capture_output=True, text=True, env=_env(TOPK_DEVICE="cuda"), timeout=120
    )
    assert done.returncode == 2
    assert "error: TOPK_DEVICE=cuda asks for a GPU, but torch finds no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_a_bad_concurrency_is_refused(tmp_path):
    command = [*TOPK, "experiment", str(_config_file(tmp_path)), "--concurrency", "0"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 2
    assert "--concurrency: expected a whole number from 1 to 64, got '0'" in done.stderr
