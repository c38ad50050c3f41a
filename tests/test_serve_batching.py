"""The batching queue on its own: which jobs share a batch, how long the worker waits, cancellation, draining."""

import threading
import time

import pytest

from sana.serve.batching import Batcher, BatchKey, Closed, Job, JobState, QueueFull

KEY = BatchKey(512, 512, 2, 4.5, "flow_dpm_solver", "")
OTHER = BatchKey(512, 768, 2, 4.5, "flow_dpm_solver", "")


class Recorder:
    """run() for the Batcher: records each batch's (key, prompts, seeds); optionally blocks until `gate` is set."""

    def __init__(self, gate: threading.Event | None = None, steps: int = 2, fail_on: str | None = None):
        self.batches, self.gate, self.steps, self.fail_on = [], gate, steps, fail_on
        self.running = threading.Event()

    def __call__(self, key, prompts, seeds, on_step):
        self.batches.append((key, list(prompts), list(seeds)))
        self.running.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if self.fail_on in prompts:
            raise RuntimeError("boom")
        for i in range(self.steps):
            on_step(i)
        return [f"{p}#{s}" for p, s in zip(prompts, seeds, strict=True)]


def _result(job: Job, timeout: float = 10):
    return job.future.result(timeout)


def _started(run: Recorder, **kwargs) -> Batcher:
    batcher = Batcher(run, **kwargs)
    batcher.start()
    return batcher


def test_compatible_jobs_share_a_batch_and_results_go_back_to_their_jobs():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _started(run, max_batch=4, max_wait_s=0.0, queue_size=16)
    first = Job(KEY, "first", 100, 1)
    batcher.submit(first)  # runs alone at once (no wait) and blocks on the gate
    assert run.running.wait(5)
    jobs = [Job(KEY, "a", 0, 2), Job(OTHER, "other", 7, 1), Job(KEY, "b", 10, 1), Job(KEY, "c", 20, 3)]
    for job in jobs:
        batcher.submit(job)
    assert batcher.depth == 4 and batcher.queued_images == 7
    gate.set()
    a, other, b, c = (_result(j) for j in jobs)
    batcher.close(5)
    assert _result(first) == ["first#100"]
    assert a == ["a#0", "a#1"] and b == ["b#10"] and c == ["c#20", "c#21", "c#22"] and other == ["other#7"]
    # FIFO by the oldest job; later compatible jobs join it; a job larger than the room left is split and its
    # rest keeps its place in the queue (behind "other", which arrived earlier).
    assert [(k, p) for k, p, _ in run.batches] == [
        (KEY, ["first"]),
        (KEY, ["a", "a", "b", "c"]),
        (OTHER, ["other"]),
        (KEY, ["c", "c"]),
    ]
    assert run.batches[1][2] == [0, 1, 10, 20] and run.batches[3][2] == [21, 22]
    assert all(job.state is JobState.DONE for job in jobs)


def test_a_full_batch_starts_without_waiting_and_a_lone_job_waits_at_most_max_wait():
    run = Recorder()
    batcher = _started(run, max_batch=2, max_wait_s=5.0, queue_size=8)
    start = time.monotonic()
    jobs = [Job(KEY, "x", 0, 1), Job(KEY, "y", 1, 1)]
    for job in jobs:
        batcher.submit(job)
    for job in jobs:
        _result(job)
    assert time.monotonic() - start < 2.0, "a full batch must not wait for max_wait"
    batcher.close(5)

    run = Recorder()
    batcher = _started(run, max_batch=8, max_wait_s=0.3, queue_size=8)
    start = time.monotonic()
    lone = Job(KEY, "lone", 0, 1)
    batcher.submit(lone)
    _result(lone)
    waited = time.monotonic() - start
    batcher.close(5)
    assert 0.25 <= waited < 3.0, f"a lone job waits for company about max_wait (0.3 s), waited {waited:.2f} s"


def test_work_that_waited_while_the_worker_was_busy_starts_at_once():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _started(run, max_batch=8, max_wait_s=0.5, queue_size=8)
    batcher.submit(Job(KEY, "busy", 0, 1))
    time.sleep(0.6)  # "busy" waited its max_wait alone and runs; the worker is now held by the gate
    assert run.running.wait(5)
    late = Job(KEY, "late", 1, 1)
    batcher.submit(late)
    time.sleep(0.6)  # longer than max_wait: "late" is due as soon as the worker is free
    gate.set()
    start = time.monotonic()
    _result(late)
    assert time.monotonic() - start < 0.4, "the worker must not idle while due work waits"
    batcher.close(5)


def test_queue_full_and_closed():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _started(run, max_batch=1, max_wait_s=0.0, queue_size=2)
    batcher.submit(Job(KEY, "running", 0, 1))
    assert run.running.wait(5)
    batcher.submit(Job(KEY, "q1", 1, 1))
    batcher.submit(Job(KEY, "q2", 2, 1))
    with pytest.raises(QueueFull):
        batcher.submit(Job(KEY, "q3", 3, 1))
    assert 1 <= batcher.retry_after_s() <= 60
    gate.set()
    batcher.close(5)
    with pytest.raises(Closed):
        batcher.submit(Job(KEY, "late", 4, 1))
    assert [p for _, p, _ in run.batches] == [["running"], ["q1"], ["q2"]], "close() drains the queue"


def test_cancelled_jobs_are_never_generated_and_a_fully_cancelled_batch_stops():
    gate = threading.Event()
    run = Recorder(gate, steps=3)
    batcher = _started(run, max_batch=1, max_wait_s=0.0, queue_size=8)
    running = Job(KEY, "running", 0, 1)
    batcher.submit(running)
    assert run.running.wait(5)
    dropped, kept = Job(KEY, "dropped", 1, 1), Job(KEY, "kept", 2, 1)
    batcher.submit(dropped)
    batcher.submit(kept)
    batcher.cancel(dropped)
    batcher.cancel(running)  # mid-batch: the step callback stops it
    assert batcher.depth == 1
    gate.set()
    assert _result(kept) == ["kept#2"]
    batcher.close(5)
    assert [p for _, p, _ in run.batches] == [["running"], ["kept"]]
    assert running.state is JobState.CANCELLED and dropped.future.cancelled()


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on():
    run = Recorder(fail_on="bad")
    batcher = _started(run, max_batch=2, max_wait_s=0.2, queue_size=8)
    bad, good = Job(KEY, "bad", 0, 3), Job(OTHER, "good", 1, 1)
    batcher.submit(bad)
    batcher.submit(good)
    with pytest.raises(RuntimeError, match="boom"):
        _result(bad)
    assert _result(good) == ["good#1"]
    batcher.close(5)
    assert [p for _, p, _ in run.batches] == [["bad", "bad"], ["good"]], "the failed job's rest is not generated"


def test_a_failing_prepare_fails_waiting_jobs():
    def prepare():
        time.sleep(0.2)
        raise OSError("no weights")

    batcher = Batcher(Recorder(), max_batch=1)
    batcher.start(prepare)
    job = Job(KEY, "x", 0, 1)
    batcher.submit(job)
    with pytest.raises(RuntimeError, match="failed to load"):
        _result(job)
    batcher.close(5)


def test_invalid_settings():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="queue_size"):
        Batcher(Recorder(), queue_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        Job(KEY, "x", 0, 0)
