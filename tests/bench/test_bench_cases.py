"""The benchmark's tables, its manifests for the relay variants, and what it renders from its
JSON (README section, plot): fast, no load, no timing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from report import (
    README_BEGIN,
    README_END,
    BacklogResult,
    RunResult,
    Table,
    markdown_report,
    plot_points,
    ratio_summary,
    replace_readme_section,
    to_json,
    write_plot,
)
from report import main as report_main
from run import (
    Sink,
    TlsSink,
    cases,
    delayed,
    mailflow_command,
    mailflow_manifests,
    parse_args,
)
from tls_sink import make_certificate

from mailflow_cli.standalone import compile_manifests
from mailflow_relay.routing.document import DefaultAction, DefaultRoute, TlsMode


def run(relay: str, seconds: float) -> RunResult:
    return RunResult(relay, 1000, 1000, seconds, seconds / 2, latency_ms=(1.0, 9.0))


def document() -> dict[str, Any]:
    table = Table(
        "Outbound hop in plaintext (smtp-sink)",
        {"messages": 1000, "reuse": "on", "recipients": 1, "processes": 2},
        (run("postfix", 2.0), run("mailflow", 1.0), run("mailflow-dkim-rsa", 4.0)),
    )
    backlog = BacklogResult(10_000, 2, 30.0, 1.5, 40.0, 10_000, 30.0, 200 * 2**20)
    text = to_json(
        machine={"date": "today", "nproc": 2, "loadavg": "3.10 2.00 1.00"},
        tables=[table],
        control_plane=[],
        backlog=backlog,
    )
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def test_the_default_run_has_both_reuse_modes_and_the_extra_cases() -> None:
    found = cases(parse_args([]))
    shapes = [(c.hop, c.load.reuse, c.load.recipients, c.relays) for c in found]
    base = ("floor", "postfix", "mailflow")
    assert shapes == [
        ("plain", True, 1, (*base, "mailflow-dkim-rsa", "mailflow-dkim-ed25519")),
        ("tls", True, 1, (*base, "mailflow-trustedca", "mailflow-namematch")),
        ("plain", False, 1, base),
        ("tls", False, 1, base),
        ("plain", True, 5, base),
        ("plain-nopipelining", True, 1, base),
        # Pipelining on and off where round trips cost something.
        ("plain-latency", True, 1, ("postfix", "mailflow", "mailflow-nopipelining")),
    ]
    only = cases(parse_args(["--relays", "mailflow", "--reuse", "on", "--recipients", "1"]))
    assert [c.relays for c in only] == [("mailflow",)] * 4
    with pytest.raises(SystemExit, match="unknown relay"):
        cases(parse_args(["--relays", "sendmail"]))


@pytest.mark.parametrize(
    ("mode", "expected"), [("TrustedCA", TlsMode.TRUSTED_CA), ("NameMatch", TlsMode.NAME_MATCH)]
)
def test_verifying_modes_trust_the_tls_sinks_certificate(
    tmp_path: Path, mode: str, expected: TlsMode
) -> None:
    sink = TlsSink(tmp_path)
    make_certificate(tmp_path)
    manifests = tmp_path / "connector.yaml"
    manifests.write_text(mailflow_manifests(sink, dkim=None, tls_mode=mode))
    compiled, _, left_out = compile_manifests(
        [str(manifests)], "bench", DefaultRoute(action=DefaultAction.REJECT), io.StringIO()
    )
    assert left_out == ()
    [connector] = compiled.connectors
    assert connector.tls.mode is expected
    assert connector.tls.ca_bundle is not None
    assert "BEGIN CERTIFICATE" in connector.tls.ca_bundle


def test_a_verifying_mode_needs_the_tls_sink() -> None:
    plain = Sink()  # smtp-sink: no certificate to trust
    plain.port = 2525
    with pytest.raises(ValueError, match="needs the TLS sink"):
        mailflow_manifests(plain, dkim=None, tls_mode="TrustedCA")


def test_the_relay_runs_with_the_processes_asked_and_room_for_the_recipients() -> None:
    load = cases(parse_args(["--processes", "3", "--recipients", "150"]))[-3].load
    command = mailflow_command(Path("m.yaml"), 2525, 9090, Path("spool"), load)
    assert command[command.index("--processes") + 1] == "3"
    assert command[command.index("--max-recipients") + 1] == "150"
    assert command[command.index("--http") + 1] == "127.0.0.1:9090"
    assert command[command.index("--pipelining") + 1] == "on"
    off = mailflow_command(Path("m.yaml"), 2525, 9090, Path("spool"), load, pipelining="off")
    assert off[off.index("--pipelining") + 1] == "off"


def test_variant_ratios_and_the_backlog_are_in_the_json() -> None:
    data = document()
    [table] = data["tables"]
    assert table["ratios"]["mailflow_over_postfix"] == 2.0
    assert table["ratios"]["mailflow_dkim_rsa_over_postfix"] == 0.5
    assert data["backlog"]["peak_rss_mib"] == 200.0


def test_the_readme_section_is_rendered_from_the_json_and_replaced_in_place() -> None:
    section = markdown_report(document())
    assert "load average 3.10 2.00 1.00" in section
    assert "| mailflow | 1000.0 | 1.00 | 9.00 | - | - | - | yes |" in section
    assert "Over Postfix: mailflow 2.00×, mailflow-dkim-rsa 0.50×" in section
    assert "backlog of 10000 messages (2 process(es)): ready in 1.50 s" in section
    readme = f"# Title\n\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n"
    replaced = replace_readme_section(readme, section, "bench/results/latest.png")
    assert "old table" not in replaced
    assert replaced.startswith("# Title\n\nbefore\n" + README_BEGIN)
    assert replaced.endswith(README_END + "\nafter\n")
    assert "![Mailflow's throughput over Postfix's, per table](bench/results/latest.png)" in (
        replaced
    )
    assert replace_readme_section(replaced, section).count(README_BEGIN) == 1
    with pytest.raises(ValueError, match="no <!-- bench:begin"):
        replace_readme_section("# no markers\n", section)


def test_the_plot_shows_every_variant_over_postfix(tmp_path: Path) -> None:
    [(label, ratios)] = plot_points(document())
    assert label.startswith("Outbound hop in plaintext")
    assert ratios == {"mailflow": 2.0, "mailflow-dkim-rsa": 0.5}
    write_plot(document(), tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_command_rewrites_only_the_readme_section(tmp_path: Path) -> None:
    figures = tmp_path / "latest.json"
    figures.write_text(json.dumps(document()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nnote by hand\n")
    assert report_main([str(figures), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{README_BEGIN}\n\nRun of today on 2 ×")
    assert text.endswith(f"{README_END}\nnote by hand\n")
    assert "old" not in text


def test_several_runs_give_each_ratio_as_median_and_range() -> None:
    runs = []
    for mailflow_seconds in (1.0, 2.0, 0.5):
        table = Table(
            "t",
            {"hop": "plain", "reuse": "on"},
            (run("postfix", 2.0), run("mailflow", mailflow_seconds)),
        )
        runs.append(json.loads(to_json(machine={}, tables=[table], control_plane=[])))
    summary = ratio_summary(runs)
    assert "Over 3 run(s)" in summary
    assert "| plain, reuse on, 1 rcpt | mailflow | 2.00× | 1.00–4.00× | 3 |" in summary
    assert ratio_summary([]) == ""


def test_the_delay_proxy_adds_its_latency_each_way_and_carries_every_byte(tmp_path: Path) -> None:
    import socket
    import socketserver
    import threading
    import time

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as echo:
        threading.Thread(target=echo.serve_forever, name="echo", daemon=True).start()
        try:
            with (
                delayed(echo.server_address[1], tmp_path) as port,
                socket.create_connection(("127.0.0.1", port), timeout=10) as client,
            ):
                started = time.monotonic()
                client.sendall(b"x" * 100_000)
                received = b""
                while len(received) < 100_000:
                    received += client.recv(65536)
                elapsed = time.monotonic() - started
        finally:
            echo.shutdown()
    assert received == b"x" * 100_000
    assert elapsed >= 0.010  # 5 ms up and 5 ms down, at the least
