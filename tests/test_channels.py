"""Channels, mailboxes, doorbells and verdict merging."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio

from helpers import limit
from pipespec.channels import Doorbell, Handoff, Mailbox, ThreadDoorbell
from pipespec.types import Verdict


@limit(5)
async def test_doorbell_wakes_a_waiter() -> None:
    bell = Doorbell()
    woke: list[bool] = []

    async def waiter() -> None:
        await bell.wait()
        woke.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        assert not woke
        bell.ring()
    assert woke == [True]


@limit(5)
async def test_doorbell_wait_with_a_timeout() -> None:
    """``wait(timeout)``: True when rung, False when the time passed first; a ring before the wait, or while a
    timed-out waiter has not yet resumed, makes the next wait return at once (nothing rung is lost)."""
    bell = Doorbell()
    assert await bell.wait(0.01) is False
    assert await bell.wait(0) is False
    bell.ring()
    assert await bell.wait(10) is True  # rung before: at once
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, bell.ring)
    assert await bell.wait(10) is True
    waiter = asyncio.ensure_future(bell.wait(0.001))
    await asyncio.sleep(0.02)  # expired by now; ring before the waiting task looks
    bell.ring()
    assert await waiter is False
    assert await bell.wait(10) is True  # the ring was kept


def test_mailbox_latest_wins_and_rollback_survives_plain_verdict() -> None:
    box: Mailbox[Verdict] = Mailbox("v", Doorbell(), Verdict.merge)
    box.put(Verdict(0, 5))
    box.put(Verdict(0, 6))
    assert box.take() == Verdict(0, 6)
    assert box.take() is None
    box.put(Verdict(1, 7, (1, 2, 3)))
    box.put(Verdict(1, 9))  # a plain verdict of the same epoch must not erase the rollback
    assert box.peek() == Verdict(1, 9, (1, 2, 3))
    box.put(Verdict(2, 4, (1, 2)))  # a newer rollback replaces the older one
    assert box.take() == Verdict(2, 4, (1, 2))
    box.put(Verdict(3, 5, (1, 2, 4), block=9))
    box.put(Verdict(3, 6, ahead=20))  # the block the successor waits for survives with the rollback
    assert box.take() == Verdict(3, 6, (1, 2, 4), ahead=20, block=9)


@limit(5)
async def test_a_handoff_from_a_thread_wakes_the_loop_only_when_the_receiver_waits() -> None:
    """The draft's loop puts proposals from its worker's thread: a receiver busy elsewhere (a forward pass) is not
    woken (it drains when it looks), a waiting one is; a put racing the receiver's re-arm is never lost."""
    loop = asyncio.get_running_loop()
    bell = Doorbell()
    box: Handoff[int] = Handoff("h", bell)
    scheduled: list[object] = []
    real = loop.call_soon_threadsafe

    def counting(callback: object, *args: object) -> object:
        if callback == bell.ring:  # to_thread settles its own future this way too
            scheduled.append(callback)
        return real(callback, *args)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        await asyncio.to_thread(box.put, 1, loop)  # nobody waits: no wake-up scheduled
        assert scheduled == [] and box.depth == 1
        assert box.drain() == [1]
        assert await bell.wait(1) is True  # the put's flag: the next wait returns at once (a spurious turn at most)
        waiting = asyncio.ensure_future(bell.wait(5))
        await asyncio.sleep(0.01)
        await asyncio.to_thread(box.put, 2, loop)  # now it waits: woken
        assert await waiting is True and len(scheduled) == 1
        assert box.drain() == [2]
    finally:
        del loop.call_soon_threadsafe
    box.close()
    box.put(3, loop)  # after close: dropped, no error
    assert box.drain() == []


def test_a_thread_doorbell_blocks_a_thread_until_rung() -> None:
    bell = ThreadDoorbell()
    assert bell.wait_blocking(0.01) is False
    bell.ring()
    assert bell.wait_blocking(5) is True  # rung before: at once
    threading.Timer(0.02, bell.ring).start()
    began = time.perf_counter()
    assert bell.wait_blocking(5) is True
    assert time.perf_counter() - began < 2


def test_a_mailbox_taken_from_another_thread_delivers_every_rollback_once() -> None:
    """The draft takes its verdicts on its own thread while the loop puts (and merges): each rollback epoch is
    seen exactly once, the last one always."""
    box: Mailbox[Verdict] = Mailbox("v", ThreadDoorbell(), Verdict.merge)
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set() or box.peek() is not None:
            v = box.take()
            if v is not None and v.rollback is not None:
                seen.append(v.epoch)

    thread = threading.Thread(target=reader)
    thread.start()
    for epoch in range(1, 3001):
        box.put(Verdict(epoch, 5, (1, 2, 3)))
        box.put(Verdict(epoch, 6))
    stop.set()
    thread.join(10)
    assert seen == sorted(set(seen)) and seen[-1] == 3000  # never twice, never out of order, the last kept
