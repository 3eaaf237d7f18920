"""Destination probes: what a hosted connector service makes admins click "validate" for.

A probe does what delivery does up to the point of sending mail — connect, EHLO,
STARTTLS, check the certificate with exactly the connector's TLS mode (the relay's own
:mod:`mailflow_relay.outbound.tls_policy`: the same context, the same SNI, the same checks) —
then says QUIT. Its result becomes the ``DestinationReachable`` and ``TLSVerified``
conditions and ``status.certificate``.

A profile has no TLS mode of its own (its connectors have), so its servers are probed
opportunistically: reachable, STARTTLS offered, which certificate. Destinations that
are chosen per recipient (the recipient's MX, ``mx: true``) have nothing fixed to
probe and report ``Unknown``.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from mailflow_relay.outbound.deliverer import ssl_cause
from mailflow_relay.outbound.implicit_tls import HandshakeFailed, ImplicitTlsSMTP
from mailflow_relay.outbound.tls_policy import (
    CertificateInfo,
    TlsPolicyError,
    check_certificate,
    classify_handshake_error,
    client_context,
    server_name_for,
)
from mailflow_relay.routing.document import ServerAddress, TlsMode, TlsPolicy

__all__ = ["ProbeResult", "ServerProbe", "probe_server", "summarize"]


@dataclass(frozen=True)
class ServerProbe:
    """What one server said."""

    server: ServerAddress
    reachable: bool
    message: str
    tls_ok: bool | None = None
    """None: not reached, so TLS was not tried."""
    tls_reason: str = ""
    tls_message: str = ""
    certificate: CertificateInfo | None = None


@dataclass(frozen=True)
class ProbeResult:
    """The probe of one object (all its servers), as conditions see it."""

    reachable: str
    reachable_reason: str
    reachable_message: str
    tls: str
    tls_reason: str
    tls_message: str
    certificate: CertificateInfo | None = None
    days_left: float | None = None


async def probe_server(
    server: ServerAddress,
    policy: TlsPolicy,
    recipient_domain: str,
    *,
    helo_name: str = "mailflow-operator.invalid",
    step_timeout: float = 10.0,
    implicit_tls: bool = False,
) -> ServerProbe:
    """Connect, EHLO, STARTTLS and check the certificate as ``policy`` requires; then QUIT.

    ``implicit_tls`` (a smart host's ``implicitTls``): TLS at connect instead of STARTTLS."""
    mode = policy.mode
    smtp = aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        local_hostname=helo_name,
        timeout=step_timeout,
        start_tls=False,
    )
    if implicit_tls:
        smtp = ImplicitTlsSMTP(
            server.host,
            server.port,
            server_name=server_name_for(policy, server.host, recipient_domain),
            tls_context=client_context(policy),
            local_hostname=helo_name,
            timeout=step_timeout,
        )
    try:
        try:
            await smtp.connect(timeout=step_timeout)
            await smtp.ehlo()
        except HandshakeFailed as e:
            error = classify_handshake_error(e.cause, mode)
            return ServerProbe(
                server, True, f"{server}: TCP answers", False, _reason(error), f"{server}: {error}"
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            return ServerProbe(server, False, f"{server}: cannot connect: {e}")
        if implicit_tls:
            pass  # TLS since connect: its certificate is checked below
        elif not smtp.supports_extension("starttls"):
            if mode.requires_tls:
                return ServerProbe(
                    server,
                    True,
                    f"{server}: SMTP answers",
                    False,
                    "NoStartTLS",
                    f"{server}: does not offer STARTTLS; {mode.value} requires TLS",
                )
            return ServerProbe(
                server,
                True,
                f"{server}: SMTP answers",
                True,
                "Opportunistic",
                f"{server}: no STARTTLS offered; Opportunistic sends in plaintext",
            )
        try:
            if not implicit_tls:
                await smtp.starttls(
                    tls_context=client_context(policy),
                    server_hostname=server_name_for(policy, server.host, recipient_domain),
                    timeout=step_timeout,
                )
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as e:
            error = classify_handshake_error(ssl_cause(e), mode)
            return ServerProbe(
                server,
                True,
                f"{server}: SMTP answers",
                not mode.requires_tls,
                _reason(error),
                f"{server}: {error}",
            )
        ssl_object = smtp.get_transport_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            info = check_certificate(policy, der, recipient_domain)
        except TlsPolicyError as e:
            return ServerProbe(
                server, True, f"{server}: SMTP answers", False, _reason(e), f"{server}: {e}"
            )
        verified = {
            TlsMode.OPPORTUNISTIC: "TLS established (not verified: Opportunistic)",
            TlsMode.SELF_SIGNED: (
                "TLS established, certificate pinned"
                if policy.pinned_fingerprints
                else "TLS established (any certificate: SelfSigned)"
            ),
        }.get(mode, f"certificate verified for {mode.value}")
        return ServerProbe(
            server, True, f"{server}: SMTP answers", True, "Verified", f"{server}: {verified}", info
        )
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            if smtp.is_connected:
                await smtp.quit(timeout=step_timeout)
        smtp.close()


def _reason(error: TlsPolicyError) -> str:
    """A condition reason (CamelCase) from the relay's TLS failure label."""
    return "".join(part.capitalize() for part in error.reason.value.split("_")).replace(
        "Starttls", "StartTLS"
    )


def summarize(
    probes: Sequence[ServerProbe], *, warning_days: float, now: datetime.datetime | None = None
) -> ProbeResult:
    """One result for an object from the probes of its servers: every server must pass."""
    now = now or datetime.datetime.now(datetime.UTC)
    unreachable = [p for p in probes if not p.reachable]
    if unreachable:
        reachable = ("False", "Unreachable", "; ".join(p.message for p in unreachable))
    else:
        reachable = ("True", "Reachable", "; ".join(p.message for p in probes))
    tried = [p for p in probes if p.tls_ok is not None]
    failed = [p for p in tried if not p.tls_ok]
    certificate = next((p.certificate for p in tried if p.certificate is not None), None)
    days_left = None
    if certificate is not None:
        days_left = (certificate.not_after - now).total_seconds() / 86400
    if not tried:
        tls = ("Unknown", "NotProbed", "No server answered, so TLS was not tried")
    elif failed:
        tls = ("False", failed[0].tls_reason, "; ".join(p.tls_message for p in failed))
    elif days_left is not None and days_left < warning_days:
        assert certificate is not None
        tls = (
            "True",
            "CertificateExpiringSoon",
            f"certificate of {certificate.subject} expires in {max(days_left, 0):.0f} day(s), "
            f"on {certificate.not_after:%Y-%m-%d}",
        )
    else:
        tls = ("True", tried[0].tls_reason, "; ".join(p.tls_message for p in tried))
    return ProbeResult(*reachable, *tls, certificate=certificate, days_left=days_left)
