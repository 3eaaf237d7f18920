"""The queue gauges on a real relay's /metrics: what waits where, and why it was deferred."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mailflow_relay.engine.queue_gauges import REASON_CLASSES, destination_label, reason_class
from mailflow_relay.routing.document import (
    ObjectRef,
    ProfilePool,
    RecipientMx,
    ServerAddress,
    SmartHost,
)
from peers import free_port
from relayproc import RelayProcess, connector
from support import eventually

MAILFLOW = str(Path(sys.executable).parent / "mailflow")


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("4.4.1 cannot connect: [Errno 111] Connection refused", "connection"),
        ("4.4.2 connection lost: reset", "connection"),
        ("4.4.3 DNS lookup of example.test failed", "dns"),
        ("4.4.4 no server to deliver to (the profile has no servers)", "dns"),
        ("4.7.5 TLS required", "tls"),
        ("4.7.8 authentication failed: 535", "security"),
        ("4.3.5 connector not ready: Secret mail/x missing", "connector_not_ready"),
        ("4.3.0 internal error: RuntimeError", "internal"),
        ("4.5.0 protocol error: the reply to DATA was '250'", "protocol"),
        ("4.2.2 mailbox full", "mailbox"),
        ("451 try again later", "remote_reply"),
        ("greylisted, come back in 5 minutes", "remote_reply"),
    ],
)
def test_deferral_reasons_fall_into_a_closed_set_of_classes(reason: str, expected: str) -> None:
    assert reason_class(reason) == expected
    assert expected in REASON_CLASSES


def test_a_destination_label_does_not_change_with_the_pool() -> None:
    profile = ObjectRef("mail", "pool")
    one = ProfilePool(profile, (ServerAddress("a.test", 25),))
    two = ProfilePool(profile, (ServerAddress("a.test", 25), ServerAddress("b.test", 587)))
    assert destination_label(one) == destination_label(two) == "profile:mail/pool"
    assert destination_label(SmartHost("relay.test", 2525)) == "relay.test:2525"
    assert destination_label(SmartHost("corp.test", mx=True)) == "mx:corp.test"
    assert destination_label(RecipientMx()) == "recipient-mx"


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("mailflow_queue_", "mailflow_deferrals_total"))
    }


def scrape_when(port: int, series: str, value: float) -> dict[str, float]:
    """The scrape once ``series`` has ``value`` (raises until then, for eventually())."""
    metrics = scrape(port)
    assert metrics.get(series) == value, metrics
    return metrics


@pytest.mark.slow
def test_the_gauges_follow_deferred_and_held_mail(tmp_path: Path) -> None:
    http = free_port()
    down = free_port()
    spool = tmp_path / "spool"
    with RelayProcess(
        tmp_path,
        connector("down", '["down.test"]', down),
        "--accept-from",
        "127.0.0.1/32",
        "--http",
        f"127.0.0.1:{http}",
        "--retry-initial",
        "3600",
        spool=spool,
    ) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail(
                "a@sender.test", ["x@down.test", "y@down.test"], "Subject: 1\r\n\r\nx\r\n"
            )
        route = f'{{connector="mail/down",destination="127.0.0.1:{down}"}}'
        metrics = eventually(lambda: scrape_when(http, f"mailflow_queue_depth{route}", 2))
        assert metrics['mailflow_deferrals_total{reason_class="connection"}'] == 2
        assert metrics[f"mailflow_queue_oldest_age_seconds{route}"] >= 0
        assert metrics["mailflow_queue_held"] == 0
        held = subprocess.run(
            [MAILFLOW, "queue", "hold", "--all", "--spool", str(spool)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert held.stdout.splitlines()[-1] == "2 recipient(s) held"
        metrics = eventually(lambda: scrape_when(http, "mailflow_queue_held", 2))
        # Nothing waits on that route any more: the series is gone, not stuck at 2.
        assert f"mailflow_queue_depth{route}" not in metrics
