"""Transports as the relay uses them, whichever event loop made them.

uvloop's transports (hosting/loops.py) have asyncio's methods but do not derive from
asyncio's classes, so ``isinstance(t, asyncio.WriteTransport)`` is False for them: a check
written that way would silently skip a 421, an abort at shutdown or after QUIT.
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["write_transport"]


def write_transport(transport: object) -> asyncio.WriteTransport | None:
    """``transport`` as a writable transport, or None when it is none (or gone)."""
    if transport is None or not all(
        callable(getattr(transport, name, None)) for name in ("write", "abort", "is_closing")
    ):
        return None
    return cast("asyncio.WriteTransport", transport)
