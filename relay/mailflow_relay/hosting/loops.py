"""The event loop a relay process runs on: uvloop (libuv) by default, asyncio's own on request.

The relay is bound by its CPU per message, and about a quarter of it went to asyncio's
selector loop, transports and callbacks (py-spy, `make bench`): uvloop runs the same
coroutines on libuv with C transports, for about a tenth less CPU per message and an
eighth more messages a second on the benchmark. ``--event-loop asyncio`` keeps the
standard loop (a debugger, a profiler that needs Python frames in the loop, a platform
without uvloop).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["EventLoop", "loop_name", "run"]

T = TypeVar("T")


class EventLoop(enum.StrEnum):
    UVLOOP = "uvloop"
    """libuv through uvloop: the default."""
    ASYNCIO = "asyncio"
    """The standard library's selector loop."""


def run(main: Coroutine[Any, Any, T], loop: EventLoop = EventLoop.UVLOOP) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    if loop is EventLoop.UVLOOP:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """The running loop's kind, for the start-up line: ``uvloop`` or ``asyncio``."""
    module = type(asyncio.get_running_loop()).__module__
    return EventLoop.UVLOOP.value if module.startswith("uvloop") else EventLoop.ASYNCIO.value
