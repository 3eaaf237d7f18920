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

In JSON, what a log call passes in ``extra=`` becomes fields of its own (a delivery line's
``recipient``, ``connector``, ``server``, ``tls_version``, ``verified``, ``status``,
``reply``), and every line logged while an SMTP session is served carries that session's
``session_id`` (:mod:`mailflow_relay.inbound.session_ids`: a context variable, so the
relay's lines about the message the session hands over carry it too). With ``json`` *every*
line the process writes is JSON: the start-up line (:func:`announce`) and an uncaught
exception too, so ``jq`` never stops at a line of text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, TextIO

from mailflow_relay.inbound.session_ids import SESSION_ID

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "announce",
    "configure_logging",
    "escape_controls",
]

# What every LogRecord has; anything else on a record came in through ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_json_output = False

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
        session_id = SESSION_ID.get()
        # The session id ties a connection's lines together here too, after the logger name.
        record.session = "" if session_id is None else f" [session {session_id}]"
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return escape_controls(super().formatException(ei), keep_newlines=True)


def _field(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    return escape_controls(str(value))


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
        session_id = SESSION_ID.get()
        if session_id is not None:
            entry["session_id"] = session_id
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and name not in entry:
                entry[name] = _field(value)
        if record.exc_info:
            entry["exception"] = escape_controls(
                self.formatException(record.exc_info), keep_newlines=True
            )
        return json.dumps(entry, ensure_ascii=False)


def announce(text: str) -> None:
    """The start-up line, whatever the log level: plain text, or a JSON line with ``json``."""
    if not _json_output:
        print(text, file=sys.stderr, flush=True)
        return
    record = logging.LogRecord(
        "mailflow_relay.hosting.serve", logging.INFO, __file__, 0, text, None, None
    )
    for handler in logging.getLogger().handlers:
        handler.handle(record)


def _log_uncaught(
    kind: type[BaseException], error: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("mailflow").critical("uncaught exception", exc_info=(kind, error, tb))


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    global _json_output
    handler = logging.StreamHandler(stream or sys.stderr)
    _json_output = fmt == "json"
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        sys.excepthook = _log_uncaught
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s%(session)s: %(message)s")
        )
    # Neither format shows the caller's file and line, its thread or its process: not
    # computing them spares a stack walk per record (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO under "mail.log"; ours say what matters.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
