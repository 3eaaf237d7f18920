"""Command-line values that name places: endpoints, networks and folders, checked once."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from mailflow_compiler.errors import UsageError
from mailflow_relay.errors import InvalidDomainError
from mailflow_relay.routing.domains import normalize_host

__all__ = ["parse_dns_servers", "parse_endpoint", "parse_networks", "spool_path"]


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
    values: Sequence[str], option: str = "--accept-from"
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as e:
            raise UsageError(f"{option} {value!r}: {e}") from e
    return tuple(networks)


def parse_dns_servers(
    values: Sequence[str], option: str = "--dns-server"
) -> tuple[tuple[str, ...], int]:
    """``IP``, ``IP:PORT``, ``[V6]:PORT`` or a bare IPv6 address, for a resolver: addresses
    only (a name would need DNS to be trusted), and one port for all of them (dnspython's
    resolver has a single port)."""
    servers: list[str] = []
    ports: set[int] = set()
    for value in values:
        host, port = value, 53
        if value.count(":") == 1 or value.startswith("["):
            host, _, text = value.rpartition(":")
            if not text.isdigit() or not 1 <= int(text) <= 65535:
                raise UsageError(f"{option} {value!r}: expected IP[:PORT]")
            host, port = host.strip("[]"), int(text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(
                f"{option} {value!r}: expected IP[:PORT] of a resolver (an address: a name "
                "would have to be resolved by a resolver not yet trusted)"
            ) from None
        servers.append(host)
        ports.add(port)
    if len(ports) > 1:
        raise UsageError(
            f"{option}: the resolvers use different ports ({', '.join(map(str, sorted(ports)))}); "
            "give them all the same port"
        )
    return tuple(servers), ports.pop() if ports else 53


def spool_path(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--spool {text!r}: not a folder")
    return path
