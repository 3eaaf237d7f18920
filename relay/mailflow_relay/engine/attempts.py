"""How one delivery reads in the log: a line per server tried, then a line per recipient.

A pool delivery may try several servers before one takes the message (or all fail); the
recipient line names the last one. So when more than one server was tried, each attempt
gets its own line first, naming its server and what happened there. The recipient line
never says ``server=None`` (``-``: no server was reached, e.g. the DNS lookup failed)
nor ``tls=none`` for a session whose TLS handshake or certificate check failed: that
reads ``tls=failed(<reason>)``, the reason the TLS failure metric counts.

The recipient line is the one INFO line per message (and recipient); the attempt lines are
DEBUG. In JSON the recipient line's values are fields too (:func:`delivery_fields`).
"""

from __future__ import annotations

import logging

from mailflow_relay.outbound.deliverer import DeliveryReport
from mailflow_relay.outbound.results import RecipientResult

__all__ = ["delivery_fields", "log_attempts", "tls_shown"]

logger = logging.getLogger("mailflow_relay.engine.relay")


def tls_shown(report: DeliveryReport) -> str:
    """The TLS of the session that decided, for the recipient line."""
    if report.tls_failure is not None:
        return f"failed({report.tls_failure.value})"
    return report.tls_version or "none"


def delivery_fields(
    recipient: str, connector: str, report: DeliveryReport, result: RecipientResult
) -> dict[str, object]:
    """The recipient line's values as JSON fields (``extra=``), so a pipeline needs no regex."""
    return {
        "recipient": recipient,
        "connector": connector,
        "server": report.server,
        "tls_version": report.tls_version,
        "tls": tls_shown(report),
        "verified": report.verified,
        "status": result.status.value,
        "reply_code": result.code,
        "reply": result.message,
    }


def log_attempts(queue_id: str, connector: str, report: DeliveryReport) -> None:
    if len(report.attempts) < 2:
        return  # the recipient line says it all
    for number, attempt in enumerate(report.attempts, start=1):
        logger.debug(
            "queue %s: attempt %d/%d connector=%s server=%s: %s",
            queue_id,
            number,
            len(report.attempts),
            connector,
            attempt.target,
            attempt.outcome,
        )
