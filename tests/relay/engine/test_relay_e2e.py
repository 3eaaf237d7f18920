"""The relay as users run it: `mailflow relay` in its own process, with independent peers.

Clients are Python's smtplib, Postfix's smtp-source and swaks; the destination is
Postfix's smtp-sink. Nothing here shares code with the relay but the command line.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mailflow_relay.queue.spool import Spool
from peers import SmtpSink, free_port, require, smtp_source, swaks
from relayproc import RelayProcess, connector

pytestmark = pytest.mark.slow


def send(
    port: int, sender: str, recipients: Sequence[str], body: str
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        return client.sendmail(sender, list(recipients), body)


def message(number: int) -> str:
    return f"From: a@sender.test\r\nTo: b@dest.test\r\nMessage-ID: <m{number}@sender.test>\r\nSubject: {number}\r\n\r\nbody {number}\r\n"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    require("smtp-sink")
    with SmtpSink() as running:
        yield running


def message_ids(sink: SmtpSink, count: int) -> list[str]:
    return [
        line.split(":", 1)[1].strip()
        for received in sink.wait_for(count, timeout=30)
        for line in received.text.splitlines()
        if line.lower().startswith("message-id:")
    ]


def test_relay_help_documents_every_option() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mailflow"), "relay", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in (
        "--manifests",
        "--listen",
        "--spool",
        "--accept-from",
        "--http",
        "--auth-secret",
        "--tls-cert",
        "--dns-server",
        "--default-route",
        "--retry-initial",
        "--spool-min-free",
    ):
        assert option in result.stdout


def test_smtp_source_through_the_relay_to_smtp_sink(tmp_path: Path, sink: SmtpSink) -> None:
    require("smtp-source")
    manifests = connector("all", '["*"]', sink.port)
    with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32") as relay:
        smtp_source(
            relay.port, count=40, size=2000, sessions=4, reuse=True, recipient="rcpt@dest.test"
        )
        received = sink.wait_for(40, timeout=30)
    assert len(received) == 40
    assert all(m.recipients == ["rcpt@dest.test"] for m in received)
    assert all("by relay.test" in m.text for m in received)


def test_swaks_with_starttls_through_the_relay(tmp_path: Path, sink: SmtpSink) -> None:
    require("swaks")
    manifests = connector("all", '["*"]', sink.port)
    with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32") as relay:
        swaks(relay.port, "--tls", "--to", "x@dest.test", "--header", "Subject: via swaks")
        (received,) = sink.wait_for(1)
    assert "Subject: via swaks" in received.text
    assert "with ESMTPS" in received.text


def test_sigkill_between_250_and_delivery_loses_no_acknowledged_message(tmp_path: Path) -> None:
    require("smtp-sink")
    port = free_port()  # nothing listens here until the relay has been killed
    manifests = connector("all", '["*"]', port)
    spool = tmp_path / "spool"
    acknowledged = []
    with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool) as relay:
        for number in range(25):
            refused = send(relay.port, "a@sender.test", ["b@dest.test"], message(number))
            assert refused == {}
            acknowledged.append(f"<m{number}@sender.test>")
        relay.kill()
    assert len(Spool(spool).scan(repair=False)) == 25

    with (
        SmtpSink(port=port) as destination,
        RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool),
    ):
        arrived = message_ids(destination, 25)
        time.sleep(0.5)  # anything delivered twice would show up now
        arrived = message_ids(destination, len(destination.messages()))
    assert sorted(arrived) == sorted(acknowledged)
    assert list(spool.glob("*.msg")) == []


def test_a_client_outside_the_allow_list_cannot_relay(tmp_path: Path, sink: SmtpSink) -> None:
    manifests = connector("all", '["*"]', sink.port)
    with RelayProcess(tmp_path, manifests, "--accept-from", "192.0.2.0/24") as relay:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(relay.port, "a@sender.test", ["b@dest.test"], message(1))
        (code, text) = refused.value.recipients["b@dest.test"]
        assert code == 550
        assert b"5.7.1" in text
        time.sleep(0.5)
    assert sink.received() == 0


def test_the_reject_default_route_refuses_unrouted_recipients_at_rcpt(
    tmp_path: Path, sink: SmtpSink
) -> None:
    manifests = connector("contoso", '["contoso.test"]', sink.port)
    with RelayProcess(
        tmp_path, manifests, "--accept-from", "127.0.0.1/32", "--default-route", "Reject"
    ) as relay:
        refused = send(
            relay.port, "a@sender.test", ["ok@contoso.test", "no@elsewhere.test"], message(1)
        )
        assert refused["no@elsewhere.test"][0] == 550
        (received,) = sink.wait_for(1)
    assert received.recipients == ["ok@contoso.test"]


def test_a_message_with_recipients_on_two_routes_is_split(tmp_path: Path) -> None:
    require("smtp-sink")
    with SmtpSink() as contoso, SmtpSink() as fabrikam:
        manifests = connector("contoso", '["contoso.test"]', contoso.port) + connector(
            "fabrikam", '["fabrikam.test", "*.fabrikam.test"]', fabrikam.port
        )
        with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32") as relay:
            send(
                relay.port,
                "a@sender.test",
                ["a@contoso.test", "b@fabrikam.test", "c@eu.fabrikam.test"],
                message(1),
            )
            (to_contoso,) = contoso.wait_for(1)
            (to_fabrikam,) = fabrikam.wait_for(1)
    assert to_contoso.recipients == ["a@contoso.test"]
    assert sorted(to_fabrikam.recipients) == ["b@fabrikam.test", "c@eu.fabrikam.test"]


@pytest.mark.parametrize(
    "payload",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"],
    ids=["lf-dot-lf", "lf-dot-crlf", "crlf-dot-lf", "cr-dot-crlf"],
)
def test_smuggled_messages_never_reach_the_destination(
    tmp_path: Path, sink: SmtpSink, payload: bytes
) -> None:
    manifests = connector("all", '["*"]', sink.port)
    with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32") as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
            stream = raw.makefile("rwb")

            def command(line: bytes) -> bytes:
                stream.write(line)
                stream.flush()
                reply = stream.readline()
                while reply[3:4] == b"-":
                    reply = stream.readline()
                return reply

            assert stream.readline().startswith(b"220")
            assert command(b"EHLO client.test\r\n").startswith(b"250")
            assert command(b"MAIL FROM:<a@sender.test>\r\n").startswith(b"250")
            assert command(b"RCPT TO:<b@dest.test>\r\n").startswith(b"250")
            assert command(b"DATA\r\n").startswith(b"354")
            smuggled = (
                b"Subject: outer\r\n\r\nouter"
                + payload
                + b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
            )
            reply = command(smuggled)
            assert reply.startswith(b"5"), reply
            # Whatever the client sends next, no second message appears at the destination.
            stream.write(b"QUIT\r\n")
            stream.flush()
        time.sleep(1.0)
    received = sink.messages()
    assert all(
        "smuggled" not in m.text and "victim@dest.test" not in m.recipients for m in received
    )
    assert received == []


def test_sigterm_stops_the_relay_cleanly(tmp_path: Path, sink: SmtpSink) -> None:
    manifests = connector("all", '["*"]', sink.port)
    with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32") as relay:
        send(relay.port, "a@sender.test", ["b@dest.test"], message(1))
        sink.wait_for(1)
        assert relay.stop() == 0


def test_the_relay_refuses_to_start_on_a_broken_listen_option(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(connector("all", '["*"]', 25))
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "mailflow"),
            "relay",
            "--manifests",
            str(tmp_path / "m.yaml"),
            "--listen",
            "nowhere",
            "--spool",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--listen 'nowhere': expected HOST:PORT" in result.stderr
