"""Run an experiment grid on this machine, a process per run, and keep one record per run.

Layout under the output root OUT:
    OUT/data/<dataset>/            shards + dataset.json (datasets.py: built once, reused while
                                   the dataset's build settings are unchanged; shared by the
                                   datasets with the same settings)
    OUT/runs/<run id>/             the run as `topk train` leaves it (spec.json, metrics.jsonl,
                                   checkpoints, result.json) plus record.json, written last
                                   (train_and_test.py)
The runs and their ids come from the plan (plan.py): a run is redone only when its spec
changes. A run with record.json is finished; one without is started again and resumes from its
latest checkpoint.

Every run trains in a worker process of a plain process pool (`RunProcesses`, processes.py;
no Ray):
`concurrency` processes at once (`--concurrency`, else the config's `concurrency`, else 2 on
the CPU and 4 on a GPU, `default_concurrency`), started with `spawn` (CUDA cannot be used in a
forked child) and reused from run to run, so torch is imported once per process. Each process
is its own one-process pool: a process that dies (a segfault, the OOM killer) fails only the
run it held, and the next run gets a fresh process. A process runs the training loop of
`topk train` and of the service's jobs (jobs.training.worker.run_loop, with the same model,
loss, data pipeline, checkpoints and metrics files) in process through
`jobs.training.run.run_training_in_process`: with a Ray Train worker group per run, runs that
had nothing left to train still took 24-39 s each on a 2-core machine (CPU-bound), more than
training one of these small runs. After training, it evaluates the best-validation checkpoint
and the last one on the test split (per-class top-K recall included). The test split is read
only there: sweeps select on the validation split.

Runs train on the GPU when torch finds one, on the CPU otherwise (jobs.training.device:
TOPK_DEVICE=auto|cpu|cuda, default auto); with a GPU the `concurrency` runs share it. The device
is not part of a run's spec (nor of its id): a run started on the CPU resumes on the GPU, and
its record says where it was trained (`device`).
"""

from __future__ import annotations

import json
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.experiment.config import ExperimentConfig
from jobs.experiment.datasets import Log, build_datasets, dataset_folders, log_stderr
from jobs.experiment.plan import Plan
from jobs.experiment.processes import RunProcesses
from jobs.experiment.train_and_test import RECORD_FILE, train_and_test

CPU_CONCURRENCY = 2
"""Runs at a time on a CPU machine when neither --concurrency nor the config says."""
GPU_CONCURRENCY = 4
"""Runs at a time sharing the GPU when neither --concurrency nor the config says: these small
runs leave a GPU mostly idle, and 4 processes keep it busy without running out of memory."""


def default_concurrency(device: str) -> int:
    """Runs at a time on `device` ("cpu" or "cuda") when nothing else says."""
    return GPU_CONCURRENCY if device == "cuda" else CPU_CONCURRENCY


def read_records(runs_root: Path, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    records = {}
    for run_id in run_ids:
        path = runs_root / run_id / RECORD_FILE
        if path.is_file():
            records[run_id] = json.loads(path.read_text())
    return records


def _load_records(plan: Plan, runs_root: Path, *, retry_failed: bool) -> dict[str, Any]:
    """The records of the plan's runs (without the failed ones when `retry_failed`), adding
    the final runs of sweeps that finished earlier and reading theirs too."""

    def kept(run_ids: list[str]) -> dict[str, Any]:
        records = read_records(runs_root, run_ids)
        if retry_failed:
            records = {k: v for k, v in records.items() if v.get("status") == "succeeded"}
        return records

    records = kept(list(plan.runs))
    while added := plan.release_finals(records):
        records.update(kept(added))
    return records


def collect(config: ExperimentConfig, out: Path) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """The plan and the records already written, training nothing (the datasets must exist)."""
    datasets = {}
    for name, folder in dataset_folders(config).items():
        info = out / "data" / folder / "dataset.json"
        if not info.is_file():
            raise ValueError(f"dataset {name} is not built under {out}: run the grid first")
        datasets[name] = info
    plan = Plan(config, datasets)
    return plan, _load_records(plan, out / "runs", retry_failed=False)


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    retry_failed: bool = False,
    log: Log = log_stderr,
    device: str | None = None,
) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """Build the datasets, run every planned run that has no record yet (`retry_failed`: and
    those whose record says failed), and return the plan and all records.

    Runs train on `device` ("auto", "cpu" or "cuda"; None reads TOPK_DEVICE, default auto: the
    GPU when there is one), `config.concurrency` at a time (None: `default_concurrency`).
    Raises ValueError for a bad config value, a missing source, or "cuda" without a GPU."""
    from jobs.training.device import resolve_device

    chosen = resolve_device(device).type
    out.mkdir(parents=True, exist_ok=True)
    invoked = time.monotonic()
    try:
        return _run_grid(config, out, retry_failed=retry_failed, log=log, device=chosen)
    finally:
        _append_timing(out, time.monotonic() - invoked)


def _append_timing(out: Path, seconds: float) -> None:
    """Add this invocation's wall time to OUT/timing.json (the report sums the entries)."""
    path = out / "timing.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"finished": time.time(), "seconds": seconds})
    path.write_text(json.dumps(entries, indent=1))


def _run_grid(
    config: ExperimentConfig, out: Path, *, retry_failed: bool, log: Log, device: str
) -> tuple[Plan, dict[str, dict[str, Any]]]:
    datasets = build_datasets(config, out, log)
    plan = Plan(config, datasets)
    runs_root = out / "runs"
    runs_root.mkdir(exist_ok=True)
    records = _load_records(plan, runs_root, retry_failed=retry_failed)
    todo = [r for r in plan.runs if r not in records]
    if not todo:
        log(f"all {len(plan.runs)} runs have records; nothing to train")
        return plan, records

    concurrency = config.concurrency or default_concurrency(device)
    log(f"{len(todo)} runs to train, {concurrency} at a time, on {device}")
    started = time.monotonic()
    done_now = 0
    with RunProcesses(concurrency) as processes:
        while True:
            running = processes.running
            todo = [r for r in plan.runs if r not in records and r not in running]
            todo.sort(key=lambda r: "sweep" not in plan.runs[r].roles)  # selections unlock finals
            while todo and processes.has_room:
                run_id = todo.pop(0)
                run = plan.runs[run_id]
                payload = {**asdict(run), "roles": sorted(run.roles)}
                processes.submit(run_id, train_and_test, payload, str(runs_root), device)
            if not processes.running:
                break
            run_id, future = processes.next_done()
            try:
                record = future.result()
            except Exception as exc:  # the process died or the task raised (not a training
                # failure, which train_and_test records itself); no record.json: the next
                # invocation tries the run again
                reason = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, BrokenProcessPool):
                    reason = f"its process died ({exc})"
                record = {"run_id": run_id, "status": "failed", "error": reason}
                log(f"run {run_id} crashed: {reason}")
            records[run_id] = record
            done_now += 1
            plan.release_finals(records)
            remaining = sum(1 for r in plan.runs if r not in records)
            elapsed = time.monotonic() - started
            eta = elapsed / done_now * remaining
            log(_progress_line(record, len(records), len(plan.runs), elapsed, eta))
    return plan, records


def _progress_line(
    record: dict[str, Any], done: int, total: int, elapsed: float, eta: float
) -> str:
    head = f"[{done}/{total}, {elapsed / 60:.1f} min, about {eta / 60:.0f} min left]"
    if record.get("status") != "succeeded":
        return f"{head} FAILED {record['run_id']}: {record.get('error')}"
    test = record.get("test_best", {})
    figures = ", ".join(
        f"{key} {value:.3f}"
        for key, value in test.items()
        if key.startswith(("top", "macro_top")) and isinstance(value, float)
    )
    return f"{head} {record['run_id']}: test {figures} ({record['wall_seconds']:.0f} s)"
