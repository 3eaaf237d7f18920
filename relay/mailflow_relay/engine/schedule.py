"""When each spooled message is next due: the workers' schedule.

The spool holds the truth (each recipient's ``next_attempt``); this index only orders the
messages in memory so that a worker takes the earliest due one at once, without scanning.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

__all__ = ["DueIndex"]


@dataclass
class DueIndex:
    """When each spooled message is next due (monotonic seconds); the spool has the truth.

    A heap with lazy deletion: workers take the earliest due message in O(log n), and a
    message rescheduled or dropped leaves a stale heap entry that is skipped later. Its
    size is bounded by the spool's (one live entry per message).
    """

    due: dict[str, float] = field(default_factory=dict)
    _heap: list[tuple[float, str]] = field(default_factory=list)

    def set(self, queue_id: str, when: float) -> None:
        self.due[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))
        if len(self._heap) > 4 * len(self.due) + 1024:
            # Many reschedules: rebuild rather than let stale entries pile up.
            self._heap = [(w, q) for q, w in self.due.items()]
            heapq.heapify(self._heap)

    def drop(self, queue_id: str) -> None:
        self.due.pop(queue_id, None)

    def _clean(self) -> None:
        while self._heap and self.due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def pop_due(self, now: float) -> str | None:
        """The earliest message due at ``now`` (removed from the index), or None."""
        self._clean()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, queue_id = heapq.heappop(self._heap)
        del self.due[queue_id]
        return queue_id

    def next_due(self) -> float | None:
        self._clean()
        return self._heap[0][0] if self._heap else None
