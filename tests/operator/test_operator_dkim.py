"""DkimKeys in the real operator (kopf + the reconciler) over HTTP against kmock's emulator.

Status conditions, the fingerprint and the DNS record to publish, key generation that never
overwrites, and DnsPublished checked against the test NSD on a loopback port.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from dkim_peers import KeyPair, ed25519_key, rsa_key
from kube_emulator import Cluster, OperatorThread, cluster
from mailflow_operator.reconcile import ReconcileSettings
from mailflow_operator.runner import OperatorConfig
from mailflow_operator.selectors import LabelSelector
from mailflow_relay.routing.dkim_keys import DkimAlgorithm, load_private_key
from mailflow_relay.routing.document import ObjectRef, RoutingDocument
from peers import DnsServer, require
from support import until

SECRET = ObjectRef("mailflow-system", "mailflow-routing")
RSA = rsa_key()
ED25519 = ed25519_key()
PUBLISHED_ELSEWHERE = rsa_key()


def config_for(api: Cluster) -> OperatorConfig:
    return OperatorConfig(
        reconcile=ReconcileSettings(
            namespaces=("mail",),
            routing_secret=SECRET,
            relay_selector=LabelSelector.parse("app.kubernetes.io/name=mailflow-relay"),
            probe_interval=0,
            debounce=0.05,
        ),
        api_server=api.url,
    )


def routing(api: Cluster) -> str:
    stored = api.stored("Secret", SECRET.namespace, SECRET.name)
    assert stored is not None
    return base64.b64decode(stored["data"]["routing.json"]).decode()


def status(api: Cluster, kind: str, name: str) -> dict[str, Any]:
    body = api.stored(kind, "mail", name)
    assert body is not None
    return dict(body.get("status") or {})


def condition(api: Cluster, kind: str, name: str, type_: str) -> dict[str, Any]:
    for item in status(api, kind, name).get("conditions", []):
        if item["type"] == type_:
            return dict(item)
    raise AssertionError(f"{kind}/{name} has no {type_} condition")


def secret(name: str, pair: KeyPair, key: str = "private.key") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "mail"},
        "data": {key: base64.b64encode(pair.pem.encode()).decode()},
    }


def dkim_key(
    name: str, selector: str, algorithm: str = "RSA-SHA256", **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "DkimKey",
        "metadata": {"name": name, "namespace": "mail"},
        "spec": {
            "domain": "contoso.test",
            "selector": selector,
            "algorithm": algorithm,
            "privateKey": {"secretRef": {"name": f"{name}-key"}},
            **spec,
        },
    }


def run(scenario: Any) -> None:
    async def main() -> None:
        async with cluster() as api:
            await scenario(api)

    asyncio.run(main())


def test_a_key_reports_its_fingerprint_dns_record_and_reaches_the_relays() -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(secret("rsa-key", RSA))
        await api.apply(dkim_key("rsa", "s2026"))
        async with OperatorThread(config_for(api)):
            ready = await until(lambda: condition(api, "DkimKey", "rsa", "Ready"))
            assert (ready["status"], ready["reason"]) == ("True", "Ready")
            assert condition(api, "DkimKey", "rsa", "Accepted")["status"] == "True"
            assert condition(api, "DkimKey", "rsa", "ResolvedRefs")["status"] == "True"
            dns_check = condition(api, "DkimKey", "rsa", "DnsPublished")
            assert (dns_check["status"], dns_check["reason"]) == ("Unknown", "NotChecked")
            shown = status(api, "DkimKey", "rsa")
            assert shown["fingerprint"] == RSA.fingerprint
            record = shown["dnsRecord"]
            assert record["name"] == "s2026._domainkey.contoso.test"
            assert record["type"] == "TXT"
            assert all(len(s.encode()) <= 255 for s in record["strings"])
            assert len(record["strings"]) == 2  # an RSA-2048 record is ~410 bytes
            public = load_private_key(RSA.pem, DkimAlgorithm.RSA_SHA256).public_key
            assert "".join(record["strings"]) == f"v=DKIM1; k=rsa; p={public}"
            assert RSA.pem_body[:40] not in repr(shown)
            await until(lambda: RoutingDocument.from_json(routing(api)).dkim_keys)
            (carried,) = RoutingDocument.from_json(routing(api)).dkim_keys
            assert (carried.ref, carried.fingerprint) == ("mail/rsa", RSA.fingerprint)

    run(scenario)


def test_a_missing_secret_and_a_conflict_are_conditions() -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(secret("a-key", RSA))
        await api.apply(secret("b-key", ED25519))
        await api.apply(dkim_key("a", "s1"))
        await api.apply(dkim_key("b", "s1", "Ed25519-SHA256"))
        await api.apply(dkim_key("lost", "s2"))
        async with OperatorThread(config_for(api)):
            refs = await until(lambda: condition(api, "DkimKey", "lost", "ResolvedRefs"))
            assert (refs["status"], refs["reason"]) == ("False", "SecretNotFound")
            assert condition(api, "DkimKey", "lost", "Ready")["status"] == "False"
            loser = await until(lambda: condition(api, "DkimKey", "b", "Accepted"))
            assert (loser["status"], loser["reason"]) == ("False", "Conflicted")
            assert "mail/a is older" in loser["message"]
            assert condition(api, "DkimKey", "a", "Accepted")["reason"] == "Conflicted"
            keys = RoutingDocument.from_json(routing(api)).dkim_keys
            assert [k.ref for k in keys] == ["mail/a"]

    run(scenario)


def test_generate_creates_a_missing_secret_and_never_overwrites_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    generated: list[str] = []

    async def scenario(api: Cluster) -> None:
        await api.apply(secret("given-key", RSA))
        await api.apply(dkim_key("given", "s1", generate={}))
        await api.apply(dkim_key("fresh", "ed1", "Ed25519-SHA256", generate={}))
        async with OperatorThread(config_for(api)):
            await until(lambda: condition(api, "DkimKey", "fresh", "Ready")["status"] == "True")
            created = api.stored("Secret", "mail", "fresh-key")
            assert created is not None
            pem = base64.b64decode(created["data"]["private.key"]).decode()
            generated.append(pem)
            made = load_private_key(pem, DkimAlgorithm.ED25519_SHA256)
            assert status(api, "DkimKey", "fresh")["fingerprint"] == made.fingerprint
            assert created["metadata"]["annotations"]["mailflow.dev/generated-for"] == (
                "DkimKey/fresh"
            )
            # The Secret that existed is the key, untouched.
            given = api.stored("Secret", "mail", "given-key")
            assert given is not None
            assert base64.b64decode(given["data"]["private.key"]).decode() == RSA.pem
            await until(lambda: condition(api, "DkimKey", "given", "Ready")["status"] == "True")
            assert status(api, "DkimKey", "given")["fingerprint"] == RSA.fingerprint
        history = api.history("Secret", "mail", "given-key")
        assert len(history) == 1, "the existing Secret was never written"

    run(scenario)
    # Neither the given key nor the generated one reaches a log line of the operator.
    assert "generated a new key into Secret mail/fresh-key" in caplog.text
    bodies = [
        RSA.pem_body,
        "".join(line for line in generated[0].splitlines() if "-----" not in line),
    ]
    for body in bodies:
        for i in range(0, len(body) - 32, 16):
            assert body[i : i + 32] not in caplog.text


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    require("nsd")
    zones = {
        "contoso.test": [
            RSA.txt_record("s2026"),
            PUBLISHED_ELSEWHERE.txt_record("stale"),
        ]
    }
    with DnsServer(zones) as server:
        yield server


def test_dns_published_says_whether_dns_carries_this_key(dns: DnsServer) -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(secret("published-key", RSA))
        await api.apply(secret("stale-key", RSA))
        await api.apply(secret("unpublished-key", ED25519))
        await api.apply(dkim_key("published", "s2026"))
        await api.apply(dkim_key("stale", "stale"))
        await api.apply(dkim_key("unpublished", "ed2027", "Ed25519-SHA256"))
        base = config_for(api)
        config = dataclasses.replace(
            base,
            reconcile=dataclasses.replace(
                base.reconcile,
                probe_interval=0.3,
                probe_timeout=2.0,
                dns_servers=(dns.address,),
                dns_port=dns.port,
            ),
        )
        async with OperatorThread(config):

            def published(name: str) -> tuple[str, str]:
                found = condition(api, "DkimKey", name, "DnsPublished")
                assert found["reason"] != "NotChecked"
                return found["status"], found["reason"]

            assert await until(lambda: published("published")) == ("True", "Published")
            assert await until(lambda: published("stale")) == ("False", "KeyMismatch")
            assert await until(lambda: published("unpublished")) == ("False", "NotPublished")
            # Ready says whether the relays can sign, DnsPublished whether receivers can verify.
            assert condition(api, "DkimKey", "unpublished", "Ready")["status"] == "True"

            # DNS stops matching the key (here: the Secret got another key, the record stayed):
            # the condition turns False and a Warning event says so, once.
            assert api.events("KeyMismatch", "published") == []
            await api.apply(secret("published-key", PUBLISHED_ELSEWHERE))
            await until(
                lambda: published("published") == ("False", "KeyMismatch"),
                what="DnsPublished=False KeyMismatch",
            )
            (event,) = await until(
                lambda: api.events("KeyMismatch", "published"), what="the KeyMismatch event"
            )
            assert event["type"] == "Warning"

    run(scenario)


def test_a_signature_that_expires_before_the_queue_gives_up_is_a_warning() -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(secret("short-key", RSA))
        await api.apply(secret("long-key", ED25519))
        await api.apply(dkim_key("short", "short", expireAfter="2d"))
        await api.apply(dkim_key("long", "long", "Ed25519-SHA256", expireAfter="7d"))
        async with OperatorThread(config_for(api)):

            def lifetime(name: str) -> tuple[str, str]:
                found = condition(api, "DkimKey", name, "SignaturesOutlastQueue")
                return found["status"], found["reason"]

            await until(
                lambda: lifetime("short") == ("False", "ExpiresWhileQueued"),
                what="SignaturesOutlastQueue=False",
            )
            await until(lambda: lifetime("long") == ("True", "OutlastsQueue"), what="long: True")
            message = condition(api, "DkimKey", "short", "SignaturesOutlastQueue")["message"]
            assert "expireAfter 2d is shorter than the relays' queue lifetime (5d)" in message
            # Still signs: a warning, not a refusal.
            assert condition(api, "DkimKey", "short", "Ready")["status"] == "True"

            (event,) = await until(
                lambda: api.events("ExpiresWhileQueued"), what="the ExpiresWhileQueued event"
            )
            assert event["type"] == "Warning"
            assert event["involvedObject"]["name"] == "short"

    run(scenario)
