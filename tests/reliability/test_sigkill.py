"""SIGKILL at random moments under traffic: every 250 arrives at least once.

`mailflow relay` runs as its own process, on one spool, in front of Postfix's smtp-sink.
Client threads send messages (one session each, a unique Message-ID each) while the relay
is killed with SIGKILL at a random moment, then started again on the same spool. A last
clean run delivers what the kills left. Every message that got a 250 must have arrived;
duplicates are possible by design (a kill between the destination's 250 and the spool
write) and are counted, and bounded: at most one per delivery in progress per kill.

The fast run (in `make test`) kills 3 times; the soak run (`make soak`) goes on until a
few thousand messages were acknowledged.
"""

from __future__ import annotations

import collections
import random
import smtplib
import threading
import time
from pathlib import Path

import pytest

from faults import need_tool, summary
from peers import SmtpSink
from relayproc import RelayProcess, connector

CLIENTS = 3
WORKERS = 16
"""The relay's default: the most deliveries a kill can interrupt."""


def client(port: int, prefix: str, acknowledged: list[str], stop: threading.Event) -> None:
    for number in range(100_000):
        if stop.is_set():
            return
        message_id = f"<{prefix}-{number}@kill.test>"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                refused = smtp.sendmail(
                    "a@kill.test",
                    ["b@dest.test"],
                    f"Message-ID: {message_id}\r\nSubject: kill\r\n\r\nx\r\n",
                )
        except (OSError, smtplib.SMTPException):
            return  # the relay was killed: this message was never acknowledged
        if not refused:
            acknowledged.append(message_id)


def kill_again_and_again(
    tmp_path: Path, *, max_rounds: int, enough: int, seconds: tuple[float, float], seed: int
) -> None:
    need_tool("smtp-sink")
    rng = random.Random(seed)
    started = time.monotonic()
    acknowledged: list[str] = []
    kills = 0
    with SmtpSink() as sink:
        manifests = connector("all", '["*"]', sink.port)
        spool = tmp_path / "spool"
        for round_number in range(max_rounds):
            if len(acknowledged) >= enough:
                break
            relay = RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool)
            with relay:
                stop = threading.Event()
                threads = [
                    threading.Thread(
                        target=client,
                        args=(relay.port, f"r{round_number}c{i}", acknowledged, stop),
                        name=f"kill-client-{i}",
                    )
                    for i in range(CLIENTS)
                ]
                for thread in threads:
                    thread.start()
                time.sleep(rng.uniform(*seconds))
                relay.kill()
                kills += 1
                stop.set()
                for thread in threads:
                    thread.join(timeout=10)
        # A last, clean run delivers what the kills left in the spool.
        with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and list(spool.glob("*.msg")):
                time.sleep(0.2)
            time.sleep(0.5)  # the last deliveries' 250s reach the sink's dump
        arrived = collections.Counter(
            line.split(":", 1)[1].strip()
            for message in sink.messages()
            for line in message.text.splitlines()
            if line.lower().startswith("message-id:")
        )
    missing = [m for m in acknowledged if m not in arrived]
    duplicates = sum(count - 1 for count in arrived.values() if count > 1)
    summary(
        "sigkill under traffic",
        messages=len(acknowledged),
        kills=kills,
        duplicates=duplicates,
        seconds=f"{time.monotonic() - started:.1f}",
        lost=len(missing),
    )
    assert acknowledged, "no message was acknowledged: nothing was tested"
    assert kills >= 2
    assert missing == []
    assert duplicates <= kills * WORKERS


def test_three_sigkills_under_traffic_lose_no_acknowledged_message(tmp_path: Path) -> None:
    kill_again_and_again(tmp_path, max_rounds=3, enough=10**9, seconds=(0.8, 2.0), seed=20261201)


@pytest.mark.soak
def test_sigkill_over_thousands_of_messages_loses_no_acknowledged_message(tmp_path: Path) -> None:
    kill_again_and_again(tmp_path, max_rounds=60, enough=2500, seconds=(0.5, 4.0), seed=12)
