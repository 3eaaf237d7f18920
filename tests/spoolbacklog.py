"""A spool with a large backlog, and the peak memory of a relay that starts on it."""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import Future
from pathlib import Path

from mailflow_relay.queue.spool import Spool, SpooledMessage
from peers import free_port
from relayproc import RelayProcess, connector

MIB = 1024 * 1024


def fill_spool(directory: Path, count: int, size: int) -> None:
    """``count`` messages of ``size`` bytes, written through the committer in batches."""
    spool = Spool(directory, max_message_size=size + MIB)
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: backlog\r\n\r\n" + line * (size // len(line))
    in_flight: list[Future[SpooledMessage]] = []
    for _ in range(count):
        in_flight.append(spool.submit_store("a@backlog.test", ["b@dest.test"], lambda _id: body))
        if len(in_flight) >= 32:  # 32 MiB in flight, not the whole backlog
            for future in in_flight:
                future.result()
            in_flight.clear()
    for future in in_flight:
        future.result()
    spool.close()


def peak_rss_of_a_relay_starting_on(tmp_path: Path, spool: Path, count: int) -> int:
    """VmHWM (bytes) of `mailflow relay` once it has rescanned ``count`` waiting messages.

    Nothing listens at the destination, so every delivery is deferred: the relay does what
    it does at start with a backlog (rescan, schedule, first attempts), nothing else. The
    relay is started here, not by RelayProcess: a cold rescan of gigabytes may take longer
    than RelayProcess waits for the port.
    """
    manifests = connector("all", '["*"]', free_port())
    relay = RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool)
    with relay.log.open("ab") as log:
        process = subprocess.Popen(relay.command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        pattern = f"spool rescanned: {count} message(s) waiting"
        while pattern not in relay.output():
            assert time.monotonic() < deadline, relay.output()[-2000:]
            assert process.poll() is None, relay.output()[-2000:]
            time.sleep(0.2)
        time.sleep(2.0)  # the first delivery attempts, each loading one body
        status = Path(f"/proc/{process.pid}/status").read_text()
    finally:
        process.kill()  # measured: no need to sit through the drain of a whole backlog
        process.wait(timeout=30)
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match is not None, status
    return int(match[1]) * 1024
