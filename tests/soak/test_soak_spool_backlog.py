"""10,000 queued messages of 1 MiB: the relay starts under 256 MiB RSS (issue 15, point 2).

10 GiB of spool on the test machine's disk, so it runs with `make soak` only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faults import summary
from spoolbacklog import MIB, fill_spool, peak_rss_of_a_relay_starting_on

MESSAGES = 10_000


@pytest.mark.soak
def test_a_relay_starting_on_10000_messages_of_1_mib_stays_under_256_mib(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    started = time.monotonic()
    fill_spool(spool, MESSAGES, MIB)
    filled = time.monotonic()

    peak = peak_rss_of_a_relay_starting_on(tmp_path, spool, MESSAGES)

    summary(
        "backlog start-up at scale",
        messages=MESSAGES,
        body_mib=1,
        fill_seconds=f"{filled - started:.0f}",
        start_seconds=f"{time.monotonic() - filled:.0f}",
        peak_rss_mib=peak // MIB,
    )
    assert peak < 256 * MIB, f"peak RSS {peak // MIB} MiB with {MESSAGES} MiB waiting"
