"""Fail closed at start and at reload: `mailflow relay --manifests` as a user runs it.

A connector that is left out of the routing document sends its mail down a less specific
route (issue 11, points 1 and 2): with a catch-all compliance connector, straight to the
recipients' MX. So a start with an invalid or conflicting object refuses, like a reload,
unless the user opts in to leaving it out; and a reload that brings a conflict is refused.
"""

from __future__ import annotations

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

# The README's compliance connector with a one-letter typo: certificatename.
TYPO = """
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {name: all-via-compliance, namespace: mail}
spec:
  recipientDomains: ["*"]
  destination:
    smartHost: {host: 127.0.0.1, port: 9}
  tls:
    mode: NameMatch
    certificatename: "*.contoso.com"
---
"""


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    require("smtp-sink")
    with SmtpSink() as running:
        yield running


def start(folder: Path, manifests: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`mailflow relay` that is expected to refuse: it must exit, not listen."""
    (folder / "manifests.yaml").write_text(manifests)
    return subprocess.run(
        [
            MAILFLOW,
            "relay",
            "--manifests",
            str(folder / "manifests.yaml"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--spool",
            str(folder / "spool"),
            "--accept-from",
            "127.0.0.1/32",
            "--hostname",
            "relay.test",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

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


def test_the_readme_typo_refuses_to_start_and_names_the_object_and_field(
    tmp_path: Path,
) -> None:
    result = start(tmp_path, TYPO + connector("partner", '["fabrikam.example"]', 9))
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("mailflow: error: --manifests: ")
    assert "OutboundConnector/mail/all-via-compliance" in last
    assert "--skip-invalid-objects" in last
    # Every problem on its own line, with the field as the user wrote it.
    assert "error: " in result.stderr
    assert (
        "OutboundConnector/mail/all-via-compliance: spec.tls.certificatename: Unknown field"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stderr


def test_a_conflict_at_start_refuses_to_start(tmp_path: Path) -> None:
    result = start(tmp_path, connector("all", '["*"]', 9) + connector("aa-new", '["*"]', 9))
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert "Conflicted" in last
    assert "OutboundConnector/mail/" in last


def test_skip_invalid_objects_starts_without_them_and_says_so_loudly(
    tmp_path: Path, sink: SmtpSink
) -> None:
    http = free_port()
    with RelayProcess(
        tmp_path,
        TYPO + connector("partner", '["fabrikam.example"]', sink.port),
        "--accept-from",
        "127.0.0.1/32",
        "--http",
        f"127.0.0.1:{http}",
        "--skip-invalid-objects",
    ) as relay:
        eventually(lambda: http_get(http, "/readyz")[0] == 200)
        _status, body = http_get(http, "/readyz")
        assert body.startswith("ready\n")
        assert "left out: " in body
        assert "OutboundConnector/mail/all-via-compliance" in body
        # One object, one problem: the typo (no cascaded "Required value" for the field it meant).
        assert metric(http, "mailflow_config_objects_left_out") == 1.0
        assert "WARNING: left out (--skip-invalid-objects)" in relay.output()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["b@fabrikam.example"], "Subject: m\r\n\r\nx\r\n")
        sink.wait_for(1)


def test_a_reload_that_introduces_a_conflict_is_refused_and_the_routes_stay(
    tmp_path: Path,
) -> None:
    require("smtp-sink")
    http = free_port()
    with SmtpSink() as compliance, SmtpSink() as newcomer:
        with RelayProcess(
            tmp_path,
            connector("all-via-compliance", '["*"]', compliance.port),
            "--accept-from",
            "127.0.0.1/32",
            "--http",
            f"127.0.0.1:{http}",
            "--reload-interval",
            "0.2",
        ) as relay:
            eventually(lambda: http_get(http, "/readyz")[0] == 200)
            # A catch-all named to sort first: by name it would take every recipient.
            (tmp_path / "manifests.yaml").write_text(
                connector("all-via-compliance", '["*"]', compliance.port)
                + connector("aa-direct", '["*"]', newcomer.port)
            )
            eventually(
                lambda: metric(http, 'mailflow_config_refusals_total{cause="conflict"}') == 1
            )
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.sendmail("a@sender.test", ["b@dest.test"], "Subject: m\r\n\r\nx\r\n")
            compliance.wait_for(1)
            assert metric(http, "mailflow_config_generation") == 1.0
            assert metric(http, 'mailflow_config_reloads_total{result="loaded"}') == 0.0
            assert "introduce a conflict" in relay.output()
            assert "mail/aa-direct" in relay.output()
        assert newcomer.messages() == []


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0"])
def test_an_open_relay_is_refused_without_the_explicit_switch(tmp_path: Path, network: str) -> None:
    result = start(tmp_path, connector("all", '["*"]', 9), "--accept-from", network)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"mailflow: error: --accept-from: {network} lets anyone")
    assert "--allow-open-relay" in line


def test_an_open_relay_asked_for_explicitly_warns_and_shows_in_a_metric(tmp_path: Path) -> None:
    http = free_port()
    with RelayProcess(
        tmp_path,
        connector("all", '["*"]', 9),
        "--accept-from",
        "0.0.0.0/0",
        "--allow-open-relay",
        "--http",
        f"127.0.0.1:{http}",
    ) as relay:
        eventually(lambda: http_get(http, "/readyz")[0] == 200)
        assert metric(http, "mailflow_open_relay") == 1.0
        assert "WARNING" in relay.output()
        assert "OPEN RELAY" in relay.output()


def test_a_relay_with_named_networks_is_not_an_open_relay(tmp_path: Path) -> None:
    http = free_port()
    with RelayProcess(
        tmp_path,
        connector("all", '["*"]', 9),
        "--accept-from",
        "127.0.0.1/32",
        "--http",
        f"127.0.0.1:{http}",
    ) as relay:
        eventually(lambda: http_get(http, "/readyz")[0] == 200)
        assert "mailflow_open_relay 0.0" in http_get(http, "/metrics")[1]
        assert "OPEN RELAY" not in relay.output()


def test_a_second_relay_on_the_same_spool_refuses_to_start_naming_the_first(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    first_folder = tmp_path / "first"
    first_folder.mkdir()
    with RelayProcess(
        first_folder, connector("all", '["*"]', 9), "--accept-from", "127.0.0.1/32", spool=spool
    ) as first:
        assert first.process is not None
        second = tmp_path / "second"
        second.mkdir()
        result = start(second, connector("all", '["*"]', 9), "--spool", str(spool))
        assert result.returncode == 2, result.stderr
        (line,) = [s for s in result.stderr.splitlines() if s.startswith("mailflow:")]
        assert f"is in use by the relay with PID {first.process.pid}" in line
        assert line.startswith(f"mailflow: error: --spool {spool}: ")
        assert "Traceback" not in result.stderr
        # The queue commands still work beside the running relay.
        listed = subprocess.run(
            [MAILFLOW, "queue", "list", "--spool", str(spool)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
    # The first relay stopped, its lock went with it: the spool is free again.
    with RelayProcess(
        second, connector("all", '["*"]', 9), "--accept-from", "127.0.0.1/32", spool=spool
    ) as again:
        assert "foreign file" not in again.output()


def test_a_connector_pointing_back_at_the_relay_stops_at_the_hop_limit_and_bounces_5_4_6(
    tmp_path: Path, sink: SmtpSink
) -> None:
    relay = RelayProcess(
        tmp_path,
        "",
        "--accept-from",
        "127.0.0.1/32",
        "--http",
        f"127.0.0.1:{(http := free_port())}",
        # No idle connections to itself: they would hold the drain for its whole grace.
        "--idle-connections",
        "0",
    )
    # Recipients at loop.test go back into the relay itself; bounces to origin.test reach
    # the sink.
    (tmp_path / "manifests.yaml").write_text(
        connector("back-to-me", '["loop.test"]', relay.port)
        + connector("origin", '["origin.test"]', sink.port)
    )
    with relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("alice@origin.test", ["bob@loop.test"], "Subject: m\r\n\r\nx\r\n")
        (dsn,) = sink.wait_for(1, timeout=60)
        assert "Status: 5.4.6" in dsn.text
        eventually(lambda: metric(http, 'mailflow_messages_refused_total{reason="mail_loop"}') == 1)
        accepted = metric(http, "mailflow_messages_accepted_total")
        # The client's copy and 49 loops (50 Received: headers), then the refusal; nothing
        # keeps going round (before: about 2,000 copies in 15 s, without end).
        assert accepted == 50.0
        time.sleep(1)
        assert metric(http, "mailflow_messages_accepted_total") == 50.0
        assert "554 5.4.6 Too many hops" in relay.output()
    assert len(sink.messages()) == 1
