"""The health and metrics port against oversized requests (issue 12, point 9).

Before: a request line over 64 KiB raised inside the connection handler: no reply, and a
traceback in the log per request. Now: 414 (request line) or 431 (a header line), one log
line without the request's content, and the port keeps answering.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from mailflow_relay.hosting.serve import HTTP_LINE_LIMIT, HealthServer
from support import run


async def _request(port: int, data: bytes) -> bytes:
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * (HTTP_LINE_LIMIT + 10) + b" HTTP/1.1\r\n\r\n", b"414 URI Too Long"),
        (
            b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * (HTTP_LINE_LIMIT + 10) + b"\r\n\r\n",
            b"431 Request Header Fields Too Large",
        ),
    ],
    ids=["request-line", "header-line"],
)
def test_an_overlong_line_gets_a_4xx_and_no_traceback(
    caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: bytes
) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        health = HealthServer()
        await health.start("127.0.0.1", 0)
        assert health._server is not None
        port = int(health._server.sockets[0].getsockname()[1])
        try:
            refused = await _request(port, request_bytes)
            healthy = await _request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        finally:
            await health.stop()
        return refused, healthy

    with caplog.at_level(logging.DEBUG):
        refused, healthy = run(scenario)
    assert refused.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert healthy.startswith(b"HTTP/1.1 200 OK\r\n")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    (line,) = [r.getMessage() for r in caplog.records if "HTTP request from" in r.getMessage()]
    assert (
        line
        == f"HTTP request from 127.0.0.1 refused with {status[:3].decode()}: a line over 65536 bytes"
    )
