"""asyncflow.workflow.runtime.cancel_all: the run's loops end when the run ends, even a loop that
Python 3.11's asyncio.wait_for let go on after a cancellation (CPython gh-86296). The watchdog's
loop did exactly that once, and a run hung after its last step."""

from __future__ import annotations

import asyncio
import sys

from asyncflow.workflow.runtime import cancel_all


async def _done() -> int:
    return 1


async def test_the_watchdogs_loop_shape_survives_a_cancellation_on_3_11_and_cancel_all_ends_it():
    """The bug itself, where it exists: the cancellation arrives as the awaited call is done, and
    Python 3.11's wait_for returns the call's result instead of raising CancelledError, so the
    loop goes on (3.12's wait_for raises it, and the loop ends). cancel_all ends it either way."""
    turns: list[int] = []

    async def watch() -> None:  # shaped as the watchdog's loop: a call with a timeout each turn
        while True:
            call = asyncio.ensure_future(_done())
            await asyncio.sleep(0)  # the call completes
            if not turns:
                asyncio.current_task().cancel()  # the run's end arrives as the call completes
            await asyncio.wait_for(call, 10)
            turns.append(1)
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(watch())
    await asyncio.sleep(0.05)
    swallowed = sys.version_info < (3, 12)
    assert (not task.done() and len(turns) > 1) == swallowed
    await cancel_all([task])
    assert task.cancelled()


async def test_cancel_all_cancels_again_a_loop_that_went_on():
    cancels: list[int] = []

    async def loop() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) > 1:
                    raise
                # the first one is lost, as 3.11's wait_for loses it

    once = asyncio.ensure_future(loop())
    await asyncio.sleep(0.02)
    once.cancel()  # what the run did before: cancel once, then wait for the loop's end
    done, _ = await asyncio.wait([once], timeout=0.2)
    assert not done and cancels == [1]  # it would have waited forever
    await asyncio.wait_for(cancel_all([once], every_s=0.05), 5)
    assert once.cancelled() and cancels == [1, 1]


async def test_cancel_all_returns_at_once_for_ended_tasks_and_sees_their_errors():
    async def fail() -> None:
        raise ValueError("a loop's own error")

    failed, finished = asyncio.ensure_future(fail()), asyncio.ensure_future(_done())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all([failed, finished, asyncio.ensure_future(asyncio.sleep(60))]), 5)
    assert isinstance(failed.exception(), ValueError) and finished.result() == 1
    await cancel_all([])  # nothing to end
