"""Pause and unpause as an administrator does it: `mailflow relay --manifests` in its own
process, `spec.paused` in the manifest, a reload, and Postfix's smtp-sink as the next hop."""

from __future__ import annotations

import smtplib
import urllib.request
from pathlib import Path

import pytest

from mailflow_relay.queue.spool import Spool
from peers import SmtpSink, free_port, require
from relayproc import RelayProcess, connector
from support import eventually

pytestmark = pytest.mark.slow

PAUSED = 'mailflow_throttled_waiting{connector="mail/all",scope="paused"}'


def metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_paused_connector_holds_mail_until_the_manifest_unpauses_it(tmp_path: Path) -> None:
    require("smtp-sink")
    http = free_port()
    with SmtpSink() as sink:
        running = connector("all", '["*"]', sink.port)
        paused = running.replace(
            "  tls: {mode: Opportunistic}\n", "  tls: {mode: Opportunistic}\n  paused: true\n"
        )
        assert paused != running
        with RelayProcess(
            tmp_path,
            paused,
            "--accept-from",
            "127.0.0.1/32",
            "--http",
            f"127.0.0.1:{http}",
            "--reload-interval",
            "0.2",
        ) as relay:
            for number in range(2):
                with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                    client.sendmail(
                        "a@sender.test", [f"r{number}@dest.test"], f"Subject: {number}\r\n\r\nx\r\n"
                    )
            eventually(lambda: metric(http, PAUSED) == 2.0)
            assert sink.received() == 0
            assert metric(http, "mailflow_recipients_deferred_total{") == 0.0
            assert metric(http, 'mailflow_bounces_total{action="failed"}') == 0.0
            # Read only, beside the running relay (as `mailflow queue list` reads).
            assert len(Spool(relay.spool).scan(repair=False)) == 2

            (tmp_path / "manifests.yaml").write_text(running)
            eventually(lambda: metric(http, "mailflow_config_generation") == 2.0)
            # Released at once, not at the next minute's look.
            sink.wait_for(2, timeout=15)
            eventually(lambda: metric(http, PAUSED) == 0.0)
        assert "held connector=mail/all limit=paused" in relay.output()
