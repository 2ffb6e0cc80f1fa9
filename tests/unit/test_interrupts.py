"""`corral.services.interrupts.interruptible`, with real signals sent to this process."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from corral.services.interrupts import Interrupted, interruptible

pytestmark = pytest.mark.timeout(20)


async def wait_for_nats(*signums: signal.Signals, stopped: asyncio.Event | None = None) -> None:
    """What a starting process does: waits; meanwhile `signums` arrive."""
    async with interruptible("waiting for NATS"):
        for signum in signums:
            os.kill(os.getpid(), signum)
        try:
            await asyncio.sleep(15)
        finally:
            if stopped is not None:
                stopped.set()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_signal_stops_the_block(signum: signal.Signals, code: int) -> None:
    before = signal.getsignal(signum)
    stopped = asyncio.Event()
    with pytest.raises(Interrupted) as caught:
        await wait_for_nats(signum, stopped=stopped)
    assert stopped.is_set()
    assert caught.value.signum == signum
    assert caught.value.code == code
    assert str(caught.value) == f"{signum.name} while waiting for NATS: stopped"
    # the handlers from before are back, and no cancellation is left pending
    assert signal.getsignal(signum) == before
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0)


async def test_without_a_signal_nothing_changes() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    async with interruptible("starting"):
        await asyncio.sleep(0.01)
        result = "done"
    assert result == "done"
    assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_an_error_in_the_block_passes_through() -> None:
    async def fail() -> None:
        async with interruptible("starting"):
            await asyncio.sleep(0)
            raise KeyError("x")

    with pytest.raises(KeyError):
        await fail()


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    entered = asyncio.Event()

    async def body() -> None:
        async with interruptible("starting"):
            entered.set()
            await asyncio.sleep(15)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_a_second_signal_after_the_first_changes_nothing() -> None:
    with pytest.raises(Interrupted) as caught:
        await wait_for_nats(signal.SIGTERM, signal.SIGINT)
    assert caught.value.signum == signal.SIGTERM
