"""Implicit TLS to a next hop (RFC 8314 §3, "SMTPS" on port 465): TLS before the greeting.

A server on port 465 waits for a TLS ClientHello and says nothing until the handshake is
done, so a client that waits for a plaintext greeting (as STARTTLS does) waits until its
connect timeout and defers. With ``smartHost.implicitTls`` the deliverer connects with
TLS at once, and applies the connector's TLS mode to that handshake exactly as it would
after STARTTLS: the same cached :func:`~.tls_policy.client_context` (chain checked or
not), the same SNI (:func:`~.tls_policy.server_name_for`), then the same
:func:`~.tls_policy.check_certificate` on the peer certificate (pins, names). A failed
handshake is a TLS failure in every mode, Opportunistic included: on such a port there is
no plaintext to fall back to.

aiosmtplib can connect with TLS (``use_tls``), but when it opens the TCP connection itself
it uses the address it connects to as the TLS server name, so the SNI would be an IP
address (not sent at all). :class:`ImplicitTlsSMTP` opens the TCP connection itself, with
the connect timeout, and hands the socket to aiosmtplib with the server name to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import aiosmtplib

from mailflow_relay.transports import write_transport

__all__ = ["HandshakeFailed", "ImplicitTlsSMTP"]


class HandshakeFailed(aiosmtplib.SMTPConnectError):
    """The TLS handshake made at connect failed; ``cause`` is what ``ssl`` raised."""

    def __init__(self, cause: ssl.SSLError) -> None:
        super().__init__(f"TLS handshake failed: {cause}")
        self.cause = cause


class ImplicitTlsSMTP(aiosmtplib.SMTP):
    """An aiosmtplib client whose connection is TLS from the first byte."""

    def __init__(
        self,
        address: str,
        port: int,
        *,
        server_name: str | None,
        tls_context: ssl.SSLContext,
        local_hostname: str,
        timeout: float,
    ) -> None:
        # aiosmtplib sends ``hostname`` as SNI when it is given a socket; an IP address
        # there is never sent (ssl leaves SNI out for addresses).
        super().__init__(
            hostname=server_name or address,
            use_tls=True,
            tls_context=tls_context,
            local_hostname=local_hostname,
            timeout=timeout,
        )
        self._address = (address, port)

    async def connect(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        timeout = kwargs.get("timeout")
        assert isinstance(timeout, int | float), "connect needs an explicit timeout"
        family = socket.AF_INET6 if ":" in self._address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.get_running_loop().sock_connect(sock, self._address)
            except TimeoutError as e:
                raise aiosmtplib.SMTPConnectTimeoutError(
                    f"Timed out connecting to {self._address[0]} on port {self._address[1]}"
                ) from e
            except OSError as e:
                raise aiosmtplib.SMTPConnectError(
                    f"Error connecting to {self._address[0]} on port {self._address[1]}: {e}"
                ) from e
            self.sock = sock
            try:
                return await super().connect(*args, **kwargs)
            except aiosmtplib.SMTPConnectError as e:
                cause = _ssl_error(e)
                if cause is not None:
                    raise HandshakeFailed(cause) from e
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        finally:
            # The transport owns the socket now; a later connect opens a new one.
            self.sock = None

    def close(self) -> None:
        # SMTP ends the session itself (QUIT, or a failure that drops it): a TLS
        # close_notify exchange adds nothing, and asyncio's graceful TLS shutdown keeps
        # the socket open until the peer answers it (up to 30 s), or past the event loop.
        transport = self.transport
        super().close()
        writable = write_transport(transport)
        if writable is not None:
            writable.abort()


def _ssl_error(error: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
