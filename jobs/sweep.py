"""Ray Tune sweeps over dotted training-spec paths: `run_sweep(sweep_spec, run_name, ...)`.

Each trial is a Tune function trainable that applies its sampled parameters to the base
TrainSpec (`jobs.contract.sweep.apply_params`, which validates again) and runs a TorchTrainer inside
(Ray Train V2 pattern: the trainer reports to Tune through TuneReportCallback). ASHA stops weak
trials on the per-epoch metric. Files under ROOT/RUN: spec.json (the sweep), tune/ (Tune's
state), trials/<trial>/ (each trial's run: metrics.jsonl, checkpoints/, result.json) and
sweep.json: the trial table, rewritten while the sweep runs as trials start, report an epoch and
end ("complete": false, trial statuses pending/running/paused/completed/stopped/error), and at
the end with the best params and the best config as a valid training spec ("complete": true).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, NoReturn

from jobs.contract.run_files import (
    check_run_name,
    join,
    normalize_root,
    ray_storage,
    read_json,
    write_json,
)
from jobs.contract.selection import best_by_metric
from jobs.contract.spec_files import resolve_class_counts
from jobs.contract.sweep import SweepSpec, apply_params, describe_best
from jobs.contract.train import TrainSpec
from jobs.training.run import build_trainer, ensure_ray, summarize_run

logger = logging.getLogger(__name__)

_REPORTED_PREFIXES = ("epoch", "train_loss", "val_", "samples_per_second", "skipped", "lr")
_LIVE_STATUSES = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused"}


def _trial_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Our per-epoch metrics out of what Tune recorded (Tune adds its own bookkeeping keys)."""
    return {
        key: value
        for key, value in (metrics or {}).items()
        if key.startswith(_REPORTED_PREFIXES) and isinstance(value, (int, float))
    }


def run_trial(config: dict[str, Any], *, base_spec: dict[str, Any], sweep_dir: str) -> None:
    """One Tune trial: build its TrainSpec and train it on Ray Train, reporting to Tune. The
    trial's spec is new in this process (a trial that switches `loss.name` may need class
    counts the base spec did not), so it is resolved here, once."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    params = config["params"]
    spec = resolve_class_counts(apply_params(base_spec, params))
    trial_dir = join(sweep_dir, "trials", f"trial-{tune.get_context().get_trial_id()}")
    write_json(join(trial_dir, "spec.json"), spec.model_dump(mode="json"))
    trainer = build_trainer(spec, trial_dir, callbacks=[TuneReportCallback()])
    trainer.fit()
    write_json(join(trial_dir, "result.json"), summarize_run(spec, trial_dir))


def _finished_status(metrics: dict[str, Any], epochs: int) -> str:
    """A trial that ended without an error: "completed" all its epochs, or "stopped" by ASHA."""
    return "completed" if metrics.get("epoch", 0) >= epochs else "stopped"


def live_trial_table(sweep: SweepSpec, sweep_dir: str) -> Any:
    """A Tune callback that rewrites ROOT/RUN/sweep.json with the trial table whenever a trial
    starts, reports an epoch or ends, so that the running sweep's trials can be followed (the
    service's sweep record and `topk sweeps status` read that file). Best effort: a write that
    fails is logged and the sweep goes on."""
    from ray import tune

    epochs = sweep.train.epochs

    class LiveTrialTable(tune.Callback):
        def __init__(self) -> None:
            self.ended: dict[str, str] = {}  # trial id -> "completed" | "stopped" | "error"

        def row(self, trial: Any) -> dict[str, Any]:
            metrics = _trial_metrics(trial.last_result)
            status = self.ended.get(trial.trial_id)
            if status is None and trial.status == "TERMINATED":
                status = _finished_status(metrics, epochs)
            elif status is None:
                status = "error" if trial.status == "ERROR" else None
            return {
                "trial_id": trial.trial_id,
                "params": dict((trial.config or {}).get("params") or {}),
                "status": status or _LIVE_STATUSES.get(trial.status, str(trial.status).lower()),
                "metrics": metrics,
                "error": None,
            }

        def write(self, trials: list[Any]) -> None:
            table = _trial_table(sweep, [self.row(trial) for trial in trials], complete=False)
            try:
                write_json(join(sweep_dir, "sweep.json"), table)
            except Exception as exc:  # a storage blip must not stop the sweep
                logger.warning("could not write the live trial table: %s", exc)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.write(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.write(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # Called before Tune marks the trial TERMINATED.
            self.ended[trial.trial_id] = _finished_status(_trial_metrics(trial.last_result), epochs)
            self.write(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended[trial.trial_id] = "error"
            self.write(trials)

    return LiveTrialTable()


def default_concurrency(spec: TrainSpec) -> int:
    """How many trials the cluster's CPUs (or GPUs) hold at once, at least 1."""
    import ray

    resources = ray.cluster_resources()
    scaling = spec.scaling
    if scaling.use_gpu:
        need, have = scaling.num_workers * scaling.gpus_per_worker, resources.get("GPU", 0.0)
    else:
        need, have = scaling.num_workers * scaling.cpus_per_worker, resources.get("CPU", 0.0)
    return max(int(math.floor(have / need + 1e-9)), 1)


def run_sweep(
    sweep: SweepSpec,
    run_name: str,
    storage: str | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Run the resolved sweep (class counts filled, as `jobs.cli.load_spec` leaves it) as
    `run_name` under the storage root and return sweep.json's content: {"metric", "mode",
    "trials": [{"trial_id", "params", "status", "metrics"}], "best_params", "best_config"}.
    Trial status: "completed", "stopped" (by ASHA) or "error". Raises RuntimeError when no
    trial produced the metric, ValueError for a bad name or storage.
    """
    check_run_name(run_name)
    sweep_dir = join(normalize_root(storage or sweep.train.storage), run_name)
    if read_json(join(sweep_dir, "spec.json")) is None:
        write_json(join(sweep_dir, "spec.json"), sweep.model_dump(mode="json"))
    scaling = sweep.train.scaling
    ensure_ray(
        address,
        num_cpus=scaling.num_workers * scaling.cpus_per_worker,
        num_gpus=scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0,
    )
    results = build_tuner(sweep, sweep_dir).fit()
    trials = [_trial_row(result, sweep.train.epochs) for result in results]
    best = best_by_metric(trials, sweep.metric, sweep.mode, metrics_of=lambda t: t["metrics"])
    if best is None:
        _fail_without_metric(sweep, sweep_dir, trials, results)
    summary = _trial_table(sweep, trials, complete=True)
    summary["best_trial_id"] = best["trial_id"]
    summary["best_params"] = best["params"]
    summary["best_config"] = apply_params(sweep.train, best["params"]).model_dump(mode="json")
    write_json(join(sweep_dir, "sweep.json"), summary)
    return summary


def build_tuner(sweep: SweepSpec, sweep_dir: str) -> Any:
    """The Tune Tuner of the sweep whose files live at `sweep_dir` (ROOT/RUN): one trial per
    point of the search space, ASHA or FIFO, at most `max_concurrent_trials` at a time."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    train = sweep.train
    scheduler: Any = FIFOScheduler()
    if sweep.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",  # one report per epoch
            max_t=train.epochs,
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
        )
    storage_path, storage_filesystem = ray_storage(sweep_dir)
    trainable = tune.with_parameters(
        run_trial, base_spec=train.model_dump(mode="json"), sweep_dir=sweep_dir
    )
    # The trial function only drives a TorchTrainer whose workers hold the resources; Tune
    # refuses an empty request, so it asks for a sliver of a CPU.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    return tune.Tuner(
        trainable,
        param_space={"params": {path: domain.to_tune() for path, domain in sweep.search.items()}},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            scheduler=scheduler,
            max_concurrent_trials=sweep.max_concurrent_trials or default_concurrency(train),
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            verbose=1,
            callbacks=[live_trial_table(sweep, sweep_dir)],
        ),
    )


def _trial_row(result: Any, epochs: int) -> dict[str, Any]:
    """One finished trial's row of the trial table, from its Tune result."""
    metrics = _trial_metrics(result.metrics)
    return {
        "trial_id": (result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1],
        "params": dict(result.config["params"]),
        "status": "error" if result.error is not None else _finished_status(metrics, epochs),
        "metrics": metrics,
        "error": None if result.error is None else _one_line(result.error),
    }


def _trial_table(sweep: SweepSpec, trials: list[dict[str, Any]], *, complete: bool) -> dict:
    """sweep.json's content without a best trial (yet)."""
    return {
        "metric": sweep.metric,
        "mode": sweep.mode,
        "complete": complete,
        "trials": trials,
        "best_params": None,
        "best_config": None,
    }


def _fail_without_metric(
    sweep: SweepSpec, sweep_dir: str, trials: list[dict[str, Any]], results: Any
) -> NoReturn:
    """Write the final trial table of a sweep where no trial reported the metric and raise
    RuntimeError. When every trial failed for the spec's or the data's reason, a relaunch would
    fail the same way: result.json then records the failure (the service fails the job at
    once instead of relaunching it)."""
    write_json(join(sweep_dir, "sweep.json"), _trial_table(sweep, trials, complete=True))
    errors = "; ".join(t["error"] for t in trials if t["error"]) or "no metric reported"
    message = f"no trial reported {sweep.metric}: {errors}"
    if not any(result.error is not None and not is_user_error(result.error) for result in results):
        write_json(
            join(sweep_dir, "result.json"),
            {"status": "failed", "error": message, "time": time.time()},
        )
    raise RuntimeError(message)


def is_user_error(error: BaseException) -> bool:
    """Whether a trial's error is the user's (the spec or the data) rather than the cluster's:
    every innermost error under Ray's wrappers (a task error's cause, Ray Train's per-worker
    failures) is a ValueError (spec validation, a refused URL, a bad dataset.json) or a
    DataPipelineError (data that cannot be read as the spec asks). A died actor or node is not."""
    from ray.exceptions import RayError

    from jobs.data.pipeline import DataPipelineError

    pending, leaves, seen = [error], [], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = [getattr(current, "cause", None), current.__cause__]
        inner += list((getattr(current, "worker_failures", None) or {}).values())
        inner = [e for e in inner if isinstance(e, BaseException) and e is not current]
        if inner:
            pending.extend(inner)
        else:
            leaves.append(current)
    return all(
        isinstance(leaf, (ValueError, DataPipelineError)) and not isinstance(leaf, RayError)
        for leaf in leaves
    )


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def format_trial_table(summary: dict[str, Any]) -> str:
    """The trial table as aligned text: one row per trial, params and the sweep metric."""
    metric = summary["metric"]
    paths = sorted({path for trial in summary["trials"] for path in trial["params"]})
    header = ["trial", "status", "epochs", *paths, metric]
    rows = [header]
    for trial in summary["trials"]:
        value = trial["metrics"].get(metric)
        rows.append(
            [
                str(trial["trial_id"]),
                trial["status"],
                str(trial["metrics"].get("epoch", 0)),
                *[_format_value(trial["params"].get(path)) for path in paths],
                "-" if value is None else f"{value:.4f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    if summary.get("best_params") is not None:
        best_id = summary.get("best_trial_id")
        best = next((t for t in summary["trials"] if t["trial_id"] == best_id), {})
        best_line = describe_best(
            summary["best_params"],
            metric=metric,
            value=best.get("metrics", {}).get(metric),
            trial=best_id,
        )
        lines.append(f"best: {best_line}")
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
