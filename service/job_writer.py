"""Recording submissions: one thread writes the jobs that requests hand it, in group commits.

Each `await writer.create(job)` resolves once the transaction holding the job has committed, so
an acknowledged submission is in the database exactly as with one transaction per request. While
a transaction commits, new submissions queue up; the next transaction takes all of them (up to
`max_batch`), so under load one thread hop, one transaction and one multi-row INSERT serve many
requests, and at low load a job is written as soon as it arrives (nothing waits for a batch to
fill). Per job, the outcome is what `Store.create_jobs` gives it: (job, created) or its
exception (IdempotencyConflict, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import defaultdict

from service.store import JobRow, NewJob, Store

log = logging.getLogger("topk.service")

_STOP = object()


class WriterStopped(RuntimeError):
    """The writer was stopped (the server is shutting down): the job was not recorded."""


class JobWriter:
    def __init__(self, store: Store, *, max_batch: int = 256):
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # transactions written (tests and benchmarks read these)
        self.jobs = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="topk-job-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop; later `create` calls raise WriterStopped."""
        self._closed = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    async def create(self, job: NewJob) -> tuple[JobRow, bool]:
        """Record `job`; returns once it is committed (or raises what creating it raised)."""
        if self._closed or self._thread is None:
            raise WriterStopped("the job writer is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((job, loop, future))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)
        # Anything queued after the stop marker was never written: say so to its requests.
        leftovers = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftovers.append(item)
        if leftovers:
            self._deliver(
                leftovers, [WriterStopped("the server is shutting down")] * len(leftovers)
            )

    def _write(self, batch: list) -> None:
        try:
            outcomes = self.store.create_jobs([job for job, _, _ in batch])
        except Exception as exc:  # the whole transaction failed: nothing of it was committed
            log.warning("recording %d submitted jobs failed: %s", len(batch), exc)
            outcomes = [exc] * len(batch)
        else:
            self.batches += 1
            self.jobs += len(batch)
        self._deliver(batch, outcomes)

    @staticmethod
    def _deliver(batch: list, outcomes: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for (_, loop, future), outcome in zip(batch, outcomes, strict=True):
            by_loop[loop].append((future, outcome))
        for loop, results in by_loop.items():
            # One wake-up of the event loop per batch, not one per job; a closed loop has
            # nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_results, results)


def _set_results(results: list) -> None:
    for future, outcome in results:
        if future.done():  # the request was cancelled (client went away); the job stands
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
