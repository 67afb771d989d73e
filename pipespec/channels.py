"""Typed channels between stages.

- ``Handoff[T]``: proposals going down the chain, from a stage's thread to the next stage; its receiver drains it
  without blocking and learns of new messages through its doorbell.
- ``Mailbox[T]``: a one-slot, never-blocking, latest-value-wins box for verdicts and rollbacks going up the chain
  (locked: any thread may put or take).
- ``ThreadDoorbell`` / ``Doorbell``: what a stage waits on when it has nothing to do, on its thread or on the event
  loop; every handoff or mailbox feeding the stage rings it.

Every stage but the target runs its loop on its worker's thread (``stages``) and waits on a ``ThreadDoorbell``; the
target, on the event loop, waits on a ``Doorbell``. The handoff into the target wakes the event loop only while the
target is waiting on its doorbell (not while it runs a forward pass). Nothing blocks a sender (a stage never runs
more than ``max_ahead`` tokens past its successor), so no cycle of full buffers can deadlock the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar


T = TypeVar("T")

__all__ = ["Doorbell", "Handoff", "Mailbox", "ThreadDoorbell"]


class Doorbell:
    """A re-armable wake-up. ``ring`` never blocks; ``wait`` returns once rung since the last ``wait`` returned.

    Callers always drain their inputs after ``wait`` returns, so a ring that lands between the wake-up and the
    re-arm is never lost: its message is drained anyway (the next ``wait`` may then return at once, for nothing).
    One waiter at a time (a stage waits on its own doorbell). Built on a bare loop future, allocated only when
    someone waits, and ``wait(timeout)`` on a loop timer: a lock-step hand-over passes through a doorbell twice per
    round, on the critical path (anyio's Event and cancel scopes cost the hand-over several loop turns).
    """

    __slots__ = ("_rung", "_waiter")

    def __init__(self) -> None:
        self._rung = False
        self._waiter: asyncio.Future[bool] | None = None

    def ring(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():  # done: timed out, its task not yet resumed; the next wait returns
            self._rung = True
        else:
            waiter.set_result(True)

    def ring_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ring from another thread, waking the loop only if someone waits now. Lost wake-ups cannot happen: the
        flag is set before the waiter is read here, and ``wait`` reads the flag again after publishing its waiter
        (under the GIL one of the two sees the other's write)."""
        self._rung = True
        if self._waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(self.ring)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a ring (True), or until ``timeout`` seconds have passed (False)."""
        if self._rung:
            self._rung = False
            return True
        if timeout is not None and timeout <= 0:
            return False
        assert self._waiter is None, "a doorbell has one waiter"
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        if self._rung:  # rung from a thread (``ring_from_thread``) just before the waiter was published
            self._rung, self._waiter = False, None
            return True
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiter is waiter:  # timed out or cancelled: nobody waits now
                self._waiter = None


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Mailbox(Generic[T]):
    """One slot; ``put`` merges with an unread value through ``merge(old, new)`` (default: the newer wins). Any thread
    may take (the draft's loop takes on its worker's thread while the loop puts): a lock keeps a merge and a take
    from interleaving, which would deliver a verdict twice or lose one."""

    def __init__(self, name: str, doorbell: Doorbell | ThreadDoorbell,
                 merge: Callable[[T, T], T] | None = None) -> None:
        self.name = name
        self._value: T | None = None
        self._doorbell = doorbell
        self._merge = merge
        self._lock = threading.Lock()
        self.puts = 0  # values put so far, read ones and merged ones included (the sender's pace, for the reader)

    def put(self, value: T) -> None:
        with self._lock:
            self.puts += 1
            if self._value is not None and self._merge is not None:
                value = self._merge(self._value, value)
            self._value = value
        self._doorbell.ring()

    def take(self) -> T | None:
        with self._lock:
            value, self._value = self._value, None
        return value

    def peek(self) -> T | None:
        return self._value


class ThreadDoorbell:
    """A doorbell whose waiter is a thread (the draft stage's loop): ``ring`` from any thread never blocks;
    ``wait_blocking`` blocks the calling thread until rung since it last returned, or until ``timeout`` seconds.
    As with ``Doorbell``, callers drain their inputs after every wake-up, so a ring that lands between the wake-up
    and the re-arm is not lost."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def ring(self) -> None:
        self._event.set()

    def ring_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """The same as ``ring`` (any thread may ring it): so a ``Handoff`` can feed a stage on a thread too."""
        self._event.set()

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """True when rung, False when the time passed first (never call it on the event loop's thread)."""
        rung = self._event.wait(timeout)
        self._event.clear()
        return rung


class Handoff(Generic[T]):
    """Proposals from a stage's thread to the next stage: ``put`` on the producer's thread, ``drain`` on the
    receiver's (the event loop, or another stage's thread when its doorbell is a ``ThreadDoorbell``).

    Unbounded, since a thread cannot await back-pressure; bounded in practice by the producer's own limit (a stage
    runs at most ``max_ahead`` tokens past its successor's verified sequence, and its successor drains every step).
    ``put`` wakes the event loop only when the receiving stage waits on its doorbell: while it runs a forward pass it
    drains what came when the pass ends, and a producer that made k calls meanwhile cost the loop nothing.
    """

    def __init__(self, name: str, doorbell: Doorbell | ThreadDoorbell) -> None:
        self.name = name
        self._items: deque[T] = deque()
        self._doorbell = doorbell
        self._closed = False

    def put(self, item: T, loop: asyncio.AbstractEventLoop) -> None:
        """On the producer's thread (a stage's): append, then ring the receiver (through ``loop`` if it waits there)."""
        if self._closed:
            return
        self._items.append(item)  # deque.append and popleft are atomic: no lock between one producer and one reader
        self._doorbell.ring_from_thread(loop)

    def drain(self) -> list[T]:
        """Everything put so far, oldest first, without waiting."""
        items: list[T] = []
        while self._items:
            items.append(self._items.popleft())
        return items

    @property
    def depth(self) -> int:
        return len(self._items)

    def close(self) -> None:
        self._closed = True
        self._items.clear()
