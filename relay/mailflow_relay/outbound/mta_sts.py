"""MTA-STS (RFC 8461): the recipient domain's published policy for TLS to its MX hosts.

* Discovery: one TXT record ``v=STSv1; id=...`` at ``_mta-sts.<policy domain>``.
* The policy: ``https://mta-sts.<policy domain>/.well-known/mta-sts.txt`` over HTTPS with
  a certificate valid for that name (WebPKI, or the bundle given for tests); no redirects,
  at most 64 KiB, ``text/plain``, within a time limit.
* A persisted cache: a policy is used until ``max_age`` runs out; a new TXT ``id`` makes
  it fetched again; past half its ``max_age`` it is fetched again at the next use
  (proactively, before it expires); when a fetch fails, the cached policy stays in force.
* ``mode: enforce``: only MX hosts matching an ``mx`` pattern are tried, with TLS and a
  certificate valid for the MX host name; ``testing``: failures are reported, delivery
  goes on as without the policy; ``none``: no policy.

The policy domain is the recipient domain, or for a smart host with ``mx: true`` the smart
host's domain (§3.4). A usable DANE requirement always wins (RFC 8461 §2): MTA-STS never
overrides a DANE check, failing or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mailflow_relay.errors import MailflowRelayError
from mailflow_relay.outbound.dns import DnsError, Resolver

__all__ = [
    "MtaSts",
    "StsMode",
    "StsPolicy",
    "StsPolicyError",
    "mx_matches",
    "parse_policy",
    "parse_txt",
]

logger = logging.getLogger(__name__)

MAX_POLICY_BYTES = 64 * 1024
MAX_AGE_LIMIT = 31_557_600
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class StsPolicyError(MailflowRelayError, ValueError):
    """A policy (or its TXT record) that is missing, malformed or could not be fetched."""

    def __init__(self, domain: str, reason: str, *, result_type: str) -> None:
        super().__init__(f"MTA-STS {domain}: {reason}")
        self.domain = domain
        self.reason = reason
        self.result_type = result_type
        """RFC 8460 result type: sts-policy-fetch-error or sts-policy-invalid."""


class StsMode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class StsPolicy:
    domain: str
    id: str
    mode: StsMode
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    text: str
    """The policy as fetched (for TLS-RPT's policy-string)."""

    def expired(self, now: float) -> bool:
        return now >= self.fetched_at + self.max_age

    def stale(self, now: float) -> bool:
        """Past half its life: fetched again at the next use, before it expires."""
        return now >= self.fetched_at + self.max_age / 2

    def allows(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_txt(domain: str, texts: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records; None when there is no (single) record."""
    records = [t for t in texts if t.startswith("v=STSv1")]
    if len(records) != 1:
        return None  # RFC 8461 3.1: none, or more than one, means no policy
    fields = dict(
        part.strip().partition("=")[::2] for part in records[0].split(";") if part.strip()
    )
    policy_id = fields.get("id", "")
    if fields.get("v") != "STSv1" or not _ID.match(policy_id):
        return None
    return policy_id


def parse_policy(domain: str, policy_id: str, text: str, fetched_at: float) -> StsPolicy:
    """RFC 8461 §3.2; raise :class:`StsPolicyError` (sts-policy-invalid) if it is not one."""
    values: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise StsPolicyError(
                domain, f"not a key: value line: {line[:80]!r}", result_type="sts-policy-invalid"
            )
        values.setdefault(key, []).append(value.strip())

    def invalid(reason: str) -> StsPolicyError:
        return StsPolicyError(domain, reason, result_type="sts-policy-invalid")

    if values.get("version") != ["STSv1"]:
        raise invalid("version must be STSv1")
    try:
        mode = StsMode(values.get("mode", [""])[0])
    except ValueError:
        raise invalid("mode must be enforce, testing or none") from None
    ages = values.get("max_age", [])
    if len(ages) != 1 or not ages[0].isdigit() or int(ages[0]) > MAX_AGE_LIMIT:
        raise invalid(f"max_age must be one number of seconds up to {MAX_AGE_LIMIT}")
    mx = tuple(p.lower().rstrip(".") for p in values.get("mx", []))
    if mode is not StsMode.NONE and not mx:
        raise invalid("mode enforce and testing need at least one mx line")
    return StsPolicy(domain, policy_id, mode, mx, int(ages[0]), fetched_at, text)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, or ``*.example.com`` for exactly one label left of it."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, tail = host.partition(".")
        return bool(head) and bool(dot) and tail == pattern[2:]
    return host == pattern


class MtaSts:
    """Finds, fetches and caches the MTA-STS policies of recipient domains."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        cache_file: Path | None = None,
        https_port: int = 443,
        cafile: str | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.cache_file = cache_file
        self.https_port = https_port
        self.timeout = timeout
        self.clock = clock
        self._context = ssl.create_default_context(cafile=cafile)
        self.ca_bundle = Path(cafile).read_text() if cafile else None
        """For tests: the CA that MX certificates are checked against under enforce."""
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._cache: dict[str, StsPolicy] = self._load()
        self.fetches = 0

    # --- the cache ----------------------------------------------------------------------

    def _load(self) -> dict[str, StsPolicy]:
        if self.cache_file is None or not self.cache_file.exists():
            return {}
        try:
            raw = json.loads(self.cache_file.read_text())
            return {
                domain: StsPolicy(
                    domain=domain,
                    id=str(entry["id"]),
                    mode=StsMode(entry["mode"]),
                    mx=tuple(str(m) for m in entry["mx"]),
                    max_age=int(entry["max_age"]),
                    fetched_at=float(entry["fetched_at"]),
                    text=str(entry["text"]),
                )
                for domain, entry in raw.items()
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A broken cache costs fetches, never mail: start empty and say so.
            logger.warning("MTA-STS cache %s unreadable (%s): starting empty", self.cache_file, e)
            return {}

    def _save(self) -> None:
        if self.cache_file is None:
            return
        now = self.clock()
        body = {
            d: {**asdict(p), "mode": p.mode.value, "mx": list(p.mx)}
            for d, p in self._cache.items()
            if not p.expired(now)
        }
        for entry in body.values():
            entry.pop("domain", None)
        temporary = self.cache_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(body, sort_keys=True))
        os.replace(temporary, self.cache_file)

    # --- lookups ------------------------------------------------------------------------

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy in force for ``domain``; raise :class:`StsPolicyError` if it cannot be had.

        None: the domain has no policy (no TXT record and nothing cached).
        """
        domain = domain.lower().rstrip(".")
        now = self.clock()
        cached = self._cache.get(domain)
        if cached is not None and cached.expired(now):
            cached = None
        try:
            policy_id = await self._txt(domain)
        except DnsError:
            if cached is not None:
                return cached  # RFC 8461 5.1: a cached policy outlives a failed lookup
            raise StsPolicyError(
                domain, "the _mta-sts TXT lookup failed", result_type="sts-policy-fetch-error"
            ) from None
        if policy_id is None:
            return cached
        if cached is not None and cached.id == policy_id and not cached.stale(now):
            return cached
        try:
            text = await self._fetch(domain)
            fresh = parse_policy(domain, policy_id, text, now)
        except StsPolicyError:
            if cached is not None:
                logger.warning("MTA-STS %s: refresh failed, the cached policy stays", domain)
                return cached
            raise
        self._cache[domain] = fresh
        try:
            await asyncio.to_thread(self._save)  # file I/O off the event loop
        except OSError as e:
            # A cache that cannot be written costs fetches after a restart, never mail.
            logger.warning("MTA-STS cache %s not written: %s", self.cache_file, e)
        logger.info("MTA-STS %s: policy id %s, mode %s", domain, fresh.id, fresh.mode.value)
        return fresh

    async def _txt(self, domain: str) -> str | None:
        try:
            texts = await self.resolver.texts(f"_mta-sts.{domain}")
        except DnsError as e:
            if e.permanent:
                return None  # NXDOMAIN: no policy
            raise
        return parse_txt(domain, texts)

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        self.fetches += 1

        def failed(reason: str) -> StsPolicyError:
            return StsPolicyError(domain, reason, result_type="sts-policy-fetch-error")

        try:
            addresses = await self.resolver.addresses(host)
        except DnsError as e:
            raise failed(f"{host} has no address: {e.reason}") from e
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    addresses[0], self.https_port, ssl=self._context, server_hostname=host
                )
                writer.write(
                    f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                    "User-Agent: mailflow\r\nAccept: text/plain\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                raw = await reader.read(MAX_POLICY_BYTES + 8192)
                if not reader.at_eof() and await reader.read(1):
                    raise failed(f"the policy is larger than {MAX_POLICY_BYTES} bytes")
        except ssl.SSLError as e:
            # sts-webpki-invalid in RFC 8460 terms: the policy host's certificate is not valid.
            raise StsPolicyError(
                domain, f"HTTPS to {host}: {e}", result_type="sts-webpki-invalid"
            ) from e
        except (OSError, TimeoutError) as e:
            raise failed(f"HTTPS to {host}: {e or type(e).__name__}") from e
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    async with asyncio.timeout(2):
                        await writer.wait_closed()
        return _body(domain, raw)


def _body(domain: str, raw: bytes) -> str:
    def failed(reason: str) -> StsPolicyError:
        return StsPolicyError(domain, reason, result_type="sts-policy-fetch-error")

    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise failed("no complete HTTP response")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        # Redirects included: RFC 8461 3.3 forbids following them.
        raise failed(f"HTTP status {lines[0][:60]!r}, not 200")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if not headers.get("content-type", "").lower().startswith("text/plain"):
        raise failed(f"Content-Type {headers.get('content-type')!r}, not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _unchunk(domain, body)
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit() or int(length) > MAX_POLICY_BYTES or len(body) < int(length):
            raise failed(f"bad or too large Content-Length {length!r}")
        body = body[: int(length)]
    if len(body) > MAX_POLICY_BYTES:
        raise failed(f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StsPolicyError(domain, f"not UTF-8: {e}", result_type="sts-policy-invalid") from e


def _unchunk(domain: str, body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise StsPolicyError(
                domain, "bad chunked encoding", result_type="sts-policy-fetch-error"
            ) from None
        if not sep or size == 0:
            return bytes(out)
        out += rest[:size]
        body = rest[size + 2 :]
