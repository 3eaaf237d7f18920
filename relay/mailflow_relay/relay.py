"""The relay: listener → spool → router → delivery, as one supervised service.

Life of a message:

1. the listener accepts it from an allowed client; :meth:`Relay._accept` adds the
   ``Received:`` header and stores it in the spool — durably — before the client hears
   ``250`` (DESIGN.md, "Relay guarantees");
2. its queue id goes to the bounded work queue; when the queue is full, nothing is
   lost: the scheduler finds the message in the spool index and queues it later;
3. a worker loads it, asks the router for each due recipient's route, splits the
   recipients into one delivery per route (and per recipient domain where the route
   delivers to the recipient's MX or checks the certificate against the recipient
   domain), delivers, and records every recipient's outcome in the spool in one atomic
   step. Delivered and failed recipients are final; deferred ones get a next attempt
   with exponential backoff; a message whose recipients are all final leaves the spool;
4. at start the spool is rescanned, so what a crash interrupted is delivered again.

Everything runs in one :class:`asyncio.TaskGroup`; :meth:`Relay.stop` stops accepting,
lets sessions finish, and lets workers finish the delivery they are in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailflow_relay.delivery import Deliverer, DeliveryReport, DeliverySettings, DeliveryStatus
from mailflow_relay.dns import Resolver
from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.listener import AcceptedMessage, ListenerSettings, SmtpListener
from mailflow_relay.router import RouteDecision, Router, domain_of
from mailflow_relay.routing import (
    RecipientMx,
    RoutingDocument,
    TlsMode,
)
from mailflow_relay.spool import RecipientState, RecipientStatus, Spool, SpooledMessage

__all__ = ["DeliveryEvent", "Relay", "RelaySettings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaySettings:
    listener: ListenerSettings
    spool_dir: Path
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    dns_servers: tuple[str, ...] = ()
    """DNS servers to ask; empty = the system's resolver configuration."""
    dns_port: int = 53
    workers: int = 16
    """Deliveries in progress at once."""
    retry_initial: float = 300.0
    """Seconds before the first retry of a deferred recipient (Postfix: 300 s)."""
    retry_max: float = 4000.0
    """The longest wait between retries (Postfix: 4000 s)."""
    scheduler_tick: float = 1.0


@dataclass(frozen=True)
class DeliveryEvent:
    """One delivery's outcome for one route: what logs, metrics and ``make demo`` show."""

    queue_id: str
    connector: str
    destination: str
    tls_mode: TlsMode
    report: DeliveryReport


@dataclass
class _Index:
    """When each spooled message is next due (monotonic seconds); the spool has the truth."""

    due: dict[str, float] = field(default_factory=dict)

    def set(self, queue_id: str, when: float) -> None:
        self.due[queue_id] = when

    def drop(self, queue_id: str) -> None:
        self.due.pop(queue_id, None)

    def take_due(self, now: float) -> list[str]:
        ready = sorted((when, qid) for qid, when in self.due.items() if when <= now)
        return [qid for _, qid in ready]


class Relay:
    def __init__(
        self,
        settings: RelaySettings,
        document: RoutingDocument,
        *,
        on_delivery: Callable[[DeliveryEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.router = Router(document)
        self.spool = Spool(
            settings.spool_dir, max_message_size=settings.listener.max_message_size * 2
        )
        self.deliverer = Deliverer(
            settings.delivery, Resolver(settings.dns_servers, port=settings.dns_port)
        )
        self.listener = SmtpListener(settings.listener, self._accept, self._check_recipient)
        self.on_delivery = on_delivery
        self._clock = clock
        self._index = _Index()
        self._in_flight: set[str] = set()
        self._work: asyncio.Queue[str] = asyncio.Queue(maxsize=max(64, settings.workers * 4))
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once the listener is bound and the spool has been rescanned."""

    @property
    def port(self) -> int:
        return self.listener.port

    def load_document(self, document: RoutingDocument) -> None:
        """Route new deliveries with ``document``; deliveries in progress keep their route."""
        self.router = Router(document)
        logger.info(
            "routing document generation %d loaded (%s)", document.generation, document.checksum
        )

    # --- accepting ---------------------------------------------------------------------------

    def _check_recipient(self, sender: str, recipient: str) -> tuple[int, str] | None:
        try:
            decision = self.router.route_for(recipient, sender)
        except InvalidAddressError as e:
            return 553, f"5.1.3 {e.reason}"
        if decision.rejected:
            return 550, "5.7.1 No route for this recipient domain"
        return None

    async def _accept(self, message: AcceptedMessage) -> str:
        stored = await asyncio.to_thread(
            self.spool.store_with_header,
            message.mail_from,
            list(dict.fromkeys(message.rcpt_tos)),
            message.with_received,
        )
        logger.info(
            "queued %s from=<%s> recipients=%d size=%d client=%s",
            stored.queue_id,
            stored.sender,
            len(stored.recipients),
            stored.size,
            message.client_address,
        )
        self._index.set(stored.queue_id, self._clock())
        self._enqueue(stored.queue_id)
        return stored.queue_id

    def _enqueue(self, queue_id: str) -> None:
        if queue_id in self._in_flight:
            return
        try:
            self._work.put_nowait(queue_id)
        except asyncio.QueueFull:
            pass  # still in the index: the scheduler queues it when there is room
        else:
            self._in_flight.add(queue_id)
            self._index.drop(queue_id)

    # --- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop`; then stop accepting, finish sessions and deliveries."""
        for message in await asyncio.to_thread(self.spool.scan):
            self._schedule(message)
        logger.info("spool rescanned: %d message(s) waiting", len(self._index.due))
        await self.listener.start()
        logger.info("listening on %s:%d", self.settings.listener.host, self.listener.port)
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                workers = [
                    tasks.create_task(self._worker(), name=f"mailflow-delivery-{i}")
                    for i in range(self.settings.workers)
                ]
                scheduler = tasks.create_task(self._scheduler(), name="mailflow-scheduler")
                await self._stopping.wait()
                await self.listener.stop(grace=self.settings.listener.command_timeout)
                scheduler.cancel()
                for worker in workers:
                    worker.cancel()
        finally:
            await self.listener.stop(grace=0)

    def stop(self) -> None:
        """Stop accepting, let sessions and deliveries in progress finish, then return from run."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _schedule(self, message: SpooledMessage) -> None:
        if message.is_final:
            return
        now_wall = datetime.now(UTC)
        waits = [
            max(0.0, (r.next_attempt - now_wall).total_seconds()) if r.next_attempt else 0.0
            for r in message.pending
        ]
        self._index.set(message.queue_id, self._clock() + min(waits, default=0.0))

    async def _scheduler(self) -> None:
        while True:
            for queue_id in self._index.take_due(self._clock()):
                if self._work.full():
                    break
                self._enqueue(queue_id)
            await asyncio.sleep(self.settings.scheduler_tick)

    async def _worker(self) -> None:
        while True:
            queue_id = await self._work.get()
            try:
                # A delivery in progress finishes even when the relay is stopping.
                await asyncio.shield(self._process(queue_id))
            except Exception:
                logger.exception("queue %s: processing failed; retrying later", queue_id)
                self._index.set(queue_id, self._clock() + self.settings.retry_initial)
            finally:
                self._in_flight.discard(queue_id)

    # --- delivering --------------------------------------------------------------------------

    async def _process(self, queue_id: str) -> None:
        message = await asyncio.to_thread(self.spool.load, queue_id)
        now = datetime.now(UTC)
        due = [r for r in message.pending if r.next_attempt is None or r.next_attempt <= now]
        router = self.router
        groups: dict[tuple[object, ...], list[tuple[RecipientState, RouteDecision]]] = {}
        updates: list[RecipientState] = []
        for state in due:
            try:
                decision = router.route_for(state.address, message.sender)
            except InvalidAddressError as e:
                updates.append(_final(state, RecipientStatus.FAILED, 553, f"5.1.3 {e.reason}"))
                continue
            if decision.destination is None:
                updates.append(
                    _final(state, RecipientStatus.FAILED, 550, "5.7.1 no route for this recipient")
                )
                continue
            groups.setdefault(_group_key(decision), []).append((state, decision))

        async with asyncio.TaskGroup() as tasks:
            for members in groups.values():
                tasks.create_task(
                    self._deliver_group(message, members, updates),
                    name=f"mailflow-deliver-{queue_id}",
                )
        if updates:
            states = await asyncio.to_thread(self.spool.update, queue_id, *updates)
        else:
            states = message.recipients
        if all(s.status.is_final for s in states):
            await asyncio.to_thread(self.spool.remove, queue_id)
            logger.info("queue %s: done, removed from the spool", queue_id)
        else:
            self._schedule(_with_states(message, states))

    async def _deliver_group(
        self,
        message: SpooledMessage,
        members: Sequence[tuple[RecipientState, RouteDecision]],
        updates: list[RecipientState],
    ) -> None:
        decision = members[0][1]
        connector = decision.connector
        name = str(connector.ref) if connector else "(default route)"
        assert decision.destination is not None
        if connector is not None and connector.unresolved:
            reason = "4.3.5 connector not ready: " + "; ".join(connector.unresolved)
            logger.warning("queue %s: %s", message.queue_id, reason)
            updates.extend(self._deferred(state, 451, reason) for state, _ in members)
            return
        report = await self.deliverer.deliver(
            mail_from=message.sender,
            recipients=[state.address for state, _ in members],
            data=message.body,
            destination=decision.destination,
            tls=decision.tls,
            auth=connector.auth if connector else None,
            recipient_domain=decision.domain,
        )
        event = DeliveryEvent(
            queue_id=message.queue_id,
            connector=name,
            destination=decision.destination.describe(),
            tls_mode=decision.tls.mode,
            report=report,
        )
        for (state, _), result in zip(members, report.results, strict=True):
            logger.info(
                "queue %s: to=<%s> connector=%s server=%s tls=%s verified=%s status=%s reply=%r",
                message.queue_id,
                state.address,
                name,
                report.server,
                report.tls_version or "none",
                report.verified,
                result.status.value,
                result.message,
            )
            if result.status is DeliveryStatus.DELIVERED:
                updates.append(
                    _final(state, RecipientStatus.DELIVERED, result.code, result.message)
                )
            elif result.status is DeliveryStatus.FAILED:
                updates.append(_final(state, RecipientStatus.FAILED, result.code, result.message))
            else:
                updates.append(self._deferred(state, result.code, result.message))
        if self.on_delivery is not None:
            self.on_delivery(event)

    def _deferred(self, state: RecipientState, code: int, reason: str) -> RecipientState:
        attempts = state.attempts + 1
        wait = min(self.settings.retry_max, self.settings.retry_initial * 2 ** (attempts - 1))
        return RecipientState(
            address=state.address,
            status=RecipientStatus.DEFERRED,
            attempts=attempts,
            next_attempt=datetime.now(UTC) + timedelta(seconds=wait),
            last_reply_code=code,
            last_reply_text=reason,
        )


def _final(state: RecipientState, status: RecipientStatus, code: int, text: str) -> RecipientState:
    return RecipientState(
        address=state.address,
        status=status,
        attempts=state.attempts + 1,
        last_reply_code=code,
        last_reply_text=text,
    )


def _with_states(message: SpooledMessage, states: Sequence[RecipientState]) -> SpooledMessage:
    return SpooledMessage(
        queue_id=message.queue_id,
        sender=message.sender,
        recipients=tuple(states),
        received=message.received,
        size=message.size,
        body=message.body,
    )


def _group_key(decision: RouteDecision) -> tuple[object, ...]:
    connector = decision.connector
    key: tuple[object, ...] = (
        None if connector is None else connector.ref,
        decision.destination,
        decision.tls,
    )
    # The recipient's MX and DomainMatch both depend on the recipient domain.
    if isinstance(decision.destination, RecipientMx) or decision.tls.mode is TlsMode.DOMAIN_MATCH:
        key += (decision.domain,)
    return key


def recipient_domain(address: str) -> str:
    return domain_of(address)
