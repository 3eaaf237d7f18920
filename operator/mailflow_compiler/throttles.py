"""Pause and throttles of connectors and profile servers: CRD fields → routing document.

The CRD schema has already checked types and ranges (crds/*.yaml); here the recipient
domains of ``throttle.domains`` are put in their canonical form (A-labels), the form the
relays compare a recipient's domain with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mailflow_relay.errors import InvalidDomainError
from mailflow_relay.routing.document import (
    DomainThrottle,
    ProfilePool,
    ServerAddress,
    ServerLimits,
    Throttle,
)
from mailflow_relay.routing.domains import normalize_domain
from mailflow_relay.routing.router import RouteDecision

__all__ = ["connector_limits", "explain_lines", "server_limits"]


def _throttle(raw: Mapping[str, Any] | None) -> Throttle | None:
    if raw is None:
        return None
    throttle = Throttle(
        max_connections=raw.get("maxConnections"),
        messages_per_minute=raw.get("messagesPerMinute"),
        recipients_per_message=raw.get("recipientsPerMessage"),
    )
    return throttle if throttle.limits_anything else None


def connector_limits(
    spec: Mapping[str, Any], invalid: Callable[[str, str], None]
) -> tuple[bool, Throttle | None, tuple[DomainThrottle, ...]]:
    """``spec.paused``, ``spec.throttle`` and ``spec.throttle.domains`` of a connector."""
    raw = spec.get("throttle")
    domains: list[DomainThrottle] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate((raw or {}).get("domains", [])):
        path = f"spec.throttle.domains[{i}].domain"
        try:
            domain = normalize_domain(str(entry["domain"]))
        except InvalidDomainError as e:
            invalid(path, f'Invalid value: "{entry["domain"]}": {e.reason}')
            continue
        if domain in seen:
            invalid(
                path,
                f'Duplicate value: "{domain}" is the same domain as'
                f" spec.throttle.domains[{seen[domain]}]; merge the two entries",
            )
            continue
        seen[domain] = i
        throttle = _throttle(entry)
        if throttle is not None:
            domains.append(DomainThrottle(domain, throttle))
    return (
        bool(spec.get("paused", False)),
        _throttle(raw),
        tuple(sorted(domains, key=lambda d: d.domain)),
    )


def server_limits(raw: Mapping[str, Any], server: ServerAddress) -> ServerLimits | None:
    """A profile server's ``paused`` and ``throttle``; None when it has neither."""
    paused = bool(raw.get("paused", False))
    throttle = _throttle(raw.get("throttle"))
    if not paused and throttle is None:
        return None
    return ServerLimits(server, paused=paused, throttle=throttle or Throttle())


def _describe(throttle: Throttle) -> str:
    parts = []
    if throttle.messages_per_minute is not None:
        parts.append(f"{throttle.messages_per_minute} messages/min")
    if throttle.max_connections is not None:
        parts.append(f"{throttle.max_connections} connections")
    if throttle.recipients_per_message is not None:
        parts.append(f"{throttle.recipients_per_message} recipients/message")
    return ", ".join(parts)


def explain_lines(decision: RouteDecision) -> list[str]:
    """What ``mailflow explain`` says about the pause and limits on this route."""
    connector = decision.connector
    if connector is None:
        return []
    lines = []
    if connector.paused:
        lines.append("  PAUSED       spec.paused: mail on this route stays queued, nothing is sent")
    if connector.throttle is not None:
        lines.append(f"  throttle     {_describe(connector.throttle)} (whole fleet)")
    lines.extend(
        f"  throttle     {d.domain}: {_describe(d.throttle)} (whole fleet)"
        for d in connector.domain_throttles
        if d.domain == decision.domain
    )
    pool = decision.destination
    if isinstance(pool, ProfilePool):
        for limits in pool.server_limits:
            what = "paused" if limits.paused else _describe(limits.throttle)
            lines.append(f"  throttle     server {limits.server}: {what}")
    return lines
