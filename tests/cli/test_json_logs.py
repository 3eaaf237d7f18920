"""`--log-format json`: every line the relay writes is JSON, also the ones before it runs
and the error it exits with, so `jq` reads the whole output."""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailflow_relay.engine.logs import configure_logging
from mailflow_relay.inbound.session_ids import bind_new_session

ROOT = Path(__file__).resolve().parents[2]
TOUR = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.yaml"))


def mailflow(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "mailflow"
    command = [str(script)] if script.exists() else [shutil.which("mailflow") or "mailflow"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def jq_lines(text: str) -> list[dict[str, object]]:
    """Every line through `jq` (which stops at the first line that is not JSON)."""
    parsed = subprocess.run(
        ["jq", "-c", "."], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert parsed.returncode == 0, (parsed.stderr, text)
    lines = [json.loads(line) for line in parsed.stdout.splitlines()]
    assert len(lines) == len(text.splitlines())
    return lines


def test_notes_before_the_start_and_the_exit_error_are_json(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        # No --accept-from and no users: a warning before anything runs; the port is taken:
        # an error at exit.
        result = mailflow(
            "relay", "--manifests", *TOUR, "--spool", str(tmp_path / "spool"),
            "--hostname", "relay.test", "--listen", address, "--log-format", "json",
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    lines = jq_lines(result.stderr)
    assert lines[0]["level"] == "warning"
    assert str(lines[0]["message"]).startswith("warning: no --accept-from and no --auth-secret")
    assert lines[-1]["level"] == "error"
    assert str(lines[-1]["message"]).startswith(f"mailflow: error: --listen {address}: address")


def test_a_usage_error_of_a_json_command_is_json(tmp_path: Path) -> None:
    result = mailflow(
        "relay", "--manifests", str(tmp_path / "missing.yaml"), "--spool", str(tmp_path),
        "--log-format", "json",
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = jq_lines(result.stderr)
    assert line["level"] == "error"
    assert "missing.yaml" in str(line["message"])


def test_an_option_error_with_json_logs_is_one_json_line(tmp_path: Path) -> None:
    """Found by argparse, before the command knows its log format: no usage text either."""
    result = mailflow("relay", "--log-format", "json", "--manifests", "x.yaml")
    assert result.returncode == 2
    (line,) = jq_lines(result.stderr)
    assert line["message"] == "mailflow: error: the following arguments are required: --spool"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, sys.excepthook
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook = hook


def test_fields_given_to_a_log_call_are_fields_and_escaped(json_log: io.StringIO) -> None:
    logging.getLogger("mailflow_relay.test").info(
        "queue %s: to=<%s>",
        "0123456789abcd-0123456789abcdef",
        "a@b.test",
        extra={"recipient": "a\x1b[31m@b.test", "verified": True, "reply_code": 250},
    )
    (entry,) = [
        json.loads(line)
        for line in json_log.getvalue().splitlines()
        if json.loads(line)["logger"] == "mailflow_relay.test"
    ]
    assert entry["queue_id"] == "0123456789abcd-0123456789abcdef"
    assert entry["recipient"] == "a\\x1b[31m@b.test"  # no terminal escape reaches the log
    assert entry["verified"] is True
    assert entry["reply_code"] == 250
    assert "session_id" not in entry


def test_a_session_id_tags_every_line_of_its_context_and_its_tasks(
    json_log: io.StringIO,
) -> None:
    import asyncio
    import contextvars

    logger = logging.getLogger("mailflow_relay.test")

    async def session() -> str:
        session_id = bind_new_session()
        logger.info("Connection from 127.0.0.1")

        async def handler() -> None:
            logger.info("queued x")

        await asyncio.create_task(handler())
        return session_id

    first = contextvars.copy_context().run(asyncio.run, session())
    logger.info("outside any session")
    entries = [json.loads(line) for line in json_log.getvalue().splitlines()]
    ours = [e for e in entries if e["logger"] == "mailflow_relay.test"]
    assert [e.get("session_id") for e in ours] == [first, first, None]


def test_the_text_format_names_the_session_too() -> None:
    import contextvars

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("INFO", "text", stream)
        logger = logging.getLogger("mailflow_relay.test")

        def in_session() -> str:
            session_id = bind_new_session()
            logger.info("Connection from 127.0.0.1")
            return session_id

        session_id = contextvars.copy_context().run(in_session)
        logger.info("outside")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    first, second = stream.getvalue().splitlines()
    assert first.endswith(
        f"INFO mailflow_relay.test [session {session_id}]: Connection from 127.0.0.1"
    )
    assert second.endswith("INFO mailflow_relay.test: outside")
