"""Soak: SIGKILL the relay again and again under traffic; no acknowledged message is lost.

`make soak` runs this (it is left out of `make test`: it takes minutes). Each round a
client thread sends messages while the relay is killed at a random moment; the relay
restarts on the same spool. At the end every message that got a 250 must have reached
the destination (Postfix's smtp-sink) at least once. Duplicates are possible by design
(a kill between the destination's 250 and the spool update) and are reported.
"""

from __future__ import annotations

import collections
import random
import smtplib
import threading
import time
from pathlib import Path

import pytest

from faults import summary
from peers import SmtpSink, require
from relayproc import RelayProcess, connector

pytestmark = pytest.mark.soak

ROUNDS = 12
SECONDS_PER_ROUND = (0.5, 2.5)


def client(port: int, prefix: str, acknowledged: list[str], stop: threading.Event) -> None:
    number = 0
    while not stop.is_set() and number < 10_000:
        message_id = f"<{prefix}-{number}@soak.test>"
        number += 1
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                refused = smtp.sendmail(
                    "a@soak.test",
                    ["b@dest.test"],
                    f"Message-ID: {message_id}\r\nSubject: soak\r\n\r\nx\r\n",
                )
        except (OSError, smtplib.SMTPException):
            return  # the relay was killed: this message was never acknowledged
        if not refused:
            acknowledged.append(message_id)


def test_repeated_sigkill_under_traffic_loses_no_acknowledged_message(tmp_path: Path) -> None:
    require("smtp-sink")
    rng = random.Random(20261128)
    started = time.monotonic()
    acknowledged: list[str] = []
    with SmtpSink() as sink:
        manifests = connector("all", '["*"]', sink.port)
        spool = tmp_path / "spool"
        for round_number in range(ROUNDS):
            relay = RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool)
            with relay:
                stop = threading.Event()
                threads = [
                    threading.Thread(
                        target=client, args=(relay.port, f"r{round_number}c{i}", acknowledged, stop)
                    )
                    for i in range(3)
                ]
                for thread in threads:
                    thread.start()
                time.sleep(rng.uniform(*SECONDS_PER_ROUND))
                relay.kill()
                stop.set()
                for thread in threads:
                    thread.join(timeout=10)
            print(
                f"round {round_number + 1}/{ROUNDS}: {len(acknowledged)} acknowledged so far",
                flush=True,
            )
        # A last, clean run delivers what the kills left in the spool.
        with RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and list(spool.glob("*.msg")):
                time.sleep(0.2)
        arrived = collections.Counter(
            line.split(":", 1)[1].strip()
            for message in sink.messages()
            for line in message.text.splitlines()
            if line.lower().startswith("message-id:")
        )
    missing = [m for m in acknowledged if m not in arrived]
    duplicates = sum(count - 1 for count in arrived.values() if count > 1)
    summary(
        "soak crashes",
        messages=len(acknowledged),
        kills=ROUNDS,
        duplicates=duplicates,
        seconds=f"{time.monotonic() - started:.1f}",
        lost=len(missing),
    )
    assert acknowledged, "no message was acknowledged: the soak tested nothing"
    assert missing == []
