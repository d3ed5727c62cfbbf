"""notifier.redis_batch: the publishes of one loop iteration go out as one batch, every caller gets
its own answer or an error, and none is left waiting (the real Redis path is covered by the broker
conformance suite and the benchmarks' personal scenario)."""

from __future__ import annotations

import asyncio

import pytest

from notifier.errors import BrokerUnavailable
from notifier.protocol import Accepted
from notifier.redis_batch import BATCH_ITEMS, Pending, PublishBatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """A send function that answers each item with an id and records the batches it got."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.batches: list[list[str]] = []
        self.fail = fail

    async def __call__(self, batch: list[Pending]) -> list[Accepted]:
        self.batches.append([p.topic for p in batch])
        await asyncio.sleep(0)  # answered on a later turn, as Redis would
        if self.fail is not None:
            raise self.fail
        return [Accepted(1000 + i, p.topic, p.ts) for i, p in enumerate(batch)]


async def test_the_publishes_of_one_iteration_go_in_one_batch_and_each_gets_its_answer() -> None:
    send = Recorder()
    batcher = PublishBatcher(send)
    futures = [batcher.submit(f"t{i}", "tail", 1, None) for i in range(10)]
    answers = await asyncio.gather(*futures)
    assert send.batches == [[f"t{i}" for i in range(10)]]
    assert [(a.id, a.topic) for a in answers] == [(1000 + i, f"t{i}") for i in range(10)]
    # The next iteration's publish is a batch of its own: nothing waits for company.
    assert (await batcher.submit("late", "tail", 1, None)).topic == "late"
    assert send.batches[-1] == ["late"]


async def test_a_batch_is_cut_at_its_size_bound() -> None:
    send = Recorder()
    batcher = PublishBatcher(send)
    await asyncio.gather(*(batcher.submit(f"t{i}", "x", 1, None) for i in range(BATCH_ITEMS + 5)))
    assert [len(b) for b in send.batches] == [BATCH_ITEMS, 5]


@pytest.mark.parametrize(
    "failure", [BrokerUnavailable("redis: connection lost"), AttributeError("'NoneType' has no attribute")]
)
async def test_a_failed_batch_answers_every_caller_with_broker_unavailable(failure: BaseException) -> None:
    batcher = PublishBatcher(Recorder(fail=failure))
    futures = [batcher.submit(f"t{i}", "x", 1, None) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5)
    assert all(isinstance(r, BrokerUnavailable) for r in results), results


async def test_a_caller_that_gave_up_is_left_out_and_the_others_answered() -> None:
    send = Recorder()
    batcher = PublishBatcher(send)
    gone = batcher.submit("gone", "x", 1, None)
    kept = batcher.submit("kept", "x", 1, None)
    gone.cancel()
    assert (await kept).topic == "kept"
    assert send.batches == [["kept"]]


async def test_close_fails_what_waits() -> None:
    batcher = PublishBatcher(Recorder())
    waiting = batcher.submit("t", "x", 1, None)
    await batcher.close()
    with pytest.raises(BrokerUnavailable):
        await waiting
