"""The reconciler: the one loop that moves jobs between the database and Ray.

Each pass:
1. follows launching/running jobs: Ray status -> our status, result.json for the outcome,
   infrastructure failures retried with backoff (a new attempt resumes from the run's
   checkpoints, since the run name is the job id) - a job Ray no longer knows (the cluster was
   replaced) is one of them - and failed with the reason once the attempts are spent;
2. launches queued jobs that fit the cluster, in submission order;
3. makes sure cancelled jobs are stopped on Ray.

One job's trouble never stalls the others: each job is handled apart, a launch that fails
deterministically (its storage cannot be written) fails that job with the reason, and a transient
one is retried on later passes up to the attempt limit. Passes that keep failing show in `/readyz`
and `/metrics` (`consecutive_failures`, `failed_passes`, `job_errors`).

When the embedded Ray head was replaced (it died and was restarted, or the server found its
recorded head gone), `cluster_replaced` moves every launching or running job to a new attempt
before anything is launched on the new head, so no attempt is ever submitted to two heads.

Never launching twice rests on two facts: a job moves queued -> launching (a compare-and-set,
with the attempt's submission id) BEFORE anything is submitted, and submission ids are
deterministic (`<job id>-<attempt>`). So after a crash, a `launching` job is looked up on Ray by
its submission id and adopted if it exists, submitted if it does not; Ray refuses a second
submission with the same id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from jobs.contract import exit_codes
from service import run_storage
from service.db import (
    CANCELLED,
    FAILED,
    LAUNCHING,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRow,
    Store,
)
from service.launcher import (
    LaunchError,
    RayJobInfo,
    build_entrypoint,
    build_job_env,
    submission_id_for,
)
from service.settings import Settings

log = logging.getLogger("topk.reconciler")

RECENTLY_CANCELLED_S = 600.0
SPEC_REFUSED_EXIT_CODES = exit_codes.REFUSED_BY_DRIVER
"""`python -m jobs train|sweep` exits 3 when the spec is invalid and 2 when its arguments or its
spec file are refused (jobs/contract/exit_codes.py): the user's error, the job fails at once. 1 when the
run failed; any other code or a vanished job is an infrastructure failure (retried up to
TOPK_MAX_ATTEMPTS) unless the run recorded its own failure in result.json."""
FAILING_PASSES = 3
"""Passes that failed in a row before `/readyz` reports the reconciler as failing."""

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


def crash_point(settings: Settings, step: str) -> None:
    """Test hook: TOPK_TEST_CRASH_AT=<step> kills the process (like kill -9) at that step."""
    if settings.test_crash_at == step:
        os._exit(137)


class Reconciler:
    def __init__(
        self,
        store: Store,
        launcher,
        settings: Settings,
        *,
        on_launch: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.launcher = launcher
        self.settings = settings
        self.on_launch = on_launch or (lambda: None)
        self.clock = clock
        self.last_pass_at: float | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0  # passes that raised, in a row
        self.failed_passes = 0
        self.job_errors = 0  # unexpected errors while handling one job (the pass went on)
        self._replacements: list[tuple[str, threading.Event]] = []
        self._replacements_lock = threading.Lock()
        self._launch_failures: dict[str, int] = {}
        self._submit_failures: dict[str, int] = {}
        self._confirmed_stopped: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="topk-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Run a pass now (e.g. a job was just submitted)."""
        if self.launcher is None:  # hold mode: a pass has nothing to launch
            return
        if not self._wake.is_set():  # a pass is already due: waking the thread again is waste
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
                self.last_error = None
                self.consecutive_failures = 0
            except Exception as exc:  # keep the loop alive; the error shows in /readyz
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.consecutive_failures += 1
                self.failed_passes += 1
                log.exception("reconciler pass failed")
            self._wake.wait(self.settings.reconcile_interval_s)
            self._wake.clear()

    def lag_seconds(self) -> float | None:
        return None if self.last_pass_at is None else self.clock() - self.last_pass_at

    def health_problem(self) -> str | None:
        """Why the reconciler is not doing its work (for /readyz), or None when it is."""
        if self.consecutive_failures >= FAILING_PASSES:
            return (
                f"failing: {self.consecutive_failures} passes in a row, last error: "
                f"{self.last_error}"
            )
        lag = self.lag_seconds()
        stalled_after = 30.0 + 10 * self.settings.reconcile_interval_s
        if self._thread is not None and lag is not None and lag > stalled_after:
            return f"stalled: no completed pass for {lag:.0f}s"
        return None

    def cluster_replaced(self, reason: str, *, wait_s: float = 0.0) -> bool:
        """The Ray cluster was replaced: the jobs it ran are gone. The next pass moves every
        launching or running job to a new attempt (before it launches anything). With `wait_s`,
        block until that pass has done so; returns whether it has."""
        done = threading.Event()
        with self._replacements_lock:
            self._replacements.append((reason, done))
        self.wake()
        return done.wait(wait_s) if wait_s > 0 else False

    def reconcile_once(self) -> None:
        if self.launcher is None:  # hold mode: accept and record, launch nothing
            self.last_pass_at = self.clock()
            return
        self._apply_replacements()
        for job in self.store.list_jobs(
            statuses=(LAUNCHING, RUNNING), oldest_first=True, limit=10_000
        ):
            self._isolated(self._follow, job)
        self._launch_queued()
        self._stop_cancelled()
        self.last_pass_at = self.clock()

    def _isolated(self, handle: Callable[[JobRow], object], job: JobRow):
        """`handle(job)`; an unexpected error is logged against that job and the pass goes on
        (one job's trouble never stalls the others)."""
        try:
            return handle(job)
        except Exception as exc:
            self.job_errors += 1
            log.exception("reconciling %s failed", job.id)
            self.store.touch(job.id, f"reconciler error, will retry: {type(exc).__name__}: {exc}")
            return None

    def _apply_replacements(self) -> None:
        with self._replacements_lock:
            pending, self._replacements = self._replacements, []
        if not pending:
            return
        reason = pending[-1][0]
        for job in self.store.list_jobs(
            statuses=(LAUNCHING, RUNNING), oldest_first=True, limit=10_000
        ):
            self._retry_or_fail(job, f"attempt {job.attempt} was lost: {reason}", retry=True)
            self._submit_failures.pop(job.id, None)
        for _, done in pending:
            done.set()

    # -- following ----------------------------------------------------------------------------

    def _follow(self, job: JobRow) -> None:
        assert job.submission_id is not None
        try:
            info = self.launcher.info(job.submission_id)
        except LaunchError as exc:
            self.store.touch(job.id, f"Ray unreachable, will retry: {exc}")
            return
        if info is None:
            if job.status == LAUNCHING:
                # Recorded but never submitted (or the submission was lost): submit it now.
                self._submit(job)
            else:
                self._retry_or_fail(
                    job,
                    f"Ray job {job.submission_id} vanished (was the cluster restarted?)",
                    retry=True,
                )
            return
        if info.status == "PENDING":
            if job.status == LAUNCHING:
                self.store.touch(job.id, f"Ray job {info.submission_id} is pending")
            return
        if info.status == "RUNNING":
            if job.status == LAUNCHING:
                self.store.transition(
                    job.id, RUNNING, f"Ray job {info.submission_id} is running", expect=LAUNCHING
                )
            return
        self._finish(job, info)

    def _finish(self, job: JobRow, info: RayJobInfo) -> None:
        result = run_storage.read_json(job.storage_root, job.id, "result.json")
        if info.status == "SUCCEEDED":
            if result is not None and result.get("status") == "failed":
                reason = f"training failed: {result.get('error') or 'see the logs'}"
                self.store.transition(job.id, FAILED, reason, expect=(LAUNCHING, RUNNING))
            else:
                self.store.transition(job.id, SUCCEEDED, "finished", expect=(LAUNCHING, RUNNING))
            return
        if info.status == "STOPPED":
            self.store.transition(
                job.id,
                CANCELLED,
                "stopped on Ray (outside the service)",
                expect=(LAUNCHING, RUNNING),
            )
            return
        # FAILED: the job's own failure when the runtime recorded one, infrastructure otherwise.
        if result is not None and result.get("status") == "failed":
            reason = f"training failed: {result.get('error') or 'see the logs'}"
            self.store.transition(job.id, FAILED, reason, expect=(LAUNCHING, RUNNING))
            return
        if info.exit_code in SPEC_REFUSED_EXIT_CODES:
            # The user's error, found by the worker: another attempt would be refused the same way.
            reason = (
                f"the worker refused the spec (exit code {info.exit_code}): "
                f"{self._refusal(job, info)}"
            )
            self.store.transition(job.id, FAILED, reason, expect=(LAUNCHING, RUNNING))
            return
        detail = _summary(info)
        self._retry_or_fail(job, f"attempt {job.attempt} failed: {detail}", retry=True)

    def _refusal(self, job: JobRow, info: RayJobInfo) -> str:
        """The worker's error lines: from the log tail in Ray's message, else from the job's
        logs, else a pointer to them."""
        found = _error_lines(info.message or "")
        if found is None:
            try:
                found = _error_lines(self.launcher.logs(job.submission_id)[-20_000:])
            except LaunchError:
                found = None
        return found or "see the job's logs"

    def _retry_or_fail(self, job: JobRow, reason: str, *, retry: bool) -> None:
        if retry and job.attempt < self.settings.max_attempts:
            delay = self.settings.retry_backoff_s * 2 ** (job.attempt - 1)
            self.store.transition(
                job.id,
                QUEUED,
                f"{reason}; retrying in {delay:.0f}s (attempt {job.attempt + 1} of "
                f"{self.settings.max_attempts}, resuming from the last checkpoint)",
                expect=job.status,
                not_before=self.clock() + delay,
            )
            return
        if retry:
            reason = f"{reason}; gave up after {job.attempt} attempts"
        self.store.transition(job.id, FAILED, reason, expect=job.status)

    # -- launching ----------------------------------------------------------------------------

    def _launch_queued(self) -> None:
        queued = self.store.list_jobs(statuses=(QUEUED,), oldest_first=True, limit=10_000)
        if not queued:
            return
        try:
            capacity = self.launcher.capacity()
        except LaunchError as exc:
            for job in queued:
                self.store.touch(job.id, f"waiting: Ray unreachable ({exc})")
            return
        capacity["CPU"] = max(capacity["CPU"], self.settings.cluster_max_cpus or 0.0)
        capacity["GPU"] = max(capacity["GPU"], self.settings.cluster_max_gpus or 0.0)
        used_cpus = used_gpus = 0.0
        for job in self.store.list_jobs(statuses=(LAUNCHING, RUNNING), limit=10_000):
            used_cpus += job.requested_cpus
            used_gpus += job.requested_gpus
        now = self.clock()
        blocked = False
        for position, job in enumerate(queued, start=1):
            if job.requested_cpus > capacity["CPU"] or job.requested_gpus > capacity["GPU"]:
                # Larger than the whole cluster: it must not block the queue behind it.
                self.store.touch(
                    job.id,
                    f"waiting for the cluster to grow: needs {job.requested_cpus:g} CPU / "
                    f"{job.requested_gpus:g} GPU, the cluster has {capacity['CPU']:g} CPU / "
                    f"{capacity['GPU']:g} GPU",
                )
                continue
            if job.not_before is not None and job.not_before > now:
                continue
            fits = (
                used_cpus + job.requested_cpus <= capacity["CPU"] + 1e-9
                and used_gpus + job.requested_gpus <= capacity["GPU"] + 1e-9
            )
            if blocked or not fits:
                blocked = True  # submission order: nothing overtakes a job that waits
                self.store.touch(job.id, f"waiting for resources (queue position {position})")
                continue
            if self._isolated(self._launch, job):
                used_cpus += job.requested_cpus
                used_gpus += job.requested_gpus

    def _launch(self, job: JobRow) -> bool:
        """queued -> launching (recorded first), then submit. False if another actor won or the
        run folder could not be written (the job then failed, or waits for a later pass)."""
        attempt = job.attempt + 1
        try:
            run_storage.write_spec(job.storage_root, job.id, job.spec)
        except Exception as exc:
            self._spec_write_failed(job, exc)
            return False
        self._launch_failures.pop(job.id, None)
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
        self._submit(launching)
        return True

    def _spec_write_failed(self, job: JobRow, exc: Exception) -> None:
        """The run's spec.json could not be written: a storage that can never be written fails
        the job at once; anything else is retried on later passes, up to the attempt limit."""
        problem = (
            f"cannot write the run folder under {job.storage_root}: {type(exc).__name__}: {exc}"
        )
        failures = self._launch_failures.get(job.id, 0) + 1
        self._launch_failures[job.id] = failures
        if isinstance(exc, _DETERMINISTIC_ERRORS) or failures >= self.settings.max_attempts:
            self._launch_failures.pop(job.id, None)
            suffix = "" if isinstance(exc, _DETERMINISTIC_ERRORS) else f" ({failures} tries)"
            self.store.transition(job.id, FAILED, f"{problem}{suffix}", expect=QUEUED)
            return
        self.store.touch(
            job.id, f"{problem}; will retry ({failures} of {self.settings.max_attempts})"
        )

    def _submit(self, job: JobRow) -> None:
        assert job.submission_id is not None
        entrypoint = build_entrypoint(
            python=self.settings.job_python,
            kind=job.kind,
            spec_url=run_storage.run_url(job.storage_root, job.id, "spec.json"),
            run_name=job.id,
            storage_root=job.storage_root,
        )
        try:
            self.launcher.submit(
                job.submission_id,
                entrypoint,
                env=build_job_env(
                    allowed_protocols=self.settings.allowed_protocols,
                    allowed_roots=self.settings.allowed_roots,
                ),
            )
        except LaunchError as exc:
            failures = self._submit_failures.get(job.id, 0) + 1
            self._submit_failures[job.id] = failures
            if failures >= self.settings.max_attempts:
                self.store.transition(
                    job.id,
                    FAILED,
                    f"Ray refused the submission {failures} times: {exc}",
                    expect=LAUNCHING,
                )
                self._submit_failures.pop(job.id, None)
            else:
                self.store.touch(job.id, f"submission failed, will retry: {exc}")
            return
        self._submit_failures.pop(job.id, None)
        self.on_launch()
        crash_point(self.settings, "after_submit")
        current = self.store.get_job(job.id)
        if current is not None and current.status == CANCELLED:
            # Cancelled while we were submitting: the cancel may have found nothing to stop.
            self._stop_quietly(job.submission_id)
        else:
            self.store.touch(job.id, f"submitted to Ray as {job.submission_id}")

    # -- cancellation -------------------------------------------------------------------------

    def _stop_cancelled(self) -> None:
        cutoff = self.clock() - RECENTLY_CANCELLED_S
        for job in self.store.list_jobs(statuses=(CANCELLED,), limit=200):
            if job.submission_id is None or (job.finished_at or 0) < cutoff:
                continue
            if job.submission_id in self._confirmed_stopped:
                continue
            try:
                info = self.launcher.info(job.submission_id)
            except LaunchError:
                return
            if info is None or info.is_terminal:
                self._confirmed_stopped.add(job.submission_id)
            else:
                self._stop_quietly(job.submission_id)

    def _stop_quietly(self, submission_id: str) -> None:
        try:
            self.launcher.stop(submission_id)
        except LaunchError as exc:
            log.warning("could not stop Ray job %s: %s", submission_id, exc)


_MAX_REFUSAL_CHARS = 500


def _error_lines(log_tail: str) -> str | None:
    """The worker's error out of the end of its output: from the last line that opens an error
    (`error: ...` or `SPEC: invalid spec (N problem(s)):`) to the end, joined on one line and
    bounded; None when no such line is there. Ray's failure message carries the last log lines
    after its own first line."""
    lines = [line.strip() for line in log_tail.splitlines()[-40:] if line.strip()]
    starts = [
        i
        for i, line in enumerate(lines)
        if line.startswith("error:") or ": error: " in line or ": invalid spec (" in line
    ]
    if not starts:
        return None
    text = " ".join(lines[starts[-1] :])
    return text if len(text) <= _MAX_REFUSAL_CHARS else text[: _MAX_REFUSAL_CHARS - 3] + "..."


def _summary(info: RayJobInfo) -> str:
    parts = [info.error_type or info.status]
    if info.exit_code is not None:
        parts.append(f"exit code {info.exit_code}")
    if info.message:
        parts.append(info.message.splitlines()[0][:300])
    return ", ".join(parts)
