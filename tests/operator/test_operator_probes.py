"""Destination probes against real loopback SMTP servers with certificates made by the tests."""

from __future__ import annotations

import asyncio
from typing import Any

from kube_emulator import Cluster, OperatorThread, cluster
from mailflow_operator.probes import probe_server, summarize
from mailflow_operator.reconcile import ReconcileSettings
from mailflow_operator.runner import OperatorConfig
from mailflow_operator.selectors import LabelSelector
from mailflow_relay.routing.document import ObjectRef, ServerAddress, TlsMode, TlsPolicy
from mailflow_relay.testing.sink import SmtpSink
from pki import Pki
from support import until


def test_name_match_probe_verifies_the_chain_and_the_name(pki: Pki) -> None:
    ca = pki.ca()
    leaf = ca.issue("mx1.contoso.test")

    async def main() -> None:
        async with SmtpSink(cert_file=leaf.cert_file, key_file=leaf.key_file) as sink:
            server = ServerAddress("127.0.0.1", sink.port)
            good = TlsPolicy(TlsMode.NAME_MATCH, "*.contoso.test", ca.pem)
            probe = await probe_server(server, good, "contoso.test")
            assert (probe.reachable, probe.tls_ok, probe.tls_reason) == (True, True, "Verified")
            assert probe.certificate is not None
            assert probe.certificate.dns_names == ("mx1.contoso.test",)
            assert sink.last_server_name is None  # a wildcard name is not sent as SNI

            wrong = TlsPolicy(TlsMode.NAME_MATCH, "relay.fabrikam.test", ca.pem)
            probe = await probe_server(server, wrong, "contoso.test")
            assert (probe.tls_ok, probe.tls_reason) == (False, "NameMismatch")
            sent: str | None = sink.last_server_name  # (mypy narrowed it to None above)
            assert sent == "relay.fabrikam.test"

            untrusted = TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=pki.ca("Other CA").pem)
            probe = await probe_server(server, untrusted, "contoso.test")
            assert (probe.tls_ok, probe.tls_reason) == (False, "Untrusted")
            assert sink.messages == []  # a probe never sends mail

    asyncio.run(main())


def test_required_tls_probe_fails_when_starttls_is_missing_and_unreachable_is_reported() -> None:
    async def main() -> None:
        async with SmtpSink() as sink:
            server = ServerAddress("127.0.0.1", sink.port)
            probe = await probe_server(server, TlsPolicy(TlsMode.SELF_SIGNED), "")
            assert (probe.reachable, probe.tls_ok, probe.tls_reason) == (True, False, "NoStartTLS")
            opportunistic = await probe_server(server, TlsPolicy(), "")
            assert (opportunistic.tls_ok, opportunistic.tls_reason) == (True, "Opportunistic")
            port = sink.port
        gone = await probe_server(ServerAddress("127.0.0.1", port), TlsPolicy(), "", step_timeout=2)
        assert not gone.reachable
        result = summarize([gone], warning_days=14)
        assert (result.reachable, result.reachable_reason) == ("False", "Unreachable")
        assert (result.tls, result.tls_reason) == ("Unknown", "NotProbed")

    asyncio.run(main())


def test_expired_certificate_is_classified_as_expired(pki: Pki) -> None:
    ca = pki.ca()
    leaf = ca.issue("mx.contoso.test", expired=True)

    async def main() -> None:
        async with SmtpSink(cert_file=leaf.cert_file, key_file=leaf.key_file) as sink:
            server = ServerAddress("127.0.0.1", sink.port)
            probe = await probe_server(server, TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=ca.pem), "")
            assert (probe.tls_ok, probe.tls_reason) == (False, "Expired")

    asyncio.run(main())


def test_operator_probes_record_conditions_certificate_and_expiry_warning(pki: Pki) -> None:
    ca = pki.ca()
    leaf = ca.issue("mx1.contoso.test")  # valid for 30 days: inside a 60-day warning period

    async def scenario(api: Cluster, port: int) -> None:
        await api.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "contoso-ca", "namespace": "mail"},
                "stringData": {"ca.crt": ca.pem},
            }
        )
        spec: dict[str, Any] = {
            "recipientDomains": ["contoso.test"],
            "destination": {"smartHost": {"host": "127.0.0.1", "port": port}},
            "tls": {
                "mode": "NameMatch",
                "certificateName": "*.contoso.test",
                "caBundle": {"secretRef": {"name": "contoso-ca"}},
            },
        }
        await api.apply(
            {
                "apiVersion": "mailflow.dev/v1alpha1",
                "kind": "OutboundConnector",
                "metadata": {"name": "contoso", "namespace": "mail"},
                "spec": spec,
            }
        )
        config = OperatorConfig(
            reconcile=ReconcileSettings(
                namespaces=("mail",),
                routing_secret=ObjectRef("mailflow-system", "routing"),
                relay_selector=LabelSelector.parse("app=relay"),
                probe_interval=30,
                certificate_warning_days=60,
                debounce=0.05,
            ),
            api_server=api.url,
        )

        def tls() -> dict[str, Any]:
            body = api.stored("OutboundConnector", "mail", "contoso")
            assert body is not None
            conditions = {c["type"]: c for c in body["status"]["conditions"]}
            assert conditions["TLSVerified"]["reason"] != "NotProbed"
            return dict(conditions["TLSVerified"])

        async with OperatorThread(config):
            verified = await until(tls, what="a probe")
            body = api.stored("OutboundConnector", "mail", "contoso")
            assert body is not None
            conditions = {c["type"]: c for c in body["status"]["conditions"]}
            assert conditions["DestinationReachable"]["status"] == "True"
            assert (verified["status"], verified["reason"]) == ("True", "CertificateExpiringSoon")
            assert (
                "expires in 30 day(s)" in verified["message"]
                or "expires in 29 day(s)" in verified["message"]
            )
            certificate = body["status"]["certificate"]
            assert certificate["dnsNames"] == ["mx1.contoso.test"]
            assert certificate["subject"] == "CN=mx1.contoso.test"
            assert certificate["issuer"] == "CN=Mailflow Test Root CA"
            assert certificate["notAfter"].endswith("Z")

            # The event is posted right after the status is written: wait for it too.
            assert await until(
                lambda: api.events("CertificateExpiringSoon"),
                what="the CertificateExpiringSoon event",
            )

    async def main() -> None:
        async with (
            SmtpSink(cert_file=leaf.cert_file, key_file=leaf.key_file) as sink,
            cluster() as api,
        ):
            await scenario(api, sink.port)

    asyncio.run(main())
