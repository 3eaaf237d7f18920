"""Delivery: one message, one route, to the next hop, with exactly the route's TLS mode.

The caller (the queue runner) hands over a message, the recipients that share one
route, and that route's destination, TLS policy and credentials. This module:

1. turns the destination into an ordered list of targets (name, address, port): a
   smart host's A/AAAA records, the MX of a smart host (``mx: true``), the servers of a
   profile (RoundRobin rotates the starting server per message, Failover keeps the
   listed order; servers that keep failing go to the back for a while — passive
   health), or the recipient domain's MX (:mod:`.dns`, RFC 5321 §5.1);
2. tries the targets in order. A target that cannot be reached, answers 4xx to the
   whole transaction, or fails the TLS policy is left for the next one; recipients
   that got a 4xx from one server are offered to the next. 2xx delivers, 5xx fails;
3. enforces TLS: Opportunistic uses STARTTLS when offered and falls back to plaintext
   (a new connection) when the handshake fails; every other mode requires STARTTLS and
   never falls back — no STARTTLS, a failed handshake or a refused certificate makes the
   target fail with a :class:`~.tls_policy.TlsPolicyError` that says why;
4. authenticates (SMTP AUTH) only over TLS.

Every network await has a timeout (RFC 5321 §4.5.3.2 gives the defaults), and the
number of concurrent connections per target is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import aiosmtplib

from mailflow_relay.envelope import EnvelopeParameters
from mailflow_relay.errors import SettingsError, require_positive
from mailflow_relay.outbound import implicit_tls
from mailflow_relay.outbound.dane import (
    Dane,
    DaneOutcome,
    DaneRequirement,
    dane_context,
    dane_outcome,
    peer_chain,
    policy_result,
    verify_chain,
)
from mailflow_relay.outbound.dns import DnsError, Resolver
from mailflow_relay.outbound.extensions import (
    ExtensionRefusal,
    plan_transaction,
)
from mailflow_relay.outbound.health import HealthTracker
from mailflow_relay.outbound.pipelining import (
    Envelope,
    Steps,
    Timeouts,
    steps_for,
)
from mailflow_relay.outbound.results import (
    Attempt,
    DeliveryReport,
    DeliveryStatus,
    RecipientResult,
)
from mailflow_relay.outbound.tls_policy import (
    CertificateInfo,
    TlsFailure,
    TlsPolicyError,
    check_certificate,
    classify_handshake_error,
    client_context,
    server_name_for,
)
from mailflow_relay.outbound.tlsrpt import PolicyResult
from mailflow_relay.routing.document import (
    Balancing,
    Destination,
    ObjectRef,
    ProfilePool,
    RecipientMx,
    SmartHost,
    SmtpCredentials,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.transports import write_transport

__all__ = [
    "Attempt",
    "Deliverer",
    "DeliveryReport",
    "DeliverySettings",
    "DeliveryStatus",
    "RecipientResult",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliverySettings:
    # Looked up when settings are made (a lambda, not the function: tests may patch it).
    helo_name: str = field(default_factory=lambda: socket.getfqdn())
    """The name this relay gives in EHLO: the host's FQDN, as the listener's hostname
    (a bare ``localhost`` is refused by many next hops)."""
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    """RFC 5321 §4.5.3.2: 5 minutes for MAIL and RCPT; DATA's end waits up to 10."""
    data_timeout: float = 600.0
    mx_port: int = 25
    """The port of MX hosts; only tests and special setups change it."""
    max_targets: int = 10
    """At most this many servers are tried for one delivery."""
    max_connections_per_target: int = 20
    failures_before_down: int = 3
    """Consecutive failures after which a server goes to the back of the line."""
    down_for: float = 60.0
    """Seconds a failing server stays at the back before it is tried first again."""
    idle_connections_per_target: int = 16
    """Connections kept open after a delivery, for the next message to the same target and
    route (0: close after each delivery). Reuse spares a TCP and TLS handshake per message.
    The default matches the relay's default worker count, so that every worker busy on one
    destination finds a connection to reuse."""
    idle_connection_seconds: float = 5.0
    """How long an unused connection is kept."""
    max_messages_per_connection: int = 100
    pipelining: bool = True
    """RFC 2920: send MAIL, RCPT and DATA in one write to next hops that offer PIPELINING
    (off: one command per round trip everywhere, as aiosmtplib alone does)."""

    def __post_init__(self) -> None:
        require_positive(
            self,
            "connect_timeout",
            "command_timeout",
            "data_timeout",
            "mx_port",
            "max_targets",
            "max_connections_per_target",
            "failures_before_down",
            "down_for",
            "idle_connections_per_target",
            "idle_connection_seconds",
            "max_messages_per_connection",
            allow_zero=("idle_connections_per_target",),
        )
        if not 0 < self.mx_port <= 65535:
            raise SettingsError("mx_port", f"{self.mx_port} is not a TCP port")


@dataclass(frozen=True)
class _Target:
    name: str
    """The host name (for SNI and name checks), or the address itself."""
    address: str
    port: int
    dane: DaneRequirement | None = None
    """What DANE requires of this hop (decided before connecting; part of the reuse key)."""
    implicit_tls: bool = False
    """TLS from the first byte (a smart host's ``implicitTls``), never STARTTLS."""

    def __str__(self) -> str:
        shown = self.name if self.name == self.address else f"{self.name}[{self.address}]"
        return f"{shown}:{self.port}"


class _TargetFailed(Exception):
    """This target did not take the transaction; try the next one."""

    def __init__(self, reason: str, code: int = 451, tls_failure: TlsFailure | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.tls_failure = tls_failure


class _ProtocolError(_TargetFailed):
    """The next hop answered out of protocol: no valid reply code, a line over the limit,
    or a code that makes no sense where it came (``250`` to ``DATA``). Nothing it said can
    be trusted, so it is never a delivery: the recipients are deferred and the connection
    is closed, never reused."""

    def __init__(self, stage: str, error: aiosmtplib.SMTPResponseException) -> None:
        text = f"{error.code} {error.message}" if _valid_code(error.code) else error.message
        super().__init__(f"4.5.0 protocol error: the reply to {stage} was {text[:120]!r}")
        self.stage = stage


class _PlaintextFallback(Exception):
    """Opportunistic TLS: the handshake failed; reconnect and send in plaintext."""


@dataclass(frozen=True)
class _ReuseKey:
    target: _Target
    tls: TlsPolicy
    auth: SmtpCredentials | None
    domain: str


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    session: _Session
    idle_since: float
    uses: int = 1


@dataclass
class _Session:
    tls_version: str | None = None
    certificate: CertificateInfo | None = None
    verified: bool = False
    dsn: bool = False
    """The last transaction passed NOTIFY on (the next hop offers DSN)."""
    decisions: list[str] = field(default_factory=list)
    """What the last transaction changed or refused to fit the next hop (extensions.py)."""


class Deliverer:
    def __init__(
        self,
        settings: DeliverySettings,
        resolver: Resolver,
        *,
        clock: Callable[[], float] = time.monotonic,
        dane: Dane | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.dane = dane or Dane(None)
        self.health = HealthTracker(settings.failures_before_down, settings.down_for, clock)
        self._round_robin: dict[ObjectRef, itertools.count[int]] = {}
        self._limits: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._idle: dict[_ReuseKey, list[_Connection]] = {}
        self._in_use: dict[tuple[str, int], int] = {}
        self._transactions = 0

    # --- targets ---------------------------------------------------------------------------

    async def _targets(self, destination: Destination, recipient_domain: str) -> list[_Target]:
        """Targets in the order to try; raises DnsError when the domain has none."""
        if isinstance(destination, ProfilePool):
            servers = list(destination.servers)
            if destination.balancing is Balancing.ROUND_ROBIN and servers:
                counter = self._round_robin.setdefault(destination.profile, itertools.count())
                start = next(counter) % len(servers)
                servers = servers[start:] + servers[:start]
            # Healthy servers first; the ones that keep failing are still tried, last.
            servers.sort(key=lambda s: self.health.is_down(s.host, s.port))
            names = [(s.host, s.port) for s in servers]
        elif isinstance(destination, SmartHost):
            if destination.mx:
                mx = await self.resolver.mx_hosts(destination.host)
                names = [(m.host, destination.port) for m in mx]
            else:
                names = [(destination.host, destination.port)]
        else:
            assert isinstance(destination, RecipientMx)
            mx = await self.resolver.mx_hosts(recipient_domain)
            names = [(m.host, self.settings.mx_port) for m in mx]
        targets: list[_Target] = []
        errors: list[str] = []
        for name, port in names:
            try:
                addresses = await self.resolver.addresses(name)
            except DnsError as e:
                # The next hop has no address: our side (or theirs) is misconfigured, which
                # is worth retrying, never a reason to bounce the recipient.
                errors.append(str(e))
                continue
            targets.extend(_Target(name, address, port) for address in addresses)
        if not targets and errors:
            raise DnsError(
                ", ".join(n for n, _ in names), "; ".join(errors), permanent=False, status="4.4.3"
            )
        implicit = _implicit_tls_hosts(destination)
        if implicit:
            targets = [
                replace(t, implicit_tls=True)
                if (t.name, t.port) in implicit or "*" in implicit
                else t
                for t in targets
            ]
        return targets[: self.settings.max_targets]

    async def _with_dane(
        self, targets: list[_Target], destination: Destination, tls: TlsPolicy, domain: str
    ) -> list[_Target]:
        found = await self.dane.requirements(
            destination, tls, domain, ((t.name, t.port) for t in targets)
        )
        return [dataclasses.replace(t, dane=found[(t.name, t.port)]) for t in targets]

    # --- delivery ----------------------------------------------------------------------------

    async def deliver(
        self,
        *,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        destination: Destination,
        tls: TlsPolicy,
        auth: SmtpCredentials | None,
        recipient_domain: str,
        parameters: EnvelopeParameters | None = None,
    ) -> DeliveryReport:
        """Deliver one message to the recipients of one route; never raises for mail reasons.

        ``parameters`` are the sender's ESMTP parameters (SMTPUTF8, BODY, DSN, REQUIRETLS):
        what each next hop gets of them is decided after its EHLO (:mod:`.extensions`)."""
        envelope = _Request(mail_from, parameters or EnvelopeParameters())
        try:
            targets = await self._targets(destination, recipient_domain)
            targets = await self._with_dane(targets, destination, tls, recipient_domain)
        except DnsError as e:
            status = DeliveryStatus.FAILED if e.permanent else DeliveryStatus.DEFERRED
            code = 550 if e.permanent else 451
            if e.status == "5.1.10":
                code = 556
            message = f"{e.status} {e}"
            return DeliveryReport(
                tuple(RecipientResult(r, status, code, message) for r in recipients)
            )
        if not targets:
            message = "4.4.4 no server to deliver to (the profile has no servers)"
            return DeliveryReport(
                tuple(RecipientResult(r, DeliveryStatus.DEFERRED, 451, message) for r in recipients)
            )

        if all(self.health.is_down(t.address, t.port) for t in targets):
            # Every server failed again and again: defer at once instead of tying up a
            # worker per message on a dead destination (no head-of-line blocking). The
            # first delivery after the back-off probes it again.
            message = "4.4.1 every server of this destination failed recently; retrying later"
            logger.info("%s: %s", destination.describe(), message)
            return DeliveryReport(
                tuple(
                    RecipientResult(r, DeliveryStatus.DEFERRED, 451, message) for r in recipients
                ),
                attempts=(Attempt(", ".join(str(t) for t in targets), "skipped: marked down"),),
            )
        pending = list(recipients)
        final: dict[str, RecipientResult] = {}
        last_failure: dict[str, RecipientResult] = {}
        attempts: list[Attempt] = []
        session = _Session()
        server: str | None = None
        tls_failure: TlsFailure | None = None
        dane: DaneOutcome | None = None
        reported: list[PolicyResult] = []
        protocol_errors = 0
        for target in targets:
            if not pending:
                break
            server = str(target)
            try:
                results, session = await self._transaction(
                    target, envelope, pending, data, tls, auth, recipient_domain
                )
            except _TargetFailed as e:
                self.health.failed(target.address, target.port)
                attempts.append(Attempt(str(target), e.reason))
                tls_failure = e.tls_failure or tls_failure
                dane = dane_outcome(target.dane, e.tls_failure)
                if e.tls_failure is not None:
                    reported.append(
                        policy_result(
                            target.dane,
                            recipient_domain,
                            target.name,
                            target.address,
                            e.tls_failure,
                        )
                    )
                protocol_errors += isinstance(e, _ProtocolError)
                logger.warning("delivery to %s failed: %s", target, e.reason)
                for recipient in pending:
                    last_failure[recipient] = RecipientResult(
                        recipient, DeliveryStatus.DEFERRED, e.code, e.reason
                    )
                continue
            self.health.succeeded(target.address, target.port)
            dane = dane_outcome(target.dane, None)
            if session.tls_version:
                reported.append(
                    policy_result(target.dane, recipient_domain, target.name, target.address, None)
                )
            attempts.append(Attempt(str(target), _summary(results)))
            still_pending = []
            for result in results:
                if result.status is DeliveryStatus.DEFERRED:
                    last_failure[result.recipient] = result
                    still_pending.append(result.recipient)
                else:
                    final[result.recipient] = result
            pending = still_pending
            if not pending:
                break
        for recipient in pending:
            final[recipient] = last_failure.get(
                recipient,
                RecipientResult(
                    recipient, DeliveryStatus.DEFERRED, 451, "4.4.1 no server answered"
                ),
            )
        return DeliveryReport(
            results=tuple(final[r] for r in recipients),
            server=server,
            tls_version=session.tls_version,
            certificate=session.certificate,
            verified=session.verified,
            tls_failure=None if session.tls_version else tls_failure,
            attempts=tuple(attempts),
            dane=dane.value if dane else None,
            policy_results=tuple(reported),
            protocol_errors=protocol_errors,
            dsn=session.dsn,
            extension_decisions=tuple(session.decisions),
        )

    async def _transaction(
        self,
        target: _Target,
        envelope: _Request,
        recipients: Sequence[str],
        data: bytes,
        tls: TlsPolicy,
        auth: SmtpCredentials | None,
        recipient_domain: str,
    ) -> tuple[list[RecipientResult], _Session]:
        limit = self._limits.setdefault(
            (target.address, target.port),
            asyncio.Semaphore(self.settings.max_connections_per_target),
        )
        key = _ReuseKey(
            target,
            tls,
            auth,
            # DomainMatch checks (and names in SNI) the recipient domain: a connection
            # verified for one domain says nothing about another.
            recipient_domain if tls.mode is TlsMode.DOMAIN_MATCH else "",
        )
        server = (target.address, target.port)
        self._in_use[server] = self._in_use.get(server, 0) + 1
        try:
            async with limit:
                return await self._limited_transaction(
                    key, target, envelope, recipients, data, tls, auth, recipient_domain
                )
        finally:
            self._in_use[server] -= 1
            if not self._in_use[server]:
                del self._in_use[server]

    async def _limited_transaction(
        self,
        key: _ReuseKey,
        target: _Target,
        envelope: _Request,
        recipients: Sequence[str],
        data: bytes,
        tls: TlsPolicy,
        auth: SmtpCredentials | None,
        recipient_domain: str,
    ) -> tuple[list[RecipientResult], _Session]:
        await self._reap_idle()
        idle = self._take_idle(key)
        if idle is not None:
            try:
                results = await self._send(idle, target, envelope, recipients, data)
            except _ProtocolError:
                # Not a stale connection but a broken server: trying again at once on a
                # fresh connection could only send the content a second time.
                idle.smtp.close()
                raise
            except (aiosmtplib.SMTPException, OSError, _TargetFailed):
                # The server closed the idle connection meanwhile, or refuses more on it
                # (421 at MAIL): a fresh connection follows, and the server is not blamed.
                idle.smtp.close()
            except BaseException:
                idle.smtp.close()
                raise
            else:
                idle.uses += 1
                await self._release(key, idle)
                return results, idle.session
        try:
            connection = await self._open_any(target, tls, auth, recipient_domain)
        except _TargetFailed:
            raise
        except Exception as e:
            # deliver() must decide something for every recipient: an answer this code
            # did not expect is a failure of this target, logged with its traceback.
            logger.exception("unexpected error talking to %s", target)
            raise _TargetFailed(f"4.4.0 unexpected error: {type(e).__name__}: {e}") from e
        try:
            results = await self._send(connection, target, envelope, recipients, data)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
            connection.smtp.close()
            raise _TargetFailed(f"4.4.2 connection lost: {e}") from e
        except aiosmtplib.SMTPException as e:
            connection.smtp.close()
            logger.exception("unexpected SMTP error from %s", target)
            raise _TargetFailed(f"4.4.0 unexpected reply: {_reply(e)}") from e
        except BaseException:
            connection.smtp.close()
            raise
        await self._release(key, connection)
        return results, connection.session

    async def _open_any(
        self, target: _Target, tls: TlsPolicy, auth: SmtpCredentials | None, recipient_domain: str
    ) -> _Connection:
        if target.dane is not None and target.dane.failure is not None:
            # A failed DNSSEC lookup or a Mandatory DANE without records: not even a connect.
            raise _TargetFailed(f"4.7.5 {target.dane.reason}", tls_failure=target.dane.failure)
        try:
            return await self._open(target, tls, auth, recipient_domain, use_tls=True)
        except _PlaintextFallback:
            logger.info("opportunistic TLS to %s failed: retrying in plaintext", target)
            return await self._open(target, tls, auth, recipient_domain, use_tls=False)

    async def _open(
        self,
        target: _Target,
        tls: TlsPolicy,
        auth: SmtpCredentials | None,
        recipient_domain: str,
        *,
        use_tls: bool,
    ) -> _Connection:
        """Connect, greet, STARTTLS as the policy says, authenticate: ready for MAIL FROM."""
        smtp = aiosmtplib.SMTP(
            hostname=target.address,
            port=target.port,
            local_hostname=self.settings.helo_name,
            timeout=self.settings.command_timeout,
            start_tls=False,
        )
        if target.implicit_tls:
            policy, by_dane = _effective_policy(target, tls)
            smtp = implicit_tls.ImplicitTlsSMTP(
                target.address,
                target.port,
                server_name=_server_name(target, policy, recipient_domain, by_dane=by_dane),
                tls_context=dane_context() if by_dane else client_context(policy),
                local_hostname=self.settings.helo_name,
                timeout=self.settings.command_timeout,
            )
        session = _Session()
        try:
            try:
                await smtp.connect(timeout=self.settings.connect_timeout)
                if target.implicit_tls:
                    _verify_peer(smtp, target, tls, recipient_domain, session)
            except implicit_tls.HandshakeFailed as e:
                error = classify_handshake_error(e.cause, tls.mode)
                raise _TargetFailed(f"4.7.5 {error}", tls_failure=error.reason) from e
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
                raise _TargetFailed(f"4.4.1 cannot connect: {e}") from e
            try:
                await self._hello(smtp)
                if target.implicit_tls:
                    pass  # TLS since connect, checked above
                elif use_tls:
                    await self._starttls(smtp, target, tls, recipient_domain, session)
                elif tls.mode.requires_tls:  # pragma: no cover - fallback is Opportunistic only
                    raise _TargetFailed("4.7.5 TLS required", tls_failure=TlsFailure.HANDSHAKE)
                if auth is not None:
                    _refuse_unverified_auth(session, tls.mode)
                    try:
                        await smtp.login(auth.username, auth.password)
                    except aiosmtplib.SMTPException as e:
                        # Our credentials were refused: a configuration problem to fix,
                        # retried later, never a bounce.
                        raise _TargetFailed(f"4.7.8 authentication failed: {_reply(e)}") from e
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
                raise _TargetFailed(f"4.4.2 connection lost: {e}") from e
        except BaseException:
            smtp.close()
            raise
        return _Connection(smtp, session, time.monotonic())

    # --- connection reuse ------------------------------------------------------------------

    def _take_idle(self, key: _ReuseKey) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.smtp.is_connected:
                return connection
            connection.smtp.close()
        return None

    async def _release(self, key: _ReuseKey, connection: _Connection) -> None:
        """Keep a connection for the next message to the same target, or say goodbye."""
        settings = self.settings
        idle = self._idle.setdefault(key, [])
        if (
            settings.idle_connections_per_target > 0
            and len(idle) < settings.idle_connections_per_target
            and connection.uses < settings.max_messages_per_connection
            and connection.smtp.is_connected
        ):
            connection.idle_since = time.monotonic()
            idle.append(connection)
            return
        await _goodbye(connection.smtp)

    def _prune(self) -> None:
        """Bound the per-server tables: they are keyed by every server mail ever went to."""
        self.health.forget_old(max(600.0, self.settings.down_for * 10))
        for server in [k for k in self._limits if self._in_use.get(k, 0) == 0]:
            del self._limits[server]
        for reuse in [k for k, idle in self._idle.items() if not idle]:
            del self._idle[reuse]

    async def _reap_idle(self) -> None:
        """Close connections that sat idle longer than the settings allow."""
        self._transactions += 1
        if self._transactions % 1000 == 0:
            self._prune()
        deadline = time.monotonic() - self.settings.idle_connection_seconds
        for key, idle in list(self._idle.items()):
            expired = [c for c in idle if c.idle_since < deadline]
            if not expired:
                continue
            self._idle[key] = [c for c in idle if c.idle_since >= deadline]
            for connection in expired:
                await _goodbye(connection.smtp)

    async def close(self) -> None:
        """QUIT every idle connection (at shutdown)."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await _goodbye(connection.smtp)

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as e:
            if 400 <= e.code < 500:
                raise _TargetFailed(f"{e.code} greeting refused: {e.message}", e.code) from e
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as again:
                # A server that refuses both greetings takes no mail from us now: that is
                # about this hop, never a reason to bounce the recipient.
                raise _TargetFailed(
                    f"4.4.0 greeting refused: {again.code} {again.message}"
                ) from again

    async def _starttls(
        self,
        smtp: aiosmtplib.SMTP,
        target: _Target,
        tls: TlsPolicy,
        recipient_domain: str,
        session: _Session,
    ) -> None:
        tls, by_dane = _effective_policy(target, tls)
        mode = tls.mode
        dane = target.dane
        requires_tls = mode.requires_tls or (dane is not None and dane.requires_tls)
        if not smtp.supports_extension("starttls"):
            if requires_tls:
                error = TlsPolicyError(
                    TlsFailure.NO_STARTTLS, "the server does not offer STARTTLS", mode=mode
                )
                raise _TargetFailed(f"4.7.5 {error}", tls_failure=error.reason)
            return
        try:
            await smtp.starttls(
                tls_context=dane_context() if by_dane else client_context(tls),
                server_hostname=_server_name(target, tls, recipient_domain, by_dane=by_dane),
                timeout=self.settings.command_timeout,
            )
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as e:
            if not requires_tls:
                raise _PlaintextFallback from e
            error = classify_handshake_error(ssl_cause(e), mode)
            raise _TargetFailed(f"4.7.5 {error}", tls_failure=error.reason) from e
        _verify_peer(smtp, target, tls, recipient_domain, session)
        await self._hello(smtp)  # RFC 3207 §4.2: forget what was said before TLS

    async def _send(
        self,
        connection: _Connection,
        target: _Target,
        request: _Request,
        recipients: Sequence[str],
        data: bytes,
    ) -> list[RecipientResult]:
        smtp, session = connection.smtp, connection.session
        plan = plan_transaction(
            request.parameters,
            request.mail_from,
            recipients,
            data,
            capabilities=smtp.esmtp_extensions.keys(),
            verified_tls=session.verified,
            server=str(target),
        )
        session.dsn = not isinstance(plan, ExtensionRefusal) and plan.dsn
        if isinstance(plan, ExtensionRefusal):
            session.decisions = [plan.reply[:6].strip()]
            logger.warning("delivery to %s refused here: %d %s", target, plan.code, plan.reply)
            reply = f"{plan.code} {plan.reply}"
            return [RecipientResult(r, DeliveryStatus.FAILED, plan.code, reply) for r in recipients]
        session.decisions = list(plan.conversions)
        if plan.conversions:
            logger.info("delivery to %s: converted (%s)", target, ", ".join(plan.conversions))
        # The addresses as sent (A-labels after a downgrade); results go back by position.
        sent = [plan.recipients[r] for r in recipients]
        envelope = Envelope.of(
            plan.mail_from,
            plan.mail_options,
            {plan.recipients[r]: plan.rcpt_options[r] for r in recipients},
        )
        try:
            results = await self._transact(smtp, envelope, sent, plan.data)
        except _ProtocolError:
            # The connection is in an unknown state (aiosmtplib may have dropped the rest
            # of the reply): it is closed, never reset and reused.
            smtp.close()
            raise
        return [replace(result, recipient=r) for r, result in zip(recipients, results, strict=True)]

    async def _transact(
        self, smtp: aiosmtplib.SMTP, envelope: Envelope, recipients: Sequence[str], data: bytes
    ) -> list[RecipientResult]:
        """MAIL, RCPT, DATA (pipelined when offered, :mod:`.pipelining`). Only a 250 after the
        content is a delivery; a reply is taken by its class only when it is a valid reply
        where it came, else it is a protocol error."""
        timeouts = Timeouts(self.settings.command_timeout, self.settings.data_timeout)
        steps = steps_for(smtp, envelope, recipients, timeouts, allowed=self.settings.pipelining)
        async with steps:
            results, finished = await self._steps(steps, recipients, data)
        if not finished and smtp.is_connected:
            # A refused DATA (or no recipient) may leave the server's transaction open
            # (RFC 5321 lets it; Postfix does): reset it, or the next message on this
            # connection would get "503 nested MAIL command".
            try:
                await smtp.rset()
            except aiosmtplib.SMTPResponseException:
                smtp.close()  # unknown state: never reused
        return [results[r] for r in recipients]

    async def _steps(
        self, steps: Steps, recipients: Sequence[str], data: bytes
    ) -> tuple[dict[str, RecipientResult], bool]:
        try:
            await steps.mail()
        except aiosmtplib.SMTPResponseException as e:
            status = _refusal(e, "MAIL FROM")
            if status is DeliveryStatus.DEFERRED:
                raise _TargetFailed(f"MAIL FROM refused: {_reply(e)}", e.code) from e
            return {
                r: RecipientResult(r, DeliveryStatus.FAILED, e.code, _reply(e)) for r in recipients
            }, False
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        for recipient in recipients:
            try:
                await steps.rcpt(recipient)
                accepted.append(recipient)
            except aiosmtplib.SMTPResponseException as e:
                status = _refusal(e, "RCPT TO")
                results[recipient] = RecipientResult(recipient, status, e.code, _reply(e))
        finished = False
        if accepted:
            try:
                response = await steps.data(data)
                for recipient in accepted:
                    results[recipient] = RecipientResult(
                        recipient, DeliveryStatus.DELIVERED, response.code, response.message
                    )
                finished = True  # a 2xx after the data ends the transaction
            except aiosmtplib.SMTPResponseException as e:
                # aiosmtplib raises for anything but 354 to DATA and 250 after the content:
                # a 250 to DATA itself lands here, with not one byte of content sent.
                status = _refusal(e, "DATA")
                for recipient in accepted:
                    results[recipient] = RecipientResult(recipient, status, e.code, _reply(e))
        return results, finished


@dataclass(frozen=True)
class _Request:
    """What the sender asked for, before any next hop is known: its address and ESMTP
    parameters (each next hop's EHLO decides what it gets of them: extensions.py)."""

    mail_from: str
    parameters: EnvelopeParameters


def _implicit_tls_hosts(destination: Destination) -> set[tuple[str, int] | str]:
    """The (host, port) pairs to reach with implicit TLS; ``"*"``: every one (MX of a smart
    host whose ``implicitTls`` covers whatever hosts its MX names)."""
    if isinstance(destination, SmartHost) and destination.implicit_tls:
        return {"*"}
    if isinstance(destination, ProfilePool):
        return {(s.host, s.port) for s in destination.servers if s.implicit_tls}
    return set()


def _effective_policy(target: _Target, tls: TlsPolicy) -> tuple[TlsPolicy, bool]:
    """The TLS policy this hop's handshake is judged by, and whether DANE authenticates it
    (then the TLSA records alone decide: never the mode, never weaker)."""
    dane = target.dane
    if dane is not None and dane.override is not None:
        tls = dane.override  # MTA-STS enforce: TLS with a certificate for the MX host
    return tls, dane is not None and dane.authenticates


def _server_name(
    target: _Target, tls: TlsPolicy, recipient_domain: str, *, by_dane: bool
) -> str | None:
    if by_dane and target.dane is not None:
        return target.dane.base_domain  # RFC 7672 §3.2.3: the TLSA base domain as SNI
    return server_name_for(tls, target.name, recipient_domain)


def _verify_peer(
    smtp: aiosmtplib.SMTP, target: _Target, tls: TlsPolicy, recipient_domain: str, session: _Session
) -> None:
    """The certificate check after a handshake (STARTTLS, or TLS at connect for implicit
    TLS): by the TLSA records when DANE authenticates this hop, else by the TLS mode."""
    tls, by_dane = _effective_policy(target, tls)
    ssl_object = smtp.get_transport_info("ssl_object")
    assert isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket)
    try:
        if by_dane and target.dane is not None:
            session.certificate = verify_chain(target.dane, peer_chain(ssl_object))
        else:
            der = ssl_object.getpeercert(binary_form=True)
            session.certificate = check_certificate(tls, der, recipient_domain)
    except TlsPolicyError as e:
        raise _TargetFailed(f"4.7.5 {e}", tls_failure=e.reason) from e
    session.tls_version = ssl_object.version()
    mode = tls.mode
    session.verified = by_dane or (
        mode is not TlsMode.OPPORTUNISTIC
        and (mode is not TlsMode.SELF_SIGNED or bool(tls.pinned_fingerprints))
    )


def _refuse_unverified_auth(session: _Session, mode: TlsMode) -> None:
    """Credentials go only over a session whose server was verified, whatever the document says.

    The compiler, the CRD and the webhook already refuse ``auth`` with a mode that does not
    verify (Opportunistic, SelfSigned without pins); this is the last line, local to the
    one place that sends them: a document from an older operator or a hand-written one
    must not leak the password to whoever answers on the port.
    """
    if session.tls_version is None:
        raise _TargetFailed("4.7.0 credentials are only sent over TLS, and TLS was not established")
    if not session.verified:
        raise _TargetFailed(
            f"4.7.0 credentials are only sent over verified TLS, and TLS mode {mode.value} "
            "did not verify the server (use TrustedCA, DomainMatch, NameMatch or SelfSigned "
            "with pinnedFingerprints): AUTH not sent"
        )


async def _goodbye(smtp: aiosmtplib.SMTP) -> None:
    # The transactions are complete: a lost QUIT changes nothing.
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        if smtp.is_connected:
            await smtp.quit(timeout=5)
    transport = write_transport(smtp.transport)
    smtp.close()
    # After QUIT a TLS close_notify exchange adds nothing, and asyncio's graceful TLS
    # shutdown keeps the socket open until the peer answers (up to 30 s, or past the event
    # loop, where it is left unclosed): drop it, as implicit_tls.py does.
    if transport is not None and transport.get_extra_info("ssl_object") is not None:
        transport.abort()


def _valid_code(code: int) -> bool:
    """RFC 5321 4.2: three digits, the first 2 to 5, the second 0 to 5."""
    return 200 <= code <= 559 and code // 10 % 10 <= 5


def _refusal(error: aiosmtplib.SMTPResponseException, stage: str) -> DeliveryStatus:
    """What a refusal at ``stage`` means: 4xx defers, 5xx fails. Any other reply (no valid
    code, a line over the limit, a 2xx or 3xx where aiosmtplib expected another) is not a
    refusal the server can mean: a protocol error, which defers the whole transaction."""
    if _valid_code(error.code) and 400 <= error.code < 500:
        return DeliveryStatus.DEFERRED
    if _valid_code(error.code) and 500 <= error.code < 600:
        return DeliveryStatus.FAILED
    raise _ProtocolError(stage, error) from error


def _reply(error: aiosmtplib.SMTPException) -> str:
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return f"{error.code} {error.message}"
    return str(error)


def ssl_cause(error: BaseException) -> BaseException:
    """The ssl error behind what aiosmtplib raised, if there is one."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


def _summary(results: Sequence[RecipientResult]) -> str:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status.value] = counts.get(result.status.value, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
