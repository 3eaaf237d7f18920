"""Nothing a client sends reaches an operator's terminal raw: both log formats escape it.

Issue 12, point 8: an unauthenticated client's unrecognised verb was logged as sent (by
aiosmtpd, under ``mail.log``), so ESC, CR and BEL went straight into the text log. The
formatters now escape every control character, whoever made the log call.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from mailflow_relay.engine.logs import JsonFormatter, configure_logging, escape_controls
from smtpraw import raw_connection, serving, settings
from support import run

HOSTILE = "\x1b[2J\x1b]0;pwned\x07\r\nFAKE INFO line\x7f\x9b31m\u202eevil"
RAW_CONTROLS = [chr(c) for c in (*range(0x0A), *range(0x0B, 0x20), *range(0x7F, 0xA0))]


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """The root logger writing to a buffer in the format named by the test's parameter."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    mail_level = logging.getLogger("mail.log").level
    stream = io.StringIO()
    configure_logging("INFO", request.param, stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("mail.log").setLevel(mail_level)


def _assert_no_raw_controls(text: str) -> None:
    # Newlines separate records: one per record, none inside one.
    for line in text.splitlines():
        found = [c for c in RAW_CONTROLS if c in line]
        assert not found, f"raw control characters {found!r} in {line!r}"
        assert "\u202e" not in line


@pytest.mark.parametrize("captured", ["text", "json"], indirect=True)
def test_hostile_verbs_helo_and_addresses_reach_the_log_escaped(captured: io.StringIO) -> None:
    # Before: "\x1b[2J..." written as sent by aiosmtpd's "unrecognised" warning. Now: escaped.
    async def scenario() -> None:
        async with serving(settings()) as listener, raw_connection(listener.port) as client:
            await client.command(b"\x1b[2J\x1b]0;pwned\x07FAKE")
            await client.command(b"HELO \x1b[31mred\x07.example")
            await client.command(b"MAIL FROM:<a\x1b[2Jb@x.example>")
            await client.command(b"XYZZY\x7f\x1b[0m")

    run(scenario)
    text = captured.getvalue()
    assert "unrecognised" in text
    assert "\\x1b[2J" in text  # what was sent stays readable, as an escape
    _assert_no_raw_controls(text)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_both_formats_escape_c0_del_c1_and_bidi_overrides_in_messages_and_tracebacks(
    fmt: str,
) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", fmt, stream)
        log = logging.getLogger("mailflow_relay.test")
        log.warning("client said %s", HOSTILE)
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            log.exception("failed for %r", "x\x1by")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.getvalue()
    _assert_no_raw_controls(text)
    if fmt == "json":
        entries = [json.loads(line) for line in text.splitlines()]
        assert len(entries) == 2
        assert entries[0]["message"] == "client said " + escape_controls(HOSTILE)
        _assert_no_raw_controls(entries[1]["exception"].replace("\n", " "))
    else:
        assert "client said \\x1b[2J\\x1b]0;pwned\\x07\\x0d\\x0aFAKE INFO line" in text
        assert "\\u202eevil" in text
        # The traceback keeps its own line breaks, and only those.
        assert "Traceback (most recent call last):\n" in text


def test_the_json_formatter_alone_escapes_what_json_dumps_would_let_through() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s", ("\x7f\x9b\u202e",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "\\x7f\\x9b\\u202e"
