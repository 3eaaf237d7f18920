"""The reconciler: every connector and profile → one routing document → relays → status.

Why one reconciler and not a handler per object: the routing document is a function
of *all* connectors, profiles and Secrets together (a conflict involves two connectors,
deleting a profile changes its connectors), so every relevant change recompiles the
whole set with the one compiler. kopf watches the resources and feeds :class:`Store`;
each change pokes the reconciler, which (debounced) does one pass:

1. bodies get the CRD defaults and schema check an API server would give them (so the
   emulator in the tests, and objects written before a CRD upgrade, behave the same);
2. :func:`~mailflow_operator.compiler.compile_routing` → document + findings;
3. :func:`~mailflow_operator.publisher.publish` → the Secret (only when the checksum
   changed; the generation read back from it only grows);
4. for each object: conditions from the findings, the relay pods' annotations and the
   last probe; written only where they differ from what is stored; an Event on every
   condition that changes status.

The store is seeded by listing everything before the first pass, so a restarted
operator never compiles a half-known world (which would flap ``ResolvedRefs`` and
bump the generation). kopf's event handlers add no finalizers and write nothing to the
objects: deleting a profile in use simply turns its connectors' ``ResolvedRefs`` False.

Probes run here too, one task per probed object, jittered: kopf's timers would put a
finalizer on every connector, and the status has one writer.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from mailflow_compiler.compiler import (
    CONNECTOR_KIND,
    PROFILE_KIND,
    Compiled,
    compile_routing,
    secret_values,
)
from mailflow_compiler.crds import load_crds
from mailflow_compiler.dkim import DKIM_KEY_KIND
from mailflow_compiler.manifests import (
    API_VERSION,
    RawConnector,
    RawDkimKey,
    RawProfile,
    RawSecret,
)
from mailflow_operator import dkim_keys
from mailflow_operator.kubeclient import KubeClient, KubeError
from mailflow_operator.metrics import OperatorMetrics
from mailflow_operator.probes import ProbeResult, probe_server, summarize
from mailflow_operator.publisher import publish, stored_routing
from mailflow_operator.selectors import LabelSelector
from mailflow_operator.status import (
    ACCEPTED,
    DESTINATION_REACHABLE,
    PROGRAMMED,
    RATE_LIMITED,
    RESOLVED_REFS,
    TLS_VERIFIED,
    TRANSPORT_SECURITY,
    Condition,
    RelayCount,
    accepted,
    kstatus,
    merge_conditions,
    now_rfc3339,
    programmed,
    rate_limited,
    ready,
    resolved_refs,
    transport_security,
)
from mailflow_operator.store import PodState, Store, pod_state, ref_of
from mailflow_relay.routing.contract import POD_GENERATION_ANNOTATION
from mailflow_relay.routing.document import (
    Connector,
    DefaultRoute,
    ObjectRef,
    ProfilePool,
    RoutingDocument,
    ServerAddress,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern

__all__ = [
    "CONFIG_GENERATION_ANNOTATION",
    "PLURALS",
    "ReconcileSettings",
    "Reconciler",
    "Store",
]

logger = logging.getLogger(__name__)

CONFIG_GENERATION_ANNOTATION = POD_GENERATION_ANNOTATION
PLURALS = {
    CONNECTOR_KIND: "outboundconnectors",
    PROFILE_KIND: "multismtpprofiles",
    DKIM_KEY_KIND: "dkimkeys",
}
_SKIPPED_SECRET_TYPES = frozenset(
    {"kubernetes.io/service-account-token", "helm.sh/release.v1", "kubernetes.io/dockercfg"}
)


@dataclass(frozen=True)
class ReconcileSettings:
    namespaces: tuple[str, ...]
    """Namespaces whose connectors, profiles and Secrets are reconciled."""
    routing_secret: ObjectRef
    """The relay config Secret that receives ``routing.json``."""
    relay_selector: LabelSelector
    """Selects the relay pods in the routing Secret's namespace."""
    default_route: DefaultRoute = field(default_factory=DefaultRoute)
    probe_interval: float = 300.0
    """Seconds between probes of one destination (jittered by ±10 %); 0 turns probes off."""
    probe_timeout: float = 10.0
    certificate_warning_days: float = 14.0
    debounce: float = 0.2
    """Changes that arrive within this many seconds are compiled together."""
    retry_delay: float = 2.0
    """After a failed pass (the API server refused or was unreachable)."""
    dns_servers: tuple[str, ...] = ()
    """DNS servers for the DkimKeys' ``DnsPublished`` check; empty: the system's resolver."""
    dns_port: int = 53
    queue_lifetime: float = dkim_keys.DEFAULT_QUEUE_LIFETIME
    """The relays' ``--queue-lifetime``: a DkimKey whose signatures expire sooner is warned about."""


@dataclass(frozen=True)
class _Probe:
    """What one probe task probes; a change restarts the task."""

    servers: tuple[ServerAddress, ...]
    policy: TlsPolicy
    recipient_domain: str
    implicit_tls: bool = False


class Reconciler:
    def __init__(
        self,
        settings: ReconcileSettings,
        client: KubeClient,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics or OperatorMetrics()
        self.store = Store()
        self.document: RoutingDocument | None = None
        """The routing document last published (None before the first pass)."""
        self.compiled: Compiled | None = None
        self.passes = 0
        self.seeded = asyncio.Event()
        self._dirty = asyncio.Event()
        self._stopping = False
        self._crds = {kind.kind: kind for kind in load_crds().values()}
        self._probes: dict[tuple[str, ObjectRef], tuple[_Probe, asyncio.Task[None]]] = {}
        self._probe_results: dict[tuple[str, ObjectRef], ProbeResult] = {}
        self._task_group: asyncio.TaskGroup | None = None
        self._failures = 0
        self._dns_checks: dict[ObjectRef, tuple[dkim_keys.DnsCheck, asyncio.Task[None]]] = {}
        self._dns_results: dict[ObjectRef, dkim_keys.DnsResult] = {}

    # --- input from the watches ------------------------------------------------------------

    def observe(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event (kopf's ``type``: None for the initial listing, or ADDED/…/DELETED)."""
        ref = ref_of(body)
        if kind == "Secret" and ref == self.settings.routing_secret:
            if event_type == "DELETED" or self._routing_secret_differs(body):
                self.poke()  # removed, emptied or edited by someone else: publish it again
            return
        table = self.store.table(kind)
        if event_type == "DELETED":
            table.pop(ref, None)
            self.store.deleted.add((kind, ref))
        else:
            value = self._value(kind, body)
            if value is None:
                table.pop(ref, None)
            else:
                table[ref] = value
            self.store.deleted.discard((kind, ref))
        self.poke()

    def _routing_secret_differs(self, body: Mapping[str, Any]) -> bool:
        if self.document is None:
            return False  # the first pass publishes anyway
        generation, checksum = stored_routing(dict(body))
        return (generation, checksum) != (self.document.generation, self.document.checksum)

    def _value(self, kind: str, body: Mapping[str, Any]) -> Any:
        if kind == "Secret":
            if body.get("type") in _SKIPPED_SECRET_TYPES:
                return None
            values, _ = secret_values(cast(RawSecret, body))
            return values
        if kind == "Pod":
            labels = (body.get("metadata") or {}).get("labels") or {}
            return pod_state(body) if self.settings.relay_selector.matches(labels) else None
        return copy.deepcopy(dict(body))

    def poke(self) -> None:
        self._dirty.set()

    def stop(self) -> None:
        self._stopping = True
        self._dirty.set()

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._task_group = group
                await self._seed()
                while not self._stopping:
                    await self._dirty.wait()
                    if self._stopping:
                        break  # type: ignore[unreachable]  # stop() runs in between
                    await asyncio.sleep(self.settings.debounce)
                    self._dirty.clear()
                    try:
                        await self.reconcile_once()
                        self._failures = 0
                    except KubeError as e:
                        self.metrics.failures.inc()
                        self._failures += 1
                        delay = min(60.0, self.settings.retry_delay * 2 ** (self._failures - 1))
                        logger.warning("reconcile failed, retrying in %.0fs: %s", delay, e)
                        group.create_task(self._poke_later(delay), name="mailflow reconcile retry")
                for _, task in [*self._probes.values(), *self._dns_checks.values()]:
                    task.cancel()
                self._probes.clear()
                self._dns_checks.clear()
        finally:
            self._task_group = None
            await self.client.close()

    async def _poke_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.poke()

    async def _seed(self) -> None:
        """List everything once, so that the first pass sees the whole world."""
        while not self._stopping:
            try:
                found: list[tuple[str, dict[str, Any]]] = []
                for namespace in self.settings.namespaces:
                    for kind, plural in PLURALS.items():
                        items = await self.client.list(API_VERSION, plural, namespace)
                        found += [(kind, item) for item in items]
                    found += [
                        ("Secret", item)
                        for item in await self.client.list("v1", "secrets", namespace)
                    ]
                relay_namespace = self.settings.routing_secret.namespace
                pods = await self.client.list(
                    "v1", "pods", relay_namespace, str(self.settings.relay_selector)
                )
                found += [("Pod", item) for item in pods]
                break
            except KubeError as e:
                logger.warning("initial listing failed, retrying: %s", e)
                await asyncio.sleep(self.settings.retry_delay)
        else:
            return
        for kind, body in found:
            ref = ref_of(body)
            if kind == "Secret" and ref == self.settings.routing_secret:
                continue
            table = self.store.table(kind)
            if ref in table or (kind, ref) in self.store.deleted:
                continue  # the watch already knows better
            value = self._value(kind, body)
            if value is not None:
                table[ref] = value
        self.seeded.set()
        self.poke()

    # --- one pass --------------------------------------------------------------------------

    def _checked(self, kind: str) -> tuple[list[dict[str, Any]], dict[ObjectRef, list[str]]]:
        """Bodies with CRD defaults applied, and schema errors of those that are invalid."""
        crd = self._crds[kind]
        table = self.store.table(kind)
        valid: list[dict[str, Any]] = []
        invalid: dict[ObjectRef, list[str]] = {}
        for ref, raw in sorted(table.items()):
            if ref.namespace not in self.settings.namespaces:
                continue
            body = {k: v for k, v in raw.items() if k != "status"}
            body = crd.schema.apply_defaults(body)
            errors = crd.schema.validate(body)
            if errors:
                invalid[ref] = [f"{e.path}: {e.message}" if e.path else e.message for e in errors]
            else:
                valid.append(body)
        return valid, invalid

    async def reconcile_once(self) -> None:
        self.metrics.reconciles.inc()
        connectors, bad_connectors = self._checked(CONNECTOR_KIND)
        profiles, bad_profiles = self._checked(PROFILE_KIND)
        keys, bad_keys = self._checked(DKIM_KEY_KIND)
        await self._generate_keys(keys)
        compiled = compile_routing(
            cast(list[RawConnector], connectors),
            cast(list[RawProfile], profiles),
            self.store.secrets,
            default_route=self.settings.default_route,
            dkim_keys=cast(list[RawDkimKey], keys),
        )
        # The generation only grows, also when the Secret was deleted or emptied: never
        # below what this operator published or what a relay already serves.
        floor = max(
            [self.document.generation if self.document else 0]
            + [p.generation for p in self.store.pods.values() if p.generation is not None]
        )
        # Throttles hold for the whole fleet: each ready relay takes 1/relays of a limit
        # (engine/throttles.py); the count follows the pods with each pass.
        fleet = max(1, sum(1 for p in self.store.pods.values() if p.ready))
        published = await publish(
            self.client,
            self.settings.routing_secret,
            dataclasses.replace(compiled.document, fleet_relays=fleet),
            floor=floor,
        )
        self.document = published.document
        self.compiled = compiled
        self.metrics.generation.set(published.document.generation)
        if published.written:
            logger.info("routing generation %d published", published.document.generation)

        ready_pods = [p for p in self.store.pods.values() if p.ready]
        self.metrics.relays_ready.set(len(ready_pods))
        self.metrics.relays_synced.set(
            sum(1 for p in ready_pods if (p.generation or 0) >= published.document.generation)
        )
        present: set[tuple[str, str, str]] = set()
        failed: list[str] = []
        for kind, invalid in ((CONNECTOR_KIND, bad_connectors), (PROFILE_KIND, bad_profiles)):
            table = self.store.connectors if kind == CONNECTOR_KIND else self.store.profiles
            for ref, raw in list(table.items()):
                if ref.namespace not in self.settings.namespaces:
                    continue
                present.add((kind, ref.namespace, ref.name))
                try:
                    await self._update_status(
                        kind, ref, raw, compiled, invalid.get(ref), ready_pods
                    )
                except KubeError as e:
                    # One object's status refused (or a passing API error) must not leave
                    # every other object without status: go on, and retry the pass.
                    logger.warning("status of %s %s not written: %s", kind, ref, e)
                    failed.append(f"{kind} {ref}")
        failed += await self._update_dkim_statuses(compiled, bad_keys)
        self.metrics.keep_ready_only(present)
        self._schedule_probes(compiled.document)
        self._schedule_dns_checks()
        self.passes += 1
        if failed:
            raise KubeError("PATCH", "status", 0, f"not written for {', '.join(failed)}")

    def _destination(self, kind: str, ref: ObjectRef, document: RoutingDocument) -> str:
        if kind == PROFILE_KIND:
            pool = self._pool(ref)
            if pool is None:
                return ""
            servers = ", ".join(str(s) for s in pool.servers) or "no servers"
            return f"{pool.balancing.value}: {servers}"
        connector = document.connector(ref)
        if connector is None:
            return ""
        destination = connector.destination
        if isinstance(destination, SmartHost):
            target = str(ServerAddress(destination.host, destination.port))
            return f"MX of {target}" if destination.mx else target
        if isinstance(destination, ProfilePool):
            return f"profile {destination.profile.name}"
        return "recipient MX"

    def _fingerprint(self, kind: str, ref: ObjectRef, document: RoutingDocument) -> str | None:
        """A checksum of everything the relays get for this object (None: nothing)."""
        if kind == CONNECTOR_KIND:
            connector = document.connector(ref)
            if connector is None:
                return None
            conflicts = tuple(c for c in document.conflicts if c.winner == ref or ref in c.losers)
            # The document's own canonical checksum, over a document of just this entry.
            return RoutingDocument(
                generation=0, connectors=(connector,), conflicts=conflicts
            ).checksum
        pool = self._pool(ref)
        if pool is None:
            return None
        return "sha256:" + hashlib.sha256(repr(pool).encode()).hexdigest()

    def _pool(self, ref: ObjectRef) -> ProfilePool | None:
        assert self.document is not None
        for connector in self.document.connectors:
            destination = connector.destination
            if isinstance(destination, ProfilePool) and destination.profile == ref:
                return destination
        raw = self.store.profiles.get(ref)
        if raw is None:
            return None
        # No connector uses it: compile it alone to describe it the same way.
        body = self._crds[PROFILE_KIND].schema.apply_defaults(
            {k: v for k, v in raw.items() if k != "status"}
        )
        probe = {
            "apiVersion": API_VERSION,
            "kind": CONNECTOR_KIND,
            "metadata": {"name": "probe", "namespace": ref.namespace},
            "spec": {"recipientDomains": ["*"], "destination": {"profileRef": {"name": ref.name}}},
        }
        try:
            document = compile_routing(
                [cast(RawConnector, probe)], [cast(RawProfile, body)], {}
            ).document
        except (KeyError, TypeError, ValueError):
            return None
        destination = document.connectors[0].destination
        return destination if isinstance(destination, ProfilePool) else None

    async def _update_status(
        self,
        kind: str,
        ref: ObjectRef,
        raw: dict[str, Any],
        compiled: Compiled,
        schema_errors: list[str] | None,
        ready_pods: list[PodState],
    ) -> None:
        assert self.document is not None
        metadata = raw.get("metadata") or {}
        generation = int(metadata.get("generation") or 0)
        old: dict[str, Any] = dict(raw.get("status") or {})
        findings = compiled.findings_for(kind, ref)

        config_generation: int | None = None
        fingerprint = None if schema_errors else self._fingerprint(kind, ref, self.document)
        if fingerprint is not None:
            # The first generation that routes this object as it is now. Its routing can
            # change without a spec change (a profile appears, a conflict's winner goes,
            # a Secret rotates): the fingerprint of what the relays get sees all of it.
            kept = old.get("configGeneration")
            if (
                old.get("observedGeneration") == generation
                and old.get("routingChecksum") == fingerprint
                and isinstance(kept, int)
                and kept <= self.document.generation
            ):
                config_generation = kept
            else:
                config_generation = self.document.generation
        synced = sum(
            1
            for p in ready_pods
            if config_generation is not None
            and p.generation is not None
            and p.generation >= config_generation
        )
        relays = RelayCount(synced, len(ready_pods))
        spec = raw.get("spec") or {}
        has_refs = kind == CONNECTOR_KIND and bool(
            (spec.get("destination") or {}).get("profileRef")
            or spec.get("auth")
            or (spec.get("tls") or {}).get("caBundle")
        )
        conditions = [
            accepted(findings, schema_errors or []),
            resolved_refs(findings, has_refs=has_refs),
            programmed(config_generation, relays, str(self.settings.relay_selector)),
        ]
        conditions.append(ready(conditions))
        self.metrics.ready.labels(kind, ref.namespace, ref.name).set(
            1.0 if conditions[-1].ok else 0.0
        )
        conditions += kstatus(conditions)
        conditions += self._probe_conditions(kind, ref)
        limited = rate_limited(
            str(ref), [p.backoff for p in ready_pods], shown_before=_shown(old, RATE_LIMITED)
        )
        if limited is not None and kind == CONNECTOR_KIND:
            conditions.append(limited)
        secured = transport_security(
            str(ref),
            [p.transport for p in ready_pods],
            shown_before=_shown(old, TRANSPORT_SECURITY),
        )
        if secured is not None and kind == CONNECTOR_KIND:
            conditions.append(secured)

        status: dict[str, Any] = {
            "observedGeneration": generation,
            "conditions": merge_conditions(
                old.get("conditions"), conditions, generation, now_rfc3339()
            ),
            "destination": self._destination(kind, ref, self.document),
            "relays": str(relays),
        }
        if config_generation is not None:
            status["configGeneration"] = config_generation
            status["routingChecksum"] = fingerprint
        result = self._probe_results.get((kind, ref))
        if result is not None and result.certificate is not None:
            certificate = result.certificate
            status["certificate"] = {
                "subject": certificate.subject,
                "issuer": certificate.issuer,
                "dnsNames": list(certificate.dns_names),
                "notAfter": certificate.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        elif "certificate" in old:
            status["certificate"] = old["certificate"]
        if status == old:
            return
        patch: dict[str, Any] = dict(status)
        for key in old:
            if key not in status:
                patch[key] = None
        await self.client.merge_patch(
            API_VERSION,
            PLURALS[kind],
            ref.namespace,
            ref.name,
            {"status": patch},
            subresource="status",
        )
        # Keep the stored copy current, so the next pass compares with what was written.
        stored = self.store.table(kind).get(ref)
        if stored is not None:
            stored["status"] = status
        await self._post_events(raw, kind, old.get("conditions") or [], status["conditions"])

    async def _post_events(
        self,
        raw: dict[str, Any],
        kind: str,
        before: list[dict[str, Any]],
        after: list[dict[str, Any]],
    ) -> None:
        previous = {c.get("type"): c for c in before if isinstance(c, dict)}
        involved = {"apiVersion": API_VERSION, "kind": kind, "metadata": raw.get("metadata") or {}}
        for condition in after:
            old = previous.get(condition["type"])
            same_status = old is not None and old.get("status") == condition["status"]
            same_reason = old is not None and old.get("reason") == condition["reason"]
            if same_status and same_reason:
                continue
            kind_of_event = _event_for(condition)
            if kind_of_event is None:
                continue
            await self.client.post_event(
                involved,
                type=kind_of_event,
                reason=condition["reason"],
                message=condition["message"],
            )

    # --- DkimKeys --------------------------------------------------------------------------

    async def _generate_keys(self, keys: list[dict[str, Any]]) -> None:
        """Create the missing Secrets of keys with ``generate: {}``; never touch one that exists."""
        for body in keys:
            ref = ref_of(body)
            if not dkim_keys.wants_generated_secret(body, self.store.secrets, ref.namespace):
                continue
            secret = dkim_keys.generated_secret(body, ref.namespace)
            name = secret["metadata"]["name"]
            try:
                await self.client.create("v1", "secrets", ref.namespace, secret)
            except KubeError as e:
                if e.status == 409:  # it exists after all, and stays as it is
                    logger.info("DkimKey %s: Secret %s exists; not generated", ref, name)
                else:  # e.g. 403: no RBAC to create Secrets here (docs/dkim.md)
                    logger.warning("DkimKey %s: Secret %s not generated: %s", ref, name, e)
                continue
            logger.info(
                "DkimKey %s: generated a new key into Secret %s/%s", ref, ref.namespace, name
            )
            self.store.secrets[ObjectRef(ref.namespace, name)] = self._value("Secret", secret)

    async def _update_dkim_statuses(
        self, compiled: Compiled, invalid: dict[ObjectRef, list[str]]
    ) -> list[str]:
        failed: list[str] = []
        for ref, raw in list(self.store.dkim_keys.items()):
            if ref.namespace not in self.settings.namespaces:
                continue
            loaded = dkim_keys.loaded_key(raw, self.store.secrets, ref.namespace)
            status = dkim_keys.dkim_status(
                raw,
                compiled.findings_for(DKIM_KEY_KIND, ref),
                invalid.get(ref, []),
                loaded,
                self._dns_results.get(ref),
                self.settings.queue_lifetime,
            )
            old = dict(raw.get("status") or {})
            if status == old:
                continue
            patch: dict[str, Any] = {**status, **{k: None for k in old if k not in status}}
            try:
                await self.client.merge_patch(
                    API_VERSION, PLURALS[DKIM_KEY_KIND], ref.namespace, ref.name,
                    {"status": patch}, subresource="status",
                )  # fmt: skip
            except KubeError as e:
                logger.warning("status of %s %s not written: %s", DKIM_KEY_KIND, ref, e)
                failed.append(f"{DKIM_KEY_KIND} {ref}")
                continue
            raw["status"] = status
            await self._post_events(
                raw, DKIM_KEY_KIND, old.get("conditions") or [], status["conditions"]
            )
        return failed

    def _schedule_dns_checks(self) -> None:
        if self._task_group is None:
            return
        wanted: dict[ObjectRef, dkim_keys.DnsCheck] = {}
        if self.settings.probe_interval > 0:
            for ref, raw in self.store.dkim_keys.items():
                loaded = dkim_keys.loaded_key(raw, self.store.secrets, ref.namespace)
                check = dkim_keys.dns_check_for(raw, loaded)
                if check is not None and ref.namespace in self.settings.namespaces:
                    wanted[ref] = check
        for ref, (check, task) in list(self._dns_checks.items()):
            if wanted.get(ref) != check:
                task.cancel()
                del self._dns_checks[ref]
                self._dns_results.pop(ref, None)
        for ref, check in wanted.items():
            if ref not in self._dns_checks:
                task = self._task_group.create_task(
                    self._dns_loop(ref, check), name=f"mailflow DNS check DkimKey {ref}"
                )
                self._dns_checks[ref] = (check, task)

    async def _dns_loop(self, ref: ObjectRef, check: dkim_keys.DnsCheck) -> None:
        interval = self.settings.probe_interval
        await asyncio.sleep(random.uniform(0, min(interval, 1.0)))  # noqa: S311 - not crypto
        while True:
            result = await dkim_keys.check_dns(
                check,
                self.settings.dns_servers,
                self.settings.dns_port,
                self.settings.probe_timeout,
            )
            if self._dns_results.get(ref) != result:
                logger.info(
                    "DkimKey %s: %s %s: %s",
                    ref,
                    dkim_keys.DNS_PUBLISHED,
                    result.status,
                    result.message,
                )
                self._dns_results[ref] = result
                self.poke()
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311

    # --- probes ----------------------------------------------------------------------------

    def _probe_conditions(self, kind: str, ref: ObjectRef) -> list[Condition]:
        target = self._probe_target(kind, ref)
        if target is None:
            return [
                Condition(DESTINATION_REACHABLE, "Unknown", "NotProbed", _NOT_PROBED),
                Condition(TLS_VERIFIED, "Unknown", "NotProbed", _NOT_PROBED),
            ]
        result = self._probe_results.get((kind, ref))
        if result is None:
            return []  # keep what is stored until the first probe of this run
        return [
            Condition(
                DESTINATION_REACHABLE,
                result.reachable,
                result.reachable_reason,
                result.reachable_message,
            ),
            Condition(TLS_VERIFIED, result.tls, result.tls_reason, result.tls_message),
        ]

    def _probe_target(self, kind: str, ref: ObjectRef) -> _Probe | None:
        if self.document is None or self.settings.probe_interval <= 0:
            return None
        if kind == PROFILE_KIND:
            pool = self._pool(ref)
            if pool is None or not pool.servers:
                return None
            return _Probe(pool.servers, TlsPolicy(), "")
        connector = self.document.connector(ref)
        if connector is None or connector.unresolved or not connector.enabled:
            return None
        destination = connector.destination
        implicit = False
        if isinstance(destination, SmartHost) and not destination.mx:
            servers: tuple[ServerAddress, ...] = (
                ServerAddress(destination.host, destination.port),
            )
            implicit = destination.implicit_tls
        elif isinstance(destination, ProfilePool) and destination.servers:
            servers = destination.servers
        else:
            return None  # RecipientMx / mx: true: the next hop depends on the recipient
        return _Probe(servers, connector.tls, _recipient_domain(connector), implicit)

    def _schedule_probes(self, document: RoutingDocument) -> None:
        if self._task_group is None:
            return
        wanted: dict[tuple[str, ObjectRef], _Probe] = {}
        for kind, table in (
            (CONNECTOR_KIND, self.store.connectors),
            (PROFILE_KIND, self.store.profiles),
        ):
            for ref in table:
                target = self._probe_target(kind, ref)
                if target is not None:
                    wanted[(kind, ref)] = target
        for key, (target, task) in list(self._probes.items()):
            if wanted.get(key) != target:
                task.cancel()
                del self._probes[key]
                self._probe_results.pop(key, None)
                self.metrics.forget(key[0], key[1].namespace, key[1].name)
        for key, target in wanted.items():
            if key not in self._probes:
                task = self._task_group.create_task(
                    self._probe_loop(key, target), name=f"mailflow probe {key[0]} {key[1]}"
                )
                self._probes[key] = (target, task)

    async def _probe_loop(self, key: tuple[str, ObjectRef], target: _Probe) -> None:
        interval = self.settings.probe_interval
        # Jitter: many connectors created at once do not probe in lockstep.
        await asyncio.sleep(random.uniform(0, min(interval, 1.0)))  # noqa: S311 - not crypto
        while True:
            probes = await asyncio.gather(
                *(
                    probe_server(
                        server,
                        target.policy,
                        target.recipient_domain,
                        step_timeout=self.settings.probe_timeout,
                        implicit_tls=target.implicit_tls or server.implicit_tls,
                    )
                    for server in target.servers
                )
            )
            result = summarize(probes, warning_days=self.settings.certificate_warning_days)
            kind, ref = key
            self.metrics.probe_ok.labels(kind, ref.namespace, ref.name).set(
                1 if result.reachable == "True" and result.tls == "True" else 0
            )
            if result.days_left is not None:
                self.metrics.certificate_days.labels(kind, ref.namespace, ref.name).set(
                    result.days_left
                )
                self.metrics.certificate_expiring.labels(kind, ref.namespace, ref.name).set(
                    1 if result.days_left < self.settings.certificate_warning_days else 0
                )
            if self._probe_results.get(key) != result:
                self._probe_results[key] = result
                self.poke()
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311


_NOT_PROBED = "The next hop is chosen per recipient (MX), or the destination is not resolved"


def _recipient_domain(connector: Connector) -> str:
    """A domain to check DomainMatch against: the first exact recipient domain."""
    for pattern in connector.recipient_patterns:
        if isinstance(pattern, DomainPattern) and "*" not in str(pattern):
            return str(pattern)
    for pattern in connector.recipient_patterns:
        text = str(pattern)
        if text.startswith("*.") and text.count("*") == 1:
            return text[2:]
    return ""


def _shown(status: Mapping[str, Any], condition_type: str) -> bool:
    """Whether the stored status has a condition of this type (an informational condition,
    once shown, stays and says when it no longer applies)."""
    return any(
        c.get("type") == condition_type
        for c in status.get("conditions") or []
        if isinstance(c, dict)
    )


def _event_for(condition: Mapping[str, Any]) -> str | None:
    """Which condition changes a user must see, and as which event type."""
    kind, status, reason = condition["type"], condition["status"], condition["reason"]
    if kind in (ACCEPTED, PROGRAMMED) and status == "True":
        return "Normal"
    watched = (
        ACCEPTED,
        RESOLVED_REFS,
        DESTINATION_REACHABLE,
        TLS_VERIFIED,
        dkim_keys.DNS_PUBLISHED,
        dkim_keys.SIGNATURES_OUTLAST_QUEUE,
        TRANSPORT_SECURITY,
    )
    if kind in watched and status == "False":
        return "Warning"
    if reason == "CertificateExpiringSoon" or (kind == RATE_LIMITED and status == "True"):
        return "Warning"
    return None
