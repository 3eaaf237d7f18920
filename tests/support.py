"""Helpers every suite shares: run a scenario on a fresh loop, wait for a condition.

Test modules import these (``from support import run, until``) instead of keeping copies:
a module cannot import from ``conftest.py`` once a second ``conftest.py`` exists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["checked_run", "eventually", "run", "until"]

T = TypeVar("T")

_original_run = asyncio.run
LEAK_GRACE_SECONDS = 1.0
"""How long tasks that are finishing on their own (a closing transport) may take."""


async def _leak_checked(main: Coroutine[Any, Any, T]) -> T:
    result = await main
    me = asyncio.current_task()
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    while True:
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    if left:
        for task in left:
            task.cancel()
        names = ", ".join(sorted(f"{t.get_name()} ({t.get_coro()!r})" for t in left))
        raise AssertionError(f"the scenario left {len(left)} task(s) running: {names}")
    return result


def checked_run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """:func:`asyncio.run` that fails when ``main`` returns with tasks still running.

    The autouse fixture in ``conftest.py`` puts this in place of :func:`asyncio.run` for
    every test: a task nobody owns is a bug (STYLE.md, "no orphan tasks").
    """
    return _original_run(_leak_checked(main), debug=debug)


def run(scenario: Callable[[], Awaitable[T]], *, within: float = 60.0) -> T:
    """Run ``scenario()`` on a fresh loop, bounded in time, failing on leaked tasks."""

    async def bounded() -> T:
        async with asyncio.timeout(within):
            return await scenario()

    return checked_run(bounded())


async def until(
    check: Callable[[], T], *, within: float = 20.0, what: str = "condition", every: float = 0.02
) -> T:
    """Poll ``check`` (state that other components change) until it returns something truthy.

    An AssertionError, KeyError or TypeError from ``check`` counts as "not yet"; the last
    one is shown if time runs out.
    """
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, TypeError) as e:
            last = e
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {within:g}s waiting for {what}: {last!r}")


def eventually(
    check: Callable[[], T], *, within: float = 15.0, what: str = "condition", every: float = 0.05
) -> T:
    """:func:`until` for tests that wait outside an event loop (processes, threads)."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, TypeError) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out after {within:g}s waiting for {what}: {last!r}")
