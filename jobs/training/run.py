"""Launch one training run on Ray Train: `run_training(spec, run_name, storage, address)`, or
in this process without Ray: `run_training_in_process(spec, run_name, storage)`.

Both take a resolved spec (class counts filled: `jobs.contract.spec_files.resolve_class_counts`,
which the process that starts the run calls once, as `jobs.cli.load_spec` does). The run lives
in ROOT/RUN on the storage root (see jobs/contract/run_files.py). Ray Train's own run folder is
ROOT/RUN/checkpoints with the fixed name "checkpoints": launching the same RUN again (a relaunch
by the service, or `topk train` with the same --run-name) finds Ray's state there and resumes
from the latest checkpoint; with more epochs in the spec it continues training.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jobs.contract.run_files import (
    RAY_RUN_FOLDER,
    check_run_name,
    join,
    normalize_root,
    ray_storage,
    read_json,
    read_metrics,
    write_json,
)
from jobs.contract.selection import best_by_metric
from jobs.contract.train import SpecError, TrainSpec
from jobs.contract.urls import PROTOCOLS_ENV, ROOTS_ENV
from jobs.training.worker import FAULT_INJECTION_ENV

if TYPE_CHECKING:
    from jobs.training.session import LocalSession

_connected_here = False  # ensure_ray made this process's Ray connection (settle_worker_output)


def ensure_ray(address: str | None = None, *, num_cpus: float = 1.0, num_gpus: float = 0.0) -> None:
    """Connect to Ray: the given address, else RAY_ADDRESS (inside a Ray job), else a new local
    cluster with enough logical CPUs for `num_cpus`. Never attaches to an unrelated cluster that
    happens to run on this machine. A no-op when Ray is already initialised in this process.

    Connecting to a cluster by address, the job's tasks and actors get that address as their
    RAY_ADDRESS (`pinned_address_env`): Ray sets it for the driver only, and Ray Train's own
    actors look the cluster up by it; without it, with a second Ray on the machine, they failed
    with "Found multiple active Ray instances"."""
    import ray

    global _connected_here
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, runtime_env=pinned_address_env(target), **quiet)
    else:
        # Logical CPUs: a 2-worker run (plus a Tune trial driver) must fit on a 2-core laptop.
        cpus = max(os.cpu_count() or 1, math.ceil(num_cpus))
        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=num_gpus or None,
            include_dashboard=False,
            **quiet,
        )
    _connected_here = True


def pinned_address_env(address: str) -> dict[str, Any] | None:
    """The runtime_env that gives every task and actor of this driver's job `address` (a GCS
    host:port) as RAY_ADDRESS; None for an address that is not one (`auto`, `ray://` clients)
    or when the job's own runtime_env sets RAY_ADDRESS already (Ray refuses two values)."""
    import json

    if address == "auto" or "://" in address:
        return None
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_env = ((submitted.get("runtime_env") or {}).get("env_vars")) or {}
    if "RAY_ADDRESS" in job_env:
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


def settle_worker_output(quiet_s: float = 1.5, timeout_s: float = 15.0) -> None:
    """Let the workers' output reach this driver before it prints its result: Ray relays worker
    lines to the driver asynchronously, and holds back repeated lines until it disconnects, so
    the run's last worker lines used to come after the driver's final result. Waits until no
    worker output has arrived for `quiet_s` (at most `timeout_s`), then disconnects from Ray
    when `ensure_ray` connected this process (which prints what Ray held back)."""
    import ray

    global _connected_here
    if not ray.is_initialized():
        return
    try:  # Ray's dispatcher of the worker output it relays (no public hook)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        dispatcher = None
    if dispatcher is not None:
        last = [time.monotonic()]
        name = "topk_settle_worker_output"
        dispatcher.add_handler(name, lambda _batch: last.__setitem__(0, time.monotonic()))
        deadline = time.monotonic() + timeout_s
        try:
            while (now := time.monotonic()) < deadline and now - last[0] < quiet_s:
                time.sleep(0.1)
        finally:
            dispatcher.remove_handler(name)
    if _connected_here:
        ray.shutdown()
        _connected_here = False


def scaling_config(spec: TrainSpec) -> Any:
    import ray.train

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=scaling.num_workers,
        use_gpu=scaling.use_gpu,
        resources_per_worker=resources,
        accelerator_type=scaling.accelerator_type if scaling.use_gpu else None,
    )


def torch_backend(spec: TrainSpec) -> str:
    """The process-group backend of the workers: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if spec.scaling.use_gpu else "gloo"


def checkpoint_score(spec: TrainSpec) -> str | None:
    """The metric that ranks a run's checkpoints: metrics.select when the run evaluates a
    validation split, else None (the latest checkpoints are kept)."""
    return spec.metrics.select if spec.data.val is not None else None


def build_trainer(
    spec: TrainSpec,
    run_dir: str,
    *,
    callbacks: list[Any] | None = None,
) -> Any:
    """The TorchTrainer for `spec` whose run lives at `run_dir` (ROOT/RUN)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.worker import train_loop_per_worker

    storage_path, storage_filesystem = ray_storage(run_dir)
    checkpoint_config = ray.train.CheckpointConfig(
        # Ray keeps the `keep_best` best by the selection metric and always the latest.
        num_to_keep=spec.checkpoint.keep_best,
        checkpoint_score_attribute=checkpoint_score(spec),
        checkpoint_score_order=spec.metrics.mode,
    )
    # The URL limits go to the workers explicitly: a Ray job's runtime_env reaches them anyway,
    # but a driver attached to a running cluster (--address) has its own environment.
    worker_env = {
        name: os.environ[name]
        for name in (FAULT_INJECTION_ENV, PROTOCOLS_ENV, ROOTS_ENV)
        if os.environ.get(name)
    }
    run_config = ray.train.RunConfig(
        name=RAY_RUN_FOLDER,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        checkpoint_config=checkpoint_config,
        failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
        callbacks=callbacks,
        worker_runtime_env={"env_vars": worker_env} if worker_env else None,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": run_dir},
        scaling_config=scaling_config(spec),
        run_config=run_config,
        torch_config=TorchConfig(backend=torch_backend(spec)),
    )


def summarize_run(spec: TrainSpec, run_dir: str, *, error: str | None = None) -> dict[str, Any]:
    """result.json's content from the run's metrics.jsonl: status, epochs, best epoch's
    metrics by `metrics.select`, and `warnings` (the epochs flagged for rank-1 collapse,
    jobs.contract.run_files.collapse_warnings) when there are any."""
    from jobs.contract.run_files import collapse_warnings

    history = read_metrics(join(run_dir, "metrics.jsonl"))
    best = best_by_metric(history, spec.metrics.select, spec.metrics.mode)
    result = {
        "status": "failed" if error else "succeeded",
        "epochs": max((r["epoch"] for r in history), default=0),
        "best": best,
        "best_epoch": best["epoch"] if best else None,
        "error": error,
        "time": time.time(),
    }
    warnings = collapse_warnings(history)
    if warnings:
        result["warnings"] = warnings
    return result


class MetricsFollower:
    """Calls `on_epoch(record)` for each new line of a run's metrics.jsonl, from a background
    thread polling storage (works for any fsspec URL, no Ray needed)."""

    def __init__(self, run_dir: str, on_epoch: Callable[[dict[str, Any]], None], *, period_s=2.0):
        self._url = join(run_dir, "metrics.jsonl")
        self._on_epoch = on_epoch
        self._period_s = period_s
        self._seen: set[int] = {r.get("epoch", 0) for r in read_metrics(self._url)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, daemon=True)

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch may land between two polls

    def _poll_forever(self) -> None:
        while not self._stop.wait(self._period_s):
            self.poll()

    def poll(self) -> None:
        try:
            records = read_metrics(self._url)
        except (OSError, ValueError):  # a half-visible file on some stores: try again later
            return
        for record in records:
            epoch = record.get("epoch", 0)
            if epoch not in self._seen:
                self._seen.add(epoch)
                self._on_epoch(record)


def run_training(
    spec: TrainSpec,
    run_name: str,
    storage: str | None = None,
    address: str | None = None,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the resolved `spec` as run `run_name` under the storage root (`storage`, else
    spec.storage, else TOPK_STORAGE_URL or ./.topk/runs) and return result.json's content.

    Writes ROOT/RUN/spec.json (when absent), metrics.jsonl per epoch, checkpoints and
    result.json. `on_epoch(record)` (optional) gets each new metrics.jsonl record while the run
    goes. A failed run writes result.json with status "failed" and raises RuntimeError
    with the cause. Raises ValueError for a bad run name or storage URL, SpecError for class
    counts left unresolved.
    """
    run_dir = _open_run(spec, run_name, storage or spec.storage)
    scaling = spec.scaling
    ensure_ray(
        address,
        num_cpus=scaling.num_workers * scaling.cpus_per_worker,
        num_gpus=scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0,
    )
    trainer = build_trainer(spec, run_dir)

    def fit() -> None:
        if on_epoch is None:
            trainer.fit()
        else:
            with MetricsFollower(run_dir, on_epoch):
                trainer.fit()

    return _train_and_record(spec, run_dir, fit)


def _open_run(spec: TrainSpec, run_name: str, storage: str | None) -> str:
    """Check the run name and that the spec is resolved, and write ROOT/RUN/spec.json when
    absent (the service writes it first); returns ROOT/RUN."""
    check_run_name(run_name)
    if type(spec.loss).needs_class_counts and spec.loss.class_counts is None:  # type: ignore[attr-defined]
        raise SpecError(
            [
                (
                    "loss.class_counts",
                    f"loss {spec.loss.name!r} needs class counts and the spec was not resolved: "
                    "call jobs.contract.spec_files.resolve_class_counts(spec) first",
                )
            ]
        )
    run_dir = join(normalize_root(storage), run_name)
    spec_url = join(run_dir, "spec.json")
    if read_json(spec_url) is None:
        write_json(spec_url, spec.model_dump(mode="json"))
    return run_dir


def _train_and_record(spec: TrainSpec, run_dir: str, train: Callable[[], None]) -> dict[str, Any]:
    """Run `train()`, then write result.json and return it; a training that raised is
    recorded as failed with its root cause in one line, raised again as RuntimeError."""
    try:
        train()
    except Exception as exc:  # Ray wraps worker errors; keep the root cause's message
        error = _root_cause(exc)
        write_json(join(run_dir, "result.json"), summarize_run(spec, run_dir, error=error))
        raise RuntimeError(error) from exc
    result = summarize_run(spec, run_dir)
    write_json(join(run_dir, "result.json"), result)
    return result


def run_training_in_process(
    spec: TrainSpec, run_name: str, storage: str, *, device: str | None = None
) -> dict[str, Any]:
    """Train the resolved `spec` as run `run_name` in this process, with the same loop as a
    Ray Train worker (jobs.training.worker.run_loop) and the same files under the local storage
    root `storage`; an interrupted run resumes from its latest checkpoint. For many small
    single-worker runs (the experiment runner), where starting a Ray Train worker group per run
    would cost more than the training; no Ray is needed.

    The device is `resolve_device(device)` (jobs.training.device: "auto", "cpu" or "cuda";
    None reads TOPK_DEVICE, default "auto": CUDA when present, else the CPU). `scaling.use_gpu`
    is accepted when that device is CUDA. Returns result.json's content; a failed run writes
    result.json with status "failed" and raises RuntimeError with the cause. Raises ValueError
    (before writing anything) for what it cannot run: several workers, a remote storage root,
    `scaling.use_gpu` without CUDA, "cuda" asked on a machine without it.
    """
    from jobs.training.worker import run_loop

    session = _local_session(spec, run_name, storage, device)
    run_dir = _open_run(spec, run_name, storage)
    # The spec object itself: this process validated it already (once per process).
    config = {"spec": spec, "run_dir": run_dir}
    return _train_and_record(spec, run_dir, lambda: run_loop(config, session))


def _local_session(
    spec: TrainSpec, run_name: str, storage: str, device: str | None
) -> LocalSession:
    """The in-process session of run `run_name`; raises ValueError (writing nothing) for what
    in-process training cannot run (see run_training_in_process)."""
    from jobs.training.device import resolve_device
    from jobs.training.session import LocalSession

    if spec.scaling.num_workers != 1:
        raise ValueError(
            "in-process training runs one worker: set scaling.num_workers 1, "
            f"got {spec.scaling.num_workers}"
        )
    chosen = resolve_device(device)
    if spec.scaling.use_gpu and chosen.type != "cuda":
        raise ValueError(
            "scaling.use_gpu: in-process training would run on the CPU (no CUDA device, or "
            "TOPK_DEVICE=cpu); unset use_gpu or run where torch finds a GPU"
        )
    root = normalize_root(storage)
    if "://" in root and not root.startswith("file://"):
        raise ValueError(f"in-process training needs a local storage root, got {root}")
    return LocalSession(
        join(root, run_name).removeprefix("file://"),
        select=checkpoint_score(spec),  # as build_trainer's CheckpointConfig
        mode=spec.metrics.mode,
        keep=spec.checkpoint.keep_best,
        device=chosen,
    )


def _root_cause(exc: BaseException) -> str:
    """The innermost error's 'Type: message' (Ray nests the worker's exception)."""
    seen = exc
    while True:
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None or inner is seen:
            break
        seen = inner
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}".strip()
