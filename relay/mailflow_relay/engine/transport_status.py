"""The last DANE and MTA-STS outcome of each connector, for the operator's status.

The operator never sees a delivery, so the relays tell it: after each delivery under a DANE or
MTA-STS policy the outcome is kept here, and the cluster mode writes :meth:`reported` into the
relay pod's ``mailflow.dev/transport-security`` annotation (routing/contract.py), which the
operator turns into the connector's ``TransportSecurity`` condition. Bounded: one entry per
connector name (names come from the routing document, never from mail), two short values each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from mailflow_relay.outbound.tlsrpt import PolicyResult

__all__ = ["MAX_CONNECTORS", "TransportStatus"]

MAX_CONNECTORS: Final = 1000
"""More connectors than this with DANE or MTA-STS: the oldest entries are forgotten."""

_STS: Final = "sts"
_SUCCESS: Final = "success"
_NOT_APPLICABLE: Final = "not_applicable"


class TransportStatus:
    def __init__(self) -> None:
        self._last: dict[str, dict[str, str]] = {}

    def record(self, connector: str, dane: str | None, policies: Iterable[PolicyResult]) -> None:
        """One delivery's outcome: the DANE result (``verified``, ``mismatch``, …) and the
        MTA-STS sessions (``success`` or the RFC 8460 result type of the failure)."""
        entry: dict[str, str] = {}
        if dane is not None and dane != _NOT_APPLICABLE:
            entry["dane"] = dane
        sts = [p.result_type or _SUCCESS for p in policies if p.policy_type == _STS]
        if sts:
            # A failure in the delivery is what a user must see, even if a retry succeeded.
            entry["mtaSts"] = next((r for r in sts if r != _SUCCESS), _SUCCESS)
        if not entry:
            return
        previous = self._last.pop(connector, {})
        self._last[connector] = {**previous, **entry}
        while len(self._last) > MAX_CONNECTORS:
            del self._last[next(iter(self._last))]

    def reported(self) -> dict[str, dict[str, str]]:
        """For the pod annotation, in a stable order (it is rewritten only when it changes)."""
        return {name: dict(sorted(entry.items())) for name, entry in sorted(self._last.items())}
