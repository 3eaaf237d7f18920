"""`mailflow relay --processes N`: worker processes on one port, supervised by one parent.

Real processes, real sockets on 127.0.0.1 and Postfix's smtp-sink as the next hop. The
destination starts out closed where a test needs mail to stay queued (every attempt is
deferred), so what each worker's spool holds can be looked at and then delivered.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mailflow_relay.hosting.workers import merge_metrics, plan_workers
from mailflow_relay.queue.folders import SpoolSet
from mailflow_relay.queue.spool import Spool
from peers import SmtpSink, free_port
from relayproc import RelayProcess, connector
from support import eventually

MAILFLOW = str(Path(sys.executable).parent / "mailflow")


def send(port: int, count: int, tag: str) -> None:
    """One message per connection: each new connection is the kernel's to place."""
    for number in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(
                "a@sender.test",
                ["b@dest.test"],
                f"Message-ID: <{tag}{number}@sender.test>\r\nSubject: {number}\r\n\r\nx\r\n",
            )


def queue_json(spool: Path) -> list[dict[str, object]]:
    listing = subprocess.run(
        [MAILFLOW, "queue", "list", "--spool", str(spool), "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return list(json.loads(listing.stdout))


def worker_pid(relay: RelayProcess, name: str) -> int:
    pids = re.findall(rf"{name} started: PID (\d+)", relay.output())
    assert pids, relay.output()
    return int(pids[-1])


def message_ids(sink: SmtpSink) -> list[str]:
    return sorted(
        line.split(":", 1)[1].strip()
        for m in sink.messages()
        for line in m.text.splitlines()
        if line.lower().startswith("message-id:")
    )


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def all_ready(http: int) -> None:
    """Until every worker listens (the port answers as soon as the first one does)."""
    eventually(lambda: get(http, "/readyz")[0] == 200, within=30, what="every worker ready")


def test_two_workers_share_the_port_each_with_its_own_spool(tmp_path: Path) -> None:
    http = free_port()
    relay = RelayProcess(
        tmp_path,
        connector("all", '["*"]', free_port()),  # closed: every message stays queued
        "--accept-from",
        "127.0.0.1/32",
        "--retry-initial",
        "3600",
        "--processes",
        "2",
        "--http",
        f"127.0.0.1:{http}",
    )
    with relay:
        all_ready(http)
        _, readiness = get(http, "/readyz")
        assert "worker-0: ready" in readiness
        assert "worker-1: ready" in readiness
        send(relay.port, 24, "s")
        per_worker = {
            folder.name: len(Spool(folder).scan(repair=False))
            for folder in (relay.spool / "worker-0", relay.spool / "worker-1")
        }
        # 24 connections from 24 source ports: the kernel's hash leaves one worker without
        # any with a chance of 2 in 2**24.
        assert sum(per_worker.values()) == 24, per_worker
        assert min(per_worker.values()) > 0, per_worker
        assert len(queue_json(relay.spool)) == 24  # `mailflow queue` sees every worker's spool
        _, metrics = get(http, "/metrics")
        accepted = re.findall(
            r'^mailflow_messages_accepted_total\{worker="(worker-\d)"\} (\S+)$', metrics, re.M
        )
        assert sorted(accepted) == sorted(
            (name, f"{float(count)}") for name, count in per_worker.items()
        ), metrics
        assert metrics.count("# TYPE mailflow_messages_accepted_total counter") == 1
        assert relay.stop() == 0


def test_a_killed_worker_is_restarted_and_its_spool_delivered(tmp_path: Path) -> None:
    destination, http = free_port(), free_port()
    relay = RelayProcess(
        tmp_path,
        connector("all", '["*"]', destination),
        "--accept-from",
        "127.0.0.1/32",
        "--processes",
        "2",
        "--http",
        f"127.0.0.1:{http}",
    )
    with relay:
        all_ready(http)
        send(relay.port, 12, "k")
        held = sorted(
            re.search(rb"Message-ID: (<k\d+@sender.test>)", m.body).group(1).decode()  # type: ignore[union-attr]
            # scan() reads envelopes only: the body comes from load().
            for m in (
                Spool(relay.spool / "worker-1").load(e.queue_id)
                for e in Spool(relay.spool / "worker-1").scan(repair=False)
            )
        )
        assert held
        killed = worker_pid(relay, "worker-1")
        os.kill(killed, signal.SIGKILL)
        eventually(
            lambda: worker_pid(relay, "worker-1") != killed,
            within=20,
            what="worker-1 restarted",
        )
        assert f"worker-1 (PID {killed}) died (signal 9)" in relay.output()
        with SmtpSink(port=destination) as sink:
            # The new worker rescans worker-1's folder and retries (0.5 s, then backoff);
            # worker-0 skips the destination that failed it for a minute, so only what
            # worker-1 held is waited for.
            sink.wait_for(len(held), timeout=40)
            time.sleep(0.5)
            assert message_ids(sink) == held
        assert relay.stop() == 0
    assert Spool(relay.spool / "worker-1").scan(repair=False) == []
    assert len(SpoolSet(relay.spool).scan()) == 12 - len(held)


def test_sigterm_drains_every_worker_and_hands_each_spool_off(tmp_path: Path) -> None:
    (tmp_path / "peer").mkdir()
    (tmp_path / "leaving").mkdir()
    http = free_port()
    with (
        SmtpSink() as sink,
        RelayProcess(
            tmp_path / "peer", connector("all", '["*"]', sink.port), "--accept-from", "127.0.0.1/32"
        ) as peer,
    ):
        leaving = RelayProcess(
            tmp_path / "leaving",
            connector("all", '["*"]', free_port()),
            "--accept-from",
            "127.0.0.1/32",
            "--retry-initial",
            "3600",
            "--drain-grace",
            "1",
            "--handoff",
            f"127.0.0.1:{peer.port}",
            "--processes",
            "2",
            "--http",
            f"127.0.0.1:{http}",
        )
        with leaving:
            all_ready(http)
            send(leaving.port, 10, "h")
            spools = [leaving.spool / "worker-0", leaving.spool / "worker-1"]
            assert all(Spool(folder).scan(repair=False) for folder in spools)
            assert leaving.stop() == 0
        sink.wait_for(10, timeout=30)
        time.sleep(0.5)  # a duplicate would arrive now
        assert message_ids(sink) == sorted(f"<h{n}@sender.test>" for n in range(10))
    assert SpoolSet(leaving.spool).scan() == []
    assert leaving.output().count("handed off to 127.0.0.1") == 10
    assert "every worker process has stopped" in leaving.output()


def test_one_process_keeps_todays_layout_and_more_deliver_what_it_left(tmp_path: Path) -> None:
    destination = free_port()
    manifests = connector("all", '["*"]', destination)
    first = RelayProcess(
        tmp_path, manifests, "--accept-from", "127.0.0.1/32", "--retry-initial", "3600"
    )
    with first:
        send(first.port, 3, "o")
        assert first.stop() == 0
    # --processes 1 (the default) is one process on the spool folder itself, as before.
    assert len(Spool(first.spool).scan(repair=False)) == 3
    assert not list(first.spool.glob("worker-*"))
    assert "worker process" not in first.output()
    with SmtpSink(port=destination) as sink:
        more = RelayProcess(
            tmp_path, manifests, "--accept-from", "127.0.0.1/32", "--processes", "2"
        )
        with more:
            # Deferred for an hour by the first run: made due now, in the old folder too.
            eventually(lambda: "drain-root started" in more.output(), what="a worker for it")
            subprocess.run(
                [MAILFLOW, "queue", "retry", "--spool", str(first.spool)], check=True, timeout=30
            )
            sink.wait_for(3, timeout=30)
            eventually(lambda: "drain-root: spool" in more.output(), what="the old spool delivered")
            assert more.stop() == 0
        assert message_ids(sink) == sorted(f"<o{n}@sender.test>" for n in range(3))
    assert SpoolSet(first.spool).scan() == []


def test_plan_gives_orphan_folders_a_worker_that_only_delivers(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root).store("a@sender.test", ["b@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    Spool(root / "worker-3")  # created, nothing in it: no worker for it
    Spool(root / "worker-2").store("a@sender.test", ["b@dest.test"], b"Subject: y\r\n\r\ny\r\n")
    plan = plan_workers(root, 2)
    assert [(s.name, s.spool_dir.name, s.accept_mail) for s in plan] == [
        ("worker-0", "worker-0", True),
        ("worker-1", "worker-1", True),
        ("drain-root", "spool", False),
        ("drain-worker-2", "worker-2", False),
    ]
    assert [s.annotates_pod for s in plan] == [True, False, False, False]
    assert [s.name for s in plan_workers(root, 1)][:1] == ["worker-0"]
    assert plan_workers(root, 1)[0].spool_dir == root


def test_merged_metrics_name_each_family_once_with_a_worker_label() -> None:
    one = (
        b"# HELP m_total Help.\n# TYPE m_total counter\nm_total 1.0\n"
        b'# HELP g Gauge.\n# TYPE g gauge\ng{reason="x"} 2.0\n'
    )
    two = b"# HELP m_total Help.\n# TYPE m_total counter\nm_total 3.0\n"
    merged = merge_metrics([("worker-0", one), ("worker-1", two)]).decode()
    assert merged.splitlines() == [
        "# HELP m_total Help.",
        "# TYPE m_total counter",
        'm_total{worker="worker-0"} 1.0',
        'm_total{worker="worker-1"} 3.0',
        "# HELP g Gauge.",
        "# TYPE g gauge",
        'g{worker="worker-0",reason="x"} 2.0',
    ]


def test_a_port_another_program_listens_on_fails_the_start_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(connector("all", '["*"]', free_port()))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # no SO_REUSEPORT: not ours to share
        port = taken.getsockname()[1]
        command = [MAILFLOW, "relay", "--manifests", str(tmp_path / "m.yaml")]
        command += ["--spool", str(tmp_path / "spool"), "--listen", f"127.0.0.1:{port}"]
        command += ["--hostname", "relay.test", "--accept-from", "127.0.0.1/32"]
        started = subprocess.run(
            [*command, "--processes", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert started.returncode == 2
    assert started.stderr.splitlines()[-1] == (
        f"mailflow: error: --listen 127.0.0.1:{port}: address already in use: another process "
        f"(another relay?) listens on 127.0.0.1:{port}; stop it or choose another port"
    )
    assert "started: PID" not in started.stderr  # no worker was started


def test_workers_drain_and_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    http = free_port()
    relay = RelayProcess(
        tmp_path,
        connector("all", '["*"]', free_port()),
        "--accept-from",
        "127.0.0.1/32",
        "--processes",
        "2",
        "--http",
        f"127.0.0.1:{http}",
    )
    with relay:
        all_ready(http)
        workers = [worker_pid(relay, "worker-0"), worker_pid(relay, "worker-1")]
        relay.kill()  # SIGKILL: the parent cannot pass anything on

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        eventually(lambda: all(gone(pid) for pid in workers), within=30, what="workers gone")
    assert relay.output().count("relay stopped;") == 2  # each drained, as on SIGTERM


def test_a_second_supervisor_on_the_same_spool_refuses_to_start(tmp_path: Path) -> None:
    relay = RelayProcess(
        tmp_path,
        connector("all", '["*"]', free_port()),
        "--accept-from",
        "127.0.0.1/32",
        "--processes",
        "2",
    )
    with relay:
        second = [*relay.command[: relay.command.index("--listen")], "--listen"]
        second += [f"127.0.0.1:{free_port()}", *relay.command[relay.command.index("--spool") :]]
        started = subprocess.run(second, capture_output=True, text=True, timeout=60, check=False)
        assert started.returncode == 2
        assert (
            f"--spool {relay.spool}: spool {relay.spool} is in use by the relay with PID"
            in (started.stderr.splitlines()[-1])
        )
        assert "started: PID" not in started.stderr
