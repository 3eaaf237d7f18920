"""What the listener remembers across sessions to slow attackers down, in bounded memory.

* :class:`AuthFailures` — AUTH failures per client address. One session may only guess a
  few times (``max_auth_failures``, then 421 and close), but an attacker simply
  reconnects; so each address that failed recently waits before its next guess is even
  verified, ``auth_failure_delay`` doubled per recent failure up to a ceiling. The table is
  an LRU of at most ``auth_failure_addresses`` entries, each forgotten after
  ``auth_failure_window`` seconds; IPv6 clients count per /64, since one host usually owns
  a whole /64 and could otherwise start afresh from each of its 2**64 addresses.
* :class:`OncePerInterval` — a log line that would repeat per attempt under a flood
  (accept() failing with EMFILE, connections over the cap) is written at most once per
  interval, with the number of occurrences it stands for.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailflow_relay.inbound.settings import IPAddress

__all__ = ["AuthFailures", "OncePerInterval", "address_key"]


def address_key(ip: IPAddress | None) -> str:
    """The key an address's failures are counted under: the IPv4 address, or its IPv6 /64."""
    if ip is None:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Record:
    failures: int
    last: float


class AuthFailures:
    """Recent AUTH failures per address key; how long the next attempt must wait."""

    def __init__(
        self,
        *,
        delay: float,
        delay_max: float,
        window: float,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.delay = delay
        self.delay_max = delay_max
        self.window = window
        self.capacity = capacity
        self._clock = clock
        self._records: collections.OrderedDict[str, _Record] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def recent(self, key: str) -> int:
        """Failures from ``key`` within the window (0 once it has passed)."""
        record = self._records.get(key)
        if record is None:
            return 0
        if self._clock() - record.last > self.window:
            del self._records[key]
            return 0
        return record.failures

    def wait_before_attempt(self, key: str) -> float:
        """Seconds to hold back the next AUTH attempt from ``key``."""
        failures = self.recent(key)
        if failures == 0 or self.delay == 0:
            return 0.0
        # Exponent capped: the ceiling is reached long before, and 2**big overflows floats.
        return float(min(self.delay_max, self.delay * 2 ** min(failures - 1, 30)))

    def failed(self, key: str) -> int:
        """Record one failure from ``key``; its recent failures now."""
        failures = self.recent(key) + 1
        self._records[key] = _Record(failures, self._clock())
        self._records.move_to_end(key)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)
        return failures

    def succeeded(self, key: str) -> None:
        """A correct password from ``key``: its earlier failures were typos."""
        self._records.pop(key, None)


class OncePerInterval:
    """Lets one line through per ``interval`` seconds and counts the ones it held back."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held = 0

    def ready(self) -> int | None:
        """None: stay quiet; else log now, standing for this many occurrences (>= 1)."""
        now = self._clock()
        self._held += 1
        if now < self._next:
            return None
        self._next = now + self.interval
        occurrences, self._held = self._held, 0
        return occurrences
