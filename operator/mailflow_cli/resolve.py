"""``mailflow explain --resolve``: the DNS and DANE outcome that would apply, per recipient.

It asks the same resolvers the relay would (``--dns-server`` for MX and addresses,
``--dnssec-resolver`` for the DNSSEC-validated answers DANE needs) through the relay's own
code (:mod:`mailflow_relay.outbound.dane`), so what it prints is what a delivery would do
now, before any connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from mailflow_relay.outbound.dane import Dane, dane_for
from mailflow_relay.outbound.dns import DnsError, Resolver
from mailflow_relay.outbound.mta_sts import MtaSts
from mailflow_relay.routing.document import (
    DaneMode,
    Destination,
    MtaStsMode,
    RecipientMx,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.router import Client, Router

__all__ = ["Lookups", "lines_for", "resolve_lines"]

TIMEOUT = 10.0


async def _hosts(
    resolver: Resolver, destination: Destination, domain: str, mx_port: int
) -> list[tuple[str, int]]:
    if isinstance(destination, RecipientMx):
        return [(m.host, mx_port) for m in await resolver.mx_hosts(domain)]
    if isinstance(destination, SmartHost):
        if destination.mx:
            return [(m.host, destination.port) for m in await resolver.mx_hosts(destination.host)]
        return [(destination.host, destination.port)]
    return []


async def lines_for(
    resolver: Resolver,
    dane: Dane,
    destination: Destination,
    tls: TlsPolicy,
    domain: str,
    mx_port: int,
) -> list[str]:
    try:
        hosts = await _hosts(resolver, destination, domain, mx_port)
    except DnsError as e:
        return [f"  resolve      {e.status} {e}"]
    if not hosts:
        return ["  resolve      (no host names to resolve: profile servers)"]
    lines = [f"  next hops    {', '.join(f'{h}:{p}' for h, p in hosts)}"]
    if tls.dane is DaneMode.NONE and tls.mta_sts is MtaStsMode.NONE:
        lines.append("  policies     none used (tls.dane and tls.mtaSts are None)")
        return lines
    found = await dane.requirements(destination, tls, domain, hosts)
    for (host, port), requirement in found.items():
        lines.append(
            f"  dane         {host}:{port}: {requirement.state.value}: {requirement.reason}"
        )
        if requirement.sts is not None:
            applied = requirement.override.describe() if requirement.override else "the mode's"
            lines.append(f"  mta-sts      {host}:{port}: {requirement.sts} (TLS checks: {applied})")
    return lines


@dataclass(frozen=True)
class Lookups:
    """The resolvers to ask, as the relay's flags of the same names give them."""

    dns_servers: tuple[str, ...] = ()
    dns_port: int = 53
    dnssec_resolvers: tuple[str, ...] = ()
    dnssec_port: int = 53
    mx_port: int = 25


def resolve_lines(
    document: RoutingDocument,
    sender: str,
    recipients: Sequence[str],
    client: Client | None,
    lookups: Lookups,
) -> list[str]:
    """For each recipient: the next hops found in DNS and what DANE requires of each."""
    router = Router(document)
    mx_port = lookups.mx_port

    async def everything() -> list[str]:
        resolver = Resolver(lookups.dns_servers, port=lookups.dns_port, timeout=TIMEOUT / 2)
        mta_sts = MtaSts(resolver, timeout=TIMEOUT / 2)
        dane = dane_for(
            lookups.dnssec_resolvers, lookups.dnssec_port, timeout=TIMEOUT / 2, mta_sts=mta_sts
        )
        lines: list[str] = []
        async with asyncio.timeout(TIMEOUT * max(1, len(recipients))):
            for recipient in recipients:
                decision = router.route_for(recipient, sender, client)
                lines.append(f"{recipient}  (resolved now)")
                if decision.destination is None:
                    lines.append("  resolve      nothing to resolve: rejected")
                    continue
                lines.extend(
                    await lines_for(
                        resolver, dane, decision.destination, decision.tls, decision.domain, mx_port
                    )
                )
                lines.append("")
        return lines

    return asyncio.run(everything())
