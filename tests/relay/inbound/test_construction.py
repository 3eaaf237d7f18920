"""A session made without aiosmtpd's introspection is the session aiosmtpd would make.

The first session of a listener is made by ``SMTP.__init__`` itself, the later ones by
``inbound/construction.py``: both are compared attribute by attribute, so an aiosmtpd
release that sets something else in ``__init__`` (or sets it otherwise) fails here, and
both are used for real over sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import types
from typing import Any

import aiosmtplib
import pytest

from mailflow_relay.inbound import construction
from mailflow_relay.inbound.listener import AcceptedMessage, ListenerSettings, SmtpListener
from mailflow_relay.inbound.passwords import hash_password
from mailflow_relay.inbound.session import SmtpSession
from support import run

BASE = ListenerSettings(
    host="127.0.0.1",
    port=0,
    hostname="relay.test",
    accept_from=(ipaddress.ip_network("127.0.0.0/8"),),
    command_timeout=10.0,
    data_timeout=10.0,
)


async def _accept(message: AcceptedMessage) -> str:
    return "Q0001"


def _compare(slow: SmtpSession, fast: SmtpSession) -> None:
    slow_attributes, fast_attributes = vars(slow), vars(fast)
    assert sorted(fast_attributes) == sorted(slow_attributes)
    for name, expected in slow_attributes.items():
        got = fast_attributes[name]
        assert type(got) is type(expected), name
        if isinstance(expected, types.MethodType):
            assert got.__func__ is expected.__func__, name
            assert got.__self__ is fast, name
        elif name in ("_smtp_methods", "_handle_hooks", "_auth_methods"):
            assert sorted(got) == sorted(expected), name
            for key, method in got.items():
                bound = method.method if name == "_auth_methods" else method
                reference = expected[key].method if name == "_auth_methods" else expected[key]
                assert bound.__func__ is reference.__func__, (name, key)
                owner = reference.__self__
                assert bound.__self__ is (fast if owner is slow else fast.event_handler), (
                    name,
                    key,
                )
                if name == "_auth_methods":
                    assert method.is_builtin == expected[key].is_builtin
        elif isinstance(expected, str | int | float | bool | type(None) | frozenset | tuple):
            assert got == expected, name
        elif isinstance(expected, types.FunctionType):
            assert got is expected, name  # aiosmtpd's login_always_fail
        elif name not in ("listener", "settings", "tls_context", "loop", "_loop"):
            # Per-connection objects (stream reader, futures, handler, limits): new ones.
            assert got is not expected, name


@pytest.mark.parametrize("users", [False, True])
def test_a_session_made_from_the_kept_tables_matches_one_aiosmtpd_made(users: bool) -> None:
    config = dataclasses.replace(BASE, users={"alice": hash_password("secret")} if users else {})

    async def main() -> None:
        construction._TABLES.clear()
        listener = SmtpListener(config, _accept, None)
        await listener.start()
        try:
            loop = asyncio.get_running_loop()
            slow = SmtpSession(listener, loop)
            assert construction._TABLES  # the first one made the tables
            fast = SmtpSession(listener, loop)
            _compare(slow, fast)
            # AUTH is offered exactly when there are users, both ways.
            assert ("PLAIN" in fast._auth_methods) is users
        finally:
            await listener.stop(grace=1.0)

    run(main)


def test_sessions_made_either_way_serve_mail() -> None:
    received: list[AcceptedMessage] = []

    async def accept(message: AcceptedMessage) -> str:
        received.append(message)
        return f"Q{len(received):04d}"

    async def main() -> list[Any]:
        construction._TABLES.clear()
        listener = SmtpListener(BASE, accept, None)
        await listener.start()
        replies: list[Any] = []
        try:
            for number in range(3):  # the first session aiosmtpd's way, then the kept one
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=listener.port, timeout=5, start_tls=False
                )
                async with client:
                    replies.append(
                        await client.sendmail(
                            "a@sender.test", ["b@dest.test"], f"Subject: {number}\r\n\r\nx\r\n"
                        )
                    )
        finally:
            await listener.stop(grace=1.0)
        return replies

    replies = run(main)
    assert len(replies) == 3
    assert [m.rcpt_tos for m in received] == [("b@dest.test",)] * 3
