"""Structured logs: one JSON object per line, with the queue id as its own field.

The relay's log calls about a message start with ``"queue %s: …"`` or ``"queued %s …"``
and pass the queue id first; the formatter lifts it into ``queue_id`` so that
``jq 'select(.queue_id == "…")'`` follows one message from acceptance to its outcome.
Secrets never reach a log call in the first place (passwords, CA bundles, AUTH data).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

__all__ = ["JsonFormatter", "configure_logging"]

_QUEUE_PREFIXES = ("queue %s", "queued %s")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (
            isinstance(record.msg, str)
            and record.msg.startswith(_QUEUE_PREFIXES)
            and isinstance(record.args, tuple)
            and record.args
        ):
            entry["queue_id"] = str(record.args[0])
        queue_id = getattr(record, "queue_id", None)
        if queue_id is not None:
            entry["queue_id"] = str(queue_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO under "mail.log"; ours say what matters.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
