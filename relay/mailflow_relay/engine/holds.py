"""What an administrator's hold and bounce (``mailflow queue hold|release|bounce``) mean to
the scheduler.

The marks live on each recipient's state in the spool (``held``, ``bounce_requested``), set
by the CLI under the message's lock. A held recipient is never due: it is not tried, not
warned about and not expired into a bounce, however long it waits; released, it is due at
once. A recipient marked for a bounce fails without another attempt, and the relay's usual
failure path (:meth:`Relay._notify_sender`) spools the RFC 3464 report to the sender before
the failure is recorded.
"""

from __future__ import annotations

from datetime import datetime

from mailflow_relay.engine.outcomes import final
from mailflow_relay.queue.spool import RecipientState, RecipientStatus, SpooledMessage

__all__ = ["ADMIN_BOUNCE_REPLY", "active", "admin_bounced", "due", "holds_any"]

ADMIN_BOUNCE_REPLY = "5.0.0 returned to the sender by an administrator (mailflow queue bounce)"
"""The diagnostic of a recipient bounced by hand: what the sender reads in the report."""


def active(message: SpooledMessage) -> tuple[RecipientState, ...]:
    """The recipients still to deliver that are not on hold (what the schedule waits for)."""
    return tuple(r for r in message.pending if not r.held)


def due(message: SpooledMessage, now: datetime) -> list[RecipientState]:
    """The recipients to act on at ``now``: not held, and their next attempt has come."""
    return [r for r in active(message) if r.next_attempt is None or r.next_attempt <= now]


def holds_any(message: SpooledMessage) -> bool:
    """Whether a recipient still to deliver is on hold (such a message is never handed off:
    the peer relay would not know of the hold)."""
    return any(r.held for r in message.pending)


def admin_bounced(state: RecipientState) -> RecipientState:
    """The recipient failed by hand, with the reply its bounce report gives."""
    return final(state, RecipientStatus.FAILED, 550, ADMIN_BOUNCE_REPLY)
