"""Which recipients the sender hears about, and how: RFC 3461's NOTIFY and RET applied.

Without NOTIFY a sender hears of failures, and of delays when the relay warns of them
(``delay_warning_after``). With NOTIFY (RFC 3461 §4.1):

* ``NEVER`` — no report at all for that recipient;
* ``FAILURE`` / ``DELAY`` — only what is listed; ``DELAY`` asks for a warning even where
  the relay sends none by default (after :data:`DEFAULT_DELAY_WARNING`);
* ``SUCCESS`` — a ``relayed`` report when the next hop took the message without DSN
  (with DSN, NOTIFY went on and that hop reports, §6.2.1).

``RET=FULL`` returns the whole message in a failure report when it fits in the spool's
size limit; ``RET=HDRS`` (and no RET) returns the headers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mailflow_relay.envelope import Notify, RecipientParameters, Ret
from mailflow_relay.queue.bounces import BounceRecipient, status_of
from mailflow_relay.queue.spool import RecipientState, RecipientStatus, SpooledMessage

__all__ = [
    "DEFAULT_DELAY_WARNING",
    "Notice",
    "bounce_recipients",
    "notices",
    "remote_mta_name",
    "returns_full",
]

DEFAULT_DELAY_WARNING = 4 * 3600.0
"""Seconds after arrival for a delay warning asked by NOTIFY=DELAY when the relay's own
``delay_warning_after`` is off (Postfix's customary ``delay_warning_time = 4h``)."""

RETURN_FULL_ALLOWANCE = 64 * 1024
"""Room kept for the report's own parts when RET=FULL returns the message."""


@dataclass(frozen=True)
class Notice:
    """One report to send: its action and its recipients."""

    action: str
    """``failed``, ``delayed`` or ``relayed``."""
    states: tuple[RecipientState, ...]
    """The recipients it reports on (delayed ones get ``delay_notified`` once it is queued)."""
    suppressed: int = 0
    """Recipients with this outcome that NOTIFY left out."""


def notices(
    message: SpooledMessage,
    updates: Sequence[RecipientState],
    now: datetime,
    delay_warning_after: float | None,
) -> list[Notice]:
    """The reports due for ``updates`` (the outcomes of one attempt), in a fixed order."""
    parameters = message.parameters
    age = (now - message.arrival).total_seconds()
    failed: list[RecipientState] = []
    delayed: list[RecipientState] = []
    relayed: list[RecipientState] = []
    suppressed = {"failed": 0, "delayed": 0}
    for state in updates:
        wanted = parameters.for_recipient(state.address)
        if state.status is RecipientStatus.FAILED:
            if wanted.wants(Notify.FAILURE):
                failed.append(state)
            else:
                suppressed["failed"] += 1
        elif state.status is RecipientStatus.DEFERRED and not state.delay_notified:
            threshold = _delay_threshold(wanted, delay_warning_after)
            if threshold is None or age < threshold:
                continue
            if wanted.wants(Notify.DELAY):
                delayed.append(state)
            else:
                suppressed["delayed"] += 1
        elif (
            state.status is RecipientStatus.DELIVERED
            and wanted.wants(Notify.SUCCESS)
            and not state.remote_dsn
        ):
            relayed.append(state)
    result = [
        Notice("failed", tuple(failed), suppressed["failed"]),
        Notice("delayed", tuple(delayed), suppressed["delayed"]),
        Notice("relayed", tuple(relayed)),
    ]
    return [n for n in result if n.states or n.suppressed]


def _delay_threshold(wanted: RecipientParameters, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if wanted.notify is not None and Notify.DELAY in wanted.notify:
        return DEFAULT_DELAY_WARNING
    return None


def bounce_recipients(
    message: SpooledMessage, notice: Notice, now: datetime
) -> list[BounceRecipient]:
    """The report's per-recipient blocks for ``notice``."""
    default_class = {"failed": "5", "delayed": "4", "relayed": "2"}[notice.action]
    return [
        BounceRecipient(
            address=s.address,
            action=notice.action,
            status="2.0.0"
            if notice.action == "relayed"
            else status_of(s.last_reply_text or "", s.last_reply_code, default_class=default_class),
            diagnostic=s.last_reply_text or "",
            remote_mta=s.remote_mta,
            last_attempt=now,
            original_recipient=message.parameters.for_recipient(s.address).orcpt,
        )
        for s in notice.states
    ]


def returns_full(message: SpooledMessage, notice: Notice, max_message_size: int) -> bool:
    """RET=FULL on a failure report, when the message and the report fit in the spool."""
    return (
        notice.action == "failed"
        and message.parameters.mail.ret is Ret.FULL
        # RFC 8689 §5: a report on a REQUIRETLS message carries no content.
        and not message.parameters.mail.requiretls
        and message.size + RETURN_FULL_ALLOWANCE <= max_message_size
    )


def remote_mta_name(server: str | None) -> str | None:
    """The host name in a target as the deliverer shows it (``name[address]:port``)."""
    if not server:
        return None
    name = server.split("[", 1)[0] if "[" in server else server.rsplit(":", 1)[0]
    return name.strip("[]") or None
