"""Throttles, adaptive backoff and pause with real relays and a real next hop (aiosmtpd).

Relays run in the test's loop, on 127.0.0.1, delivering to one sink that records when
each recipient arrived. Timing assertions are lower bounds on the schedule the engine
computed (a loaded machine only stretches it) and counts, never "within N ms".
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from faults import connector, document, metric, relay_settings, running, send
from mailflow_relay.engine.relay import Relay
from mailflow_relay.engine.throttles import Admission
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import RoutingDocument, Throttle
from mailflow_relay.routing.router import RouteDecision
from mailflow_relay.testing.sink import SmtpSink
from support import run, until

CONNECTOR = "mail/dest"


def record_admissions(relay: Relay) -> list[float]:
    """When the relay's gate let a delivery start (the computed schedule, in seconds)."""
    times: list[float] = []
    admit = relay.gate.admit

    def recording(queue_id: str, arrival: datetime, decision: RouteDecision) -> Admission:
        admission = admit(queue_id, arrival, decision)
        if admission.ticket is not None:
            times.append(time.monotonic())
        return admission

    relay.gate.admit = recording  # type: ignore[method-assign]
    return times


def sink_document(port: int, **fields: object) -> RoutingDocument:
    c = replace(connector("dest", ["*"], port), **fields)  # type: ignore[arg-type]
    return document(c)


def test_a_rate_limit_holds_across_two_relays_sharing_it(tmp_path: Path) -> None:
    per_relay = 4

    async def scenario() -> None:
        async with SmtpSink() as sink:
            shared = replace(
                sink_document(sink.port, throttle=Throttle(messages_per_minute=120)),
                fleet_relays=2,
            )
            relays = [Relay(relay_settings(tmp_path / f"spool-{n}"), shared) for n in range(2)]
            admitted = [record_admissions(r) for r in relays]
            async with running(relays[0]), running(relays[1]):
                await asyncio.gather(
                    *(
                        send(relay.port, [f"r{n}-{m}@dest.test"], message_id=f"r{n}-{m}")
                        for n, relay in enumerate(relays)
                        for m in range(per_relay)
                    )
                )
                await until(lambda: len(sink.messages) == 2 * per_relay, within=30, what="all")
                holds = [
                    sum(
                        metric(r, "mailflow_throttle_holds_total", connector=CONNECTOR, reason=x)
                        for x in ("rate", "order")
                    )
                    for r in relays
                ]
                deferred = [
                    metric(
                        r,
                        "mailflow_recipients_deferred_total",
                        connector=CONNECTOR,
                        destination=f"127.0.0.1:{sink.port}",
                        tls_mode="Opportunistic",
                    )
                    for r in relays
                ]
        # 120 a minute for a fleet of two: each relay one a second.
        for times in admitted:
            assert len(times) == per_relay
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps) >= 0.99, gaps
        merged = sorted(admitted[0] + admitted[1])
        for start in merged:
            # Any 3 seconds hold at most 6 starts (2 a second) for the two relays together.
            assert sum(1 for t in merged if start <= t < start + 3.0) <= 6
        arrivals = [t for t, _ in sink.rcpt_log]
        assert max(arrivals) - min(arrivals) >= 2.0
        # Held mail was never an attempt: nothing deferred, every recipient delivered once.
        assert all(h > 0 for h in holds), holds
        assert deferred == [0.0, 0.0]
        assert sorted(a for _, a in sink.rcpt_log) == sorted(
            f"r{n}-{m}@dest.test" for n in range(2) for m in range(per_relay)
        )

    run(scenario, within=60)


def test_a_421_storm_slows_delivery_down_and_it_recovers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with SmtpSink(data_reply="421 4.7.28 too many messages, slow down") as sink:
            settings = relay_settings(
                tmp_path / "spool",
                retry_initial=0.2,
                retry_max=0.4,
                backoff_recovery=4.0,
                delivery=DeliverySettings(
                    helo_name="relay.test", connect_timeout=2, command_timeout=5, down_for=0.2
                ),
            )
            relay = Relay(
                settings, sink_document(sink.port, throttle=Throttle(messages_per_minute=600))
            )

            def factor() -> float:
                value = relay.metrics.registry.get_sample_value(
                    "mailflow_backoff_factor", {"connector": CONNECTOR}
                )
                return 1.0 if value is None else value

            async with running(relay):
                await asyncio.gather(
                    *(send(relay.port, [f"s{m}@dest.test"], message_id=f"s{m}") for m in range(3))
                )
                await until(lambda: factor() <= 0.35, within=20, what="the rate lowered")
                storm_replies = metric(
                    relay, "mailflow_rate_limit_replies_total", connector=CONNECTOR
                )
                during_storm = len(sink.messages)
                lowest = factor()
                sink.data_reply = None  # the provider is happy again
                admitted = record_admissions(relay)
                await asyncio.gather(
                    *(send(relay.port, [f"a{m}@dest.test"], message_id=f"a{m}") for m in range(4))
                )
                await until(lambda: len(sink.messages) == 7, within=30, what="all delivered")
                after_storm = list(admitted)
                await until(lambda: factor() == 1.0, within=30, what="recovered")
                admitted.clear()
                await asyncio.gather(
                    *(send(relay.port, [f"b{m}@dest.test"], message_id=f"b{m}") for m in range(3))
                )
                await until(lambda: len(sink.messages) == 10, within=30, what="delivered again")
        assert during_storm == 0
        assert storm_replies >= 2
        assert lowest <= 0.35
        # Right after the storm the engine spaces deliveries by the lowered rate: 600 a
        # minute is one per 0.1 s; at a factor of 0.35, recovering by doubling every 4 s,
        # the first starts are at least 0.15 s apart for well over a second.
        gaps = [b - a for a, b in itertools.pairwise(after_storm)]
        assert len(gaps) >= 3
        assert min(gaps[:3]) >= 0.15, gaps
        assert len(admitted) == 3

    run(scenario, within=90)


def test_a_paused_connector_keeps_its_mail_without_bouncing_and_releases_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with SmtpSink() as sink:
            paused = sink_document(sink.port, paused=True)
            relay = Relay(relay_settings(tmp_path / "spool", queue_lifetime=600.0), paused)
            async with running(relay):
                await asyncio.gather(
                    *(send(relay.port, [f"p{m}@dest.test"], message_id=f"p{m}") for m in range(3))
                )
                await until(
                    lambda: (
                        metric(
                            relay, "mailflow_throttled_waiting", connector=CONNECTOR, scope="paused"
                        )
                        == 3
                    ),
                    within=20,
                    what="three held",
                )
                await asyncio.sleep(0.5)  # ten scheduler ticks: nothing may move meanwhile
                held_received = len(sink.rcpt_log)
                spooled = len(relay.spool.scan(repair=False))
                bounces = metric(relay, "mailflow_bounces_total", action="failed")
                attempts = [s.attempts for m in relay.spool.scan() for s in m.recipients]
                unpaused_at = time.monotonic()
                relay.load_document(replace(sink_document(sink.port), generation=2))
                await until(lambda: len(sink.messages) == 3, within=20, what="released")
                released_in = time.monotonic() - unpaused_at
                await until(
                    lambda: (
                        metric(
                            relay, "mailflow_throttled_waiting", connector=CONNECTOR, scope="paused"
                        )
                        == 0
                    ),
                    within=5,
                    what="gauge back to 0",
                )
        assert held_received == 0
        assert spooled == 3
        assert bounces == 0
        assert attempts == [0, 0, 0]
        # "At once": long before the 60 s a held message sleeps between looks.
        assert released_in < 20

    run(scenario, within=60)


def test_paused_mail_fails_at_the_queue_lifetime_not_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with SmtpSink() as sink:
            relay = Relay(
                relay_settings(tmp_path / "spool", queue_lifetime=1.5),
                sink_document(sink.port, paused=True),
            )
            async with running(relay):
                await send(relay.port, ["late@dest.test"], message_id="late")
                await asyncio.sleep(0.5)
                early = metric(relay, "mailflow_bounces_total", action="failed")
                await until(
                    lambda: metric(relay, "mailflow_bounces_total", action="failed") == 1,
                    within=20,
                    what="the bounce at the lifetime",
                )
        assert early == 0
        # The bounce goes to the sender through the same (paused) connector: nothing left.
        assert sink.rcpt_log == []
        assert any(
            "queue lifetime exceeded; held by the paused limit of mail/dest" in r.getMessage()
            for r in caplog.records
        )

    run(scenario, within=40)
