"""Throttles, adaptive backoff and pause: when a delivery may start, decided before it starts.

A throttle keeps mail queued; it never refuses or bounces it, and a held delivery is not
an attempt (no attempt count, no retry backoff). Limits are declared on a connector, on
a profile server and on a recipient domain of a connector (``maxConnections``,
``messagesPerMinute``, ``recipientsPerMessage``) and hold for the whole fleet: the
operator writes the number of ready relays in the routing document and each relay takes
an equal share (rate / relays; connections // relays, at least one). While the fleet
scales, the document follows within a reconcile: for that moment the fleet may send up
to one relay's share more (or less) than declared.

Order is fair: while a message waits for a limit, younger messages do not take the slot
before it (oldest arrival first per limit). Rates are spaced evenly (no burst): with 60
messages per minute shared by two relays, each sends one message every two seconds.

Adaptive backoff: a ``421`` or a ``4.7.x`` reply (the big providers' "slow down") halves
that destination's rate and connection count (at most once a second), down to 1/64; the
factor then recovers by doubling every ``recovery`` seconds without such a reply. A
destination without a declared rate starts from the rate this relay sent at just before
the first such reply (over the last minute, or since the first delivery in it).

Pause: a paused connector, or a paused profile server, delivers nothing; its mail waits
(and fails at the queue lifetime, as deferred mail does). A new routing document wakes
everything that waits, so unpausing resumes at once.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from mailflow_relay.queue.spool import RecipientState, RecipientStatus
from mailflow_relay.routing.document import (
    Balancing,
    Connector,
    ObjectRef,
    ProfilePool,
    RecipientMx,
    RoutingDocument,
    ServerAddress,
    Throttle,
)
from mailflow_relay.routing.router import RouteDecision

__all__ = [
    "DEFAULT_ROUTE",
    "Admission",
    "DeliveryGate",
    "HoldReason",
    "ThrottleMetrics",
    "Ticket",
    "is_rate_limit_reply",
]

logger = logging.getLogger("mailflow_relay.engine.relay")

DEFAULT_ROUTE = "(default route)"
MIN_FACTOR = 1 / 64
PENALTY_SPACING = 1.0
"""Seconds between two halvings: a storm of parallel 421s counts as one."""
MAX_HOLD = 60.0
"""The longest a held message sleeps before it looks again (limits may have changed)."""
CONNECTION_RECHECK = 5.0
"""A message waiting for a connection is woken when one is released; this is the fallback."""
LATE_WAITER = 1.0
"""A waiter this late for its next look blocks nobody (it is busy, or gone)."""
STALE_WAITER = 3 * MAX_HOLD
"""A waiter this late is forgotten."""
_SERVER_4_7 = re.compile(r"(?<![\d.])(4\d\d)[ -]4\.7\.\d{1,3}(?![\d.])")
_GREETING_421 = re.compile(r"(?<![\d.])421(?:[ -]|, )")
"""A 421 the deliverer quotes (``cannot connect: (421, '…')``, ``unexpected reply: 421 …``)."""


class HoldReason:
    """Why a delivery waits: the ``limit`` label of the throttle metrics."""

    PAUSED = "paused"
    CONNECTIONS = "connections"
    RATE = "rate"
    ORDER = "order"
    """An older message waits for the same limit and goes first."""


def is_rate_limit_reply(code: int, text: str) -> bool:
    """A "slow down" from the destination: ``421`` (service closing, also as the greeting),
    or a 4xx reply of the server with an enhanced status ``4.7.x`` (RFC 3463 security or
    policy; 4.7.28 and friends are the providers' rate limits).

    The server's own words carry their reply code (``450 4.7.28 …``); the relay's local
    verdicts (``4.7.5 TLS required``) do not, and neither counts ``454`` (TLS not
    available, RFC 3207): those are about TLS, never about the rate.
    """
    if code == 421:
        return True
    head = text[:160]
    if head.startswith("4.7."):
        return False  # the relay's own TLS or AUTH verdict, whatever it quotes
    if _GREETING_421.search(head):
        return True
    match = _SERVER_4_7.search(head)
    return match is not None and match[1] != "454"


@dataclass
class _Backoff:
    factor: float = 1.0
    since: float = 0.0
    base_rate: float | None = None
    """Messages per minute this relay sent at when the backoff began (no declared rate)."""
    base_connections: int = 1

    def current(self, now: float, recovery: float) -> float:
        return min(1.0, self.factor * 2 ** ((now - self.since) / recovery))


@dataclass
class _Key:
    """One limit's state in this relay."""

    connector: str
    kind: str
    """``connector``, ``server`` or ``domain``: the ``scope`` label."""
    in_use: int = 0
    next_free: float = 0.0
    waiting: dict[str, tuple[datetime, float]] = field(default_factory=dict)
    """queue id → (arrival, when it looks again): the fairness order."""
    started: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=4096)
    )
    backoff: _Backoff | None = None

    def oldest_waiter(self, now: float) -> tuple[str, float] | None:
        """The oldest message waiting here and when it looks again; one that did not come
        back in time (delivered another way, deleted, a busy relay) blocks nobody."""
        live = [(a, q, u) for q, (a, u) in self.waiting.items() if u > now - LATE_WAITER]
        if not live:
            return None
        _, queue_id, until = min(live)
        return queue_id, until

    def waiting_ahead(self, queue_id: str, arrival: datetime, now: float) -> list[float]:
        """When the live waiters older than ``queue_id`` look again (empty: it is first)."""
        return [
            until
            for other, (other_arrival, until) in self.waiting.items()
            if other != queue_id
            and until > now - LATE_WAITER
            and (other_arrival, other) < (arrival, queue_id)
        ]

    def forget_late(self, now: float) -> None:
        for queue_id in [q for q, (_, u) in self.waiting.items() if u < now - STALE_WAITER]:
            del self.waiting[queue_id]

    def rate_last_minute(self, now: float) -> float:
        """Messages a minute started here lately: over the last minute, or over the time
        since the first of them when that is shorter (a burst is not a slow minute)."""
        recent = [t for t in self.started if now - t < 60.0]
        if not recent:
            return 0.0
        return len(recent) * 60.0 / max(1.0, now - recent[0])


@dataclass(frozen=True)
class Ticket:
    """A granted delivery: what it holds, to give back with :meth:`DeliveryGate.release`."""

    keys: tuple[tuple[object, ...], ...]
    backoff_key: tuple[object, ...]


@dataclass(frozen=True)
class Admission:
    ticket: Ticket | None
    """None: held."""
    decision: RouteDecision
    """The route to deliver on (a profile pool narrowed to the servers that may take it)."""
    until: float = 0.0
    reason: str = ""
    first: bool = True
    """The first hold of this message for this reason (the one worth an INFO line)."""


@dataclass(frozen=True)
class _Limit:
    key: tuple[object, ...]
    kind: str
    throttle: Throttle | None


class ThrottleMetrics:
    """The gate's metrics, in the relay's registry; labels are connectors of the document
    (or ``(default route)``), scopes and reasons: bounded by the configuration."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.throttled_waiting = Gauge(
            "mailflow_throttled_waiting",
            "Messages held by a throttle or a pause (queued, not attempted), by connector and"
            " scope (connector, server, domain, paused).",
            ["connector", "scope"],
            registry=registry,
        )
        self.throttle_holds = Counter(
            "mailflow_throttle_holds",
            "Deliveries held back instead of started, by connector and reason (paused,"
            " connections, rate, order).",
            ["connector", "reason"],
            registry=registry,
        )
        self.backoff_factor = Gauge(
            "mailflow_backoff_factor",
            "The adaptive backoff in force per connector: the share of its rate and connections"
            " left after 421 / 4.7.x replies (1: none; the lowest of its destinations).",
            ["connector"],
            registry=registry,
        )
        self.rate_limit_replies = Counter(
            "mailflow_rate_limit_replies",
            "Deliveries answered with 421 or a 4.7.x reply (they lower the rate), by connector.",
            ["connector"],
            registry=registry,
        )


class DeliveryGate:
    """Decides whether a delivery may start now, and keeps the limits' state."""

    def __init__(
        self,
        document: RoutingDocument,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        recovery: float = 60.0,
    ) -> None:
        self._metrics = ThrottleMetrics(registry)
        self._clock = clock
        self.recovery = recovery
        self._fleet = document.fleet_relays
        self._keys: dict[tuple[object, ...], _Key] = {}
        self._paused: dict[str, tuple[datetime, float]] = {}
        """Messages waiting for a paused connector or server (no order: nothing moves)."""
        self._paused_by: dict[str, str] = {}
        self._turns: dict[ObjectRef, int] = {}
        """Round robin among a pool's throttled servers: whose turn it is."""

    # --- configuration -----------------------------------------------------------------

    def load(self, document: RoutingDocument) -> list[str]:
        """A new document: its fleet size from now on; every waiting message to wake."""
        if document.fleet_relays != self._fleet:
            logger.info(
                "throttles: fleet of %d relays: each relay takes 1/%d of every limit",
                document.fleet_relays,
                document.fleet_relays,
            )
        self._fleet = document.fleet_relays
        waiting = set(self._paused)
        for key in self._keys.values():
            waiting.update(key.waiting)
        self._paused.clear()
        self._paused_by.clear()
        return sorted(waiting)

    # --- splitting ---------------------------------------------------------------------

    @staticmethod
    def domain_limited(decision: RouteDecision) -> bool:
        """Whether the recipient's domain has its own throttle (a delivery per domain)."""
        connector = decision.connector
        return connector is not None and any(
            d.domain == decision.domain for d in connector.domain_throttles
        )

    def chunks(
        self, members: Sequence[tuple[RecipientState, RouteDecision]]
    ) -> Iterator[list[tuple[RecipientState, RouteDecision]]]:
        """One route's recipients in messages of at most ``recipientsPerMessage``."""
        decision = members[0][1]
        throttles = [limit.throttle for limit in self._limits(decision)]
        if isinstance(decision.destination, ProfilePool):
            # Which server takes it is decided later: the smallest of the pool's servers.
            throttles += [s.throttle for s in decision.destination.server_limits]
        limits = [t.recipients_per_message for t in throttles if t and t.recipients_per_message]
        size = min(limits, default=len(members)) or 1
        for start in range(0, len(members), size):
            yield list(members[start : start + size])

    # --- admission ---------------------------------------------------------------------

    def admit(self, queue_id: str, arrival: datetime, decision: RouteDecision) -> Admission:
        now = self._clock()
        name = _name(decision.connector)
        connector = decision.connector
        if connector is not None and connector.paused:
            return self._pause(queue_id, arrival, decision, name, "connector")
        decision, server_limit = self._choose_server(queue_id, arrival, decision, now)
        if decision.destination is None:
            return self._pause(queue_id, arrival, decision, name, "server")
        limits = [*self._limits(decision), *([server_limit] if server_limit else [])]
        held_for = 0.0
        reason = ""
        denying: list[_Key] = []
        for limit in limits:
            key = self._key(limit, name)
            wait, why = self._wait(key, limit, queue_id, arrival, now)
            if wait > 0:
                denying.append(key)
                if wait > held_for:
                    held_for, reason = wait, why
        if held_for > 0:
            until = now + min(held_for, MAX_HOLD)
            first = not any(queue_id in key.waiting for key in denying)
            for key in denying:
                key.waiting[queue_id] = (arrival, until)
            self._metrics.throttle_holds.labels(name, reason).inc()
            return Admission(None, decision, until=until, reason=reason, first=first)
        self._paused.pop(queue_id, None)
        self._paused_by.pop(queue_id, None)
        for limit in limits:
            key = self._key(limit, name)
            key.waiting.pop(queue_id, None)
            key.in_use += 1
            key.started.append(now)
            interval = self._interval(key, limit, now)
            if interval:
                key.next_free = max(key.next_free, now) + interval
        return Admission(
            Ticket(tuple(limit.key for limit in limits), self._backoff_key(decision, limits)),
            decision,
        )

    def _pause(
        self,
        queue_id: str,
        arrival: datetime,
        decision: RouteDecision,
        name: str,
        scope: str,
    ) -> Admission:
        first = queue_id not in self._paused
        self._paused[queue_id] = (arrival, self._clock())
        self._paused_by[queue_id] = name
        self._metrics.throttle_holds.labels(name, HoldReason.PAUSED).inc()
        if scope == "server":
            logger.debug("every server of %s is paused or at its limit", name)
        until = self._clock() + MAX_HOLD
        return Admission(None, decision, until=until, reason=HoldReason.PAUSED, first=first)

    def _choose_server(
        self, queue_id: str, arrival: datetime, decision: RouteDecision, now: float
    ) -> tuple[RouteDecision, _Limit | None]:
        """For a pool with paused or throttled servers: the servers this delivery may use.

        A throttled server is used only with a slot granted here (the first one free, in
        the pool's order, rotated for round robin); servers without limits stay behind it
        for failover. Paused servers are left out. None destination: none may be used now.
        """
        pool = decision.destination
        if not isinstance(pool, ProfilePool) or not pool.server_limits:
            return decision, None
        name = _name(decision.connector)
        free: list[ServerAddress] = []
        limited: list[tuple[ServerAddress, _Limit]] = []
        for server in pool.servers:
            limits = pool.limits_of(server)
            if limits is None or not limits.throttle.limits_anything:
                if limits is None or not limits.paused:
                    free.append(server)
                continue
            if not limits.paused:
                limited.append(
                    (server, _Limit(("server", pool.profile, server), "server", limits.throttle))
                )
        if pool.balancing is Balancing.ROUND_ROBIN and limited:
            turn = self._turns.get(pool.profile, 0) % len(limited)
            limited = limited[turn:] + limited[:turn]
        for server, limit in limited:
            key = self._key(limit, name)
            wait, _ = self._wait(key, limit, queue_id, arrival, now)
            if wait <= 0:
                self._turns[pool.profile] = self._turns.get(pool.profile, 0) + 1
                narrowed = replace(pool, servers=(server, *free))
                return replace(decision, destination=narrowed), limit
        if free:
            return replace(decision, destination=replace(pool, servers=tuple(free))), None
        if limited:
            # Every server is at its limit: wait for the first one (a rate or a connection).
            server, limit = limited[0]
            narrowed = replace(pool, servers=(server,))
            return replace(decision, destination=narrowed), limit
        return replace(decision, destination=None), None

    def release(self, ticket: Ticket, states: Sequence[RecipientState]) -> list[str]:
        """A delivery ended: give its slots back, learn from its replies; who to wake."""
        now = self._clock()
        limited = any(
            s.status is RecipientStatus.DEFERRED
            and is_rate_limit_reply(s.last_reply_code or 0, s.last_reply_text or "")
            for s in states
        )
        wake: list[str] = []
        for key_id in ticket.keys:
            key = self._keys.get(key_id)
            if key is None:
                continue
            key.in_use = max(0, key.in_use - 1)
            oldest = key.oldest_waiter(now)
            if oldest is not None:
                wake.append(oldest[0])
        if limited:
            self._penalise(ticket.backoff_key, now)
        return wake

    def forget(self, queue_id: str) -> None:
        """The message left the queue: it waits for nothing any more."""
        self._paused.pop(queue_id, None)
        self._paused_by.pop(queue_id, None)
        for key in self._keys.values():
            key.waiting.pop(queue_id, None)

    # --- limits ------------------------------------------------------------------------

    def _limits(self, decision: RouteDecision) -> list[_Limit]:
        connector = decision.connector
        if connector is None:
            limits = []
        else:
            limits = [_Limit(("connector", connector.ref), "connector", connector.throttle)]
            for domain in connector.domain_throttles:
                if domain.domain == decision.domain:
                    limits.append(
                        _Limit(("domain", connector.ref, domain.domain), "domain", domain.throttle)
                    )
        if isinstance(decision.destination, RecipientMx):
            # The recipient's MX is its own destination: a backoff there is per domain.
            ref = None if connector is None else connector.ref
            if not any(limit.kind == "domain" for limit in limits):
                limits.append(_Limit(("domain", ref, decision.domain), "domain", None))
        return limits

    def _backoff_key(self, decision: RouteDecision, limits: Sequence[_Limit]) -> tuple[object, ...]:
        for kind in ("server", "domain"):
            for limit in limits:
                if limit.kind == kind and (
                    kind == "server" or isinstance(decision.destination, RecipientMx)
                ):
                    return limit.key
        return limits[0].key if limits else ("connector", None)

    def _key(self, limit: _Limit, name: str) -> _Key:
        key = self._keys.get(limit.key)
        if key is None:
            key = self._keys[limit.key] = _Key(name, limit.kind)
        return key

    def _factor(self, key: _Key, now: float) -> float:
        if key.backoff is None:
            return 1.0
        factor = key.backoff.current(now, self.recovery)
        if factor >= 1.0:
            logger.info("backoff of %s (%s) is over: full rate again", key.connector, key.kind)
            key.backoff = None
        return factor

    def _rate(self, key: _Key, limit: _Limit, now: float) -> float | None:
        """Messages per minute this relay may send for ``key`` now; None: no limit."""
        declared = limit.throttle.messages_per_minute if limit.throttle else None
        factor = self._factor(key, now)
        if declared is not None:
            return declared / self._fleet * factor
        if key.backoff is not None and key.backoff.base_rate is not None:
            return key.backoff.base_rate * factor
        return None

    def _connections(self, key: _Key, limit: _Limit, now: float) -> int | None:
        declared = limit.throttle.max_connections if limit.throttle else None
        factor = self._factor(key, now)
        if declared is not None:
            return max(1, math.floor(declared / self._fleet * factor))
        if key.backoff is not None:
            return max(1, math.floor(key.backoff.base_connections * factor))
        return None

    def _interval(self, key: _Key, limit: _Limit, now: float) -> float:
        rate = self._rate(key, limit, now)
        return 0.0 if rate is None else 60.0 / max(rate, 1e-6)

    def _wait(
        self, key: _Key, limit: _Limit, queue_id: str, arrival: datetime, now: float
    ) -> tuple[float, str]:
        """Seconds ``queue_id`` must wait for ``key`` (0: it may go now), and why."""
        connections = self._connections(key, limit, now)
        if connections is not None and key.in_use >= connections:
            return CONNECTION_RECHECK, HoldReason.CONNECTIONS
        rate = self._rate(key, limit, now)
        wait = key.next_free - now if rate is not None else 0.0
        ahead = key.waiting_ahead(queue_id, arrival, now)
        if ahead:
            # Older messages wait for this limit and take the next slots: this one looks
            # again at its own turn (not all at once at the next slot), and not sooner than
            # 0.1 s, so that an older one that is late (its worker busy) makes none spin.
            turn = max(wait, 0.0) + (len(ahead) * 60.0 / rate if rate else 0.0)
            return max(turn, max(ahead) - now, 0.1) + 0.01, HoldReason.ORDER
        if wait > 0:
            return wait, HoldReason.RATE
        return 0.0, ""

    def _penalise(self, key_id: tuple[object, ...], now: float) -> None:
        key = self._keys.get(key_id)
        if key is None:
            return
        self._metrics.rate_limit_replies.labels(key.connector).inc()
        backoff = key.backoff
        if backoff is None:
            backoff = key.backoff = _Backoff(
                factor=1.0,
                since=now - PENALTY_SPACING,
                base_rate=max(1.0, key.rate_last_minute(now)),
                base_connections=max(1, key.in_use + 1),
            )
        if now - backoff.since < PENALTY_SPACING:
            return
        backoff.factor = max(MIN_FACTOR, backoff.current(now, self.recovery) / 2)
        backoff.since = now
        logger.warning(
            "%s (%s) answers with rate limits: its rate and connections are down to %.3g of"
            " normal; recovering by doubling every %.0fs",
            key.connector,
            key.kind,
            backoff.factor,
            self.recovery,
        )

    # --- observing ---------------------------------------------------------------------

    def backoff_factors(self) -> dict[str, float]:
        """The lowest backoff factor per connector (1: none)."""
        now = self._clock()
        factors: dict[str, float] = {}
        for key in self._keys.values():
            factor = self._factor(key, now)
            factors[key.connector] = min(factors.get(key.connector, 1.0), factor)
        return factors

    def reported_backoff(self) -> dict[str, float]:
        """For the pod annotation: connectors backing off, the factor rounded down to a
        power of two (it changes a few times per recovery, not at every look)."""
        return {
            name: 2.0 ** math.floor(math.log2(factor))
            for name, factor in sorted(self.backoff_factors().items())
            if factor < 1.0 and name != DEFAULT_ROUTE
        }

    def update_gauges(self) -> None:
        now = self._clock()
        waiting: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        for queue_id, name in self._paused_by.items():
            waiting[(name, HoldReason.PAUSED)].add(queue_id)
        for key in self._keys.values():
            key.forget_late(now)
            waiting[(key.connector, key.kind)].update(key.waiting)
        gauge = self._metrics.throttled_waiting
        gauge.clear()
        for (name, scope), queue_ids in waiting.items():
            gauge.labels(name, scope).set(len(queue_ids))
        factors = self._metrics.backoff_factor
        factors.clear()
        for name, factor in self.backoff_factors().items():
            factors.labels(name).set(factor)
        self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        """Keys of recipient domains come and go with the mail: drop the idle ones."""
        for key_id in [
            k
            for k, key in self._keys.items()
            if key.in_use == 0
            and key.backoff is None
            and not key.waiting
            and key.next_free < now - 60.0
            and (not key.started or key.started[-1] < now - 60.0)
        ]:
            del self._keys[key_id]


def _name(connector: Connector | None) -> str:
    return DEFAULT_ROUTE if connector is None else str(connector.ref)
