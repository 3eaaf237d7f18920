"""Where a message goes: MX and address lookups with dnspython, as RFC 5321 §5.1 says.

* MX records are tried by preference, lowest first; hosts of equal preference are
  shuffled so that load spreads (§5.1: "randomize").
* No MX record but the name exists: the domain itself is the implicit MX (§5.1).
* A single MX of preference 0 with the target "." is a null MX (RFC 7505): the
  domain accepts no mail, a permanent failure (556 5.1.10).
* NXDOMAIN is permanent (the domain does not exist: 5.1.2); SERVFAIL, a timeout or no
  answer from any server is temporary (4.4.3) and the message is retried later.

Every lookup has a timeout; the resolver's servers can be given explicitly, so tests
(and clusters with a special resolver) point it at their own DNS server.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver

from mailflow_relay.errors import MailflowRelayError

__all__ = ["DnsError", "MxHost", "Resolver"]

logger = logging.getLogger(__name__)


class DnsError(MailflowRelayError, LookupError):
    """A lookup that did not give a usable answer; ``permanent`` says whether to bounce."""

    def __init__(self, name: str, reason: str, *, permanent: bool, status: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.permanent = permanent
        self.status = status
        """The enhanced status code (RFC 3463) for a bounce or deferral."""


@dataclass(frozen=True)
class MxHost:
    preference: int
    host: str
    implicit: bool = False


class Resolver:
    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        port: int = 53,
        timeout: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = port
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security

    async def mx_hosts(self, domain: str) -> list[MxHost]:
        """The mail exchangers of ``domain`` in the order to try them."""
        try:
            answer = await self._resolver.resolve(domain, dns.rdatatype.MX, search=False)
        except dns.resolver.NXDOMAIN as e:
            raise DnsError(
                domain, "domain does not exist (NXDOMAIN)", permanent=True, status="5.1.2"
            ) from e
        except dns.resolver.NoAnswer:
            logger.info("no MX for %s: using the implicit MX (RFC 5321 5.1)", domain)
            return [MxHost(0, domain, implicit=True)]
        except dns.exception.DNSException as e:
            # SERVFAIL, timeouts, anything that is not a definite answer: retry later.
            raise DnsError(
                domain, f"MX lookup failed temporarily: {e}", permanent=False, status="4.4.3"
            ) from e
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer]
        if len(records) == 1 and records[0][1] in ("", ".") and records[0][0] == 0:
            raise DnsError(
                domain,
                "the domain publishes a null MX: it accepts no mail (RFC 7505)",
                permanent=True,
                status="5.1.10",
            )
        records = [r for r in records if r[1] not in ("", ".")]
        by_preference: dict[int, list[str]] = {}
        for preference, host in records:
            by_preference.setdefault(preference, []).append(host)
        ordered: list[MxHost] = []
        for preference in sorted(by_preference):
            hosts = by_preference[preference]
            self._rng.shuffle(hosts)
            ordered.extend(MxHost(preference, host) for host in hosts)
        return ordered

    async def texts(self, name: str) -> list[str]:
        """The TXT records of ``name``, each as one string (its parts joined); [] for none."""
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.TXT, search=False)
        except dns.resolver.NXDOMAIN as e:
            raise DnsError(name, "does not exist (NXDOMAIN)", permanent=True, status="5.1.2") from e
        except dns.resolver.NoAnswer:
            return []
        except dns.exception.DNSException as e:
            raise DnsError(
                name, f"TXT lookup failed temporarily: {e}", permanent=False, status="4.4.3"
            ) from e
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in answer
            if isinstance(r, dns.rdtypes.ANY.TXT.TXT)
        ]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host`` (an address literal is returned as is)."""
        try:
            return [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            pass
        found: list[str] = []
        failures: list[str] = []
        permanent = True
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self._resolver.resolve(host, rdtype, search=False)
            except dns.resolver.NXDOMAIN:
                failures.append(f"{rdtype.name}: NXDOMAIN")
                break
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException as e:
                permanent = False
                failures.append(f"{rdtype.name}: {e}")
                continue
            found.extend(r.to_text() for r in answer)
        if found:
            return found
        reason = "; ".join(failures) or "no A or AAAA record"
        raise DnsError(
            host,
            f"no address: {reason}",
            permanent=permanent,
            status="5.1.2" if permanent else "4.4.3",
        )
