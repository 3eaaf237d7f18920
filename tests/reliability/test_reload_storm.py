"""The routing document replaced again and again under traffic: every message is routed
by a document that was in force while it was in the relay.

Generation ``g`` routes every recipient to next hop ``g % HOPS`` (one raw-socket hop per
index, all on 127.0.0.1), so the hop that took a message says which generations could
have routed it: those ``g``, ``HOPS`` generations apart. The test records when each
generation came into force, and checks, for every delivered message, that one of its
candidate generations was in force at some moment between the start of its SMTP session
and its delivery. A stale router (a document kept past its time), a mix of two documents
or a lost message fails it. The fast run swaps 300 times; the soak run 1,000 times.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults import FaultyHop, connector, document, relay_settings, running, send, summary
from mailflow_relay.engine.relay import Relay
from mailflow_relay.routing.document import RoutingDocument
from support import run, until

HOPS = 60
SWAP_EVERY = 0.01
CLIENTS = 3


@dataclass
class Storm:
    sent: dict[str, float]
    """Message id -> when its session began (monotonic)."""
    in_force: list[tuple[float, int]]
    """(monotonic time, generation) for every document loaded, in order."""
    hops: list[FaultyHop]
    seconds: float


async def storm(tmp_path: Path, swaps: int) -> Storm:
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        hops = [await stack.enter_async_context(FaultyHop()) for _ in range(HOPS)]

        def routing(generation: int) -> RoutingDocument:
            return document(
                connector("dest", ["*"], hops[generation % HOPS].port, generation=generation),
                generation=generation,
            )

        first = routing(1)
        relay = Relay(relay_settings(tmp_path / "spool", workers=8), first)
        in_force = [(time.monotonic(), 1)]
        sent: dict[str, float] = {}
        done = asyncio.Event()

        async def client(number: int) -> None:
            for n in range(100_000):
                if done.is_set():
                    return
                message_id = f"c{number}-{n}"
                sent[message_id] = time.monotonic()
                await send(relay.port, ["x@dest.test"], message_id=message_id)

        async with running(relay):
            async with asyncio.TaskGroup() as tasks:
                for number in range(CLIENTS):
                    tasks.create_task(client(number), name=f"storm-client-{number}")
                for generation in range(2, swaps + 2):
                    await asyncio.sleep(SWAP_EVERY)
                    relay.load_document(routing(generation))
                    in_force.append((time.monotonic(), generation))
                done.set()
            await until(
                lambda: sum(sum(h.delivered.values()) for h in hops) >= len(sent),
                within=60,
                what="every message delivered",
            )
            await until(lambda: not list(relay.spool.directory.glob("*.msg")), what="spool empty")
        return Storm(sent, in_force, hops, time.monotonic() - started)


def check(result: Storm) -> tuple[int, int, list[str]]:
    """(delivered, duplicates, messages routed by no document in force at the time)."""
    times = [t for t, _ in result.in_force]
    generations = [g for _, g in result.in_force]
    delivered = duplicates = 0
    wrong: list[str] = []
    for message_id, began in result.sent.items():
        takers = [
            (index, at)
            for index, hop in enumerate(result.hops)
            for at in hop.taken_at.get(message_id, [])
        ]
        if not takers:
            continue
        delivered += 1
        duplicates += len(takers) - 1
        for index, at in takers:
            # The generations in force at some moment of [began, at]: the one in force at
            # `began`, and every one loaded after it up to `at`.
            first = max(0, bisect.bisect_right(times, began) - 1)
            last = bisect.bisect_right(times, at)
            if not any(g % HOPS == index for g in generations[first:last]):
                wrong.append(f"{message_id} via hop {index}")
    return delivered, duplicates, wrong


def assert_storm(result: Storm, label: str) -> None:
    delivered, duplicates, wrong = check(result)
    lost = len(result.sent) - delivered
    summary(
        label,
        messages=len(result.sent),
        generations=len(result.in_force),
        kills=0,
        duplicates=duplicates,
        misrouted=len(wrong),
        seconds=f"{result.seconds:.1f}",
        lost=lost,
    )
    assert len(result.sent) >= 50, "too little traffic to prove anything"
    assert wrong == []
    assert lost == 0
    assert duplicates == 0


def test_three_hundred_reloads_under_traffic_route_every_message_by_a_document_in_force(
    tmp_path: Path,
) -> None:
    assert_storm(run(lambda: storm(tmp_path, 300), within=120), "reload storm (300)")


@pytest.mark.soak
def test_a_thousand_reloads_under_traffic_route_every_message_by_a_document_in_force(
    tmp_path: Path,
) -> None:
    assert_storm(run(lambda: storm(tmp_path, 1000), within=240), "reload storm (1000)")


def test_the_check_catches_a_message_routed_by_a_stale_document() -> None:
    """The check itself can fail: a message taken by the hop of a generation that was
    not in force between its session and its delivery is reported."""
    hops = [FaultyHop() for _ in range(HOPS)]
    in_force = [(10.0 + g, g) for g in range(1, 10)]  # generation g from t = 10 + g
    hops[5 % HOPS].taken_at["fresh"] = [15.5]  # generation 5 was in force at 15.5: fine
    hops[2 % HOPS].taken_at["stale"] = [15.5]  # generation 2 ended at 13: stale
    result = Storm({"fresh": 15.2, "stale": 15.2}, in_force, hops, 0.0)
    assert check(result) == (2, 0, ["stale via hop 2"])
