"""The delivery gate on a virtual clock: the schedule it computes, exactly.

Two gates stand for two relays of one fleet (the document says ``fleet relays: 2``); a
rate declared for the connector must hold for both together. No sockets here: the
end-to-end behaviour with real relays and a real next hop is in test_throttles_e2e.py.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from mailflow_relay.engine.throttles import DeliveryGate, HoldReason, is_rate_limit_reply
from mailflow_relay.queue.spool import RecipientState, RecipientStatus
from mailflow_relay.routing.document import (
    Balancing,
    Connector,
    DomainThrottle,
    ObjectRef,
    ProfilePool,
    RecipientMx,
    RoutingDocument,
    ServerAddress,
    ServerLimits,
    SmartHost,
    Throttle,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.routing.router import MatchRule, RouteDecision

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def connector(**fields: object) -> Connector:
    base = Connector(
        ref=ObjectRef("mail", "partner"),
        generation=1,
        created="",
        enabled=True,
        recipient_patterns=(DomainPattern.parse("*"),),
        sender_patterns=(),
        destination=SmartHost("127.0.0.1", 2525),
        tls=TlsPolicy(),
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def decision(c: Connector, domain: str = "dest.test") -> RouteDecision:
    return RouteDecision(
        recipient=f"x@{domain}",
        domain=domain,
        sender_domain="sender.test",
        rule=MatchRule.CATCH_ALL,
        connector=c,
        recipient_pattern=None,
        sender_pattern=None,
        destination=c.destination,
        tls=c.tls,
        reason="test",
    )


def gate(c: Connector, clock: Clock, *, fleet: int = 1, recovery: float = 60.0) -> DeliveryGate:
    document = RoutingDocument(generation=1, connectors=(c,), fleet_relays=fleet)
    return DeliveryGate(document, CollectorRegistry(), clock=clock, recovery=recovery)


def deferred(code: int, text: str) -> RecipientState:
    return RecipientState(
        address="x@dest.test",
        status=RecipientStatus.DEFERRED,
        attempts=1,
        last_reply_code=code,
        last_reply_text=text,
    )


def delivered() -> RecipientState:
    return RecipientState(
        address="x@dest.test", status=RecipientStatus.DELIVERED, attempts=1, last_reply_code=250
    )


def drive(gates: list[DeliveryGate], c: Connector, clock: Clock, seconds: float) -> list[float]:
    """Offer one message per gate every 50 ms of virtual time; the times admitted."""
    admitted: list[float] = []
    step = 0
    while clock.now < 1000.0 + seconds:
        for number, g in enumerate(gates):
            queue_id = f"q{number}-{step}"
            admission = g.admit(queue_id, T0 + timedelta(seconds=step), decision(c))
            if admission.ticket is not None:
                admitted.append(clock.now)
                g.release(admission.ticket, [delivered()])
            else:
                g.forget(queue_id)
        step += 1
        clock.now += 0.05
    return admitted


def test_a_rate_declared_for_the_connector_holds_for_two_relays_together() -> None:
    c = connector(throttle=Throttle(messages_per_minute=60))
    clock = Clock()
    two = [gate(c, clock, fleet=2), gate(c, clock, fleet=2)]
    admitted = drive(two, c, clock, 30.0)
    # 60 a minute for the fleet: 30 s give 30 (each relay one every 2 s, from t=0).
    assert 29 <= len(admitted) <= 32
    clock = Clock()
    alone = drive([gate(c, clock)], c, clock, 30.0)
    assert 29 <= len(alone) <= 31


def test_connections_are_shared_by_the_fleet_and_never_below_one() -> None:
    c = connector(throttle=Throttle(max_connections=4))
    clock = Clock()
    g = gate(c, clock, fleet=2)
    first = g.admit("a", T0, decision(c))
    second = g.admit("b", T0, decision(c))
    third = g.admit("c", T0, decision(c))
    assert first.ticket is not None
    assert second.ticket is not None
    assert third.ticket is None
    assert third.reason == HoldReason.CONNECTIONS
    # The slot given back wakes the oldest waiter.
    assert g.release(first.ticket, [delivered()]) == ["c"]
    assert g.admit("c", T0, decision(c)).ticket is not None
    tiny = gate(connector(throttle=Throttle(max_connections=1)), clock, fleet=3)
    assert tiny.admit("a", T0, decision(c)).ticket is not None


def test_the_oldest_waiting_message_goes_first() -> None:
    c = connector(throttle=Throttle(messages_per_minute=60))
    clock = Clock()
    g = gate(c, clock)
    assert g.admit("first", T0, decision(c)).ticket is not None
    old = g.admit("old", T0 + timedelta(seconds=1), decision(c))
    assert old.ticket is None
    assert old.reason == HoldReason.RATE
    clock.now = old.until
    # A younger message looks first, at the moment the slot frees: it waits behind.
    young = g.admit("young", T0 + timedelta(seconds=5), decision(c))
    assert young.ticket is None
    assert young.reason == HoldReason.ORDER
    assert young.until > old.until
    assert g.admit("old", T0 + timedelta(seconds=1), decision(c)).ticket is not None


def test_waiting_messages_look_again_at_their_own_turn() -> None:
    c = connector(throttle=Throttle(messages_per_minute=60))
    clock = Clock()
    g = gate(c, clock)
    assert g.admit("first", T0, decision(c)).ticket is not None
    turns = [g.admit(f"m{n}", T0 + timedelta(seconds=n), decision(c)).until for n in range(1, 5)]
    # One a second: the second waiter looks a second after the first, and so on; not all
    # of them at the next free slot.
    gaps = [b - a for a, b in itertools.pairwise(turns)]
    assert gaps == pytest.approx([1.0, 1.0, 1.0], abs=0.05)
    # A message older than every waiter (say, rescanned after a restart) is not behind them.
    clock.now = turns[0]
    assert g.admit("rescanned", T0 - timedelta(days=1), decision(c)).ticket is not None


def test_a_421_storm_halves_the_rate_and_it_recovers_gradually() -> None:
    c = connector(throttle=Throttle(messages_per_minute=600, max_connections=8))
    clock = Clock()
    g = gate(c, clock, recovery=10.0)
    factors = []
    for _ in range(4):  # four seconds of 421s
        admission = g.admit("q", T0, decision(c))
        assert admission.ticket is not None
        g.release(admission.ticket, [deferred(421, "421 4.7.28 too fast, slow down")])
        factors.append(g.backoff_factors()["mail/partner"])
        clock.now += 1.0
        clock.now = max(clock.now, g._keys[("connector", c.ref)].next_free)
    assert factors[0] == pytest.approx(0.5 * 2 ** (0 / 10), rel=0.01)
    assert factors[-1] < 0.1
    key = g._keys[("connector", c.ref)]
    # The next slot is spaced by the lowered rate: 600/min at factor f is 0.1/f seconds.
    lowered = g.admit("after", T0, decision(c))
    assert lowered.ticket is not None
    assert key.next_free - clock.now == pytest.approx(
        0.1 / g.backoff_factors()["mail/partner"], 0.05
    )
    # Ten quiet seconds double it; after 40 the backoff is over.
    before = g.backoff_factors()["mail/partner"]
    clock.now += 10.0
    assert g.backoff_factors()["mail/partner"] == pytest.approx(2 * before, rel=0.01)
    clock.now += 40.0
    assert g.backoff_factors()["mail/partner"] == 1.0


def test_a_storm_of_parallel_421s_counts_once_a_second() -> None:
    c = connector()
    clock = Clock()
    g = gate(c, clock)
    tickets = [g.admit(f"q{n}", T0, decision(c)).ticket for n in range(10)]
    for ticket in tickets:
        assert ticket is not None
        g.release(ticket, [deferred(421, "4.3.2 going away")])
    assert g.backoff_factors()["mail/partner"] == pytest.approx(0.5)
    # Without a declared limit the base is what this relay did: ten connections, ten in the
    # last second (600 a minute: a burst is not spread over a minute).
    key = g._keys[("connector", c.ref)]
    assert key.backoff is not None
    assert key.backoff.base_connections == 10
    assert key.backoff.base_rate == 600.0


def test_the_recipient_mx_backs_off_per_domain() -> None:
    c = connector(destination=RecipientMx())
    clock = Clock()
    g = gate(c, clock)
    slow = g.admit("a", T0, decision(c, "big.test"))
    assert slow.ticket is not None
    g.release(slow.ticket, [deferred(450, "450 4.7.28 rate limited")])
    backed_off = {k for k, v in g._keys.items() if v.backoff is not None}
    assert backed_off == {("domain", c.ref, "big.test")}
    other = g.admit("b", T0, decision(c, "other.test"))
    assert other.ticket is not None
    assert g._keys[("domain", c.ref, "other.test")].backoff is None


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (421, "4.3.2 service not available", True),
        (450, "450 4.7.28 too many messages", True),
        (451, "MAIL FROM refused: 451 4.7.0 try later", True),
        (451, "4.4.1 cannot connect: (421, '4.7.0 try again later, closing')", True),
        (451, "4.4.0 unexpected reply: 421 4.3.2 going away", True),
        (451, "451 4.3.0 try again later", False),
        (550, "550 5.7.1 refused", False),
        (450, "450 4.2.0 mailbox busy, see 14.7.1", False),
        # The relay's own TLS and AUTH verdicts are not the destination slowing us down.
        (451, "4.7.5 TLS required", False),
        (451, "4.7.5 STARTTLS refused: 454 4.7.0 TLS not available", False),
        (451, "4.7.8 authentication failed: 454 4.7.0 temporary failure", False),
        (451, "4.4.1 cannot connect: [Errno 111] Connection refused", False),
    ],
)
def test_what_counts_as_a_rate_limit_reply(code: int, text: str, expected: bool) -> None:
    assert is_rate_limit_reply(code, text) is expected


def test_a_paused_connector_holds_everything_and_a_new_document_wakes_it() -> None:
    c = connector(paused=True)
    clock = Clock()
    g = gate(c, clock)
    held = g.admit("q", T0, decision(c))
    assert held.ticket is None
    assert held.reason == HoldReason.PAUSED
    assert held.first
    assert not g.admit("q", T0, decision(c)).first
    running = replace(c, paused=False)
    assert g.load(RoutingDocument(generation=2, connectors=(running,))) == ["q"]
    assert g.admit("q", T0, decision(running)).ticket is not None


def test_recipients_per_message_splits_and_domain_throttles_apply() -> None:
    c = connector(
        throttle=Throttle(recipients_per_message=5),
        domain_throttles=(DomainThrottle("small.test", Throttle(recipients_per_message=2)),),
    )
    g = gate(c, Clock())
    members = [
        (RecipientState(address=f"r{n}@small.test"), decision(c, "small.test")) for n in range(5)
    ]
    assert [len(chunk) for chunk in g.chunks(members)] == [2, 2, 1]
    assert DeliveryGate.domain_limited(decision(c, "small.test"))
    server = ServerAddress("127.0.0.1", 1)
    pool = ProfilePool(
        profile=ObjectRef("mail", "gw"),
        servers=(server,),
        server_limits=(ServerLimits(server, throttle=Throttle(recipients_per_message=3)),),
    )
    pooled = connector(destination=pool)
    members = [
        (RecipientState(address=f"r{n}@x.test"), decision(pooled, "x.test")) for n in range(4)
    ]
    assert [len(chunk) for chunk in g.chunks(members)] == [3, 1]
    assert not DeliveryGate.domain_limited(decision(c, "big.test"))


def test_a_profile_server_that_is_paused_or_full_is_not_used() -> None:
    a, b, spare = (
        ServerAddress("127.0.0.1", 1),
        ServerAddress("127.0.0.1", 2),
        ServerAddress("127.0.0.1", 3),
    )
    pool = ProfilePool(
        profile=ObjectRef("mail", "gw"),
        servers=(a, b, spare),
        balancing=Balancing.FAILOVER,
        server_limits=(
            ServerLimits(a, throttle=Throttle(max_connections=1)),
            ServerLimits(b, paused=True),
        ),
    )
    c = connector(destination=pool)
    g = gate(c, Clock())
    first = g.admit("q1", T0, decision(c))
    assert first.ticket is not None
    assert isinstance(first.decision.destination, ProfilePool)
    assert first.decision.destination.servers == (a, spare)
    # a is full and b paused: only the server without limits is left.
    second = g.admit("q2", T0, decision(c))
    assert isinstance(second.decision.destination, ProfilePool)
    assert second.decision.destination.servers == (spare,)
    every_server_paused = replace(pool, servers=(b,), server_limits=(ServerLimits(b, paused=True),))
    held = gate(connector(destination=every_server_paused), Clock()).admit(
        "q3", T0, decision(connector(destination=every_server_paused))
    )
    assert held.ticket is None
    assert held.reason == HoldReason.PAUSED


def test_round_robin_takes_the_throttled_servers_in_turn() -> None:
    a, b = ServerAddress("127.0.0.1", 1), ServerAddress("127.0.0.1", 2)
    pool = ProfilePool(
        profile=ObjectRef("mail", "gw"),
        servers=(a, b),
        server_limits=(
            ServerLimits(a, throttle=Throttle(max_connections=5)),
            ServerLimits(b, throttle=Throttle(max_connections=5)),
        ),
    )
    c = connector(destination=pool)
    g = gate(c, Clock())
    chosen = []
    for n in range(4):
        admission = g.admit(f"q{n}", T0, decision(c))
        assert admission.ticket is not None
        assert isinstance(admission.decision.destination, ProfilePool)
        chosen.append(admission.decision.destination.servers[0])
        g.release(admission.ticket, [delivered()])
    assert chosen == [a, b, a, b]
