"""How the `topk` client commands show jobs: the job table, one job, a sweep's trial table."""

from __future__ import annotations

from typing import Any

from jobs.contract.selection import best_by_metric
from service.console import print_rows
from service.job_status import TERMINAL


def metric_text(metrics: dict[str, Any]) -> str:
    """The latest validation top-K figures and the training loss, on one line."""
    keys = [k for k in metrics if k.startswith(("val_top", "val_macro_top", "train_loss"))]
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics[k], int | float))


def print_table(jobs: list[dict[str, Any]]) -> None:
    if not jobs:
        print("no jobs")
        return
    header = ("ID", "KIND", "STATUS", "ATTEMPTS", "CREATED", "NAME", "REASON")
    rows = [
        (
            job["id"], job["kind"], job["status"], str(job["attempts"]),
            job["created_at"][:19].replace("T", " "), job.get("name") or "-",
            (job.get("status_reason") or "")[:60],
        )
        for job in jobs
    ]  # fmt: skip
    print_rows(header, rows)


def print_job(job: dict[str, Any]) -> None:
    fields = [
        ("id", job["id"]), ("kind", job["kind"]), ("status", job["status"]),
        ("reason", job.get("status_reason")), ("attempts", job["attempts"]),
        ("created", job["created_at"]), ("started", job.get("started_at")),
        ("finished", job.get("finished_at")), ("storage", job.get("storage")),
        ("dashboard", job.get("dashboard_url")),
    ]  # fmt: skip
    for label, value in fields:
        if value not in (None, ""):
            print(f"{label + ':':<11}{value}")
    if job.get("latest_metrics"):
        print(
            f"{'metrics:':<11}epoch {job['latest_metrics'].get('epoch')}  "
            + metric_text(job["latest_metrics"])
        )
    for warning in job.get("warnings") or []:
        print(f"{'warning:':<11}{warning}")
    if job["kind"] == "sweep":
        _print_trials(job)


def _print_trials(job: dict[str, Any]) -> None:
    """A sweep's trial table (live while the sweep runs: jobs/sweep.py rewrites sweep.json as
    trials report) and its best trial as one line."""
    from jobs.contract.sweep import describe_best

    spec = job.get("spec") or {}
    metric, mode = spec.get("metric", "val_top5"), spec.get("mode", "max")
    trials = [t for t in job.get("trials") or [] if isinstance(t, dict)]
    if not trials:
        if job["status"] not in TERMINAL:
            print(f"{'trials:':<11}none reported yet")
        return
    paths = sorted({path for t in trials for path in (t.get("params") or {})})
    header = ("TRIAL", "STATUS", "EPOCH", *paths, metric)
    rows = []
    for trial in trials:
        params, metrics = trial.get("params") or {}, trial.get("metrics") or {}
        value = metrics.get(metric)
        rows.append(
            (
                str(trial.get("trial_id", "-")), str(trial.get("status", "-")),
                str(metrics.get("epoch", "-")),
                *[_value_text(params.get(path)) for path in paths],
                f"{value:.4f}" if isinstance(value, int | float) else "-",
            )
        )  # fmt: skip
    print("trials:")
    print_rows(header, rows, indent="  ")
    best_params = job.get("best_params")
    if best_params is not None:
        best = _best_trial(trials, metric, mode, params=best_params)
        label = "best:"
    else:  # still running: the best trial so far
        best = _best_trial(trials, metric, mode)
        best_params = best.get("params") if best else None
        label = "best so far:"
    if best_params is not None:
        value = (best or {}).get("metrics", {}).get(metric)
        trial_id = (best or {}).get("trial_id")
        print(f"{label} {describe_best(best_params, metric=metric, value=value, trial=trial_id)}")


def _best_trial(
    trials: list[dict[str, Any]], metric: str, mode: str, *, params: dict | None = None
) -> dict[str, Any] | None:
    """The trial with the best `metric` (among those with `params` when given), by the rule
    every layer uses (jobs/contract/selection.py)."""
    candidates = [t for t in trials if params is None or t.get("params") == params]
    return best_by_metric(
        candidates,
        metric,
        "max" if mode == "max" else "min",
        metrics_of=lambda t: t.get("metrics") or {},
    )


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
