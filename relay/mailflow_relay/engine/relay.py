"""The relay: listener → spool → router → delivery, as one supervised service.

Life of a message:

1. the listener accepts it from an allowed client; :meth:`Relay._accept` adds the
   ``Received:`` header and stores it in the spool — durably — before the client hears
   ``250`` (DESIGN.md, "Relay guarantees");
2. its queue id goes into the due index (:mod:`.schedule`, a heap by next attempt) and
   an idle worker wakes at once; a message just accepted is delivered from memory;
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
import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from mailflow_relay.engine.answers import ThreadAnswers
from mailflow_relay.engine.attempts import delivery_fields, log_attempts, tls_shown
from mailflow_relay.engine.handoff import HandOff
from mailflow_relay.engine.holds import active, admin_bounced, due, holds_any
from mailflow_relay.engine.metrics import RelayMetrics
from mailflow_relay.engine.notifications import (
    Notice,
    bounce_recipients,
    notices,
    remote_mta_name,
    returns_full,
)
from mailflow_relay.engine.origin import is_peer, take_origin
from mailflow_relay.engine.outcomes import deferred, final, with_states
from mailflow_relay.engine.published import publish
from mailflow_relay.engine.queue_gauges import QueueView, destination_label, reason_class
from mailflow_relay.engine.schedule import DueIndex
from mailflow_relay.engine.signing import DkimSigner, every_route_opts_out
from mailflow_relay.engine.throttles import Admission, DeliveryGate
from mailflow_relay.engine.transport_status import TransportStatus
from mailflow_relay.envelope import EnvelopeParameters, MailParameters
from mailflow_relay.errors import (
    InvalidAddressError,
    RoutingDocumentError,
    require_positive,
)
from mailflow_relay.inbound.listener import AcceptedMessage, ListenerSettings, SmtpListener
from mailflow_relay.inbound.settings import IPNetwork
from mailflow_relay.outbound.dane import dane_for
from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.outbound.mta_sts import MtaSts
from mailflow_relay.outbound.tlsrpt import ReportSettings, TlsReporter, TlsReportStore
from mailflow_relay.queue.admin import FLUSH_REQUEST
from mailflow_relay.queue.bounces import build_dsn
from mailflow_relay.queue.lock import SpoolLock
from mailflow_relay.queue.spool import (
    MessageNotFoundError,
    RecipientState,
    RecipientStatus,
    Spool,
    SpoolCorruptError,
    SpooledMessage,
)
from mailflow_relay.routing.document import (
    RecipientMx,
    RoutingDocument,
    TlsMode,
)
from mailflow_relay.routing.router import Client, RouteDecision, Router

__all__ = ["DeliveryEvent", "Relay", "RelaySettings"]

T = TypeVar("T")
FRESH_CACHE_BYTES = 64 * 1024 * 1024
"""Messages just accepted are kept in memory up to this many bytes for their first delivery."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaySettings:
    listener: ListenerSettings
    spool_dir: Path
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    dns_servers: tuple[str, ...] = ()
    """DNS servers to ask; empty = the system's resolver configuration."""
    dns_port: int = 53
    dnssec_resolvers: tuple[str, ...] = ()
    """Validating resolvers whose AD bit is trusted, for DANE; empty = DANE never applies."""
    dnssec_port: int = 53
    mta_sts_cache: Path | None = None
    """Where MTA-STS policies are kept across restarts; None: in memory only."""
    tls_report_contact: str | None = None
    """TLS-RPT (RFC 8460): the contact-info of the daily reports; None: no reports sent."""
    workers: int = 16
    """Deliveries in progress at once."""
    retry_initial: float = 300.0
    """Seconds before the first retry of a deferred recipient (Postfix: 300 s)."""
    retry_max: float = 4000.0
    """The longest wait between retries (Postfix: 4000 s)."""
    scheduler_tick: float = 1.0
    spool_threads: int = 64
    """Threads for spool I/O (each mostly waits on fsync)."""
    spool_min_free: int | None = None
    """Free bytes the spool's file system must keep for new mail: below it, recipients are
    refused at RCPT with ``452 4.3.1`` (try later) while the queue is still delivered
    (Postfix's ``queue_minfree``). None: 1.5 times the message size limit, Postfix's rule."""
    spool_write_backoff: float = 1.0
    """Seconds before writing a message's outcomes again after the spool refused the write
    (a full disk, an I/O error); doubles with each failure in a row, up to ``retry_max``.
    Meanwhile the outcomes are kept in memory, so no recipient is delivered twice."""
    queue_lifetime: float = 5 * 24 * 3600.0
    """A recipient still deferred this long after arrival fails, and the sender is told
    (Postfix ``maximal_queue_lifetime``, 5 days)."""
    delay_warning_after: float | None = None
    """Tell the sender once (``Action: delayed``) when a recipient is still deferred after
    this many seconds; None: no delay warnings (Postfix's default)."""
    drain_grace: float = 25.0
    """On stop: seconds that sessions may take to finish and deliveries may go on."""
    handoff: tuple[str, int] | None = None
    """On stop: hand what is left in the spool to this peer relay (the relay Service)."""
    handoff_timeout: float = 30.0
    backoff_recovery: float = 60.0
    """After a 421 or 4.7.x reply halved a destination's rate: seconds per doubling back."""
    handoff_peers: tuple[IPNetwork, ...] = ()
    """Networks of the peer relays (the pods' network): a hand-off from them keeps the
    message's arrival time and submitting client (engine/origin.py). From anyone else
    that header is removed and ignored. Empty: nobody is trusted, a handed-off message
    starts a new queue lifetime."""
    accept_mail: bool = True
    """False: no listener; deliver what the spool holds and stop once it is empty (a worker
    process on a spool folder no listening worker owns, hosting/workers.py)."""

    def __post_init__(self) -> None:
        require_positive(
            self,
            "dns_port",
            "workers",
            "retry_initial",
            "retry_max",
            "scheduler_tick",
            "spool_threads",
            "queue_lifetime",
            "delay_warning_after",
            "drain_grace",
            "handoff_timeout",
            "spool_min_free",
            "spool_write_backoff",
            "backoff_recovery",
            allow_zero=("drain_grace", "spool_min_free"),
        )

    @property
    def spool_reserve(self) -> int:
        """The free-space reserve in force, in bytes (see ``spool_min_free``)."""
        if self.spool_min_free is not None:
            return self.spool_min_free
        return int(self.listener.max_message_size * 1.5)


@dataclass(frozen=True)
class DeliveryEvent:
    """One delivery's outcome for one route: what logs, metrics and ``make demo`` show."""

    queue_id: str
    connector: str
    destination: str
    tls_mode: TlsMode
    report: DeliveryReport


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
        self.metrics = RelayMetrics()
        self.router = Router(document)
        self.document = document
        self.signer = DkimSigner(document.dkim_keys, self.metrics.dkim)
        self.metrics.config_generation.set(document.generation)
        self.left_out: tuple[str, ...] = ()
        """Objects the document in force was compiled without (``--skip-invalid-objects``)."""
        self.spool = Spool(
            settings.spool_dir, max_message_size=settings.listener.max_message_size * 2
        )
        resolver = Resolver(settings.dns_servers, port=settings.dns_port)
        mta_sts = MtaSts(resolver, cache_file=settings.mta_sts_cache)
        self.tls_reports = TlsReportStore()
        """TLS-RPT (RFC 8460): the day's sessions per policy domain."""
        self.tls_reporter = (
            TlsReporter(
                self.tls_reports,
                resolver,
                self._submit_report,
                ReportSettings(
                    organization=settings.listener.hostname,
                    contact=settings.tls_report_contact,
                    submitter=settings.listener.hostname,
                ),
            )
            if settings.tls_report_contact
            else None
        )
        self.deliverer = Deliverer(
            settings.delivery,
            resolver,
            dane=dane_for(settings.dnssec_resolvers, settings.dnssec_port, mta_sts=mta_sts),
        )
        self.listener = SmtpListener(
            settings.listener,
            self._accept,
            self._check_recipient,
            on_refusal=lambda reason: self.metrics.refused.labels(reason).inc(),
            on_event=lambda event: self.metrics.smtp_defences.labels(event.value).inc(),
        )
        self.metrics.open_relay.set(1 if settings.listener.open_networks else 0)
        if settings.listener.open_networks:
            logger.warning(
                "OPEN RELAY: anyone may relay through this relay (accept from %s, allowed by "
                "allow_open_relay)",
                ", ".join(str(n) for n in settings.listener.open_networks),
            )
        self.on_delivery = on_delivery
        self._clock = clock
        self._index = DueIndex()
        self.gate = DeliveryGate(
            document, self.metrics.registry, clock=clock, recovery=settings.backoff_recovery
        )
        self._holds: dict[str, dict[str, float]] = {}
        """Recipients a throttle or a pause holds: queue id → address → when to look again."""
        self.transport_status = TransportStatus()
        """The last DANE / MTA-STS outcome per connector, for the pod annotation (cluster.py)."""
        self._queue_view = QueueView(
            self.metrics.queue_depth, self.metrics.queue_oldest_age, self.metrics.queue_held
        )
        self._queued: dict[str, datetime] = {}
        """Every message in the spool that is not final, with its arrival time (for gauges)."""
        self._in_flight: set[str] = set()
        self._processing: set[asyncio.Task[None]] = set()
        self._stores: set[asyncio.Future[SpooledMessage]] = set()
        self._answers: ThreadAnswers | None = None
        self._work_available = asyncio.Event()
        # Spool I/O waits on fsync, not on the CPU: enough threads let the file system
        # commit many messages' fsyncs together (its own group commit), where asyncio's
        # default pool (CPUs + 4) would make sessions queue behind each other.
        self._spool_threads = ThreadPoolExecutor(
            max_workers=settings.spool_threads, thread_name_prefix="mailflow-spool"
        )
        self._fresh: dict[str, SpooledMessage] = {}
        self._fresh_bytes = 0
        self._unrecorded: dict[str, dict[str, RecipientState]] = {}
        """Outcomes decided (a recipient delivered, its bounce spooled) that the spool could
        not write yet, by queue id and address: they count as recorded for every later
        attempt, so a full disk never makes the relay deliver one recipient again and again.
        Lost with the process, as any outcome between the next hop's 250 and the write."""
        self._spool_write_failures = 0
        """Spool writes refused in a row (reset by the next write that succeeds)."""
        self._spool_full = False
        self._free_checked_at = -float("inf")
        self._free_measured = 0
        self._spooled_since_measured = 0
        """Bytes stored since the last statvfs: between two looks the estimate goes down."""
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.ready = asyncio.Event()
        """Set once the listener is bound and the spool has been rescanned."""

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def is_ready(self) -> bool:
        """For ``/readyz``: serving, with a routing document, and not draining."""
        return self.ready.is_set() and not self.stopping

    # --- configuration -----------------------------------------------------------------------

    def load_document(self, document: RoutingDocument, *, left_out: Sequence[str] = ()) -> None:
        """Route new deliveries with ``document``; deliveries in progress keep their route.

        The swap is one assignment: a delivery reads ``self.router`` once, so it sees the
        old document or the new one, never a mix. Sessions are not touched. ``left_out``
        names the objects the document was compiled without, for ``/readyz``.
        """
        self.router = Router(document)
        self.signer = DkimSigner(document.dkim_keys, self.metrics.dkim)
        self.document = document
        # Limits or pauses may have changed: what waits looks again at once.
        for queue_id in self.gate.load(document):
            if queue_id in self._queued:
                self._enqueue(queue_id)
        publish(self.settings.spool_dir, document)
        self._queue_view.reroute(self.router)
        self.leave_out(left_out)
        self.metrics.config_generation.set(document.generation)
        self.metrics.config_reloads.labels("loaded").inc()
        logger.info(
            "routing document generation %d loaded (%s, %d connectors)",
            document.generation,
            document.checksum,
            len(document.connectors),
        )

    def load_document_json(self, text: str | bytes) -> bool:
        """Load a serialised document; a broken one is refused and the current one stays."""
        try:
            document = RoutingDocument.from_json(text)
        except RoutingDocumentError as e:
            self.refuse_document(str(e))
            return False
        if (
            document.checksum == self.document.checksum
            and document.generation == self.document.generation
        ):
            return True
        self.load_document(document)
        return True

    def leave_out(self, lines: Sequence[str]) -> None:
        """Say that the document in force was compiled without these objects (the user
        opted in): in ``/readyz`` detail and ``mailflow_config_objects_left_out``."""
        self.left_out = tuple(lines)
        self.metrics.config_left_out.set(len(self.left_out))

    def refuse_document(self, reason: str, *, cause: str = "invalid") -> None:
        """Keep the document in force; ``cause`` (invalid, conflict, unreadable) labels
        ``mailflow_config_refusals_total``."""
        self.metrics.config_reloads.labels("refused").inc()
        self.metrics.config_refusals.labels(cause).inc()
        logger.error(
            "routing document refused (%s): %s; generation %d stays in force",
            cause,
            reason,
            self.document.generation,
        )

    # --- accepting ---------------------------------------------------------------------------

    def _check_recipient(
        self, sender: str, recipient: str, client: str = "", user: str | None = None
    ) -> tuple[int, str] | None:
        try:
            decision = self.router.route_for(recipient, sender, Client(client or None, user))
        except InvalidAddressError as e:
            self.metrics.refused.labels("bad_recipient").inc()
            return 553, f"5.1.3 {e.reason}"
        if decision.rejected:
            if is_peer(client, self.settings.handoff_peers):
                # A peer's hand-off: its origin header (read at DATA) may name the client
                # a client-scoped route is for; the route is decided at delivery, and no
                # route then fails the recipient (a bounce), never a way around a policy.
                return None
            self.metrics.refused.labels("no_route").inc()
            return 550, "5.7.1 No route for this recipient domain"
        if not self._spool_has_room():
            self.metrics.refused.labels("spool_full").inc()
            return 452, "4.3.1 Insufficient system storage, try again later"
        return None

    def _spool_has_room(self) -> bool:
        """Whether the spool's file system has more free space than the reserve.

        One statvfs(2) at most once a second (and at once after a write found the disk
        full): cheap enough for the RCPT path, fresh enough to stop taking mail before the
        disk is full, so that a client hears "452 try later" instead of a local error.
        """
        now = self._clock()
        if now - self._free_checked_at < 1.0:
            free = self._free_measured - self._spooled_since_measured
        else:
            self._free_checked_at = now
            try:
                free = self._free_measured = self.spool.free_bytes()
            except OSError as e:
                logger.warning("spool: cannot tell the free space (%s); assuming it unchanged", e)
                return not self._spool_full
            self._spooled_since_measured = 0
            self.metrics.spool_free_bytes.set(free)
        full = free < self.settings.spool_reserve
        if full != self._spool_full:
            self.metrics.spool_full.set(int(full))
            if full:
                logger.warning(
                    "spool: %d bytes free, below the reserve of %d: new mail is refused with"
                    " 452 4.3.1 until there is room; the queue is still delivered",
                    free,
                    self.settings.spool_reserve,
                )
            else:
                logger.warning("spool: %d bytes free again: accepting new mail", free)
        self._spool_full = full
        return not full

    async def _accept(self, message: AcceptedMessage) -> str:
        # A hand-off from a peer says when the message arrived and who submitted it; from
        # anyone else that header is removed unread (origin.py).
        data, origin = take_origin(
            message.data, message.client_address, self.settings.handoff_peers
        )
        if data is not message.data:
            message = replace(message, data=data)
            self.metrics.handoff_origins.labels("ignored" if origin is None else "trusted").inc()
        if origin is not None:
            logger.info(
                "hand-off from peer %s: arrived %s, client %s",
                message.client_address,
                origin.arrival.isoformat(),
                origin.client or "-",
            )
        if origin is not None and origin.requiretls:
            mail = replace(message.parameters.mail, requiretls=True)
            message = replace(message, parameters=replace(message.parameters, mail=mail))
        client = origin.client if origin is not None else message.client_address
        user = origin.user if origin is not None else message.authenticated_user
        store = self._committed(
            self.spool.submit_store,
            message.mail_from,
            list(dict.fromkeys(message.rcpt_tos)),
            functools.partial(
                self._received_and_signed,
                message,
                self.router,
                self.signer,
                Client(client or None, user),
            ),
            client=client,
            user=user,
            arrived=origin.arrival if origin is not None else None,
            parameters=message.parameters,
        )
        try:
            stored = await asyncio.shield(store)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._free_checked_at = -float("inf")  # the next RCPT looks again
            raise
        except asyncio.CancelledError:
            # The session ended (client gone, timeout) while the record was being written.
            # The thread still finishes: a record that made it to disk must be delivered,
            # even though the client never heard 250 and will likely send it again.
            self._stores.add(store)
            store.add_done_callback(self._stored_unacknowledged)
            raise
        self._queued_message(stored, message.client_address)
        return stored.queue_id

    @staticmethod
    def _received_and_signed(
        message: AcceptedMessage, router: Router, signer: DkimSigner, client: Client, queue_id: str
    ) -> bytes:
        """The stored form: ``Received:``, then DKIM (in the spool thread; see :mod:`.signing`)."""
        opted_out = signer.configured and every_route_opts_out(
            router.route_for(rcpt, message.mail_from, client)
            for rcpt in dict.fromkeys(message.rcpt_tos)
        )
        return signer.sign(message.with_received(queue_id), queue_id=queue_id, opted_out=opted_out)

    async def _io(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._spool_threads, functools.partial(function, *args, **kwargs)
        )

    async def _commit(self, submit: Callable[..., Future[T]], *args: Any, **kwargs: Any) -> T:
        """A spool write through the committer: one hand-off there, one back after the
        batch's fdatasync (no thread of the pool waits for it)."""
        return await self._committed(submit, *args, **kwargs)

    def _committed(
        self, submit: Callable[..., Future[T]], *args: Any, **kwargs: Any
    ) -> asyncio.Future[T]:
        """:meth:`_commit` as a future: the answers of one batch wake the loop once."""
        loop = asyncio.get_running_loop()
        if self._answers is None or self._answers.loop is not loop:
            self._answers = ThreadAnswers(loop)
        return self._answers.wrap(submit(*args, **kwargs))

    def _stored_unacknowledged(self, store: asyncio.Future[SpooledMessage]) -> None:
        self._stores.discard(store)
        if store.cancelled() or store.exception() is not None:
            return
        stored = store.result()
        logger.warning("queue %s: stored, but the client left before hearing 250", stored.queue_id)
        self._queued_message(stored, "(gone)")

    def _queued_message(self, stored: SpooledMessage, client: str) -> None:
        self._spooled_since_measured += stored.size
        if self._fresh_bytes + stored.size <= FRESH_CACHE_BYTES:
            self._fresh[stored.queue_id] = stored
            self._fresh_bytes += stored.size
        self.metrics.accepted.inc()
        logger.debug(  # the delivery line is the one INFO line per message
            "queued %s from=<%s> recipients=%d size=%d client=%s",
            stored.queue_id,
            stored.sender,
            len(stored.recipients),
            stored.size,
            client,
        )
        self._track(stored)
        self._enqueue(stored.queue_id)

    def _track(self, message: SpooledMessage) -> None:
        self._queued[message.queue_id] = message.arrival
        fresh = self._fresh.get(message.queue_id)
        if fresh is not None and fresh is not message:
            # A flush's reread: the spool's states win (a hold set by `mailflow queue`), the
            # body stays the one in memory (a scan reads envelopes only, never bodies).
            self._fresh[message.queue_id] = replace(fresh, recipients=message.recipients)
        self._schedule(message)

    def _enqueue(self, queue_id: str) -> None:
        """Due now: a waiting worker takes it at once (it is already in the index)."""
        self._index.set(queue_id, min(self._index.due.get(queue_id, self._clock()), self._clock()))
        self._work_available.set()

    # --- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop`, then drain (see :meth:`stop`) and return.

        Raises :class:`SpoolInUseError` at once when another relay holds the spool."""
        lock = SpoolLock(self.settings.spool_dir)
        lock.acquire()
        try:
            await self._run()
        finally:
            lock.release()

    async def _run(self) -> None:
        publish(self.settings.spool_dir, self.document)  # the spool is ours now (locked)
        for message in await self._io(self.spool.scan):
            if message.is_final:
                # A crash came between recording the last outcome and removing the record.
                await self._commit(self.spool.submit_remove, message.queue_id)
                continue
            self._track(message)
        logger.info("spool rescanned: %d message(s) waiting", len(self._queued))
        if self.settings.accept_mail:
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
                if self.tls_reporter is not None:
                    tasks.create_task(self.tls_reporter.run(self._stopping), name="mailflow-tlsrpt")
                await self._stopping.wait()
                await self._drain(workers, scheduler)
        finally:
            await self.listener.stop(grace=0)
            await self.deliverer.close()
        if self._stores:
            # Records still being written for sessions that went away: they belong in the
            # spool (and in the hand-off) too.
            await asyncio.gather(*self._stores, return_exceptions=True)
        try:
            if self.settings.handoff is not None:
                await self._hand_off(self.settings.handoff)
        finally:
            self._fresh.clear()
            # Writes still running (a store whose session went away) finish first.
            await asyncio.to_thread(self._spool_threads.shutdown, True)
            await asyncio.to_thread(self.spool.close)
        logger.info("relay stopped; %d message(s) left in the spool", len(self._queued))

    async def _submit_report(self, sender: str, recipients: list[str], data: bytes) -> None:
        """A TLS-RPT report by mail: spooled and delivered like any message (RFC 8460 5.3)."""
        report = await self._io(self.spool.store, sender, recipients, data)
        self._track(report)
        self._enqueue(report.queue_id)

    def stop(self) -> None:
        """Drain: readiness goes false, the listener stops accepting, open sessions finish,
        deliveries go on until the grace period; then what is left stays in the spool or,
        with hand-off, goes to a peer relay."""
        if not self._stopping.is_set():
            logger.info("stopping: draining for up to %.0fs", self.settings.drain_grace)
        self._stopping.set()

    async def _drain(
        self, workers: list[asyncio.Task[None]], scheduler: asyncio.Task[None]
    ) -> None:
        deadline = self._clock() + self.settings.drain_grace
        await self.listener.stop_accepting()
        await self.listener.wait_sessions_closed(max(0.0, deadline - self._clock()))
        # Deliveries that are due go on until the grace period ends (the workers keep
        # taking due messages meanwhile).
        while self._clock() < deadline and (self._in_flight or self._due_now()):  # noqa: ASYNC110
            # A real yield each time: the workers must get the loop to take what is due.
            await asyncio.sleep(min(0.05, max(0.0, deadline - self._clock())))
        scheduler.cancel()
        for worker in workers:
            worker.cancel()
        # The grace period is over: deliveries still in progress are cut short. Their
        # messages stay in the spool (or go to the peer) with the outcome unrecorded, so
        # at worst a message the destination already took goes out once more — never zero.
        unfinished = [task for task in self._processing if not task.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            logger.warning(
                "drain: %d delivery(ies) cut short at the end of the grace period", len(unfinished)
            )
            await asyncio.gather(*unfinished, return_exceptions=True)

    def _due_now(self) -> bool:
        next_due = self._index.next_due()
        return next_due is not None and next_due <= self._clock()

    def _schedule(self, message: SpooledMessage) -> None:
        self._queue_view.track(message, self.router)
        if message.is_final:
            return
        now_wall = datetime.now(UTC)
        holds = self._holds.pop(message.queue_id, {})
        waits = [
            max(0.0, holds[r.address] - self._clock())
            if r.address in holds
            else max(0.0, (r.next_attempt - now_wall).total_seconds())
            if r.next_attempt
            else 0.0
            for r in active(message)
        ]
        if not waits:  # all on hold: due again once `mailflow queue release` flushes
            self._index.drop(message.queue_id)
            return
        self._index.set(message.queue_id, self._clock() + min(waits, default=0.0))
        self._work_available.set()

    async def _scheduler(self) -> None:
        flush = self.settings.spool_dir / FLUSH_REQUEST
        while True:
            if flush.exists():
                # `mailflow queue retry` made deferred recipients due: reread the spool.
                with contextlib.suppress(FileNotFoundError):
                    flush.unlink()
                try:
                    # Read only: `mailflow queue` may be writing its own temp files now.
                    rescanned = await self._io(self.spool.scan, repair=False)
                except OSError:
                    logger.exception("flush: cannot read the spool; the schedule stays as it was")
                    rescanned = []
                for message in rescanned:
                    if not message.is_final and message.queue_id not in self._in_flight:
                        self._track(message)
                logger.info("flush requested: %d message(s) rescheduled", len(self._index.due))
            self._update_gauges()
            if not self.settings.accept_mail and not self._queued and not self.stopping:
                logger.info("spool %s delivered: nothing left, stopping", self.settings.spool_dir)
                self.stop()
            await asyncio.sleep(self.settings.scheduler_tick)

    def _update_gauges(self) -> None:
        self.metrics.queue_messages.set(len(self._queued))
        oldest = min(self._queued.values(), default=None)
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        self.metrics.queue_oldest_seconds.set(max(0.0, age))
        self._queue_view.publish(self._queued, datetime.now(UTC))
        self.metrics.sessions.set(self.listener.active_sessions)
        self.gate.update_gauges()

    async def _next_due(self) -> str:
        """Wait for the earliest due message that no other worker is on."""
        while True:
            self._work_available.clear()
            queue_id = self._index.pop_due(self._clock())
            if queue_id is not None:
                if queue_id in self._in_flight:
                    continue  # being delivered: it reschedules itself when done
                return queue_id
            next_due = self._index.next_due()
            wait = 1.0 if next_due is None else min(1.0, max(0.0, next_due - self._clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._work_available.wait()

    async def _worker(self) -> None:
        while True:
            queue_id = await self._next_due()
            self._in_flight.add(queue_id)
            self._idle.clear()
            # The processing task is tracked on its own: when a stopping relay cancels its
            # workers, a delivery in progress goes on (shielded) and the drain waits for it
            # before anything is handed to a peer.
            task = asyncio.create_task(
                self._process_guarded(queue_id), name=f"mailflow-process-{queue_id}"
            )
            self._processing.add(task)
            task.add_done_callback(self._processing.discard)
            await asyncio.shield(task)

    async def _process_guarded(self, queue_id: str) -> None:
        try:
            await self._process(queue_id)
        except MessageNotFoundError:
            # Deleted by an administrator (`mailflow queue delete`) meanwhile.
            logger.info("queue %s: no longer in the spool", queue_id)
            self._queued.pop(queue_id, None)
            self._unrecorded.pop(queue_id, None)
            self._index.drop(queue_id)
        except SpoolCorruptError as e:
            # Its body failed the checksum: the spool copied it to corrupt/ and took it out.
            logger.error("queue %s: unreadable, left in corrupt/ for a person: %s", queue_id, e)
            self.metrics.spool_corrupt.inc()
            self._queued.pop(queue_id, None)
            self._unrecorded.pop(queue_id, None)
            self._index.drop(queue_id)
        except Exception as e:
            logger.exception("queue %s: processing failed", queue_id)
            await self._defer_after_error(queue_id, e)
        finally:
            self._in_flight.discard(queue_id)
            if queue_id not in self._queued:
                self.gate.forget(queue_id)
                self._holds.pop(queue_id, None)
            if not self._in_flight:
                self._idle.set()

    async def _defer_after_error(self, queue_id: str, error: Exception) -> None:
        """Record the failure as a deferral, so backoff, the lifetime and the bounce apply."""
        try:
            # What the spool could not write yet still holds: a delivered one stays delivered.
            message = self._with_unrecorded(await self._io(self.spool.load, queue_id))
            reason = f"4.3.0 internal error: {type(error).__name__}"
            updates = [self._deferred(state, 451, reason) for state in active(message)]
            updates = self._expire(message, updates, datetime.now(UTC))
            updates = await self._notify_sender(message, updates, datetime.now(UTC))
            states = await self._commit(self.spool.submit_update, queue_id, *updates)
            if all(s.status.is_final for s in states):
                await self._commit(self.spool.submit_remove, queue_id)
                self._queued.pop(queue_id, None)
            else:
                self._schedule(with_states(message, states))
        except Exception:
            logger.exception("queue %s: cannot record the failure; retrying later", queue_id)
            self._index.set(queue_id, self._clock() + self.settings.retry_initial)

    # --- delivering --------------------------------------------------------------------------

    async def _process(self, queue_id: str) -> None:
        message = self._with_unrecorded(await self._current(queue_id))
        now = datetime.now(UTC)
        updates = await self._attempt(message, now)
        updates = self._expire(message, updates, now)
        await self._record(message, updates, now)

    async def _current(self, queue_id: str) -> SpooledMessage:
        fresh = self._fresh.pop(queue_id, None)
        # One stat(2), cheaper here than a trip through the spool threads.
        if fresh is not None and not self.spool.contains(queue_id):
            # Deleted by an administrator before its first delivery.
            self._fresh_bytes -= fresh.size
            raise MessageNotFoundError(queue_id)
        if fresh is not None:
            # Just stored and never attempted: the spool holds exactly this; no re-read.
            self._fresh_bytes -= fresh.size
            return fresh
        return await self._io(self.spool.load, queue_id)

    def _with_unrecorded(self, message: SpooledMessage) -> SpooledMessage:
        """The message as the relay knows it: the spool's states, then what it could not write."""
        unrecorded = self._unrecorded.get(message.queue_id)
        if not unrecorded:
            return message
        return with_states(message, [unrecorded.get(s.address, s) for s in message.recipients])

    async def _attempt(self, message: SpooledMessage, now: datetime) -> list[RecipientState]:
        """Route and deliver the recipients that are due; their new states."""
        queue_id = message.queue_id
        router = self.router
        groups: dict[tuple[object, ...], list[tuple[RecipientState, RouteDecision]]] = {}
        updates: list[RecipientState] = []
        for state in due(message, now):
            if state.bounce_requested:
                updates.append(admin_bounced(state))
                continue
            try:
                decision = router.route_for(state.address, message.sender, _client_of(message))
            except InvalidAddressError as e:
                updates.append(final(state, RecipientStatus.FAILED, 553, f"5.1.3 {e.reason}"))
                continue
            if decision.destination is None:
                updates.append(
                    final(state, RecipientStatus.FAILED, 550, "5.7.1 no route for this recipient")
                )
                continue
            groups.setdefault(_group_key(decision), []).append((state, decision))

        # One route failing in a way nobody foresaw must not cost the other routes their
        # recorded outcome (they would be delivered again): each group stands alone.
        outcomes: list[list[RecipientState] | BaseException]
        if len(groups) == 1:
            # Most messages have one route: awaited here, without a task of its own.
            (members,) = groups.values()
            try:
                outcomes = [await self._deliver_gated(message, members)]
            except Exception as e:
                outcomes = [e]
        else:
            outcomes = await asyncio.gather(
                *(self._deliver_gated(message, members) for members in groups.values()),
                return_exceptions=True,
            )
        for members, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                logger.error(
                    "queue %s: delivery failed unexpectedly: %r",
                    queue_id,
                    outcome,
                    exc_info=outcome,
                )
                reason = f"4.3.0 internal error: {type(outcome).__name__}"
                updates.extend(self._deferred(state, 451, reason) for state, _ in members)
            else:
                updates.extend(outcome)
        return updates

    async def _record(
        self, message: SpooledMessage, updates: list[RecipientState], now: datetime
    ) -> None:
        """Tell senders about failures, then write every outcome; on a refused write, keep
        the outcomes in memory and try the write again after a backoff."""
        unrecorded = dict(self._unrecorded.get(message.queue_id, {}))
        try:
            updates = await self._notify_sender(message, updates, now)
        except OSError as e:
            # The bounce is not spooled, so the failure may not be recorded (the sender
            # would never hear of it): those recipients wait as deferred and are tried
            # again; what was delivered stays delivered.
            reason = "4.3.0 the bounce could not be spooled"
            kept = [
                self._deferred(message.recipient(s.address), 451, f"{reason}: {s.last_reply_text}")
                if s.status is RecipientStatus.FAILED
                else s
                for s in updates
            ]
            self._spool_write_failed(message, unrecorded | _by_address(kept), "bounce", e)
            return
        outcomes = unrecorded | _by_address(updates)
        try:
            await self._write_outcomes(message, list(outcomes.values()))
        except OSError as e:
            self._spool_write_failed(message, outcomes, "state", e)
            return
        if self._unrecorded.pop(message.queue_id, None) is not None:
            logger.info("queue %s: outcomes kept in memory are now in the spool", message.queue_id)
            self._update_unrecorded_gauge()
        if self._spool_write_failures:
            logger.info(
                "spool: writable again after %d refused write(s)", self._spool_write_failures
            )
            self._spool_write_failures = 0
            self.metrics.spool_write_backoff.set(0)

    async def _write_outcomes(self, message: SpooledMessage, updates: list[RecipientState]) -> None:
        queue_id = message.queue_id
        merged = {s.address: s for s in message.recipients} | _by_address(updates)
        if updates and all(s.status.is_final for s in merged.values()):
            # Every recipient is done: the record goes at once, without first writing (and
            # fsyncing) a state file that would be deleted right after. A crash in between
            # delivers again, as one between the next hop's 250 and any write would.
            await self._commit(self.spool.submit_remove, queue_id, force=True)
            self._queued.pop(queue_id, None)
            logger.debug("queue %s: done, removed from the spool", queue_id)
            return
        if updates:
            states = await self._commit(self.spool.submit_update, queue_id, *updates)
        else:
            states = message.recipients
        if all(s.status.is_final for s in states):
            await self._commit(self.spool.submit_remove, queue_id)
            self._queued.pop(queue_id, None)
            logger.debug("queue %s: done, removed from the spool", queue_id)
        else:
            self._schedule(with_states(message, states))

    def _spool_write_failed(
        self,
        message: SpooledMessage,
        outcomes: dict[str, RecipientState],
        what: str,
        error: OSError,
    ) -> None:
        """Back off: the spool refused a write. The outcomes wait in memory, the message is
        tried again later (only its recipients that are due, never the delivered ones)."""
        queue_id = message.queue_id
        if outcomes:
            self._unrecorded[queue_id] = outcomes
        self._update_unrecorded_gauge()
        self._spool_write_failures += 1
        wait = min(
            self.settings.retry_max,
            self.settings.spool_write_backoff * 2 ** min(self._spool_write_failures - 1, 30),
        )
        self.metrics.spool_write_failures.labels(what).inc()
        self.metrics.spool_write_backoff.set(wait)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            self._free_checked_at = -float("inf")  # the next RCPT looks again
        logger.warning(
            "queue %s: the spool refused the %s write (%s); %d outcome(s) kept in memory;"
            " writing again in %.1fs",
            queue_id,
            what,
            error,
            len(outcomes),
            wait,
        )
        self._index.set(queue_id, self._clock() + wait)

    def _update_unrecorded_gauge(self) -> None:
        self.metrics.spool_unrecorded.set(sum(len(o) for o in self._unrecorded.values()))

    def _expire(
        self, message: SpooledMessage, updates: list[RecipientState], now: datetime
    ) -> list[RecipientState]:
        """Deferred recipients past the queue lifetime fail (RFC 3463 4.4.7)."""
        if (now - message.arrival).total_seconds() < self.settings.queue_lifetime:
            return updates
        expired = []
        for state in updates:
            if state.status is RecipientStatus.DEFERRED:
                reason = (
                    f"4.4.7 queue lifetime exceeded; last error: {state.last_reply_text or 'none'}"
                )
                logger.warning(
                    "queue %s: to=<%s> expired: %s", message.queue_id, state.address, reason
                )
                state = replace(
                    state, status=RecipientStatus.FAILED, next_attempt=None, last_reply_text=reason
                )
            expired.append(state)
        return expired

    async def _notify_sender(
        self, message: SpooledMessage, updates: list[RecipientState], now: datetime
    ) -> list[RecipientState]:
        """Queue a DSN for recipients that failed now (and delay warnings, when enabled).

        The bounce is spooled before the failure is recorded: a crash in between can give
        a second bounce, never none.
        """
        due = notices(message, updates, now, self.settings.delay_warning_after)
        for notice in due:
            if notice.suppressed:
                self.metrics.notifications_suppressed.labels(notice.action).inc(notice.suppressed)
                logger.info(
                    "queue %s: no %s notification for %d recipient(s): NOTIFY did not ask for it",
                    message.queue_id,
                    notice.action,
                    notice.suppressed,
                )
        due = [n for n in due if n.states]
        if not message.sender:
            failed = sum(len(n.states) for n in due if n.action == "failed")
            if failed:
                logger.warning(
                    "queue %s: %d recipient(s) failed; no bounce for the null sender",
                    message.queue_id,
                    failed,
                )
            return updates
        for notice in due:
            await self._queue_notice(message, notice, now)
        marked = {s.address for n in due if n.action == "delayed" for s in n.states}
        if marked:
            updates = [
                replace(s, delay_notified=True) if s.address in marked else s for s in updates
            ]
        return updates

    async def _deliver_gated(
        self,
        message: SpooledMessage,
        members: Sequence[tuple[RecipientState, RouteDecision]],
    ) -> list[RecipientState]:
        """Deliver one route's recipients within its throttles and pause (engine/throttles.py):
        what is held keeps its state (not an attempt) and waits."""
        updates: list[RecipientState] = []
        for chunk in self.gate.chunks(members):
            admission = self.gate.admit(message.queue_id, message.arrival, chunk[0][1])
            if admission.ticket is None:
                updates.extend(self._held(message, chunk, admission))
                continue
            outcome: list[RecipientState] = []
            try:
                outcome = await self._deliver_group(
                    message, [(state, admission.decision) for state, _ in chunk]
                )
            finally:
                for waiter in self.gate.release(admission.ticket, outcome):
                    if waiter != message.queue_id and waiter in self._queued:
                        self._enqueue(waiter)
            updates.extend(outcome)
        return updates

    def _held(
        self,
        message: SpooledMessage,
        chunk: Sequence[tuple[RecipientState, RouteDecision]],
        admission: Admission,
    ) -> list[RecipientState]:
        """Held recipients wait, unchanged, until the queue lifetime; then they fail (and the
        sender gets a bounce), as deferred ones do."""
        name = str(chunk[0][1].connector.ref) if chunk[0][1].connector else "(default route)"
        left = self.settings.queue_lifetime - (datetime.now(UTC) - message.arrival).total_seconds()
        if left <= 0:
            reason = (
                f"4.4.7 queue lifetime exceeded; held by the {admission.reason} limit of {name}"
            )
            logger.warning(
                "queue %s: %d recipient(s) expired: %s", message.queue_id, len(chunk), reason
            )
            return [final(state, RecipientStatus.FAILED, 451, reason) for state, _ in chunk]
        until = min(admission.until, self._clock() + left)
        holds = self._holds.setdefault(message.queue_id, {})
        for state, _ in chunk:
            holds[state.address] = until
        logger.log(
            logging.INFO if admission.first else logging.DEBUG,
            "queue %s: %d recipient(s) held connector=%s limit=%s: looking again in %.1fs",
            message.queue_id,
            len(chunk),
            name,
            admission.reason,
            until - self._clock(),
        )
        return []

    async def _queue_notice(self, message: SpooledMessage, notice: Notice, now: datetime) -> None:
        action = notice.action
        dsn = build_dsn(
            reporting_mta=self.settings.listener.hostname,
            original=message,
            recipients=bounce_recipients(message, notice, now),
            will_retry_until=message.arrival + timedelta(seconds=self.settings.queue_lifetime)
            if action == "delayed"
            else None,
            now=now,
            return_full=returns_full(message, notice, self.spool.max_message_size),
        )
        # A sender with a UTF-8 address (or UTF-8 headers returned) needs SMTPUTF8 onward.
        utf8 = not (message.sender.isascii() and dsn.isascii())
        bounce = await self._commit(
            self.spool.submit_store,
            "",
            [message.sender],
            _constant_body(dsn),
            parameters=EnvelopeParameters(MailParameters(smtputf8=True)) if utf8 else None,
        )
        self.metrics.bounces.labels(action).inc()
        logger.info(
            "queue %s: %s notification to <%s> queued as %s",
            message.queue_id,
            action,
            message.sender,
            bounce.queue_id,
        )
        self._track(bounce)
        self._enqueue(bounce.queue_id)

    async def _deliver_group(
        self,
        message: SpooledMessage,
        members: Sequence[tuple[RecipientState, RouteDecision]],
    ) -> list[RecipientState]:
        """Deliver one route's recipients; their new states (never raises for mail reasons)."""
        updates: list[RecipientState] = []
        decision = members[0][1]
        connector = decision.connector
        name = str(connector.ref) if connector else "(default route)"
        assert decision.destination is not None
        destination = decision.destination.describe()
        # The destination's stable name, not its description: a pool's members change.
        labels = (name, destination_label(decision.destination), decision.tls.mode.value)
        if connector is not None and connector.unresolved:
            reason = "4.3.5 connector not ready: " + "; ".join(connector.unresolved)
            logger.warning("queue %s: %s", message.queue_id, reason)
            self.metrics.deferred.labels(*labels).inc(len(members))
            return [self._deferred(state, 451, reason) for state, _ in members]
        started = self._clock()
        report = await self.deliverer.deliver(
            mail_from=message.sender,
            recipients=[state.address for state, _ in members],
            data=message.body,
            destination=decision.destination,
            tls=decision.tls,
            auth=connector.auth if connector else None,
            recipient_domain=decision.domain,
            parameters=message.parameters,
        )
        for extension_decision in report.extension_decisions:
            self.metrics.extension_decisions.labels(extension_decision).inc()
        self.metrics.delivery_seconds.labels(name).observe(self._clock() - started)
        if report.protocol_errors:
            self.metrics.protocol_errors.labels(*labels[:2]).inc(report.protocol_errors)
        if report.dane is not None:
            self.metrics.dane_results.labels(name, report.dane).inc()
        self.transport_status.record(name, report.dane, report.policy_results)
        for policy_outcome in report.policy_results:
            self.tls_reports.record(policy_outcome)
            self.metrics.tls_policy_results.labels(
                name, policy_outcome.policy_type, policy_outcome.result_type or "success"
            ).inc()
        if report.tls_failure is not None:
            self.metrics.tls_failures.labels(
                name, decision.tls.mode.value, report.tls_failure.value
            ).inc()
        event = DeliveryEvent(
            queue_id=message.queue_id,
            connector=name,
            destination=destination,
            tls_mode=decision.tls.mode,
            report=report,
        )
        log_attempts(message.queue_id, name, report)
        for (state, _), result in zip(members, report.results, strict=True):
            logger.info(
                "queue %s: to=<%s> connector=%s server=%s tls=%s verified=%s status=%s reply=%r",
                message.queue_id,
                state.address,
                name,
                report.server or "-",
                tls_shown(report),
                report.verified,
                result.status.value,
                result.message,
                extra=delivery_fields(state.address, name, report, result),
            )
            # Remote-MTA (RFC 3464) and whether that hop took NOTIFY over (RFC 3461 §6.2.1).
            state = replace(state, remote_mta=remote_mta_name(report.server), remote_dsn=report.dsn)
            if result.status is DeliveryStatus.DELIVERED:
                self.metrics.delivered.labels(*labels).inc()
                updates.append(final(state, RecipientStatus.DELIVERED, result.code, result.message))
            elif result.status is DeliveryStatus.FAILED:
                self.metrics.failed.labels(*labels).inc()
                updates.append(final(state, RecipientStatus.FAILED, result.code, result.message))
            else:
                self.metrics.deferred.labels(*labels).inc()
                updates.append(self._deferred(state, result.code, result.message))
        if self.on_delivery is not None:
            self.on_delivery(event)
        return updates

    def _deferred(self, state: RecipientState, code: int, reason: str) -> RecipientState:
        self.metrics.deferrals.labels(reason_class(reason)).inc()
        return deferred(state, code, reason, self.settings.retry_initial, self.settings.retry_max)

    # --- hand-off ----------------------------------------------------------------------------

    async def _hand_off(self, peer: tuple[str, int]) -> None:
        scanned = [self._with_unrecorded(m) for m in await self._io(self.spool.scan)]
        for message in [m for m in scanned if m.is_final]:
            # Done in memory (the spool could not write it): nothing to hand over.
            with contextlib.suppress(MessageNotFoundError, OSError):
                await self._commit(self.spool.submit_remove, message.queue_id, force=True)
                self._queued.pop(message.queue_id, None)
        # Held mail stays here: the peer would not know of the hold, and would deliver it.
        remaining = [m for m in scanned if not m.is_final and not holds_any(m)]
        handoff = HandOff(
            peer=peer,
            local_hostname=self.settings.listener.hostname,
            timeout=self.settings.handoff_timeout,
            metrics=self.metrics,
            update=functools.partial(self._commit, self.spool.submit_update),
            remove=functools.partial(self._commit, self.spool.submit_remove, force=True),
            load=functools.partial(self._io, self.spool.load),
        )
        for queue_id in await handoff.run(remaining):
            self._queued.pop(queue_id, None)


def _client_of(message: SpooledMessage) -> Client | None:
    """Who submitted ``message``, for client-scoped connectors; None for a bounce this
    relay wrote (it matches only connectors not scoped to clients)."""
    if not message.client and message.user is None:
        return None
    return Client(message.client or None, message.user)


def _group_key(decision: RouteDecision) -> tuple[object, ...]:
    connector = decision.connector
    key: tuple[object, ...] = (
        None if connector is None else connector.ref,
        decision.destination,
        decision.tls,
    )
    # The recipient's MX and DomainMatch both depend on the recipient domain.
    if (
        isinstance(decision.destination, RecipientMx)
        or decision.tls.mode is TlsMode.DOMAIN_MATCH
        or DeliveryGate.domain_limited(decision)  # a throttle of its own
    ):
        key += (decision.domain,)
    return key


def _by_address(states: Sequence[RecipientState]) -> dict[str, RecipientState]:
    return {s.address: s for s in states}


def _constant_body(body: bytes) -> Callable[[str], bytes]:
    return lambda _queue_id: body
