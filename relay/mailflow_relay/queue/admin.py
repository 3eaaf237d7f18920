"""``mailflow queue``: look at a spool and act on it, as ``postqueue``/``postsuper`` do.

It works on the spool folder directly, also while a relay runs on it: it only reads what
the relay writes (no repair of a spool in use), and every change is an atomic spool
operation under the same per-message lock the relay takes. ``retry`` also leaves a flush request that a
running relay picks up within a second, so deferred mail is tried at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from mailflow_relay.queue.folders import SpoolSet
from mailflow_relay.queue.spool import (
    MessageNotFoundError,
    SpooledMessage,
    SpoolError,
)

__all__ = ["FLUSH_REQUEST", "delete", "list_queue", "retry", "show"]

FLUSH_REQUEST = ".flush"
"""A file in the spool folder: a running relay retries every deferred recipient now."""


def _age(message: SpooledMessage, now: datetime) -> str:
    seconds = int((now - message.received).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _message_json(message: SpooledMessage, now: datetime) -> dict[str, object]:
    return {
        "queueId": message.queue_id,
        "sender": message.sender,
        "received": message.received.isoformat(),
        "ageSeconds": int((now - message.received).total_seconds()),
        "size": message.size,
        "recipients": [
            {
                "address": r.address,
                "status": r.status.value,
                "attempts": r.attempts,
                "nextAttempt": None if r.next_attempt is None else r.next_attempt.isoformat(),
                "lastReply": r.last_reply_text,
            }
            for r in message.recipients
        ],
    }


def list_queue(spool_dir: Path, out: TextIO, *, as_json: bool = False) -> int:
    spool = SpoolSet(spool_dir)  # with worker processes, every worker's folder too
    messages = spool.scan(repair=False)
    now = datetime.now(UTC)
    if as_json:
        json.dump([_message_json(m, now) for m in messages], out, indent=2)
        out.write("\n")
        return 0
    if not messages:
        out.write("the queue is empty\n")
        return 0
    out.write(f"{'QUEUE ID':<31}  {'AGE':>5}  {'SIZE':>8}  SENDER / RECIPIENTS\n")
    for message in messages:
        out.write(
            f"{message.queue_id:<31}  {_age(message, now):>5}  {message.size:>8}  "
            f"<{message.sender}>\n"
        )
        for r in message.recipients:
            reason = (
                f"  ({r.last_reply_text})" if r.last_reply_text and not r.status.is_final else ""
            )
            out.write(
                f"{'':<50}  <{r.address}> {r.status.value}, {r.attempts} attempt(s){reason}\n"
            )
    pending = sum(1 for m in messages if not m.is_final)
    out.write(f"-- {len(messages)} message(s), {pending} with recipients to deliver\n")
    return 0


def show(
    spool_dir: Path, queue_id: str, out: TextIO, *, body: bool = False, as_json: bool = False
) -> int:
    message = SpoolSet(spool_dir).load(queue_id)
    now = datetime.now(UTC)
    if as_json:
        entry = _message_json(message, now)
        if body:
            entry["body"] = message.body.decode("utf-8", "replace")
        json.dump(entry, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"queue id:  {message.queue_id}\nreceived:  {message.received.isoformat()}\n")
    out.write(f"sender:    <{message.sender}>\nsize:      {message.size}\n")
    for r in message.recipients:
        when = f", next attempt {r.next_attempt.isoformat()}" if r.next_attempt else ""
        out.write(f"recipient: <{r.address}> {r.status.value}, {r.attempts} attempt(s){when}\n")
        if r.last_reply_text:
            out.write(f"           last reply: {r.last_reply_text}\n")
    headers, _, rest = message.body.partition(b"\r\n\r\n")
    out.write("\n" + headers.decode("utf-8", "replace").replace("\r\n", "\n") + "\n")
    if body:
        out.write("\n" + rest.decode("utf-8", "replace").replace("\r\n", "\n"))
    return 0


def retry(spool_dir: Path, queue_ids: Sequence[str], out: TextIO) -> int:
    """Make deferred recipients due now (all messages when no id is given)."""
    spool = SpoolSet(spool_dir)
    targets = [spool.load(q) for q in queue_ids] if queue_ids else spool.scan(repair=False)
    count = 0
    for message in targets:
        try:
            count += spool.make_due(message.queue_id)
        except MessageNotFoundError:
            continue  # delivered or removed by the relay meanwhile: nothing to retry
        except SpoolError as e:
            out.write(f"{message.queue_id}: not retried: {e}\n")
    spool.touch_all(FLUSH_REQUEST)
    out.write(f"{count} deferred recipient(s) made due now\n")
    return 0


def delete(spool_dir: Path, queue_ids: Sequence[str], out: TextIO) -> int:
    """Remove messages for good: no delivery, no bounce."""
    spool = SpoolSet(spool_dir)
    problems = 0
    for queue_id in queue_ids:
        try:
            spool.remove(queue_id, force=True)
        except MessageNotFoundError:
            out.write(f"{queue_id}: not in the spool\n")
            problems += 1
            continue
        except SpoolError as e:
            out.write(f"{queue_id}: {e}\n")
            problems += 1
            continue
        out.write(f"{queue_id}: deleted\n")
    return 1 if problems else 0
