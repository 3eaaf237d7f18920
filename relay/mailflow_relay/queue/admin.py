"""``mailflow queue``: look at a spool and act on it, as ``postqueue``/``postsuper`` do.

It works on the spool folder directly, also while a relay runs on it: it only reads what
the relay writes (no repair of a spool in use), and every change is an atomic spool
operation under the same per-message lock the relay takes. ``retry``, ``hold``,
``release`` and ``bounce`` also leave a flush request that a running relay picks up within
a second, so it acts on them at once.

``hold``, ``release`` and ``bounce`` take queue ids, filters (:mod:`.selection`) or both,
and act on the recipients still to deliver that match. Without either they refuse (an
operator who forgot a filter must not bounce the whole queue); ``--all`` means all.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

from mailflow_relay.queue.folders import SpoolSet
from mailflow_relay.queue.selection import QueueFilter, Route, route_of
from mailflow_relay.queue.spool import (
    MessageNotFoundError,
    RecipientState,
    SpooledMessage,
    SpoolError,
)
from mailflow_relay.routing.router import Router

__all__ = [
    "FLUSH_REQUEST",
    "MARKS",
    "PUBLISHED_DOCUMENT",
    "Selection",
    "delete",
    "list_queue",
    "mark",
    "retry",
    "show",
]

FLUSH_REQUEST = ".flush"
"""A file in the spool folder: a running relay retries every deferred recipient now."""
PUBLISHED_DOCUMENT: Final = ".routing.json"
"""The routing document in force, left in the spool folder by the relay (no secrets)."""


@dataclass(frozen=True)
class Selection:
    """What a command acts on: queue ids (none: every message), filters, and the router
    that tells each recipient's route now (None: no routing document at hand)."""

    queue_ids: tuple[str, ...] = ()
    filter: QueueFilter = field(default_factory=QueueFilter)
    router: Router | None = None

    def route(self, message: SpooledMessage, address: str) -> Route | None:
        if self.router is None:
            return None
        return route_of(self.router, message.sender, message.client, message.user, address)

    def recipients(self, message: SpooledMessage, now: datetime) -> list[RecipientState]:
        """The recipients still to deliver that the filters select."""
        if not self.filter.matches_message(message.sender, message.arrival, now):
            return []
        return [
            r
            for r in message.pending
            if self.filter.matches_recipient(
                r.address,
                self.route(message, r.address) if self.filter.connector is not None else None,
            )
        ]

    def messages(
        self, spool: SpoolSet, now: datetime, missing: list[str] | None = None
    ) -> list[SpooledMessage]:
        """The selected messages (by id, else all), those with a selected recipient when
        filters are given. Ids not in the spool go to ``missing`` (without it, they raise)."""
        if self.queue_ids:
            found = []
            for queue_id in dict.fromkeys(self.queue_ids):
                try:
                    found.append(spool.load(queue_id))
                except MessageNotFoundError:
                    if missing is None:
                        raise
                    missing.append(queue_id)
        else:
            found = spool.scan(repair=False)
        if self.filter.empty:
            return found
        return [m for m in found if self.recipients(m, now)]


def _held(state: RecipientState) -> RecipientState:
    return replace(state, held=True)


def _released(state: RecipientState) -> RecipientState:
    # Due at once, as `retry` would make it: it waited long enough on hold.
    return replace(state, held=False, next_attempt=None) if state.held else state


def _bounced(state: RecipientState) -> RecipientState:
    return replace(state, held=False, bounce_requested=True, next_attempt=None)


MARKS: Final[dict[str, tuple[Callable[[RecipientState], RecipientState], str, str]]] = {
    "hold": (_held, "held: not delivered, not bounced until released", "held"),
    "release": (_released, "released: due now", "released"),
    "bounce": (_bounced, "to be returned to the sender by the relay", "marked for a bounce"),
}
"""``mailflow queue ACTION``: the change to each selected recipient, and what it means."""


def _age(message: SpooledMessage, now: datetime) -> str:
    seconds = int((now - message.received).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _route_json(routes: Selection, message: SpooledMessage, state: RecipientState) -> object:
    route = None if state.status.is_final else routes.route(message, state.address)
    if route is None:
        return None
    return {"connector": route.connector, "destination": route.destination, "tlsMode": route.tls}


def _message_json(
    message: SpooledMessage, now: datetime, routes: Selection | None = None
) -> dict[str, object]:
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
                "held": r.held,
                "bounceRequested": r.bounce_requested,
                **({} if routes is None else {"route": _route_json(routes, message, r)}),
            }
            for r in message.recipients
        ],
    }


def _status(state: RecipientState) -> str:
    marks = [
        m for m, on in (("held", state.held), ("bounce requested", state.bounce_requested)) if on
    ]
    return state.status.value + "".join(f" [{m}]" for m in marks)


def list_queue(
    spool_dir: Path, out: TextIO, *, as_json: bool = False, selection: Selection | None = None
) -> int:
    spool = SpoolSet(spool_dir)  # with worker processes, every worker's folder too
    now = datetime.now(UTC)
    messages = (selection or Selection()).messages(spool, now)
    if as_json:
        json.dump([_message_json(m, now) for m in messages], out, indent=2)
        out.write("\n")
        return 0
    if not messages:
        given = [] if selection is None else selection.filter.describe()
        out.write(f"no message matches {' '.join(given)}\n" if given else "the queue is empty\n")
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
            out.write(f"{'':<50}  <{r.address}> {_status(r)}, {r.attempts} attempt(s){reason}\n")
    pending = sum(1 for m in messages if not m.is_final)
    out.write(f"-- {len(messages)} message(s), {pending} with recipients to deliver\n")
    return 0


def show(
    spool_dir: Path,
    queue_id: str,
    out: TextIO,
    *,
    body: bool = False,
    as_json: bool = False,
    router: Router | None = None,
) -> int:
    """One message; with a router, the route each recipient still to deliver takes now."""
    message = SpoolSet(spool_dir).load(queue_id)
    now = datetime.now(UTC)
    routes = Selection(router=router)
    if as_json:
        entry = _message_json(message, now, routes)
        if body:
            entry["body"] = message.body.decode("utf-8", "replace")
        json.dump(entry, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"queue id:  {message.queue_id}\nreceived:  {message.received.isoformat()}\n")
    out.write(f"sender:    <{message.sender}>\nsize:      {message.size}\n")
    for r in message.recipients:
        when = f", next attempt {r.next_attempt.isoformat()}" if r.next_attempt else ""
        out.write(f"recipient: <{r.address}> {_status(r)}, {r.attempts} attempt(s){when}\n")
        if r.last_reply_text:
            out.write(f"           last reply: {r.last_reply_text}\n")
        if not r.status.is_final:
            route = routes.route(message, r.address)
            shown = "unknown (no routing document)" if route is None else route.describe()
            out.write(f"           route now: {shown}\n")
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


def _only(
    addresses: set[str], change: Callable[[RecipientState], RecipientState], state: RecipientState
) -> RecipientState:
    return change(state) if state.address in addresses else state


def mark(spool_dir: Path, action: str, selection: Selection, out: TextIO) -> int:
    """``hold``, ``release`` or ``bounce`` the selected recipients; 1 if a queue id was not
    found or a change was refused."""
    change, meaning, done = MARKS[action]
    spool = SpoolSet(spool_dir)
    now = datetime.now(UTC)
    changed = 0
    missing: list[str] = []
    messages = selection.messages(spool, now, missing)
    for queue_id in missing:
        out.write(f"{queue_id}: not in the spool (delivered, bounced or deleted)\n")
    problems = len(missing)
    for message in messages:
        chosen = {r.address for r in selection.recipients(message, now)}
        try:
            states = spool.amend(message.queue_id, functools.partial(_only, chosen, change))
        except MessageNotFoundError:
            continue  # finished by the relay meanwhile: nothing left to act on
        except SpoolError as e:
            out.write(f"{message.queue_id}: not changed: {e}\n")
            problems += 1
            continue
        for state in states:
            out.write(f"{message.queue_id}: <{state.address}> {meaning}\n")
        changed += len(states)
    spool.touch_all(FLUSH_REQUEST)
    out.write(f"{changed} recipient(s) {done}\n")
    return 1 if problems else 0
