"""The id of the SMTP session being served, for the log lines about it.

A context variable, set when a connection is accepted: the session's task and every task
it starts inherit it, so each line logged while the session is served (aiosmtpd's own, the
listener's, the relay's "queued" line for the message it hands over) can say which
connection it is about. The JSON log format writes it as ``session_id``.
"""

from __future__ import annotations

import contextvars
import secrets
from typing import Final

__all__ = ["SESSION_ID", "bind_new_session"]

SESSION_ID: Final = contextvars.ContextVar[str | None]("mailflow_session_id", default=None)


def bind_new_session() -> str:
    """A fresh id (random: it says nothing about the client), bound in this context."""
    session_id = secrets.token_hex(6)
    SESSION_ID.set(session_id)
    return session_id
