"""A recipient's outcome, as the spool records it: final (delivered, failed) or deferred.

Deferred recipients wait with exponential backoff (Postfix's ``minimal_backoff_time`` and
``maximal_backoff_time``); the wait is computed from the attempt count, so it survives
restarts and hand-offs without extra state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from mailflow_relay.queue.spool import RecipientState, RecipientStatus, SpooledMessage

__all__ = ["deferred", "final", "with_states"]


def final(state: RecipientState, status: RecipientStatus, code: int, text: str) -> RecipientState:
    return replace(
        state,
        status=status,
        attempts=state.attempts + 1,
        next_attempt=None,
        last_reply_code=code,
        last_reply_text=text,
    )


def with_states(message: SpooledMessage, states: Sequence[RecipientState]) -> SpooledMessage:
    return replace(message, recipients=tuple(states))


def deferred(
    state: RecipientState, code: int, reason: str, retry_initial: float, retry_max: float
) -> RecipientState:
    """Deferred once more: the next attempt after ``retry_initial * 2**(attempts-1)``, capped."""
    attempts = state.attempts + 1
    wait = min(retry_max, retry_initial * 2 ** (attempts - 1))
    return replace(
        state,
        status=RecipientStatus.DEFERRED,
        attempts=attempts,
        next_attempt=datetime.now(UTC) + timedelta(seconds=wait),
        last_reply_code=code,
        last_reply_text=reason,
    )
