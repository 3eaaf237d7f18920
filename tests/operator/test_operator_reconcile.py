"""The real operator (kopf + the reconciler) over HTTP against kmock's Kubernetes emulator."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kube_emulator import Cluster, OperatorThread, cluster
from mailflow_compiler.checks import check_manifests
from mailflow_compiler.manifests import Manifest, load_manifests
from mailflow_operator.reconcile import ReconcileSettings
from mailflow_operator.runner import OperatorConfig
from mailflow_operator.selectors import LabelSelector
from mailflow_relay.routing.document import ObjectRef, RoutingDocument
from support import until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RELAYS = "mailflow-system"
SECRET = ObjectRef(RELAYS, "mailflow-routing")


def config_for(api: Cluster) -> OperatorConfig:
    return OperatorConfig(
        reconcile=ReconcileSettings(
            namespaces=("mail",),
            routing_secret=SECRET,
            relay_selector=LabelSelector.parse("app.kubernetes.io/name=mailflow-relay"),
            probe_interval=0,  # probes have their own tests, against real SMTP servers
            debounce=0.05,
        ),
        api_server=api.url,
    )


def run(scenario: Callable[[Cluster], Awaitable[None]]) -> None:
    async def main() -> None:
        async with cluster() as api:
            await scenario(api)

    asyncio.run(main())


def routing(api: Cluster) -> tuple[str, dict[str, str]]:
    secret = api.stored("Secret", SECRET.namespace, SECRET.name)
    assert secret is not None
    text = base64.b64decode(secret["data"]["routing.json"]).decode()
    return text, secret["metadata"]["annotations"]


def status(api: Cluster, kind: str, name: str) -> dict[str, Any]:
    body = api.stored(kind, "mail", name)
    assert body is not None
    return dict(body.get("status") or {})


def condition(api: Cluster, kind: str, name: str, type_: str) -> dict[str, Any]:
    for item in status(api, kind, name).get("conditions", []):
        if item["type"] == type_:
            return dict(item)
    raise AssertionError(f"{kind}/{name} has no {type_} condition")


def connector(name: str, domains: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": name, "namespace": "mail"},
        "spec": {"recipientDomains": domains, **spec},
    }


def relay_pod(name: str, generation: int | None, *, ready: bool = True) -> dict[str, Any]:
    annotations = {} if generation is None else {"mailflow.dev/config-generation": str(generation)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": RELAYS,
            "labels": {"app.kubernetes.io/name": "mailflow-relay"},
            "annotations": annotations,
        },
        "spec": {"containers": [{"name": "relay", "image": "mailflow"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


async def apply_examples(api: Cluster) -> list[Manifest]:
    """Apply every example; the manifests as the cluster now holds them (with metadata)."""
    stored = []
    for manifest in load_manifests(sorted(str(p) for p in EXAMPLES.glob("*.yaml"))):
        assert manifest.body is not None
        body = await api.apply(manifest.body)
        stored.append(dataclasses.replace(manifest, body=body))
    return stored


def compiled_from(manifests: list[Manifest], generation: int) -> str:
    """What `mailflow relay --manifests` compiles from the same objects."""
    result = check_manifests(manifests, resolve_secrets=True)
    assert result.compiled is not None
    document = dataclasses.replace(result.compiled.document, generation=generation)
    return document.to_json()


def test_examples_publish_the_document_that_mailflow_relay_compiles_byte_for_byte() -> None:
    async def scenario(api: Cluster) -> None:
        manifests = await apply_examples(api)
        async with OperatorThread(config_for(api)) as operator:
            await until(lambda: api.stored("Secret", SECRET.namespace, SECRET.name), what="Secret")
            await until(lambda: operator.passes >= 1)
            text, annotations = routing(api)
            assert text == compiled_from(manifests, generation=1)
            document = RoutingDocument.from_json(text)
            assert annotations == {
                "mailflow.dev/generation": "1",
                "mailflow.dev/checksum": document.checksum,
            }
            assert len(document.connectors) == 8

            # Printer columns read real status fields on every object.
            await until(lambda: status(api, "OutboundConnector", "tls-name-match")["relays"])
            assert status(api, "OutboundConnector", "all-via-compliance")["destination"] == (
                "compliance.contoso.com:25"
            )
            assert status(api, "OutboundConnector", "fabrikam-partner")["destination"] == (
                "profile fabrikam-gateways"
            )
            assert status(api, "OutboundConnector", "tls-domain-match")["destination"] == (
                "recipient MX"
            )
            await until(lambda: status(api, "MultiSmtpProfile", "fabrikam-gateways")["relays"])
            assert status(api, "MultiSmtpProfile", "fabrikam-gateways")["destination"] == (
                "RoundRobin: 192.0.2.21:25, 192.0.2.22:25, gw3.fabrikam.example:587"
            )
            for name in ("all-via-compliance", "fabrikam-partner", "marketing-bulk"):
                assert status(api, "OutboundConnector", name)["relays"] == "0/0"
                assert condition(api, "OutboundConnector", name, "Accepted")["status"] == "True"
                assert condition(api, "OutboundConnector", name, "ResolvedRefs")["status"] == "True"
                programmed = condition(api, "OutboundConnector", name, "Programmed")
                assert (programmed["status"], programmed["reason"]) == ("False", "NoReadyRelays")

            # Nothing changed: a pass (here, caused by a pod that is not a relay) writes nothing.
            history = len(api.history("Secret", SECRET.namespace, SECRET.name))
            before = operator.passes
            other = relay_pod("not-a-relay", None)
            other["metadata"]["labels"] = {"app": "something-else"}
            await api.apply(other)
            await until(lambda: operator.passes > before, what="another pass")
            assert len(api.history("Secret", SECRET.namespace, SECRET.name)) == history
            assert routing(api)[1]["mailflow.dev/generation"] == "1"

    run(scenario)


def test_conflicting_connectors_are_both_not_accepted_and_name_each_other() -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(connector("first", ["*"]))
        await api.apply(connector("second", ["*.*"]))
        async with OperatorThread(config_for(api)):
            first = await until(lambda: condition(api, "OutboundConnector", "first", "Accepted"))
            # One pass writes one status after the other: wait for the second one too.
            second = await until(lambda: condition(api, "OutboundConnector", "second", "Accepted"))
            assert (first["status"], first["reason"]) == ("False", "Conflicted")
            assert (second["status"], second["reason"]) == ("False", "Conflicted")
            assert "OutboundConnector mail/second" in first["message"]
            assert "keeps routing it" in first["message"]
            assert "OutboundConnector mail/first" in second["message"]
            assert "mail/first is older" in second["message"]
            ready = condition(api, "OutboundConnector", "second", "Ready")
            assert (ready["status"], ready["reason"]) == ("False", "Conflicted")
            document = RoutingDocument.from_json(routing(api)[0])
            assert [str(c.winner) for c in document.conflicts] == ["mail/first"]

            # The user fixes it: the loser's Accepted turns True, with a new transition time.
            await api.apply(connector("second", ["contoso.com"]))
            await until(
                lambda: (
                    condition(api, "OutboundConnector", "second", "Accepted")["status"] == "True"
                )
            )
            await until(
                lambda: condition(api, "OutboundConnector", "first", "Accepted")["status"] == "True"
            )
            assert status(api, "OutboundConnector", "second")["observedGeneration"] == 2

    run(scenario)


def test_missing_profile_turns_resolved_refs_false_until_it_exists_and_again_when_deleted() -> None:
    profile = {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "MultiSmtpProfile",
        "metadata": {"name": "pool", "namespace": "mail"},
        "spec": {"servers": [{"host": "192.0.2.21"}]},
    }

    async def scenario(api: Cluster) -> None:
        await api.apply(
            connector("partner", ["fabrikam.example"], destination={"profileRef": {"name": "pool"}})
        )
        async with OperatorThread(config_for(api)):
            refs = await until(
                lambda: condition(api, "OutboundConnector", "partner", "ResolvedRefs")
            )
            assert (refs["status"], refs["reason"]) == ("False", "ProfileNotFound")
            assert refs["message"] == (
                'spec.destination.profileRef.name: Not found: "pool": no MultiSmtpProfile '
                'named "pool" in namespace "mail"'
            )
            assert condition(api, "OutboundConnector", "partner", "Ready")["status"] == "False"
            assert status(api, "OutboundConnector", "partner")["destination"] == "profile pool"

            await api.apply(profile)
            await until(
                lambda: (
                    condition(api, "OutboundConnector", "partner", "ResolvedRefs")["status"]
                    == "True"
                )
            )
            generation = int(routing(api)[1]["mailflow.dev/generation"])
            assert generation == 2
            served = RoutingDocument.from_json(routing(api)[0])
            partner = served.connector(ObjectRef("mail", "partner"))
            assert partner is not None
            assert not partner.unresolved

            # Deleting a profile in use: no finalizer holds it, its connector stops resolving.
            await api.delete("MultiSmtpProfile", "mail", "pool")
            await until(
                lambda: (
                    condition(api, "OutboundConnector", "partner", "ResolvedRefs")["status"]
                    == "False"
                )
            )
            assert api.stored("MultiSmtpProfile", "mail", "pool") is None
            assert routing(api)[1]["mailflow.dev/generation"] == "3"

    run(scenario)


def test_relay_pods_serving_the_generation_make_connectors_programmed() -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(connector("all", ["*"]))
        await api.apply(relay_pod("relay-0", None))
        await api.apply(relay_pod("relay-1", None))
        await api.apply(relay_pod("relay-2", 0, ready=False))  # not ready: not counted
        async with OperatorThread(config_for(api)):
            # Relays annotate their pods once they load a published document.
            await until(lambda: routing(api)[1]["mailflow.dev/generation"] == "1")
            await api.apply(relay_pod("relay-0", 1))
            await until(lambda: status(api, "OutboundConnector", "all")["relays"] == "1/2")
            programmed = condition(api, "OutboundConnector", "all", "Programmed")
            assert (programmed["status"], programmed["reason"]) == ("False", "Pending")
            assert status(api, "OutboundConnector", "all")["configGeneration"] == 1

            await api.apply(relay_pod("relay-1", 1))
            await until(
                lambda: condition(api, "OutboundConnector", "all", "Programmed")["status"] == "True"
            )
            assert status(api, "OutboundConnector", "all")["relays"] == "2/2"
            ready = condition(api, "OutboundConnector", "all", "Ready")
            assert (ready["status"], ready["reason"]) == ("True", "Ready")
            assert ready["observedGeneration"] == 1

            # A spec change: a new generation of the connector, of the document; the relays
            # still serve the old one, so it is not programmed until they catch up.
            updated = connector("all", ["*"], description="changed")
            await api.apply(updated)
            await until(lambda: status(api, "OutboundConnector", "all")["observedGeneration"] == 2)
            assert status(api, "OutboundConnector", "all")["configGeneration"] == 2
            assert condition(api, "OutboundConnector", "all", "Programmed")["status"] == "False"
            assert routing(api)[1]["mailflow.dev/generation"] == "2"
            await api.apply(relay_pod("relay-0", 2))
            await api.apply(relay_pod("relay-1", 3))
            await until(
                lambda: condition(api, "OutboundConnector", "all", "Programmed")["status"] == "True"
            )

            # Deleting a connector removes its routes in the next generation. relay-1 says
            # it serves 3 (ahead of the Secret): numbers in use are never reused, so 4.
            await api.delete("OutboundConnector", "mail", "all")
            await until(lambda: routing(api)[1]["mailflow.dev/generation"] == "4")
            await api.delete("Secret", SECRET.namespace, SECRET.name)
            # Deleted (or emptied) by someone: published again, and the sequence goes on.
            await until(lambda: routing(api)[1]["mailflow.dev/generation"] == "5")
            assert RoutingDocument.from_json(routing(api)[0]).connectors == ()

    run(scenario)


def test_a_restarted_operator_publishes_the_same_document_and_changes_no_status() -> None:
    async def scenario(api: Cluster) -> None:
        await apply_examples(api)
        await api.apply(connector("duplicate-catch-all", ["*.*"]))
        await api.apply(relay_pod("relay-0", None))
        async with OperatorThread(config_for(api)) as operator:
            await until(lambda: routing(api)[1]["mailflow.dev/generation"] == "1")
            await api.apply(relay_pod("relay-0", 1))
            await until(
                lambda: status(api, "OutboundConnector", "tls-name-match").get("relays") == "1/1"
            )
            settled = operator.passes
            await until(lambda: operator.passes >= settled)
        names = [
            ("OutboundConnector", m.name)
            for m in load_manifests(sorted(str(p) for p in EXAMPLES.glob("*.yaml")))
            if m.kind == "OutboundConnector"
        ] + [
            ("OutboundConnector", "duplicate-catch-all"),
            ("MultiSmtpProfile", "fabrikam-gateways"),
        ]
        before = {name: copy.deepcopy(status(api, *name)) for name in names}
        versions = {name: len(api.history(name[0], "mail", name[1])) for name in names}
        secret_versions = len(api.history("Secret", SECRET.namespace, SECRET.name))
        text = routing(api)[0]

        async with OperatorThread(config_for(api)) as operator:
            await until(lambda: operator.passes >= 1, what="a pass after the restart")
            await asyncio.sleep(0.3)  # and whatever the replayed watch events cause
        assert routing(api)[0] == text
        assert len(api.history("Secret", SECRET.namespace, SECRET.name)) == secret_versions
        for name in names:
            assert status(api, *name) == before[name], name
            assert len(api.history(name[0], "mail", name[1])) == versions[name], name

    run(scenario)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("0[1-9]*.yaml")))
def test_each_example_set_alone_is_published_byte_identical(example: str) -> None:
    async def scenario(api: Cluster) -> None:
        manifests = []
        for path in ("00-secrets.yaml", example):
            for manifest in load_manifests([str(EXAMPLES / path)]):
                assert manifest.body is not None
                body = await api.apply(manifest.body)
                manifests.append(dataclasses.replace(manifest, body=body))
        async with OperatorThread(config_for(api)) as operator:
            await until(lambda: operator.passes >= 1)
            assert routing(api)[0] == compiled_from(manifests, generation=1)

    run(scenario)


def test_a_routing_change_without_a_spec_change_waits_for_the_relays_again() -> None:
    """A profile that appears changes its connector's routing, not its spec."""

    async def scenario(api: Cluster) -> None:
        await api.apply(
            connector("pooled", ["pool.example"], destination={"profileRef": {"name": "pool"}})
        )
        await api.apply(relay_pod("relay-0", None))
        async with OperatorThread(config_for(api)):
            await until(lambda: routing(api)[1]["mailflow.dev/generation"] == "1")
            await api.apply(relay_pod("relay-0", 1))
            await until(
                lambda: (
                    condition(api, "OutboundConnector", "pooled", "Programmed")["status"] == "True"
                )
            )
            await api.apply(
                {
                    "apiVersion": "mailflow.dev/v1alpha1",
                    "kind": "MultiSmtpProfile",
                    "metadata": {"name": "pool", "namespace": "mail"},
                    "spec": {"servers": [{"host": "192.0.2.1"}]},
                }
            )
            await until(lambda: routing(api)[1]["mailflow.dev/generation"] == "2")
            await until(lambda: status(api, "OutboundConnector", "pooled")["configGeneration"] == 2)
            programmed = condition(api, "OutboundConnector", "pooled", "Programmed")
            assert (programmed["status"], programmed["reason"]) == ("False", "Pending")
            assert condition(api, "OutboundConnector", "pooled", "Reconciling")["status"] == "True"
            await api.apply(relay_pod("relay-0", 2))
            await until(
                lambda: condition(api, "OutboundConnector", "pooled", "Ready")["status"] == "True"
            )
            assert condition(api, "OutboundConnector", "pooled", "Stalled")["status"] == "False"

    run(scenario)


def test_a_huge_list_of_findings_still_makes_a_writable_status() -> None:
    domains = [f"d{i}.example" for i in range(256)]

    async def scenario(api: Cluster) -> None:
        await api.apply(connector("first", domains))
        await api.apply(connector("second", domains))
        async with OperatorThread(config_for(api)):
            await until(
                lambda: (
                    condition(api, "OutboundConnector", "second", "Accepted")["reason"]
                    == "Conflicted"
                )
            )
            for name in ("first", "second"):
                for item in status(api, "OutboundConnector", name)["conditions"]:
                    assert len(item["message"]) <= 32768, (name, item["type"], len(item["message"]))
            assert condition(api, "OutboundConnector", "second", "Stalled")["status"] == "True"

    run(scenario)


def test_the_document_says_how_many_ready_relays_share_each_throttle() -> None:
    async def scenario(api: Cluster) -> None:
        throttled = connector("all", ["*"], throttle={"messagesPerMinute": 600})
        await api.apply(throttled)
        await api.apply(relay_pod("relay-0", None))
        await api.apply(relay_pod("relay-1", None))
        await api.apply(relay_pod("relay-2", None, ready=False))  # not ready: no share
        async with OperatorThread(config_for(api)):
            await until(lambda: RoutingDocument.from_json(routing(api)[0]).fleet_relays == 2)
            generation = int(routing(api)[1]["mailflow.dev/generation"])
            # The fleet grows: each relay's share shrinks in the next generation.
            await api.apply(relay_pod("relay-2", None))
            await until(lambda: RoutingDocument.from_json(routing(api)[0]).fleet_relays == 3)
            assert int(routing(api)[1]["mailflow.dev/generation"]) == generation + 1
            # The connector's own routing did not change: its configGeneration stays.
            await until(lambda: status(api, "OutboundConnector", "all").get("configGeneration"))
            assert status(api, "OutboundConnector", "all")["configGeneration"] == generation

    run(scenario)


def test_a_relay_backing_off_shows_in_the_connector_status() -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(connector("all", ["*"]))
        slowed = relay_pod("relay-0", None)
        slowed["metadata"]["annotations"]["mailflow.dev/backoff"] = '{"mail/all":0.25}'
        await api.apply(slowed)
        await api.apply(relay_pod("relay-1", None))
        async with OperatorThread(config_for(api)):
            await until(
                lambda: (
                    condition(api, "OutboundConnector", "all", "RateLimited")["status"] == "True"
                )
            )
            limited = condition(api, "OutboundConnector", "all", "RateLimited")
            assert limited["reason"] == "RateLimitReplies"
            assert "1/2 ready relays send at 25%" in limited["message"]
            # Informational: the connector stays Ready.
            assert (
                condition(api, "OutboundConnector", "all", "Ready")["reason"] != "RateLimitReplies"
            )
            # The relay recovered and says so (an empty annotation): back to full rate.
            slowed["metadata"]["annotations"]["mailflow.dev/backoff"] = "{}"
            await api.apply(slowed)
            await until(
                lambda: (
                    condition(api, "OutboundConnector", "all", "RateLimited")["reason"]
                    == "FullRate"
                )
            )

    run(scenario)


def test_transport_security_shows_what_dane_and_mta_sts_did_on_the_relays() -> None:
    async def scenario(api: Cluster) -> None:
        await api.apply(connector("all", ["*"]))
        first = relay_pod("relay-0", None)
        first["metadata"]["annotations"]["mailflow.dev/transport-security"] = (
            '{"mail/all":{"dane":"verified","mtaSts":"success"}}'
        )
        await api.apply(first)
        await api.apply(relay_pod("relay-1", None))
        async with OperatorThread(config_for(api)):

            def secured() -> dict[str, Any]:
                return condition(api, "OutboundConnector", "all", "TransportSecurity")

            await until(lambda: secured()["reason"] == "Verified")
            assert secured()["status"] == "True"
            assert secured()["message"] == (
                "DANE verified the next hop and the MTA-STS policy was met on the last"
                " deliveries of 1/2 ready relays"
            )
            # A TLSA mismatch on another relay: False, a Warning event, still Ready.
            second = relay_pod("relay-1", None)
            second["metadata"]["annotations"]["mailflow.dev/transport-security"] = (
                '{"mail/all":{"dane":"mismatch"},"mail/other":{"dane":"NOT VALID"}}'
            )
            await api.apply(second)
            await until(lambda: secured()["reason"] == "DaneFailed")
            assert secured()["status"] == "False"
            assert "DANE refused the next hop (mismatch)" in secured()["message"]
            # Informational: Ready does not follow it.
            assert condition(api, "OutboundConnector", "all", "Ready")["reason"] != "DaneFailed"
            (event,) = await until(lambda: api.events("DaneFailed"), what="the DaneFailed event")
            assert event["type"] == "Warning"
            # An MTA-STS failure alone.
            first["metadata"]["annotations"]["mailflow.dev/transport-security"] = (
                '{"mail/all":{"mtaSts":"validation-failure"}}'
            )
            second["metadata"]["annotations"]["mailflow.dev/transport-security"] = "{}"
            await api.apply(first)
            await api.apply(second)
            await until(lambda: secured()["reason"] == "MtaStsFailed")
            assert "(validation-failure)" in secured()["message"]

    run(scenario)
