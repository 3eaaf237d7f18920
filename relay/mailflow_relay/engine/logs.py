r"""Structured logs: one JSON object per line, with the queue id as its own field.

The relay's log calls about a message start with ``"queue %s: …"`` or ``"queued %s …"``
and pass the queue id first; the formatter lifts it into ``queue_id`` so that
``jq 'select(.queue_id == "…")'`` follows one message from acceptance to its outcome.
Secrets never reach a log call in the first place (passwords, CA bundles, AUTH data).

Much of what is logged comes from clients: HELO names, addresses, unrecognised verbs (which
aiosmtpd logs itself). Both formats escape every control character — C0, DEL, C1 and the
bidirectional overrides — as ``\xNN``/``\uNNNN`` in the final line, so no client can move
an operator's cursor, ring the bell, recolour the terminal or forge a second log line.
The formatters do it, not each log call: a call that forgets is still safe.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "escape_controls"]

_QUEUE_PREFIXES = ("queue %s", "queued %s")

_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROLS_BUT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``ESC`` -> ``\\x1b``).

    ``keep_newlines`` is for tracebacks, whose line breaks are the formatter's own.
    """
    pattern = _CONTROLS_BUT_NEWLINE if keep_newlines else _CONTROLS
    return pattern.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """The text format, one line per record whatever the record's arguments hold."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return escape_controls(super().formatException(ei), keep_newlines=True)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape_controls(record.getMessage()),
        }
        if (
            isinstance(record.msg, str)
            and record.msg.startswith(_QUEUE_PREFIXES)
            and isinstance(record.args, tuple)
            and record.args
        ):
            entry["queue_id"] = escape_controls(str(record.args[0]))
        queue_id = getattr(record, "queue_id", None)
        if queue_id is not None:
            entry["queue_id"] = escape_controls(str(queue_id))
        if record.exc_info:
            entry["exception"] = escape_controls(
                self.formatException(record.exc_info), keep_newlines=True
            )
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO under "mail.log"; ours say what matters.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
