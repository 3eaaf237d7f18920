"""aiosmtpd's ``SMTP.__init__`` without its introspection at every connection.

``SMTP.__init__`` looks its own class and its handler over each time it is called:
``inspect.getmembers`` of both (every attribute, each property evaluated), ``dir`` twice
and ``inspect.signature`` of the EHLO hook, to build three tables of bound methods. For
this relay's session that was about 0.3 ms of CPU per connection, the largest single cost
of a message sent on a connection of its own (py-spy, ``make bench --reuse off``).

The tables depend only on the two classes and on the AUTH mechanisms left out, so the
first session of a kind is made by ``SMTP.__init__`` itself and its tables are kept as
plain functions; every later one gets the same attributes, set here, and those functions
bound to it and to its handler. ``tests/relay/inbound/test_construction.py`` compares a
session made each way, attribute by attribute: an aiosmtpd release that sets anything
else in ``__init__`` fails it.
"""

from __future__ import annotations

import asyncio
import ssl
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, _AuthMechAttr, login_always_fail

__all__ = ["SmtpOptions", "init_smtp"]


@dataclass(frozen=True)
class _Tables:
    commands: dict[str, Callable[..., Any]]
    """``smtp_*`` by command: functions of the protocol's class."""
    auth: dict[str, tuple[Callable[..., Any], bool, bool]]
    """By mechanism: the function, whether it is the protocol's (else the handler's), and
    aiosmtpd's ``is_builtin``."""
    hooks: dict[str, Callable[..., Any]]
    """``handle_*`` by name: functions of the handler's class."""
    ehlo_hook_version: str | None


_TABLES: dict[tuple[type, type, frozenset[str]], _Tables | None] = {}


@dataclass(frozen=True)
class SmtpOptions:
    """The arguments this relay gives ``SMTP.__init__`` (aiosmtpd's defaults for the rest:
    AUTH over TLS only and not required, no call limits, no PROXY protocol)."""

    data_size_limit: int
    hostname: str
    ident: str
    tls_context: ssl.SSLContext | None
    timeout: float
    auth_exclude_mechanism: frozenset[str]
    enable_smtputf8: bool


def init_smtp(
    protocol: SMTP, handler: object, loop: asyncio.AbstractEventLoop, options: SmtpOptions
) -> None:
    """``SMTP.__init__(protocol, handler, …)`` with ``options``."""
    key = (type(protocol), type(handler), options.auth_exclude_mechanism)
    known = key in _TABLES
    tables = _TABLES.get(key)
    if tables is None:
        # The first of its kind, or a shape this module does not know: aiosmtpd's own way.
        SMTP.__init__(
            protocol,
            handler,
            data_size_limit=options.data_size_limit,
            hostname=options.hostname,
            ident=options.ident,
            tls_context=options.tls_context,
            timeout=options.timeout,
            auth_require_tls=True,
            auth_exclude_mechanism=options.auth_exclude_mechanism,
            enable_SMTPUTF8=options.enable_smtputf8,
            loop=loop,
        )
        if not known:
            _TABLES[key] = _tables_of(protocol, handler)
        return
    data_size_limit, hostname, ident = options.data_size_limit, options.hostname, options.ident
    tls_context, timeout = options.tls_context, options.timeout
    enable_smtputf8 = options.enable_smtputf8
    # What SMTP.__init__ sets, in its order, for the arguments above.
    attributes: dict[str, Any] = vars(protocol)
    attributes["__ident__"] = ident
    protocol.loop = loop
    asyncio.StreamReaderProtocol.__init__(
        protocol,
        asyncio.StreamReader(loop=loop, limit=protocol.line_length_limit),
        client_connected_cb=protocol._cb_client_connected,
        loop=loop,
    )
    protocol.event_handler = handler
    protocol.data_size_limit = data_size_limit
    protocol.enable_SMTPUTF8 = enable_smtputf8
    protocol._decode_data = False
    protocol.command_size_limits.clear()
    protocol.hostname = hostname
    protocol.tls_context = tls_context
    protocol.require_starttls = tls_context and False
    protocol._timeout_duration = timeout
    protocol._timeout_handle = None
    protocol._tls_handshake_okay = True
    protocol._tls_protocol = None
    protocol._original_transport = None
    protocol.session = None
    protocol.envelope = None
    protocol.transport = None
    protocol._handler_coroutine = None
    protocol._auth_require_tls = True
    protocol._proxy_timeout = None
    protocol._authenticator = None
    protocol._auth_callback = login_always_fail
    protocol._auth_required = False
    protocol._auth_methods = {
        name: _AuthMechAttr(types.MethodType(function, protocol if own else handler), builtin)
        for name, (function, own, builtin) in tables.auth.items()
    }
    protocol._handle_hooks = {
        name: types.MethodType(function, handler) for name, function in tables.hooks.items()
    }
    protocol._ehlo_hook_ver = tables.ehlo_hook_version
    protocol._smtp_methods = {
        name: types.MethodType(function, protocol) for name, function in tables.commands.items()
    }
    protocol._enforce_call_limit = False


def _tables_of(protocol: SMTP, handler: object) -> _Tables | None:
    """The tables of a session made by ``SMTP.__init__``, as functions; None when any
    entry is not a method of the protocol or the handler (then nothing is reused)."""
    commands: dict[str, Callable[..., Any]] = {}
    for name, method in protocol._smtp_methods.items():
        if not isinstance(method, types.MethodType) or method.__self__ is not protocol:
            return None
        commands[name] = method.__func__
    auth: dict[str, tuple[Callable[..., Any], bool, bool]] = {}
    for name, entry in protocol._auth_methods.items():
        method = entry.method
        if not isinstance(method, types.MethodType) or method.__self__ not in (protocol, handler):
            return None
        auth[name] = (method.__func__, method.__self__ is protocol, entry.is_builtin)
    hooks: dict[str, Callable[..., Any]] = {}
    for name, hook in protocol._handle_hooks.items():
        if not isinstance(hook, types.MethodType) or hook.__self__ is not handler:
            return None
        hooks[name] = hook.__func__
    return _Tables(commands, auth, hooks, protocol._ehlo_hook_ver)
