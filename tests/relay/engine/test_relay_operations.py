"""Operating a relay: HTTP endpoints, live reload, JSON logs, the queue command, drain.

Everything through the command line, as an administrator would: `mailflow relay` in its
own process, `mailflow queue` on its spool, SIGTERM to drain.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import SmtpSink, free_port, require
from relayproc import RelayProcess, connector
from support import eventually

pytestmark = pytest.mark.slow

MAILFLOW = str(Path(sys.executable).parent / "mailflow")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    require("smtp-sink")
    with SmtpSink() as running:
        yield running


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(port: int, line_start: str) -> float:
    _, text = http_get(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def queue(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILFLOW, "queue", *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_health_readiness_and_metrics_are_served(tmp_path: Path, sink: SmtpSink) -> None:
    http = free_port()
    with RelayProcess(
        tmp_path,
        connector("all", '["*"]', sink.port),
        "--accept-from",
        "127.0.0.1/32",
        "--http",
        f"127.0.0.1:{http}",
    ) as relay:
        eventually(lambda: http_get(http, "/readyz")[0] == 200)
        assert http_get(http, "/healthz") == (200, "ok\n")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["b@dest.test"], "Subject: m\r\n\r\nx\r\n")
        sink.wait_for(1)
        eventually(lambda: metric(http, "mailflow_recipients_delivered_total{") == 1.0)
        assert metric(http, "mailflow_messages_accepted_total") == 1.0
        assert metric(http, "mailflow_config_generation") == 1.0
        assert http_get(http, "/nothing")[0] == 404


def test_a_manifest_change_applies_without_restart_and_without_dropping_a_session(
    tmp_path: Path,
) -> None:
    require("smtp-sink")
    http = free_port()
    with SmtpSink() as old, SmtpSink() as new:
        manifests = connector("all", '["*"]', old.port)
        with RelayProcess(
            tmp_path,
            manifests,
            "--accept-from",
            "127.0.0.1/32",
            "--http",
            f"127.0.0.1:{http}",
            "--reload-interval",
            "0.2",
        ) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.sendmail("a@sender.test", ["b@dest.test"], "Subject: before\r\n\r\nx\r\n")
                old.wait_for(1)
                (tmp_path / "manifests.yaml").write_text(connector("all", '["*"]', new.port))
                eventually(lambda: metric(http, "mailflow_config_generation") == 2.0)
                # The session that was open across the reload goes on, on the new route.
                client.sendmail("a@sender.test", ["b@dest.test"], "Subject: after\r\n\r\nx\r\n")
                (after,) = new.wait_for(1)
            assert "Subject: after" in after.text
            assert len(old.messages()) == 1


def test_a_broken_manifest_is_refused_and_the_old_routes_stay(
    tmp_path: Path, sink: SmtpSink
) -> None:
    http = free_port()
    with RelayProcess(
        tmp_path,
        connector("all", '["*"]', sink.port),
        "--accept-from",
        "127.0.0.1/32",
        "--http",
        f"127.0.0.1:{http}",
        "--reload-interval",
        "0.2",
    ) as relay:
        (tmp_path / "manifests.yaml").write_text(
            "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\n  broken: [\n"
        )
        eventually(lambda: metric(http, 'mailflow_config_reloads_total{result="refused"}') == 1.0)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["b@dest.test"], "Subject: still\r\n\r\nx\r\n")
        sink.wait_for(1)
        assert metric(http, "mailflow_config_generation") == 1.0
        assert "routing document refused" in relay.output()


def test_json_logs_follow_one_message_by_its_queue_id(tmp_path: Path, sink: SmtpSink) -> None:
    with RelayProcess(
        tmp_path,
        connector("all", '["*"]', sink.port),
        "--accept-from",
        "127.0.0.1/32",
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
    ) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo()
            client.mail("a@sender.test")
            client.rcpt("b@dest.test")
            code, reply = client.data(b"Subject: traced\r\n\r\nx\r\n")
        assert code == 250
        queue_id = reply.decode().rsplit(" ", 1)[1]
        sink.wait_for(1)
        eventually(lambda: "removed from the spool" in relay.output())
    # Start, delivery and drain: stdout and stderr (one file here) hold JSON lines only,
    # as jq reads them; the start-up line too.
    log = relay.output()
    parsed = subprocess.run(
        ["jq", "-c", "."], input=log, capture_output=True, text=True, timeout=30, check=False
    )
    assert parsed.returncode == 0, parsed.stderr
    lines = log.splitlines()
    assert len(parsed.stdout.splitlines()) == len(lines)
    entries = [json.loads(line) for line in lines]
    assert any(e["message"].startswith("mailflow relay: listening on") for e in entries)
    assert any(e["message"].startswith("stopping: draining") for e in entries)

    traced = [e for e in entries if e.get("queue_id") == queue_id]
    (queued,) = [e for e in traced if e["message"].startswith(f"queued {queue_id} from=<a@")]
    assert traced[-1]["message"] == f"queue {queue_id}: done, removed from the spool"
    # One INFO line per message: the delivery line, with its values as fields.
    (delivery,) = [e for e in traced if e["level"] == "info"]
    assert delivery["recipient"] == "b@dest.test"
    assert delivery["connector"] == "mail/all"
    assert delivery["server"] == f"127.0.0.1:{sink.port}"
    assert delivery["status"] == "delivered"
    assert delivery["reply_code"] == 250
    assert isinstance(delivery["verified"], bool)
    assert "tls_version" in delivery
    assert delivery["reply"]
    # The session id ties the connection's lines to the message it handed over.
    session = queued["session_id"]
    connection = [e for e in entries if e.get("session_id") == session]
    assert any(e["message"].startswith("Connection from 127.0.0.1") for e in connection)
    assert any(e["message"].startswith("Connection from 127.0.0.1 closed") for e in connection)
    assert delivery.get("session_id") is None  # delivered by a worker, not the session
    accepted = [e for e in traced if e["message"].startswith(f"Accepted message {queue_id}")]
    assert [e["session_id"] for e in accepted] == [session]


def test_the_queue_command_lists_shows_deletes_and_retries(tmp_path: Path) -> None:
    require("smtp-sink")
    port = free_port()  # down for now
    spool = tmp_path / "spool"
    manifests = connector("all", '["*"]', port)
    with RelayProcess(
        tmp_path, manifests, "--accept-from", "127.0.0.1/32", "--retry-initial", "3600", spool=spool
    ) as relay:
        for name in ("keep", "drop"):
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.sendmail(
                    "a@sender.test", [f"{name}@dest.test"], f"Subject: {name}\r\n\r\nx\r\n"
                )
        eventually(
            lambda: (
                len(json.loads(queue("list", "--spool", str(spool), "-o", "json").stdout)) == 2
                and all(
                    m["recipients"][0]["status"] == "deferred"
                    for m in json.loads(queue("list", "--spool", str(spool), "-o", "json").stdout)
                )
            )
        )
        listed = json.loads(queue("list", "--spool", str(spool), "-o", "json").stdout)
        by_recipient = {m["recipients"][0]["address"]: m for m in listed}
        assert by_recipient["keep@dest.test"]["recipients"][0]["lastReply"].startswith(
            "4.4.1 cannot connect"
        )

        shown = queue("show", by_recipient["keep@dest.test"]["queueId"], "--spool", str(spool))
        assert shown.returncode == 0
        assert "Subject: keep" in shown.stdout
        assert "Received: from client" in shown.stdout or "Received:" in shown.stdout

        deleted = queue("delete", by_recipient["drop@dest.test"]["queueId"], "--spool", str(spool))
        assert deleted.stdout.strip().endswith("deleted")
        text = queue("list", "--spool", str(spool)).stdout
        assert "keep@dest.test" in text
        assert "drop@dest.test" not in text

        with SmtpSink(port=port) as destination:
            assert (
                queue("retry", "--spool", str(spool)).stdout
                == "1 deferred recipient(s) made due now\n"
            )
            (arrived,) = destination.wait_for(1)
            assert arrived.recipients == ["keep@dest.test"]
            eventually(
                lambda: queue("list", "--spool", str(spool)).stdout == "the queue is empty\n"
            )


def test_queue_errors_name_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    missing = queue("show", "0123456789abcd-0123456789abcdef", "--spool", str(tmp_path / "spool"))
    assert missing.returncode == 2
    assert "0123456789abcd-0123456789abcdef" in missing.stderr
    escape = queue("show", "../../etc/passwd", "--spool", str(tmp_path / "spool"))
    assert escape.returncode == 2
    assert "not a queue id" in escape.stderr or "queue id" in escape.stderr
    nowhere = queue("list", "--spool", str(tmp_path / "nowhere"))
    assert nowhere.returncode == 2
    assert "no such folder" in nowhere.stderr


def test_sigterm_hands_the_queue_to_a_peer_and_every_message_arrives_once(
    tmp_path: Path, sink: SmtpSink
) -> None:
    (tmp_path / "peer").mkdir()
    (tmp_path / "leaving").mkdir()
    with RelayProcess(
        tmp_path / "peer", connector("all", '["*"]', sink.port), "--accept-from", "127.0.0.1/32"
    ) as peer:
        dead = free_port()
        leaving = RelayProcess(
            tmp_path / "leaving",
            connector("all", '["*"]', dead),
            "--accept-from",
            "127.0.0.1/32",
            "--retry-initial",
            "3600",
            "--drain-grace",
            "1",
            "--handoff",
            f"127.0.0.1:{peer.port}",
        )
        with leaving:
            for number in range(6):
                with smtplib.SMTP("127.0.0.1", leaving.port, timeout=10) as client:
                    client.sendmail(
                        "a@sender.test",
                        ["b@dest.test"],
                        f"Message-ID: <h{number}@sender.test>\r\nSubject: {number}\r\n\r\nx\r\n",
                    )
            assert leaving.stop() == 0
        received = sink.wait_for(6)
        time.sleep(0.5)
        received = sink.messages()
    ids = sorted(
        line.split(":", 1)[1].strip()
        for m in received
        for line in m.text.splitlines()
        if line.lower().startswith("message-id:")
    )
    assert ids == sorted(f"<h{n}@sender.test>" for n in range(6))
    assert list((tmp_path / "leaving" / "spool").glob("*.msg")) == []
    assert "handed off to 127.0.0.1" in leaving.output()
