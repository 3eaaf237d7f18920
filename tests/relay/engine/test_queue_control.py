"""`mailflow queue hold|release|bounce` against a running relay and real SMTP peers.

Held mail is neither delivered nor bounced (not even past its queue lifetime) until it is
released; a bounce fails the recipient without another attempt and the sender gets an
RFC 3464 report, through the relay's own failure path.
"""

from __future__ import annotations

import email
import email.message
import json
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import SmtpSink, free_port, require
from relayproc import RelayProcess, connector
from support import eventually

pytestmark = pytest.mark.slow

MAILFLOW = str(Path(sys.executable).parent / "mailflow")


def queue(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILFLOW, "queue", *args], capture_output=True, text=True, timeout=30, check=False
    )


def listed(spool: Path) -> dict[str, dict[str, object]]:
    """Recipient address -> its state, as `mailflow queue list -o json` shows it."""
    messages = json.loads(queue("list", "--spool", str(spool), "-o", "json").stdout)
    return {r["address"]: r | {"queueId": m["queueId"]} for m in messages for r in m["recipients"]}


@pytest.fixture
def senders() -> Iterator[SmtpSink]:
    """Where mail to the senders' domain goes: the bounce reports."""
    require("smtp-sink")
    with SmtpSink() as running:
        yield running


def send(relay: RelayProcess, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("alice@sender.test", [recipient], f"Subject: {recipient}\r\n\r\nx\r\n")


def report_of(message_text: str) -> dict[str, str]:
    """The per-recipient fields of an RFC 3464 report (message/delivery-status)."""
    parsed = email.message_from_string(message_text)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    (status,) = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    assert len(blocks) == 2  # per-message, then one recipient
    recipient = blocks[1]
    assert isinstance(recipient, email.message.Message)
    return {k: str(v) for k, v in recipient.items()}


def test_held_mail_waits_past_its_lifetime_until_released_and_a_bounce_reports_it(
    tmp_path: Path, senders: SmtpSink
) -> None:
    destination_port = free_port()  # down while the mail is put on hold
    spool = tmp_path / "spool"
    manifests = connector("dest", '["dest.test"]', destination_port) + connector(
        "senders", '["sender.test"]', senders.port
    )
    with RelayProcess(
        tmp_path,
        manifests,
        "--accept-from",
        "127.0.0.1/32",
        "--retry-initial",
        "3600",
        "--queue-lifetime",
        "3",
        spool=spool,
    ) as relay:
        send(relay, "kept@dest.test")
        send(relay, "returned@dest.test")
        eventually(
            lambda: (
                {r["status"] for r in listed(spool).values()} == {"deferred"}
                and len(listed(spool)) == 2
            )
        )
        held = queue("hold", "--domain", "dest.test", "--spool", str(spool))
        assert held.returncode == 0, held.stderr
        assert held.stdout.splitlines()[-1] == "2 recipient(s) held"
        with SmtpSink(port=destination_port) as destination:
            # Due now, the destination is up, and the lifetime (3 s) runs out meanwhile:
            # held, nothing happens to them.
            assert queue("retry", "--spool", str(spool)).returncode == 0
            time.sleep(5)
            assert destination.messages() == []
            assert senders.messages() == []
            states = listed(spool)
            assert {a: s["held"] for a, s in states.items()} == {
                "kept@dest.test": True,
                "returned@dest.test": True,
            }
            assert "<kept@dest.test> deferred [held]" in queue("list", "--spool", str(spool)).stdout

            released = queue(
                "release", str(states["kept@dest.test"]["queueId"]), "--spool", str(spool)
            )
            assert released.returncode == 0, released.stderr
            (arrived,) = destination.wait_for(1)
            assert arrived.recipients == ["kept@dest.test"]

            bounced = queue(
                "bounce", str(states["returned@dest.test"]["queueId"]), "--spool", str(spool)
            )
            assert bounced.returncode == 0, bounced.stderr
            (report,) = senders.wait_for(1)
            eventually(lambda: listed(spool) == {})
            # Neither was delivered twice, and the bounced one never went to the destination.
            assert [m.recipients for m in destination.messages()] == [["kept@dest.test"]]
    assert report.mail_from == ""
    assert report.recipients == ["alice@sender.test"]
    fields = report_of(report.text)
    assert fields["Final-Recipient"] == "rfc822; returned@dest.test"
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.0.0"
    assert "returned to the sender by an administrator" in fields["Diagnostic-Code"]
    assert "Subject: returned@dest.test" in report.text  # the original headers


def test_a_draining_relay_keeps_held_mail_and_hands_off_the_rest(tmp_path: Path) -> None:
    require("smtp-sink")
    spool = tmp_path / "spool"
    with SmtpSink() as peer:  # stands in for the peer relay: it takes what is handed off
        leaving = RelayProcess(
            tmp_path,
            connector("all", '["*"]', free_port()),  # the destination is down
            "--accept-from",
            "127.0.0.1/32",
            "--retry-initial",
            "3600",
            "--drain-grace",
            "1",
            "--handoff",
            f"127.0.0.1:{peer.port}",
            spool=spool,
        )
        with leaving:
            send(leaving, "held@dest.test")
            send(leaving, "moving@dest.test")
            eventually(
                lambda: (
                    len(listed(spool)) == 2
                    and {r["status"] for r in listed(spool).values()} == {"deferred"}
                )
            )
            assert queue("hold", "--domain", "dest.test", "--spool", str(spool)).returncode == 0
            # Released again before the stop: that one goes to the peer, the other stays.
            queue(
                "release", str(listed(spool)["moving@dest.test"]["queueId"]), "--spool", str(spool)
            )
            assert leaving.stop() == 0
        (handed,) = peer.wait_for(1)
        assert handed.recipients == ["moving@dest.test"]
        time.sleep(0.5)
        assert len(peer.messages()) == 1
    states = listed(spool)
    assert list(states) == ["held@dest.test"]
    assert states["held@dest.test"]["held"] is True
