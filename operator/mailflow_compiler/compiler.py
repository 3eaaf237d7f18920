"""The compiler: OutboundConnectors + MultiSmtpProfiles + Secrets → one routing document.

There is one compiler. ``mailflow validate``, ``mailflow explain``, standalone
``mailflow relay --manifests`` and the operator all call :func:`compile_routing`, so
what a pipeline checks offline is what the fleet runs.

Inputs are schema-valid, defaulted bodies (the API server, or :mod:`.schema` offline,
has done that). What the schema cannot see is decided here and reported as findings
that name the object, the field and the status condition they affect:

* domains are normalised (case, IDNA) and duplicates after normalisation are refused;
* references are resolved: a profile in the same namespace, Secrets and their keys, a
  CA bundle that parses. A connector whose references do not resolve still holds its
  routes, marked unresolved, so its mail is deferred rather than sent somewhere else;
* two enabled connectors with the same recipient pattern and the same sender scope
  conflict; the older one (creation time, then name, then namespace) keeps the key.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from mailflow_compiler.dkim import DKIM_KEY_KIND, compile_dkim_keys
from mailflow_compiler.manifests import RawConnector, RawDkimKey, RawProfile, RawSecret
from mailflow_compiler.throttles import connector_limits, server_limits
from mailflow_relay.errors import InvalidDomainError
from mailflow_relay.routing.document import (
    Balancing,
    ClientScope,
    Conflict,
    Connector,
    DaneMode,
    DefaultRoute,
    Destination,
    IPNetwork,
    MtaStsMode,
    ObjectRef,
    ProfilePool,
    RecipientMx,
    RoutingDocument,
    ServerAddress,
    ServerLimits,
    SmartHost,
    SmtpCredentials,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern, normalize_domain, normalize_host

__all__ = [
    "CONNECTOR_KIND",
    "PROFILE_KIND",
    "Compiled",
    "Finding",
    "SecretStore",
    "compile_routing",
    "secret_values",
]

CONNECTOR_KIND = "OutboundConnector"
PROFILE_KIND = "MultiSmtpProfile"
AUTH_USERNAME_KEY = "username"
AUTH_PASSWORD_KEY = "password"  # noqa: S105 - the name of a Secret key, not a password
AUTH_NEEDS_VERIFIED_TLS = (
    "auth sends credentials only over a verified TLS session: set tls.mode to TrustedCA, "
    "DomainMatch or NameMatch, or SelfSigned with pinnedFingerprints"
)

SecretStore = Mapping[ObjectRef, Mapping[str, str]]
"""Decoded Secret data by namespace/name. ``None`` where Secrets are unknown (not checked)."""


@dataclass(frozen=True, order=True)
class Finding:
    """Something about one object that the schema could not catch."""

    kind: str
    ref: ObjectRef
    path: str
    message: str
    condition: str
    """The status condition this makes False: ``Accepted`` or ``ResolvedRefs``."""
    reason: str
    """The condition's reason: ``Conflicted``, ``InvalidValue``, ``ProfileNotFound``, …"""


@dataclass(frozen=True)
class Compiled:
    document: RoutingDocument
    findings: tuple[Finding, ...] = field(default=())

    def findings_for(self, kind: str, ref: ObjectRef) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind and f.ref == ref]


def secret_values(secret: RawSecret) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A Secret's keys decoded (``data`` is base64, ``stringData`` wins, as the API server does).

    Returns the values and, separately, (field path, message) for keys that do not decode.
    """
    values: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for key, encoded in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(str(encoded), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            problems.append((f"data.{key}", "Invalid value: not base64-encoded UTF-8 text"))
    for key, text in (secret.get("stringData") or {}).items():
        values[key] = str(text)
    return values, problems


def _ref(body: RawConnector | RawProfile, default_namespace: str) -> ObjectRef:
    metadata = body["metadata"]
    return ObjectRef(metadata.get("namespace") or default_namespace, metadata["name"])


class _ConnectorCompiler:
    def __init__(
        self,
        body: RawConnector,
        ref: ObjectRef,
        profiles: Mapping[ObjectRef, ProfilePool],
        secrets: SecretStore | None,
    ) -> None:
        self.body = body
        self.ref = ref
        self.profiles = profiles
        self.secrets = secrets
        self.findings: list[Finding] = []
        self.unresolved: list[str] = []

    def invalid(self, path: str, message: str) -> None:
        self.findings.append(
            Finding(CONNECTOR_KIND, self.ref, path, message, "Accepted", "InvalidValue")
        )

    def missing(self, path: str, message: str, reason: str) -> None:
        self.findings.append(
            Finding(CONNECTOR_KIND, self.ref, path, message, "ResolvedRefs", reason)
        )
        self.unresolved.append(message)

    def patterns(self, field_name: str) -> tuple[DomainPattern, ...]:
        parsed: dict[DomainPattern, int] = {}
        texts: list[str] = self.body["spec"].get(field_name, [])  # type: ignore[assignment]
        for i, text in enumerate(texts):
            path = f"spec.{field_name}[{i}]"
            try:
                pattern = DomainPattern.parse(text)
            except InvalidDomainError as e:
                self.invalid(path, f'Invalid value: "{text}": {e.reason}')
                continue
            if pattern in parsed:
                first = parsed[pattern]
                self.invalid(
                    path,
                    f'Duplicate value: "{text}" is the same domain pattern as '
                    f"spec.{field_name}[{first}] ({pattern})",
                )
                continue
            parsed[pattern] = i
        return tuple(parsed)

    def destination(self) -> Destination:
        raw = self.body["spec"].get("destination") or {}
        if "smartHost" in raw:
            smart = raw["smartHost"]
            try:
                host = normalize_host(smart["host"])
            except InvalidDomainError as e:
                self.invalid(
                    "spec.destination.smartHost.host",
                    f'Invalid value: "{smart["host"]}": {e.reason}',
                )
                host = smart["host"]
            port = int(smart.get("port", 25))
            return SmartHost(
                host=host,
                port=port,
                mx=bool(smart.get("mx", False)),
                # RFC 8314 §3.3 registers 465 for implicit TLS: STARTTLS there is a
                # plaintext greeting that never comes (a 30 s connect timeout).
                implicit_tls=bool(smart.get("implicitTls", port == 465)),
            )
        if "profileRef" in raw:
            target = ObjectRef(self.ref.namespace, raw["profileRef"]["name"])
            pool = self.profiles.get(target)
            if pool is None:
                self.missing(
                    "spec.destination.profileRef.name",
                    f'Not found: "{target.name}": no {PROFILE_KIND} named "{target.name}" in '
                    f'namespace "{target.namespace}"',
                    "ProfileNotFound",
                )
                return ProfilePool(profile=target, servers=(), balancing=Balancing.ROUND_ROBIN)
            return pool
        return RecipientMx()

    def secret(self, path: str, name: str, keys: Sequence[str]) -> dict[str, str] | None:
        if self.secrets is None:
            return None
        target = ObjectRef(self.ref.namespace, name)
        values = self.secrets.get(target)
        if values is None:
            self.missing(
                path,
                f'Not found: "{name}": no Secret named "{name}" in namespace "{target.namespace}"',
                "SecretNotFound",
            )
            return None
        absent = [key for key in keys if key not in values]
        if absent:
            listed = ", ".join(f'"{key}"' for key in absent)
            self.missing(
                path, f'Not found: Secret "{name}" has no key {listed}', "SecretKeyNotFound"
            )
            return None
        return {key: values[key] for key in keys}

    def tls(self) -> TlsPolicy:
        raw = self.body["spec"].get("tls") or {}
        mode = TlsMode(raw.get("mode", TlsMode.OPPORTUNISTIC.value))
        ca_bundle = None
        if "caBundle" in raw:
            secret_ref = raw["caBundle"]["secretRef"]
            key = secret_ref.get("key", "ca.crt")
            values = self.secret("spec.tls.caBundle.secretRef.name", secret_ref["name"], [key])
            if values is not None:
                ca_bundle = values[key]
                try:
                    if not x509.load_pem_x509_certificates(ca_bundle.encode("utf-8")):
                        raise ValueError("no certificate")
                except ValueError as e:
                    self.missing(
                        "spec.tls.caBundle.secretRef.key",
                        f'Invalid value: key "{key}" of Secret "{secret_ref["name"]}" holds no PEM '
                        f"CA certificates ({e})",
                        "InvalidCABundle",
                    )
                    ca_bundle = None
        certificate_name = raw.get("certificateName")
        return TlsPolicy(
            mode=mode,
            certificate_name=certificate_name.lower() if certificate_name else None,
            ca_bundle=ca_bundle,
            pinned_fingerprints=tuple(_canonical_pin(p) for p in raw.get("pinnedFingerprints", [])),
            dane=DaneMode(raw.get("dane", DaneMode.NONE.value)),
            mta_sts=MtaStsMode(raw.get("mtaSts", MtaStsMode.NONE.value)),
        )

    def auth(self, tls: TlsPolicy) -> SmtpCredentials | None:
        raw = self.body["spec"].get("auth")
        if not raw:
            return None
        if not _verifies(tls):
            # The CRD's CEL rule says the same; this catches objects stored before that rule
            # (Helm never upgrades CRDs) and documents not made by the API server. The
            # connector's mail waits (unresolved) rather than going out without the login.
            message = f"Invalid value: {tls.mode.value}: {AUTH_NEEDS_VERIFIED_TLS}"
            self.invalid("spec.auth", message)
            self.unresolved.append(f"spec.auth: {AUTH_NEEDS_VERIFIED_TLS}")
            return None
        values = self.secret(
            "spec.auth.secretRef.name",
            raw["secretRef"]["name"],
            [AUTH_USERNAME_KEY, AUTH_PASSWORD_KEY],
        )
        if values is None:
            return None
        return SmtpCredentials(values[AUTH_USERNAME_KEY], values[AUTH_PASSWORD_KEY])

    def compile(self) -> Connector:
        spec = self.body["spec"]
        metadata = self.body["metadata"]
        recipient_patterns = self.patterns("recipientDomains")
        sender_patterns = self.patterns("senderDomains")
        destination = self.destination()
        tls = self.tls()
        auth = self.auth(tls)
        paused, throttle, domain_throttles = connector_limits(spec, self.invalid)
        return Connector(
            ref=self.ref,
            generation=int(metadata.get("generation", 0)),
            created=str(metadata.get("creationTimestamp", "")),
            enabled=bool(spec.get("enabled", True)),
            description=str(spec.get("description", "")),
            recipient_patterns=recipient_patterns,
            sender_patterns=sender_patterns,
            destination=destination,
            tls=tls,
            auth=auth,
            unresolved=tuple(self.unresolved),
            clients=self.clients(),
            dkim_sign=bool((spec.get("dkim") or {}).get("sign", True)),
            paused=paused,
            throttle=throttle,
            domain_throttles=domain_throttles,
        )

    def clients(self) -> ClientScope | None:
        raw = self.body["spec"].get("clients")
        if raw is None:
            return None
        networks: list[IPNetwork] = []
        for i, text in enumerate(raw.get("networks", [])):
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError as e:
                self.invalid(f"spec.clients.networks[{i}]", f'Invalid value: "{text}": {e}')
                continue
            if network.prefixlen == 0:
                # Every address: the same as no client scope, but easy to misread.
                self.invalid(
                    f"spec.clients.networks[{i}]",
                    f'Invalid value: "{text}": every address; omit clients to serve every client',
                )
                continue
            networks.append(network)
        users = tuple(dict.fromkeys(str(u) for u in raw.get("users", [])))
        return ClientScope(tuple(sorted(set(networks), key=str)), tuple(sorted(users)))


def _verifies(tls: TlsPolicy) -> bool:
    """Whether the mode authenticates the server: the condition for sending it credentials."""
    if tls.mode is TlsMode.SELF_SIGNED:
        return bool(tls.pinned_fingerprints)
    return tls.mode is not TlsMode.OPPORTUNISTIC


def _canonical_pin(pin: str) -> str:
    """``sha256/<base64>`` and ``sha256/<hex>`` both become ``sha256/<lower-case hex>``."""
    _, _, value = pin.partition("/")
    if len(value) == 64:
        return "sha256/" + value.lower()
    return "sha256/" + base64.b64decode(value).hex()


def _compile_profile(body: RawProfile, ref: ObjectRef, findings: list[Finding]) -> ProfilePool:
    servers: list[ServerAddress] = []
    limits: list[ServerLimits] = []
    first_at: dict[ServerAddress, int] = {}
    for i, raw in enumerate(body["spec"].get("servers", [])):
        try:
            host = normalize_host(raw["host"])
        except InvalidDomainError as e:
            findings.append(
                Finding(
                    PROFILE_KIND,
                    ref,
                    f"spec.servers[{i}].host",
                    f'Invalid value: "{raw["host"]}": {e.reason}',
                    "Accepted",
                    "InvalidValue",
                )
            )
            continue
        port = int(raw.get("port", 25))
        # RFC 8314 §3.3: 465 is implicit TLS (as for a connector's smartHost).
        server = ServerAddress(host, port, bool(raw.get("implicitTls", port == 465)))
        if server in first_at:
            findings.append(
                Finding(
                    PROFILE_KIND,
                    ref,
                    f"spec.servers[{i}]",
                    f"Duplicate value: {server} is the same server as spec.servers[{first_at[server]}]",
                    "Accepted",
                    "InvalidValue",
                )
            )
            continue
        first_at[server] = i
        servers.append(server)
        limit = server_limits(raw, server)
        if limit is not None:
            limits.append(limit)
    return ProfilePool(
        profile=ref,
        servers=tuple(servers),
        balancing=Balancing(body["spec"].get("balancing", Balancing.ROUND_ROBIN.value)),
        server_limits=tuple(limits),
    )


def compile_routing(
    connectors: Sequence[RawConnector],
    profiles: Sequence[RawProfile],
    secrets: SecretStore | None,
    *,
    generation: int = 1,
    default_route: DefaultRoute | None = None,
    default_namespace: str = "default",
    dkim_keys: Sequence[RawDkimKey] = (),
) -> Compiled:
    """Compile resources into a routing document and the findings about them.

    ``secrets`` is ``None`` when Secrets are not known (an offline check without Secret
    manifests): references to them are then neither resolved nor reported.
    """
    findings: list[Finding] = []
    pools: dict[ObjectRef, ProfilePool] = {}
    for profile in profiles:
        ref = _ref(profile, default_namespace)
        pools[ref] = _compile_profile(profile, ref, findings)

    compiled: list[Connector] = []
    for body in connectors:
        compiler = _ConnectorCompiler(body, _ref(body, default_namespace), pools, secrets)
        compiled.append(compiler.compile())
        findings.extend(compiler.findings)

    conflicts = _resolve_conflicts(compiled, connectors, default_namespace, findings)
    keys, key_findings = compile_dkim_keys(dkim_keys, secrets, default_namespace=default_namespace)
    findings.extend(
        Finding(DKIM_KEY_KIND, f.ref, f.path, f.message, f.condition, f.reason)
        for f in key_findings
    )
    document = RoutingDocument(
        generation=generation,
        connectors=tuple(sorted(compiled, key=lambda c: c.ref)),
        conflicts=tuple(conflicts),
        default_route=default_route or DefaultRoute(),
        dkim_keys=tuple(keys),
    )
    return Compiled(document=document, findings=tuple(sorted(findings)))


def _resolve_conflicts(
    compiled: Sequence[Connector],
    bodies: Sequence[RawConnector],
    default_namespace: str,
    findings: list[Finding],
) -> list[Conflict]:
    claims: dict[
        tuple[DomainPattern, DomainPattern | None, ClientScope | None], list[Connector]
    ] = defaultdict(list)
    for connector in compiled:
        if not connector.enabled:
            continue
        senders: tuple[DomainPattern | None, ...] = connector.sender_patterns or (None,)
        for recipient in connector.recipient_patterns:
            for sender in senders:
                claims[(recipient, sender, connector.clients)].append(connector)

    # Where each pattern was written, to point the finding at the right list item.
    written_at: dict[ObjectRef, dict[DomainPattern, int]] = {}
    for body in bodies:
        positions: dict[DomainPattern, int] = {}
        for i, text in enumerate(body["spec"].get("recipientDomains", [])):
            try:
                positions.setdefault(DomainPattern.parse(text), i)
            except InvalidDomainError:
                continue
        written_at[_ref(body, default_namespace)] = positions

    conflicts: list[Conflict] = []
    for (recipient, sender, clients), holders in sorted(
        claims.items(), key=lambda item: str(item[0])
    ):
        if len(holders) < 2:
            continue
        # Creation time first; offline manifests have none, so the name decides there.
        ordered = sorted(holders, key=lambda c: (c.created or "~", c.ref.name, c.ref.namespace))
        winner, losers = ordered[0], ordered[1:]
        conflicts.append(
            Conflict(recipient, sender, winner.ref, tuple(c.ref for c in losers), clients)
        )
        scope = "every sender" if sender is None else f"senders {sender}"
        if clients is not None:
            scope += f" from clients {clients}"
        # Say what decided: "older" only when creation times did (offline, the name does).
        by_age = all(c.created for c in ordered) and len({c.created for c in ordered}) > 1
        why = "is older" if by_age else "comes first by name"
        for connector in ordered:
            others = ", ".join(str(c.ref) for c in ordered if c is not connector)
            if connector is winner:
                outcome = f"this connector {why} and keeps routing it"
            else:
                outcome = f"{winner.ref} {why} and routes it"
            index = written_at.get(connector.ref, {}).get(recipient, 0)
            findings.append(
                Finding(
                    CONNECTOR_KIND,
                    connector.ref,
                    f"spec.recipientDomains[{index}]",
                    f'Conflicted: "{recipient}" for {scope} is also claimed by {CONNECTOR_KIND} '
                    f"{others}; {outcome}",
                    "Accepted",
                    "Conflicted",
                )
            )
    return conflicts


def normalized_domain_or_none(text: str) -> str | None:
    try:
        return normalize_domain(text)
    except InvalidDomainError:
        return None
