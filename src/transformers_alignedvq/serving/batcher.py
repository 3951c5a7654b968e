"""Dynamic batching: a bounded queue of jobs and one worker that runs the engine's batch step on several at once.

Requests wait in a bounded asyncio queue; the worker takes the first, collects more until it has
``max_batch_size`` or ``max_wait_ms`` passed, and runs the batch step in a worker thread, so the event loop keeps
accepting (and refusing) requests meanwhile. A job whose client disconnected is dropped before its batch runs.
`EngineHealth` records whether the last batch (or the warm-up) succeeded, for ``/healthz``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from .engines.base import GenerationRequest, GenerationResult
from .errors import model_failed, shutting_down

logger = logging.getLogger(__name__)

# Threads that decode frames and tokenise questions (`DynamicBatcher.off_loop`).
DECODE_THREADS = 2
# After SIGTERM, how long requests already on the wire get to be read before the listening socket closes.
DRAIN_GRACE_S = 0.1


class QueueFull(Exception):
    """The batcher's queue holds ``max_queue`` jobs; the route answers 503 with a ``Retry-After``."""


@dataclass(eq=False)
class Job:
    """One request in the batcher: its `GenerationRequest`, the future its route awaits, and timings."""

    request: GenerationRequest
    future: asyncio.Future
    enqueued: float
    started: float = 0.0
    batch_size: int = 0


class EngineHealth:
    """Whether the model answered the last time it was asked: the warm-up, then every batch."""

    def __init__(self):
        self.last_ok: bool | None = None
        self.last_at: float | None = None
        self.consecutive_failures = 0

    def record(self, ok: bool) -> None:
        self.last_ok, self.last_at = ok, time.monotonic()
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1

    @property
    def ok(self) -> bool:
        return self.last_ok is not False

    def snapshot(self) -> dict:
        return {
            "last_generate": {None: "not_run", True: "ok", False: "failed"}[self.last_ok],
            "seconds_since_last_generate": None if self.last_at is None else time.monotonic() - self.last_at,
            "consecutive_failures": self.consecutive_failures,
        }


class DynamicBatcher:
    """Bounded queue + one worker that runs `run_batch` on up to ``max_batch_size`` queued jobs at once.

    With ``complete`` (the vLLM engine), `run_batch` only prepares each job (image features) and
    ``complete(request, prepared)`` then answers each job on its own, concurrently with the worker collecting
    the next batch; at most ``max_in_flight`` jobs are taken from the queue and not yet answered. Without it,
    `run_batch` returns the answers and ``max_in_flight`` is ``max_batch_size``.
    """

    def __init__(self, run_batch: Callable[[list[Job]], list], *, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, health: EngineHealth | None = None,
                 complete: Callable[[GenerationRequest, Any], Awaitable[GenerationResult]] | None = None,
                 max_in_flight: int | None = None):
        self.run_batch, self.complete = run_batch, complete
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_ms / 1000.0, max_queue
        self.max_in_flight = max_in_flight if complete is not None and max_in_flight else max_batch_size
        self.health = health or EngineHealth()
        self.queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._decoder: ThreadPoolExecutor | None = None
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._active: set[Job] = set()  # jobs taken from the queue and not answered yet
        self._room: asyncio.Event | None = None  # set when fewer than max_in_flight jobs are active
        self._completions: set[asyncio.Task] = set()
        self.batches = 0
        self.requests = 0
        self.abandoned = 0  # jobs dropped (or stopped, in vLLM) because their client left
        self.stopping = False
        self.on_batch: Callable[[int], None] | None = None  # called with each batch's size (metrics)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        # Restartable: the same app may go through several lifespans (tests, embedded servers).
        self.stopping = False
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self._room = asyncio.Event()
        self._room.set()
        # One thread: batch steps never overlap, so batches are the only parallelism of this process.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignedvq-generate")
        self._decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="alignedvq-decode")
        self._task = asyncio.create_task(self._worker(), name="alignedvq-batcher")

    async def off_loop(self, function: Callable[..., Any], *args) -> Any:
        """``function(*args)`` in the decode threads: frame decoding and tokenisation stay off the event loop,
        so a flood of costly frames delays the requests behind it in those threads, not every connection."""
        if self._decoder is None:
            raise shutting_down()
        return await asyncio.get_running_loop().run_in_executor(self._decoder, function, *args)

    async def drain(self, deadline: float) -> None:
        """Take no new jobs; answer the queued and running ones until ``deadline`` (`time.monotonic`), then
        answer what is left with 503."""
        self.stopping = True
        await asyncio.sleep(DRAIN_GRACE_S)
        while (self.queue_depth() or self._active) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._refuse_pending()

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._refuse_pending()
        if self._completions:
            await asyncio.gather(*self._completions, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
            self._decoder = None

    def _refuse_pending(self) -> None:
        # A job's completion task is cancelled when its future is settled here (see `_complete`).
        pending = list(self._active)
        while self.queue is not None and not self.queue.empty():
            pending.append(self.queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(shutting_down())

    def queue_depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def retry_after_seconds(self) -> int:
        """Whole seconds until the queue has likely drained enough to take one more request."""
        batches_ahead = self.queue_depth() / self.max_batch_size + 1
        return max(1, min(60, math.ceil(self._batch_seconds * batches_ahead)))

    def submit(self, job: Job) -> None:
        if self.stopping or self.queue is None:
            raise shutting_down()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None

    async def _collect(self) -> list[Job]:
        assert self.queue is not None and self._room is not None
        while len(self._active) >= self.max_in_flight:
            self._room.clear()
            await self._room.wait()
        size = min(self.max_batch_size, self.max_in_flight - len(self._active))
        taken = [await self.queue.get()]
        self._active.add(taken[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(taken) < size:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self.queue.get_nowait()
            taken.append(job)
            self._active.add(job)
        # A job whose client went away was cancelled: do not spend compute on it.
        dropped = [job for job in taken if job.future.done()]
        self.abandoned += sum(job.future.cancelled() for job in dropped)
        self._release(dropped)
        return [job for job in taken if not job.future.done()]

    def _release(self, jobs: Sequence[Job]) -> None:
        self._active.difference_update(jobs)
        if self._room is not None and len(self._active) < self.max_in_flight:
            self._room.set()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                job.started, job.batch_size = started, len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                prepared = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception:  # a bug or a model failure: every waiting client gets a 500, the server lives
                logger.exception("batched generate failed")
                self.health.record(False)
                for job in batch:
                    _settle(job.future, error=model_failed())
                self._release(batch)
            else:
                self.health.record(True)
                self._hand_on(batch, prepared)
            seconds = time.perf_counter() - started
            self._batch_seconds = seconds if self.batches == 0 else 0.8 * self._batch_seconds + 0.2 * seconds
            self.batches += 1
            self.requests += len(batch)

    def _hand_on(self, batch: list[Job], prepared: list) -> None:
        """After a successful batch step: answer the jobs, or start each one's second stage."""
        if self.complete is None:
            self.abandoned += sum(job.future.cancelled() for job in batch)  # stopped mid-generate
            for job, result in zip(batch, prepared):
                _settle(job.future, result=result)
            self._release(batch)
        else:
            for job, item in zip(batch, prepared):
                self._start_completion(job, item)

    def _start_completion(self, job: Job, prepared: Any) -> None:
        task = asyncio.create_task(self._complete(job, prepared))
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)
        # The client left, or shutdown answered it: stop computing (vLLM aborts the request).
        job.future.add_done_callback(lambda _: task.cancel())

    async def _complete(self, job: Job, prepared: Any) -> None:
        assert self.complete is not None
        try:
            result = await self.complete(job.request, prepared)
        except asyncio.CancelledError:
            self.abandoned += job.future.cancelled()
        except Exception:
            logger.exception("generate failed")
            self.health.record(False)
            _settle(job.future, error=model_failed())
        else:
            self.health.record(True)
            _settle(job.future, result=result)
        finally:
            self._release([job])


def _settle(future: asyncio.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


__all__ = ["DECODE_THREADS", "DRAIN_GRACE_S", "DynamicBatcher", "EngineHealth", "Job", "QueueFull"]
