"""A relay starting on a backlog holds envelopes, not bodies (issue 15, point 2).

Before the envelope-only index a start-up read every body into memory: a backlog of
messages as large as the chart's memory limit crash-looped the relay exactly when a
backlog existed. The relay's peak RSS must now not grow with the bytes waiting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from faults import summary
from spoolbacklog import MIB, fill_spool, peak_rss_of_a_relay_starting_on

MESSAGES = 500
"""500 MiB waiting: a relay that read the bodies would peak far above the bound."""
PEAK_BOUND = 192 * MIB


@pytest.mark.slow
def test_a_relay_starting_on_500_mib_of_backlog_does_not_hold_the_bodies(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    fill_spool(spool, MESSAGES, MIB)

    peak = peak_rss_of_a_relay_starting_on(tmp_path, spool, MESSAGES)

    summary("backlog start-up", messages=MESSAGES, body_mib=1, peak_rss_mib=peak // MIB)
    assert peak < PEAK_BOUND, f"peak RSS {peak // MIB} MiB with {MESSAGES} MiB waiting"
