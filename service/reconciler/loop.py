"""The reconciler's loop: one thread, one pass at a time, each job handled apart."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from service.error_text import describe_error
from service.job_status import CANCELLED, LAUNCHED
from service.launcher import LaunchError
from service.reconciler.following import Following
from service.reconciler.launching import Launching
from service.settings import Settings
from service.store import JobRow, Store

log = logging.getLogger("topk.reconciler")

RECENTLY_CANCELLED_S = 600.0
FAILING_PASSES = 3
"""Passes that failed in a row before `/readyz` reports the reconciler as failing."""


class Reconciler:
    """Moves jobs between the database and Ray (service/reconciler/__init__.py says how).
    `launcher` is None in launch mode `hold`: jobs are recorded and stay queued."""

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
        self.clock = clock
        self.launching = Launching(
            store,
            launcher,
            settings,
            on_launch=on_launch or (lambda: None),
            isolated=self._isolated,
            clock=clock,
        )
        self.following = Following(store, launcher, settings, self.launching.submit, clock)
        self.last_pass_at: float | None = None
        self.last_error: str | None = None  # of the latest pass, when it failed
        self.consecutive_failures = 0  # passes that raised, in a row
        self.failed_passes = 0
        self.job_errors = 0  # unexpected errors while handling one job (the pass went on)
        self._replacements: list[tuple[str, threading.Event]] = []
        self._replacements_lock = threading.Lock()
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
            except Exception as exc:  # keep the loop alive; /readyz shows the error
                self.last_error = describe_error(exc)
                self.consecutive_failures += 1
                self.failed_passes += 1
                log.exception("reconciler pass failed")
            self._wake.wait(self.settings.reconcile_interval_s)
            self._wake.clear()

    # -- health -------------------------------------------------------------------------------

    def lag_seconds(self) -> float | None:
        return None if self.last_pass_at is None else self.clock() - self.last_pass_at

    def health_problem(self) -> str | None:
        """Why the reconciler is not doing its work (for /readyz), or None when it is: passes
        that failed FAILING_PASSES times in a row, or none completed for a long while."""
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

    # -- a pass -------------------------------------------------------------------------------

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
        """Follow launching and running jobs, launch queued ones that fit, and make sure
        cancelled ones are stopped on Ray."""
        if self.launcher is None:  # hold mode: accept and record, launch nothing
            self.last_pass_at = self.clock()
            return
        self._apply_replacements()
        for job in self._active_jobs():
            self._isolated(self.following.follow, job)
        self.launching.launch_queued()
        self._stop_cancelled()
        self.last_pass_at = self.clock()

    def _active_jobs(self) -> list[JobRow]:
        return self.store.list_jobs(statuses=LAUNCHED, oldest_first=True, limit=10_000)

    def _isolated(self, handle: Callable[[JobRow], object], job: JobRow):
        """`handle(job)`; an unexpected error is logged against that job and the pass goes on
        (one job's trouble never stalls the others)."""
        try:
            return handle(job)
        except Exception as exc:
            self.job_errors += 1
            log.exception("reconciling %s failed", job.id)
            self.store.touch(job.id, f"reconciler error, will retry: {describe_error(exc)}")
            return None

    def _apply_replacements(self) -> None:
        with self._replacements_lock:
            pending, self._replacements = self._replacements, []
        if not pending:
            return
        reason = pending[-1][0]
        for job in self._active_jobs():
            self.following.retry_or_fail(job, f"attempt {job.attempt} was lost: {reason}")
            self.launching.submit_failures.pop(job.id, None)
        for _, done in pending:
            done.set()

    def _stop_cancelled(self) -> None:
        """Stop on Ray the recently cancelled jobs it may still run (a cancel whose stop did
        not reach Ray, a job cancelled while it was being submitted)."""
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
                self.launching.stop_quietly(job.submission_id)
