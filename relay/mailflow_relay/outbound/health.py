"""Passive health of next-hop servers: who failed recently goes to the back of the line.

No probes: the outcome of real deliveries is the signal. A server that failed a few times
in a row is tried last for a while, so one dead pool member does not delay every message.
When every server of a destination is down, the deliverer defers at once rather than tie
up a worker per message; the first delivery after the back-off probes them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["HealthTracker"]

logger = logging.getLogger("mailflow_relay.outbound.deliverer")


@dataclass
class _Health:
    failures: int = 0
    down_until: float = 0.0
    last_failure: float = 0.0


@dataclass
class HealthTracker:
    """Passive health of servers: who failed recently goes to the back of the line."""

    failures_before_down: int
    down_for: float
    clock: Callable[[], float] = time.monotonic
    _servers: dict[tuple[str, int], _Health] = field(default_factory=dict)

    def is_down(self, host: str, port: int) -> bool:
        health = self._servers.get((host, port))
        return health is not None and health.down_until > self.clock()

    def failed(self, host: str, port: int) -> None:
        health = self._servers.setdefault((host, port), _Health())
        health.failures += 1
        health.last_failure = self.clock()
        if health.failures >= self.failures_before_down:
            health.down_until = self.clock() + self.down_for
            logger.warning(
                "server %s:%d failed %d times in a row: skipped for %.0fs",
                host,
                port,
                health.failures,
                self.down_for,
            )

    def succeeded(self, host: str, port: int) -> None:
        self._servers.pop((host, port), None)

    def forget_old(self, age: float) -> None:
        """Drop servers that last failed long ago (MX hosts come and go with the mail)."""
        horizon = self.clock() - age
        for key in [
            k
            for k, h in self._servers.items()
            if h.last_failure < horizon and h.down_until < self.clock()
        ]:
            del self._servers[key]
