"""The batching queue: one worker thread generates compatible requests together.

A `Job` is one request: `n` images of one prompt with seeds seed, seed + 1, ... Jobs wait in FIFO order. The
worker takes the oldest job and fills a batch of up to `max_batch` images with it and with every later job of the
same `BatchKey` (size, steps, guidance, sampler, negative prompt), in queue order; a job of more images than fit is
split over several batches. While the batch is not full the worker waits for company, but never longer than
`max_wait_s` after the oldest job arrived: work that has already waited that long (because the worker was busy) is
started at once, so the worker never idles while work waits.

A cancelled job (client gone, timeout) is dropped from the queue and never generated; a batch whose jobs are all
cancelled is stopped at the next sampling step. `close()` stops taking new jobs, generates everything queued,
then ends the worker.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sana.serve")


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """What must be equal for requests to share a batch."""

    height: int
    width: int
    steps: int
    guidance: float
    sampler: str
    negative_prompt: str


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class QueueFull(Exception):
    """The queue holds `queue_size` jobs already."""


class Closed(Exception):
    """The batcher no longer takes jobs (shutting down)."""


class BatchCancelled(Exception):
    """Raised from the step callback to stop a batch whose jobs were all cancelled."""


class Job:
    """n images of one prompt; `future` gets the list of n images (or the batch's exception)."""

    def __init__(self, key: BatchKey, prompt: str, seed: int, n: int):
        if n < 1:
            raise ValueError(f"a job needs at least one image, got n={n}")
        self.key, self.prompt, self.seed, self.n = key, prompt, seed, n
        self.future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        self.images: list[Any] = [None] * n
        self.scheduled = 0  # images handed to batches so far
        self.finished = 0  # images generated so far
        self.state = JobState.QUEUED
        self.step = 0  # sampling step of the batch now running this job
        self.enqueued = time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self.state is JobState.CANCELLED

    @property
    def active(self) -> bool:
        """Still to be generated (queued or running), neither cancelled nor answered."""
        return self.state in (JobState.QUEUED, JobState.RUNNING)

    def cancel(self) -> None:
        """Drop the job: its queued images are never generated and its result is discarded."""
        if self.state is not JobState.DONE:
            self.state = JobState.CANCELLED
            self.future.cancel()


# run(key, prompts, seeds, on_step) -> one image per prompt; on_step(i) after sampling step i (0-based).
RunBatch = Callable[[BatchKey, list[str], list[int], Callable[[int], None]], list[Any]]


@dataclasses.dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    seconds_per_batch: float = 0.0  # moving average, for Retry-After estimates


class Batcher:
    """FIFO queue of jobs and the worker thread that runs them in batches (see the module docstring)."""

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch: int = 4,
        max_wait_s: float = 0.02,
        queue_size: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait_s}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.run, self.max_batch, self.max_wait_s, self.queue_size = run, max_batch, max_wait_s, queue_size
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: deque[Job] = deque()  # jobs with images not yet handed to a batch
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------------
    # Client side (event loop threads)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting)")
            job.enqueued = time.monotonic()
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancel()
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet started or partly started)."""
        with self._cond:
            return sum(1 for j in self._queue if j.active)

    @property
    def queued_images(self) -> int:
        with self._cond:
            return sum(j.n - j.scheduled for j in self._queue if j.active)

    def position(self, job: Job) -> int | None:
        """0 for the next job to run; None when the job is not waiting."""
        with self._cond:
            live = [j for j in self._queue if j.active]
            return live.index(job) if job in live else None

    def retry_after_s(self) -> int:
        """A guess of when the queue has room again: the time to run the queued batches, 1 s to 60 s."""
        batches = self.queued_images / self.max_batch
        return int(min(60, max(1, round(batches * (self.stats.seconds_per_batch or 1.0)))))

    # ---------------------------------------------------------------------------------------------------
    # Worker

    def start(self, prepare: Callable[[], None] | None = None) -> None:
        """Start the worker thread; it runs `prepare()` (load, warm up) before taking jobs."""
        if self._thread is not None:
            raise RuntimeError("the batcher is already started")
        self._thread = threading.Thread(target=self._main, args=(prepare,), name="sana-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, generate every queued one, then stop the worker (waits at most `timeout`)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self, prepare: Callable[[], None] | None) -> None:
        if prepare is not None:
            try:
                prepare()
            except Exception:  # reported by prepare's owner; fail the jobs that wait and stop
                log.exception("the worker could not start")
                with self._cond:
                    self._closing = True
                    for job in self._queue:
                        _set_exception(job, RuntimeError("the model failed to load"))
                    self._queue.clear()
                return
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """Block until a batch is due: (job, image index) pairs of one key; None when closing and empty."""
        with self._cond:
            while True:
                while self._queue and not self._queue[0].active:
                    self._queue.popleft()
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                available = sum(j.n - j.scheduled for j in self._queue if j.key == head.key and j.active)
                wait = head.enqueued + self.max_wait_s - time.monotonic()
                if available >= self.max_batch or wait <= 0 or self._closing:
                    return self._take(head.key)
                self._cond.wait(wait)

    def _take(self, key: BatchKey) -> list[tuple[Job, int]]:
        batch: list[tuple[Job, int]] = []
        for job in list(self._queue):
            if not job.active or job.key != key:
                continue
            take = min(job.n - job.scheduled, self.max_batch - len(batch))
            batch += [(job, job.scheduled + i) for i in range(take)]
            job.scheduled += take
            job.state = JobState.RUNNING
            job.step = 0
            if job.scheduled == job.n:
                self._queue.remove(job)
            if len(batch) == self.max_batch:
                break
        return batch

    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        jobs = list(dict.fromkeys(job for job, _ in batch))

        def on_step(i: int) -> None:
            for job in jobs:
                job.step = i + 1
            if not any(job.active for job in jobs):
                raise BatchCancelled

        start = time.perf_counter()
        try:
            images = self.run(
                jobs[0].key, [job.prompt for job, _ in batch], [job.seed + i for job, i in batch], on_step
            )
            if len(images) != len(batch):
                raise RuntimeError(f"the pipeline returned {len(images)} images for a batch of {len(batch)}")
        except BatchCancelled:
            log.info("batch of %d stopped: every request in it was cancelled", len(batch))
            return
        except Exception as e:  # the batch's requests answer with the error; the worker goes on
            log.exception("batch of %d failed", len(batch))
            with self._cond:
                for job in jobs:
                    _set_exception(job, e)
                    job.state = JobState.DONE  # its other images, if any, are not generated
            return
        seconds = time.perf_counter() - start
        stats = self.stats
        stats.batches += 1
        stats.images += len(batch)
        stats.seconds_per_batch = seconds if stats.batches == 1 else 0.8 * stats.seconds_per_batch + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
        with self._cond:
            for (job, i), image in zip(batch, images, strict=True):
                job.images[i] = image
                job.finished += 1
            for job in jobs:
                if job.finished == job.n and job.active:
                    job.state = JobState.DONE
                    try:
                        job.future.set_result(job.images)
                    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                        pass
                elif job.active and job.scheduled < job.n:
                    job.state = JobState.QUEUED  # the rest of its images wait for the next batch


def _set_exception(job: Job, error: BaseException) -> None:
    try:
        job.future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass
