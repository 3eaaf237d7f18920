"""The relay's event loop: uvloop by default, asyncio's own with ``--event-loop asyncio``.

Real processes and sockets on 127.0.0.1; the next hop is Postfix's smtp-sink, which
announces PIPELINING (the pipelined transaction writes through the transport itself).
"""

from __future__ import annotations

import asyncio
import re
import smtplib
from pathlib import Path

import pytest

from mailflow_relay.hosting.loops import EventLoop, loop_name, run
from mailflow_relay.transports import write_transport
from peers import SmtpSink, require
from relayproc import RelayProcess, connector
from support import eventually


@pytest.mark.parametrize(
    ("option", "shown"),
    [
        ((), "uvloop"),
        (("--event-loop", "asyncio"), "asyncio"),
        (("--event-loop", "uvloop"), "uvloop"),
    ],
)
def test_the_relay_delivers_on_the_loop_it_names(
    tmp_path: Path, option: tuple[str, ...], shown: str
) -> None:
    require("smtp-sink")
    with SmtpSink() as sink:
        manifests = connector("all", '["*"]', sink.port)
        with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", *option) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                for number in range(3):  # the second and third reuse the outbound connection
                    client.sendmail(
                        "a@sender.test", ["b@dest.test"], f"Subject: {number}\r\n\r\nx\r\n"
                    )
            received = sink.wait_for(3, timeout=30)
            assert len(received) == 3
            eventually(lambda: f"event loop {shown}" in relay.output(), what="the start-up line")
            assert "Traceback" not in relay.output()
        log = relay.output()
    # Each session's lines carry its own id, its closing line too (uvloop runs protocol
    # callbacks in the loop's own context: an id bound there would label later lines).
    opened = re.findall(r"\[session (\w+)\]: Connection from 127\.0\.0\.1 \(relaying", log)
    closed = re.findall(r"\[session (\w+)\]: Connection from 127\.0\.0\.1 closed", log)
    assert len(opened) >= 2  # the readiness probe's connection and the client's
    assert sorted(opened) == sorted(closed)
    assert len(set(opened)) == len(opened)
    assert not re.search(r"\[session \w+\]: (relay stopped|stopping)", log)


def _transport_seen(loop_kind: EventLoop) -> tuple[str, bool, bool]:
    async def main() -> tuple[str, bool, bool]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        transport = writer.transport
        found = write_transport(transport) is transport
        writer.close()
        server.close()
        await server.wait_closed()
        return loop_name(), found, write_transport(object()) is None

    return run(main(), loop_kind)


@pytest.mark.parametrize("loop_kind", list(EventLoop))
def test_transports_of_either_loop_are_recognised(loop_kind: EventLoop) -> None:
    # uvloop's transports do not derive from asyncio's classes: an isinstance check would
    # skip the 421 before a close, the abort at shutdown and the one after QUIT.
    name, found, other_refused = _transport_seen(loop_kind)
    assert name == loop_kind.value
    assert found
    assert other_refused
