"""Command-line values that name places: endpoints, networks and folders, checked once."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from mailflow_compiler.errors import UsageError
from mailflow_relay.errors import InvalidDomainError
from mailflow_relay.routing.domains import normalize_host

__all__ = ["parse_endpoint", "parse_networks", "spool_path"]


def parse_endpoint(text: str, option: str, *, names: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; HOST an IP address, or with ``names`` a host name."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{option} {text!r}: expected HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            return host, int(port)
        if not names:
            raise UsageError(f"{option} {text!r}: HOST must be an IP address to bind") from None
        try:
            normalize_host(host)
        except InvalidDomainError as e:
            raise UsageError(f"{option} {text!r}: {e.reason}") from e
    return host, int(port)


def parse_networks(
    values: Sequence[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as e:
            raise UsageError(f"--accept-from {value!r}: {e}") from e
    return tuple(networks)


def spool_path(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--spool {text!r}: not a folder")
    return path
