"""A counting SMTP sink that offers STARTTLS: the far end of the TLS table.

smtp-sink has no TLS, so for the outbound hop with TLS both relays deliver here instead:
an aiosmtpd server in its own process (run as ``python tls_sink.py``), offering STARTTLS
with a self-signed certificate (Opportunistic / Postfix ``may`` check nothing). It keeps
no message, only counts: every few milliseconds it writes ``<messages> <messages over
TLS> <sessions>`` to a file that the harness reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailflow_relay.certificates import self_signed

__all__ = ["make_certificate", "parse_counts"]

WRITE_INTERVAL = 0.02


def make_certificate(folder: Path, name: str = "tls-sink.bench.test") -> tuple[Path, Path]:
    """A self-signed certificate for ``name``; returns (cert file, key file)."""
    certificate, key = self_signed([name], days=1)
    cert_file, key_file = folder / "tls-sink.crt", folder / "tls-sink.key"
    cert_file.write_bytes(certificate)
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    return cert_file, key_file


def parse_counts(text: str) -> tuple[int, int, int]:
    """(messages, messages over TLS, sessions) from the count file; zeros while it is empty."""
    parts = text.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return 0, 0, 0
    return int(parts[0]), int(parts[1]), int(parts[2])


class _Counts:
    messages = 0
    tls_messages = 0
    sessions = 0


class _Handler:
    def __init__(self, counts: _Counts) -> None:
        self.counts = counts

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.counts.messages += 1
        if session.ssl is not None:
            self.counts.tls_messages += 1
        return "250 2.0.0 OK: counted"


async def _serve(port: int, cert: Path, key: Path, count_file: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    counts = _Counts()
    handler = _Handler(counts)
    loop = asyncio.get_running_loop()

    class _CountingSMTP(SMTP):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if getattr(self, "_bench_counted", False) is False:
                self._bench_counted = True
                counts.sessions += 1
            super().connection_made(transport)

    def factory() -> SMTP:
        return _CountingSMTP(
            handler,
            hostname="tls-sink.bench.test",
            tls_context=context,
            require_starttls=False,
            data_size_limit=64 * 1024 * 1024,
            loop=loop,
        )

    server = await loop.create_server(factory, "127.0.0.1", port, backlog=256)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    written: tuple[int, int, int] | None = None
    try:
        while not stop.is_set():
            now = (counts.messages, counts.tls_messages, counts.sessions)
            if now != written:
                temp = count_file.with_suffix(".tmp")
                temp.write_text(" ".join(map(str, now)))
                temp.replace(count_file)
                written = now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WRITE_INTERVAL):
                    await stop.wait()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--count-file", type=Path, required=True)
    args: Any = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.cert, args.key, args.count_file))


if __name__ == "__main__":
    main()
