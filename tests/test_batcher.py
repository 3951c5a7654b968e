"""`DynamicBatcher` with a second, per-request stage (how the vLLM engine answers), on fake engines."""

from __future__ import annotations

import asyncio

import pytest

from transformers_alignedvq.serving.batcher import DynamicBatcher, Job
from transformers_alignedvq.serving.engines.base import GenerationRequest, GenerationResult
from transformers_alignedvq.serving.errors import ApiError
from transformers_alignedvq.serving.sampling import SamplingOptions


class FakeEngine:
    """Batch step: tags each request; completion: waits until released, or fails for question 'fail'."""

    def __init__(self):
        self.release = asyncio.Event()
        self.running, self.most_running, self.cancelled, self.batches = 0, 0, 0, []

    def run_batch(self, jobs):
        self.batches.append(len(jobs))
        return [f"prepared {job.request.input_ids[0]}" for job in jobs]

    async def complete(self, request, prepared):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if request.input_ids[0] == -1:
            raise RuntimeError("model failed")
        return GenerationResult(text=prepared, generated_tokens=1, generate_s=0.0)


def job(number: int) -> Job:
    request = GenerationRequest(indices=None, input_ids=[number], options=SamplingOptions(max_new_tokens=1))
    return Job(request=request, future=asyncio.get_running_loop().create_future(), enqueued=0.0)


async def started(engine: FakeEngine, jobs: list[Job], **options) -> DynamicBatcher:
    """A running batcher given ``jobs``, once as many of them as it may take are waiting in ``complete``."""
    batcher = DynamicBatcher(engine.run_batch, complete=engine.complete, max_wait_ms=0, max_queue=16, **options)
    await batcher.start()
    for item in jobs:
        batcher.submit(item)
    for _ in range(500):
        if engine.running == min(len(jobs), batcher.max_in_flight):
            break
        await asyncio.sleep(0.01)
    return batcher


def test_jobs_complete_one_by_one_within_the_in_flight_bound():
    async def scenario():
        engine = FakeEngine()
        jobs = [job(i) for i in range(6)]
        batcher = await started(engine, jobs, max_batch_size=2, max_in_flight=3)
        assert engine.running == 3 and batcher.in_flight == 3 and batcher.queue_depth() == 3
        engine.release.set()
        results = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 10)
        await batcher.stop()
        assert [r.text for r in results] == [f"prepared {i}" for i in range(6)]
        assert engine.most_running == 3 and max(engine.batches) <= 2 and batcher.health.ok

    asyncio.run(scenario())


def test_a_job_whose_client_left_stops_its_completion():
    async def scenario():
        engine = FakeEngine()
        jobs = [job(0), job(1)]
        batcher = await started(engine, jobs, max_batch_size=2, max_in_flight=4)
        jobs[0].future.cancel()  # what the route does when the client disconnects
        await asyncio.sleep(0.05)
        assert engine.cancelled == 1 and batcher.abandoned == 1 and batcher.in_flight == 1
        engine.release.set()
        assert (await asyncio.wait_for(jobs[1].future, 10)).text == "prepared 1"
        await batcher.stop()

    asyncio.run(scenario())


def test_a_failing_completion_is_a_500_and_marks_health_until_one_succeeds():
    async def scenario():
        engine = FakeEngine()
        failing = job(-1)
        batcher = await started(engine, [failing], max_batch_size=2, max_in_flight=4)
        engine.release.set()
        with pytest.raises(ApiError) as error:
            await asyncio.wait_for(failing.future, 10)
        assert error.value.status == 500 and error.value.type == "internal_error"
        assert not batcher.health.ok and batcher.health.consecutive_failures == 1
        good = job(2)
        batcher.submit(good)
        assert (await asyncio.wait_for(good.future, 10)).text == "prepared 2" and batcher.health.ok
        await batcher.stop()

    asyncio.run(scenario())


def test_stopping_answers_running_jobs_with_503_and_stops_them():
    async def scenario():
        engine = FakeEngine()
        jobs = [job(i) for i in range(4)]
        batcher = await started(engine, jobs, max_batch_size=4, max_in_flight=2)
        await batcher.stop()
        for item in jobs:
            with pytest.raises(ApiError) as error:
                item.future.result()
            assert error.value.status == 503
        assert engine.cancelled == 2 and engine.running == 0

    asyncio.run(scenario())
