"""Launching queued jobs: which ones fit the cluster now, and the steps of one launch.

A launch writes the run's spec.json, then records queued -> launching with the attempt's
submission id (a compare-and-set) BEFORE it submits to Ray; submission ids are deterministic
(`<job id>-<attempt>`), so a crash between the two is repaired by looking the id up on Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from jobs.contract import run_files
from service.error_text import describe_error
from service.job_status import CANCELLED, FAILED, LAUNCHED, LAUNCHING, QUEUED
from service.launcher import LaunchError, build_entrypoint, build_job_env, submission_id_for
from service.settings import Settings, crash_point
from service.store import JobRow, Store

log = logging.getLogger("topk.reconciler")

# A storage that cannot be written this way will not be writable on the next pass either.
_DETERMINISTIC_ERRORS = (
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
    NotImplementedError,
    ValueError,
    TypeError,
)
_SLACK = 1e-9  # resource sums are floats


class Admission:
    """Which queued jobs may launch, asked in submission order: a job launches when what the
    active jobs asked for plus its own request fits the cluster's CPUs and GPUs, and nothing
    overtakes a job that waits for resources. A job larger than the whole cluster waits for it
    to grow without blocking the others; one in its retry backoff is passed over."""

    def __init__(self, capacity: dict[str, float], active: list[JobRow], now: float):
        self.capacity, self.now = capacity, now
        self.used_cpus = sum(job.requested_cpus for job in active)
        self.used_gpus = sum(job.requested_gpus for job in active)
        self.blocked = False

    def wait_reason(self, job: JobRow, position: int) -> str | None:
        """Why `job` (the `position`-th in the queue) does not launch now ("" when it is in its
        backoff), or None when it may."""
        cpus, gpus = self.capacity["CPU"], self.capacity["GPU"]
        if job.requested_cpus > cpus or job.requested_gpus > gpus:
            return (
                f"waiting for the cluster to grow: needs {job.requested_cpus:g} CPU / "
                f"{job.requested_gpus:g} GPU, the cluster has {cpus:g} CPU / {gpus:g} GPU"
            )
        if job.not_before is not None and job.not_before > self.now:
            return ""
        fits = (
            self.used_cpus + job.requested_cpus <= cpus + _SLACK
            and self.used_gpus + job.requested_gpus <= gpus + _SLACK
        )
        if self.blocked or not fits:
            self.blocked = True  # submission order: nothing overtakes a job that waits
            return f"waiting for resources (queue position {position})"
        return None

    def launched(self, job: JobRow) -> None:
        self.used_cpus += job.requested_cpus
        self.used_gpus += job.requested_gpus


class Launching:
    """Launches queued jobs on Ray; a launch that keeps failing fails its job."""

    def __init__(
        self,
        store: Store,
        launcher,
        settings: Settings,
        *,
        on_launch: Callable[[], None],
        isolated: Callable[[Callable[[JobRow], object], JobRow], object],
        clock: Callable[[], float] = time.time,
    ):
        self.store, self.launcher, self.settings = store, launcher, settings
        self.on_launch, self.isolated, self.clock = on_launch, isolated, clock
        self.launch_failures: dict[str, int] = {}
        self.submit_failures: dict[str, int] = {}

    def launch_queued(self) -> None:
        queued = self.store.list_jobs(statuses=(QUEUED,), oldest_first=True, limit=10_000)
        if not queued:
            return
        try:
            capacity = self.launcher.capacity()
        except LaunchError as exc:
            for job in queued:
                self.store.touch(job.id, f"waiting: Ray unreachable ({exc})", expect=job.status)
            return
        capacity["CPU"] = max(capacity["CPU"], self.settings.cluster_max_cpus or 0.0)
        capacity["GPU"] = max(capacity["GPU"], self.settings.cluster_max_gpus or 0.0)
        active = self.store.list_jobs(statuses=LAUNCHED, limit=10_000)
        admission = Admission(capacity, active, self.clock())
        for position, job in enumerate(queued, start=1):
            reason = admission.wait_reason(job, position)
            if reason:
                self.store.touch(job.id, reason, expect=job.status)
            elif reason is None and self.isolated(self._launch, job):
                admission.launched(job)

    def _launch(self, job: JobRow) -> bool:
        """queued -> launching (recorded first), then submit. False if another actor won or the
        run folder could not be written (the job then failed, or waits for a later pass)."""
        attempt = job.attempt + 1
        try:
            run_files.write_spec(job.storage_root, job.id, job.spec)
        except Exception as exc:
            self._spec_write_failed(job, exc)
            return False
        self.launch_failures.pop(job.id, None)
        crash_point(self.settings, "after_spec_write")
        launching = self.store.transition(
            job.id,
            LAUNCHING,
            f"launching attempt {attempt}",
            expect=QUEUED,
            attempt=attempt,
            submission_id=submission_id_for(job.id, attempt),
            not_before=None,
        )
        if launching is None:
            return False
        crash_point(self.settings, "after_launching_recorded")
        self.submit(launching)
        return True

    def _spec_write_failed(self, job: JobRow, exc: Exception) -> None:
        """The run's spec.json could not be written: a storage that can never be written fails
        the job at once; anything else is retried on later passes, up to the attempt limit."""
        problem = f"cannot write the run folder under {job.storage_root}: {describe_error(exc)}"
        failures = self.launch_failures.get(job.id, 0) + 1
        self.launch_failures[job.id] = failures
        if isinstance(exc, _DETERMINISTIC_ERRORS) or failures >= self.settings.max_attempts:
            self.launch_failures.pop(job.id, None)
            suffix = "" if isinstance(exc, _DETERMINISTIC_ERRORS) else f" ({failures} tries)"
            self.store.transition(job.id, FAILED, f"{problem}{suffix}", expect=QUEUED)
            return
        self.store.touch(
            job.id,
            f"{problem}; will retry ({failures} of {self.settings.max_attempts})",
            expect=job.status,
        )

    def submit(self, job: JobRow) -> None:
        """Submit a launching job's attempt to Ray (once: Ray refuses a known submission id)."""
        assert job.submission_id is not None
        entrypoint = build_entrypoint(
            python=self.settings.job_python,
            kind=job.kind,
            spec_url=run_files.run_url(job.storage_root, job.id, "spec.json"),
            run_name=job.id,
            storage_root=job.storage_root,
        )
        env = build_job_env(
            allowed_protocols=self.settings.allowed_protocols,
            allowed_roots=self.settings.allowed_roots,
        )
        try:
            self.launcher.submit(job.submission_id, entrypoint, env=env)
        except LaunchError as exc:
            self._submit_failed(job, exc)
            return
        self.submit_failures.pop(job.id, None)
        self.on_launch()
        crash_point(self.settings, "after_submit")
        current = self.store.get_job(job.id)
        if current is not None and current.status == CANCELLED:
            # Cancelled while we were submitting: the cancel may have found nothing to stop.
            self.stop_quietly(job.submission_id)
        else:
            self.store.touch(job.id, f"submitted to Ray as {job.submission_id}", expect=job.status)

    def _submit_failed(self, job: JobRow, exc: LaunchError) -> None:
        failures = self.submit_failures.get(job.id, 0) + 1
        self.submit_failures[job.id] = failures
        if failures < self.settings.max_attempts:
            self.store.touch(job.id, f"submission failed, will retry: {exc}", expect=job.status)
            return
        reason = f"Ray refused the submission {failures} times: {exc}"
        self.store.transition(job.id, FAILED, reason, expect=LAUNCHING)
        self.submit_failures.pop(job.id, None)

    def stop_quietly(self, submission_id: str) -> None:
        try:
            self.launcher.stop(submission_id)
        except LaunchError as exc:
            log.warning("could not stop Ray job %s: %s", submission_id, exc)
