"""Answers from the spool's committer thread, handed to the event loop a batch at a time.

``asyncio.wrap_future`` wakes the loop once per future: a ``call_soon_threadsafe``, which
writes to the loop's self-pipe, and a read of it on the other side. The committer answers a
whole batch at once (every message of one ``fdatasync``), so :class:`ThreadAnswers` queues
the answers and wakes the loop once for all that arrived before it ran.

The waiter keeps ``wrap_future``'s contract: its result or exception is the future's, and
cancelling the waiter cancels the future (a spool request not yet taken by the committer is
then never written).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["ThreadAnswers"]

T = TypeVar("T")


class ThreadAnswers:
    """Turns ``concurrent.futures`` futures into waiters on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._arrived: list[tuple[asyncio.Future[Any], Future[Any]]] = []

    def wrap(self, future: Future[T]) -> asyncio.Future[T]:
        """A waiter on the loop, done when ``future`` is (call it on the loop)."""
        waiter: asyncio.Future[T] = self.loop.create_future()
        waiter.add_done_callback(functools.partial(_cancel_source, future))
        future.add_done_callback(functools.partial(self._arrive, waiter))
        return waiter

    def _arrive(self, waiter: asyncio.Future[Any], future: Future[Any]) -> None:
        """In the thread that finished ``future``: queue it; the first one wakes the loop."""
        with self._lock:
            self._arrived.append((waiter, future))
            first = len(self._arrived) == 1
        if first:
            # A closed loop raises RuntimeError: nobody waits any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        with self._lock:
            arrived, self._arrived = self._arrived, []
        for waiter, future in arrived:
            if waiter.done():
                continue  # cancelled meanwhile
            if future.cancelled():
                waiter.cancel()
                continue
            error = future.exception()
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


def _cancel_source(future: Future[Any], waiter: asyncio.Future[Any]) -> None:
    if waiter.cancelled():
        future.cancel()
