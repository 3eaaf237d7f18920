"""The benchmark harness's own arithmetic and output: fast, no processes, no timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from control_plane import connector_bodies, lookup_recipients
from postfix_instance import main_cf, master_cf
from report import ControlPlaneResult, RunResult, Table, format_table, percentile, to_json
from smtp_peers import message_body, parse_counters, source_command
from tls_sink import parse_counts

from mailflow_compiler.compiler import compile_routing
from mailflow_relay.routing.router import Router

DIRECTORIES = {
    "daemon_directory": "/usr/lib/postfix/sbin",
    "command_directory": "/usr/sbin",
    "meta_directory": "/etc/postfix",
    "shlib_directory": "/usr/lib/postfix",
}


def settings(text: str) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in text.splitlines() if line)
    return dict(pairs)


def run(relay: str, rate_seconds: float, **fields: object) -> RunResult:
    return RunResult(
        relay=relay,
        messages=1000,
        expected=1000,
        seconds=rate_seconds,
        inject_seconds=rate_seconds / 2,
        **fields,  # type: ignore[arg-type]
    )


def test_percentile_is_the_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError, match="fraction"):
        percentile(samples, 0)


def test_a_run_reports_its_rate_and_latencies() -> None:
    result = run("mailflow", 2.0, latency_ms=(1.0, 2.0, 3.0, 40.0), peak_rss_bytes=3 * 2**20)
    assert result.complete
    assert result.msgs_per_second == 500.0
    assert (result.p50_ms, result.p99_ms) == (2.0, 40.0)
    assert result.peak_rss_mib == 3.0
    data = result.as_json()
    assert data["latency_samples"] == 4
    assert "latency_ms" not in data


def test_a_run_short_of_its_messages_is_incomplete_and_gets_no_ratio() -> None:
    short = RunResult("mailflow", 10, 1000, 5.0, 1.0)
    table = Table("t", {}, (run("floor", 1.0), run("postfix", 2.0), short))
    assert not short.complete
    assert table.ratios()["mailflow_over_postfix"] is None
    assert table.ratios()["postfix_over_floor"] == 0.5


def test_the_table_shows_every_relay_and_the_ratios() -> None:
    table = Table(
        "Outbound hop in plaintext",
        {"messages": 1000, "reuse": "on"},
        (
            run("floor", 0.5),
            run("postfix", 2.0, cpu_seconds=1.5, processes=40),
            run("mailflow", 4.0, tls_messages=990, sessions=12),
        ),
    )
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0] == "Outbound hop in plaintext  (messages=1000, reuse=on)"
    assert lines[1].split()[:3] == ["relay", "msg/s", "end-to-end"]
    assert [line.split()[0] for line in lines[3:6]] == ["floor", "postfix", "mailflow"]
    assert "250.0" in lines[5]
    assert "990 over TLS, 12 sessions" in lines[5]
    assert lines[-1] == (
        "ratios (msg/s): Mailflow/Postfix = 0.50, Mailflow/floor = 0.12, Postfix/floor = 0.25"
    )


def test_the_json_has_the_same_figures_as_the_table() -> None:
    table = Table("plain", {"messages": 1000}, (run("postfix", 2.0), run("mailflow", 4.0)))
    control = [ControlPlaneResult("compile", 10, 0.5, "ms")]
    document = json.loads(to_json(machine={"nproc": 2}, tables=[table], control_plane=control))
    assert document["machine"] == {"nproc": 2}
    [plain] = document["tables"]
    assert [r["msgs_per_second"] for r in plain["runs"]] == [500.0, 250.0]
    assert plain["ratios"]["mailflow_over_postfix"] == 0.5
    assert document["control_plane"][0] == {
        "measure": "compile",
        "connectors": 10,
        "value": 0.5,
        "unit": "ms",
        "detail": "",
    }


def test_postfix_main_cf_keeps_the_instance_private_and_on_loopback(tmp_path: Path) -> None:
    conf = settings(
        main_cf(tmp_path, relay_port=2600, connection_reuse=True, tls=True, directories=DIRECTORIES)
    )
    assert conf["config_directory"] == str(tmp_path / "etc")
    assert conf["queue_directory"] == str(tmp_path / "queue")
    assert conf["data_directory"] == str(tmp_path / "data")
    assert conf["inet_interfaces"] == "127.0.0.1"
    assert conf["mydestination"] == ""
    assert conf["mynetworks"] == "127.0.0.0/8"
    assert conf["relayhost"] == "[127.0.0.1]:2600"
    assert conf["smtp_tls_security_level"] == "may"
    assert conf["smtp_connection_cache_on_demand"] == "yes"
    assert conf["maillog_file"].startswith(conf["maillog_file_prefixes"])
    # Default durability: nothing in the file turns Postfix's fsync off.
    assert not any("fsync" in name for name in conf)


def test_postfix_main_cf_turns_reuse_and_tls_off(tmp_path: Path) -> None:
    conf = settings(
        main_cf(tmp_path, relay_port=25, connection_reuse=False, tls=False, directories=DIRECTORIES)
    )
    assert conf["smtp_connection_cache_on_demand"] == "no"
    assert conf["smtp_tls_security_level"] == "none"


def test_postfix_master_cf_listens_on_one_loopback_port_without_chroot() -> None:
    rows = [line.split() for line in master_cf(2525).splitlines()]
    inet = [row for row in rows if row[1] == "inet"]
    assert inet == [["127.0.0.1:2525", "inet", "n", "-", "n", "-", "-", "smtpd"]]
    assert {row[4] for row in rows} == {"n"}
    assert {"pickup", "cleanup", "qmgr", "smtp", "postlog"} <= {row[0] for row in rows}


def test_smtp_source_command_reuses_connections_only_when_asked() -> None:
    command = source_command(
        2525, messages=100, size=4096, sessions=8, reuse=True, smtp_source="smtp-source"
    )
    assert command[:7] == ["smtp-source", "-m", "100", "-l", "4096", "-s", "8"]
    assert "-d" in command
    assert command[-1] == "inet:127.0.0.1:2525"
    plain = source_command(
        2525, messages=100, size=4096, sessions=8, reuse=False, smtp_source="smtp-source"
    )
    assert "-d" not in plain


def test_sink_counters_and_tls_counts_are_parsed() -> None:
    assert parse_counters("") == 0
    assert parse_counters("conn=1 mesg=0 \rconn=3 mesg=17 \r") == 17
    assert parse_counts("12 10 4") == (12, 10, 4)
    assert parse_counts("") == (0, 0, 0)


def test_the_probe_message_is_close_to_the_size_and_has_crlf_lines_only() -> None:
    body = message_body(4096)
    assert 4000 <= len(body) <= 4096
    assert b"\n" not in body.replace(b"\r\n", b"")


def test_benchmark_connectors_compile_cleanly_and_route_the_lookup_mix() -> None:
    compiled = compile_routing(connector_bodies(40), [], {}, default_namespace="bench")
    assert not compiled.findings
    router = Router(compiled.document)
    rules = {router.route_for(r, s).rule.value for r, s in lookup_recipients(30)}
    assert rules == {"exact", "wildcard", "catch-all"}
