"""The routing document: everything a relay needs to route and deliver, in one value.

The operator (and ``mailflow relay --manifests`` in standalone mode) compiles every
OutboundConnector, MultiSmtpProfile and referenced Secret into one document; relays
load it, route with it and report the generation they serve. The relay owns this
format: producers import it from here.

The serialised form is canonical JSON (sorted keys, no insignificant white space), so
the same inputs always give the same bytes and the same checksum. The checksum covers
everything but the generation, so a producer can tell "nothing changed" without
comparing generations, and a relay can refuse a document that was cut or altered.

Conflicts are resolved by the producer (it knows creation times) and recorded here: a
connector that lost a (recipient pattern, sender pattern, client scope) key to an older
connector does not route that key, and the record lets ``mailflow explain`` say why.

A document with a client-scoped connector (``clients``) says ``routing/v2``: a relay
that predates client scopes would ignore the field and route that connector's mail for
every client, so it must refuse the document instead (and keep the one in force).
Documents without one keep ``routing/v1`` and their checksum.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from mailflow_relay.errors import DkimKeyError, InvalidDomainError, RoutingDocumentError
from mailflow_relay.routing.dkim_keys import (
    NEVER_SIGNED,
    DkimAlgorithm,
    DkimCanonicalization,
    DkimKey,
    load_private_key,
)
from mailflow_relay.routing.domains import DomainPattern

_E = TypeVar("_E", bound=enum.Enum)

__all__ = [
    "ROUTING_API_VERSION",
    "ROUTING_API_VERSION_CLIENTS",
    "Balancing",
    "ClientScope",
    "Conflict",
    "Connector",
    "DaneMode",
    "DefaultAction",
    "DefaultRoute",
    "Destination",
    "DkimKey",
    "DomainThrottle",
    "MtaStsMode",
    "ObjectRef",
    "ProfilePool",
    "RecipientMx",
    "RoutingDocument",
    "ServerAddress",
    "ServerLimits",
    "SmartHost",
    "SmtpCredentials",
    "Throttle",
    "TlsMode",
    "TlsPolicy",
]

ROUTING_API_VERSION = "mailflow.dev/routing/v1"
ROUTING_API_VERSION_CLIENTS = "mailflow.dev/routing/v2"
"""The version of a document with a client-scoped connector (older relays refuse it)."""

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class TlsMode(enum.Enum):
    """How strictly TLS is enforced on the next hop (see DESIGN.md, "TLS modes")."""

    OPPORTUNISTIC = "Opportunistic"
    SELF_SIGNED = "SelfSigned"
    TRUSTED_CA = "TrustedCA"
    DOMAIN_MATCH = "DomainMatch"
    NAME_MATCH = "NameMatch"

    @property
    def requires_tls(self) -> bool:
        return self is not TlsMode.OPPORTUNISTIC

    @property
    def verifies_chain(self) -> bool:
        return self in (TlsMode.TRUSTED_CA, TlsMode.DOMAIN_MATCH, TlsMode.NAME_MATCH)


class DaneMode(enum.Enum):
    """``tls.dane``: Postfix's ``dane`` (Opportunistic) and ``dane-only`` (Mandatory)."""

    OPPORTUNISTIC = "Opportunistic"
    MANDATORY = "Mandatory"
    NONE = "None"


class MtaStsMode(enum.Enum):
    """``tls.mtaSts``: apply the policy domain's MTA-STS policy (RFC 8461), or not."""

    OPPORTUNISTIC = "Opportunistic"
    NONE = "None"


class Balancing(enum.Enum):
    ROUND_ROBIN = "RoundRobin"
    FAILOVER = "Failover"


class DefaultAction(enum.Enum):
    """What happens to a recipient that no connector matches."""

    RECIPIENT_MX = "RecipientMx"
    REJECT = "Reject"


@dataclass(frozen=True, order=True)
class ObjectRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> ObjectRef:
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name:
            raise ValueError(f"{text!r} is not of the form namespace/name")
        return cls(namespace, name)


@dataclass(frozen=True)
class TlsPolicy:
    mode: TlsMode = TlsMode.OPPORTUNISTIC
    certificate_name: str | None = None
    """For NameMatch: the name the certificate must carry; ``*.x`` = one label left of x."""
    ca_bundle: str | None = field(default=None, repr=False)
    """PEM certificates that replace the system roots; None = system roots."""
    pinned_fingerprints: tuple[str, ...] = ()
    """For SelfSigned: ``sha256/<base64>`` or ``sha256/<hex>`` of the certificate or its SPKI."""
    dane: DaneMode = DaneMode.NONE
    """DANE (RFC 7672) for MX hosts and named smart hosts; see outbound/dane.py."""
    mta_sts: MtaStsMode = MtaStsMode.NONE
    """MTA-STS (RFC 8461) of the policy domain; see outbound/mta_sts.py."""

    def describe(self) -> str:
        parts = [self.mode.value]
        if self.dane is not DaneMode.NONE:
            parts.append(f"DANE {self.dane.value}")
        if self.mta_sts is not MtaStsMode.NONE:
            parts.append(f"MTA-STS {self.mta_sts.value}")
        if self.certificate_name:
            parts.append(f"certificateName {self.certificate_name}")
        if self.pinned_fingerprints:
            parts.append(f"{len(self.pinned_fingerprints)} pinned fingerprint(s)")
        if self.ca_bundle:
            parts.append("connector CA bundle")
        elif self.mode.verifies_chain:
            parts.append("system roots")
        return ", ".join(parts)


@dataclass(frozen=True, order=True)
class ServerAddress:
    host: str
    port: int = 25
    implicit_tls: bool = False
    """A profile server's ``implicitTls``: TLS from the first byte (RFC 8314 §3, port 465)."""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class SmartHost:
    """One next hop by name or IP; with ``mx`` the MX records of ``host`` are used instead."""

    host: str
    port: int = 25
    mx: bool = False
    implicit_tls: bool = False
    """TLS from the first byte (RFC 8314 §3, port 465) instead of STARTTLS."""

    def describe(self) -> str:
        target = str(ServerAddress(self.host, self.port))
        shown = (
            f"smart host MX of {self.host} (port {self.port})"
            if self.mx
            else f"smart host {target}"
        )
        return f"{shown} (implicit TLS)" if self.implicit_tls else shown


@dataclass(frozen=True)
class Throttle:
    """Limits that keep mail queued (never refused): fleet-wide, see engine/throttles.py.

    None: no limit of that kind."""

    max_connections: int | None = None
    messages_per_minute: int | None = None
    recipients_per_message: int | None = None
    """More recipients than this for one destination are split into several messages."""

    @property
    def limits_anything(self) -> bool:
        return any(
            v is not None
            for v in (self.max_connections, self.messages_per_minute, self.recipients_per_message)
        )


@dataclass(frozen=True)
class DomainThrottle:
    """A throttle for one recipient domain (exact, lower case) of a connector's mail."""

    domain: str
    throttle: Throttle


@dataclass(frozen=True)
class ServerLimits:
    """A profile server's pause and throttle (servers without any are not listed)."""

    server: ServerAddress
    paused: bool = False
    throttle: Throttle = Throttle()


@dataclass(frozen=True)
class ProfilePool:
    """The servers of a MultiSmtpProfile; no servers means the profile was not found."""

    profile: ObjectRef
    servers: tuple[ServerAddress, ...]
    balancing: Balancing = Balancing.ROUND_ROBIN
    server_limits: tuple[ServerLimits, ...] = ()

    def limits_of(self, server: ServerAddress) -> ServerLimits | None:
        # By host and port: the limits name a server, however it is connected to.
        return next(
            (
                s
                for s in self.server_limits
                if (s.server.host, s.server.port) == (server.host, server.port)
            ),
            None,
        )

    def describe(self) -> str:
        if not self.servers:
            return f"profile {self.profile} (unresolved)"
        servers = ", ".join(str(s) for s in self.servers)
        return f"profile {self.profile} ({self.balancing.value}: {servers})"


@dataclass(frozen=True)
class RecipientMx:
    """Deliver to the MX of the recipient's domain (RFC 5321 §5.1)."""

    def describe(self) -> str:
        return "recipient MX"


Destination: TypeAlias = SmartHost | ProfilePool | RecipientMx


@dataclass(frozen=True)
class SmtpCredentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class ClientScope:
    """The submitting clients a connector serves: a source network or an AUTH user.

    A client matches when its address is in one of :attr:`networks` or it logged in as
    one of :attr:`users`. The compliance design needs it: mail that comes back from the
    compliance server must not go to the compliance server again.
    """

    networks: tuple[IPNetwork, ...] = ()
    users: tuple[str, ...] = ()

    def matches(self, address: str | None, user: str | None) -> bool:
        if user is not None and user in self.users:
            return True
        if address is None or not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def __str__(self) -> str:
        parts = [*(str(n) for n in self.networks), *(f"user {u}" for u in self.users)]
        return ", ".join(parts)


@dataclass(frozen=True)
class Connector:
    ref: ObjectRef
    generation: int
    created: str
    """The resource's creationTimestamp (RFC 3339), "" when unknown (offline manifests)."""
    enabled: bool
    recipient_patterns: tuple[DomainPattern, ...]
    sender_patterns: tuple[DomainPattern, ...]
    """Empty: the connector serves every sender (the whole organisation)."""
    destination: Destination
    tls: TlsPolicy
    description: str = ""
    auth: SmtpCredentials | None = None
    unresolved: tuple[str, ...] = ()
    """Why this connector cannot deliver now (a missing profile or Secret); mail it routes is
    deferred, never sent elsewhere."""
    clients: ClientScope | None = None
    """None: every submitting client. Otherwise only mail from these clients."""
    dkim_sign: bool = True
    """False (``dkim: {sign: false}``): the next hop signs; see :mod:`mailflow_relay.engine.signing`."""
    paused: bool = False
    """Its mail stays queued and nothing is delivered (nor bounced before the queue lifetime)."""
    throttle: Throttle | None = None
    domain_throttles: tuple[DomainThrottle, ...] = ()


@dataclass(frozen=True)
class Conflict:
    """Several enabled connectors claim the same recipient pattern for the same sender scope."""

    recipient: DomainPattern
    sender: DomainPattern | None
    winner: ObjectRef
    losers: tuple[ObjectRef, ...]
    clients: ClientScope | None = None


@dataclass(frozen=True)
class DefaultRoute:
    action: DefaultAction = DefaultAction.RECIPIENT_MX
    tls: TlsPolicy = TlsPolicy(TlsMode.OPPORTUNISTIC)

    def describe(self) -> str:
        if self.action is DefaultAction.REJECT:
            return "reject (no connector matches)"
        return f"recipient MX with {self.tls.mode.value} TLS"


@dataclass(frozen=True)
class RoutingDocument:
    generation: int
    connectors: tuple[Connector, ...]
    conflicts: tuple[Conflict, ...] = ()
    default_route: DefaultRoute = DefaultRoute()
    dkim_keys: tuple[DkimKey, ...] = ()
    """Enabled DKIM keys with their private keys (this document lives in a Secret; never log
    :meth:`to_json`)."""
    fleet_relays: int = 1
    """The ready relays the operator counted: each takes this share of a throttle."""

    def __post_init__(self) -> None:
        # One value, one order: documents built from the same parts in any order are equal
        # and serialise to the same bytes.
        object.__setattr__(self, "connectors", tuple(sorted(self.connectors, key=_by_ref)))
        object.__setattr__(self, "dkim_keys", tuple(sorted(self.dkim_keys, key=_dkim_order)))
        object.__setattr__(self, "conflicts", tuple(sorted(self.conflicts, key=_conflict_key)))

    def to_json(self) -> str:
        body = _document_body(self)
        return _canonical({**body, "generation": self.generation, "checksum": _checksum(body)})

    @property
    def checksum(self) -> str:
        return _checksum(_document_body(self))

    def connector(self, ref: ObjectRef) -> Connector | None:
        for connector in self.connectors:
            if connector.ref == ref:
                return connector
        return None

    @classmethod
    def from_json(cls, text: str | bytes) -> RoutingDocument:
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise RoutingDocumentError("", f"not JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: object) -> RoutingDocument:
        top = _Reader(raw, "")
        if top.text("apiVersion") not in (ROUTING_API_VERSION, ROUTING_API_VERSION_CLIENTS):
            raise RoutingDocumentError(
                "apiVersion", f"expected {ROUTING_API_VERSION!r} or {ROUTING_API_VERSION_CLIENTS!r}"
            )
        document = cls(
            generation=top.integer("generation"),
            connectors=tuple(_read_connector(r) for r in top.items("connectors")),
            conflicts=tuple(_read_conflict(r) for r in top.items("conflicts")),
            default_route=_read_default_route(top.child("defaultRoute")),
            dkim_keys=tuple(_read_dkim_key(r) for r in top.optional_items("dkimKeys")),
            fleet_relays=_read_fleet(top.optional_child("fleet")),
        )
        expected = top.text("checksum")
        if expected != document.checksum:
            raise RoutingDocumentError("checksum", "does not match the document's content")
        return document


# --- serialisation ------------------------------------------------------------------------


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _checksum(body: Mapping[str, object]) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _document_body(document: RoutingDocument) -> dict[str, object]:
    scoped = any(c.clients is not None for c in document.connectors)
    body: dict[str, object] = {
        "apiVersion": ROUTING_API_VERSION_CLIENTS if scoped else ROUTING_API_VERSION,
        "connectors": [_connector_dict(c) for c in document.connectors],
        "conflicts": [_conflict_dict(c) for c in document.conflicts],
        "defaultRoute": {
            "action": document.default_route.action.value,
            "tls": _tls_dict(document.default_route.tls),
        },
    }
    # Written only when present: a document without DKIM keeps its bytes and checksum, and an
    # older relay, which does not read this field, refuses a document with it (checksum).
    if document.dkim_keys:
        body["dkimKeys"] = [_dkim_key_dict(k) for k in document.dkim_keys]
    if document.fleet_relays != 1:
        body["fleet"] = {"relays": document.fleet_relays}
    return body


def _dkim_order(key: DkimKey) -> tuple[str, str, str]:
    return (key.domain, key.selector, key.ref)


def _dkim_key_dict(key: DkimKey) -> dict[str, object]:
    return {
        "ref": key.ref,
        "domain": key.domain,
        "subdomains": key.subdomains,
        "selector": key.selector,
        "algorithm": key.algorithm.value,
        "privateKey": key.private_key,
        "fingerprint": key.fingerprint,
        "signedHeaders": list(key.signed_headers),
        "canonicalization": key.canonicalization.value,
        "expireAfter": key.expire_after,
    }


def _by_ref(connector: Connector) -> ObjectRef:
    return connector.ref


def _conflict_key(conflict: Conflict) -> tuple[str, str, str, str]:
    sender = "" if conflict.sender is None else str(conflict.sender)
    clients = "" if conflict.clients is None else str(conflict.clients)
    return (str(conflict.recipient), sender, clients, str(conflict.winner))


def _clients_dict(clients: ClientScope) -> dict[str, object]:
    return {"networks": [str(n) for n in clients.networks], "users": list(clients.users)}


def _tls_dict(tls: TlsPolicy) -> dict[str, object]:
    written: dict[str, object] = {
        "mode": tls.mode.value,
        "certificateName": tls.certificate_name,
        "caBundle": tls.ca_bundle,
        "pinnedFingerprints": list(tls.pinned_fingerprints),
    }
    # Written only when used, so that documents without them stay byte for byte the same.
    if tls.dane is not DaneMode.NONE:
        written["dane"] = tls.dane.value
    if tls.mta_sts is not MtaStsMode.NONE:
        written["mtaSts"] = tls.mta_sts.value
    return written


def _destination_dict(destination: Destination) -> dict[str, object]:
    if isinstance(destination, SmartHost):
        return {
            "kind": "SmartHost",
            "host": destination.host,
            "port": destination.port,
            "mx": destination.mx,
            "implicitTls": destination.implicit_tls,
        }
    if isinstance(destination, ProfilePool):
        return {
            "kind": "Profile",
            "profile": str(destination.profile),
            "balancing": destination.balancing.value,
            "servers": [
                {"host": s.host, "port": s.port, "implicitTls": s.implicit_tls}
                for s in destination.servers
            ],
            # Only when set: documents without server limits keep their bytes and checksum.
            **(
                {"serverLimits": [_server_limits_dict(s) for s in destination.server_limits]}
                if destination.server_limits
                else {}
            ),
        }
    return {"kind": "RecipientMx"}


def _connector_dict(connector: Connector) -> dict[str, object]:
    auth = connector.auth
    return {
        "ref": str(connector.ref),
        "generation": connector.generation,
        "created": connector.created,
        "enabled": connector.enabled,
        "description": connector.description,
        "recipientDomains": [str(p) for p in connector.recipient_patterns],
        "senderDomains": [str(p) for p in connector.sender_patterns],
        "destination": _destination_dict(connector.destination),
        "tls": _tls_dict(connector.tls),
        "auth": None if auth is None else {"username": auth.username, "password": auth.password},
        "unresolved": list(connector.unresolved),
        # Only when set: documents without client scopes keep their bytes and checksum.
        **({} if connector.clients is None else {"clients": _clients_dict(connector.clients)}),
        # Only the opt-out is written, so documents without it keep their bytes (see above).
        **({} if connector.dkim_sign else {"dkim": {"sign": False}}),
        **_limits_dict(connector),
    }


def _conflict_dict(conflict: Conflict) -> dict[str, object]:
    return {
        "recipient": str(conflict.recipient),
        "sender": None if conflict.sender is None else str(conflict.sender),
        "winner": str(conflict.winner),
        "losers": [str(r) for r in conflict.losers],
        **({} if conflict.clients is None else {"clients": _clients_dict(conflict.clients)}),
    }


class _Reader:
    """Typed access to one JSON object, with the path of every field for errors."""

    def __init__(self, raw: object, path: str) -> None:
        if not isinstance(raw, dict):
            raise RoutingDocumentError(path, "expected an object")
        self.raw: dict[str, Any] = raw
        self.path = path

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, kind: type | tuple[type, ...], name: str) -> Any:
        if key not in self.raw:
            raise RoutingDocumentError(self._at(key), "missing")
        value = self.raw[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise RoutingDocumentError(self._at(key), f"expected {name}")
        if not isinstance(value, kind):
            raise RoutingDocumentError(self._at(key), f"expected {name}")
        return value

    def text(self, key: str) -> str:
        return str(self._get(key, str, "a string"))

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, (str, type(None)), "a string or null")
        return None if value is None else str(value)

    def integer(self, key: str) -> int:
        return int(self._get(key, int, "an integer"))

    def boolean(self, key: str) -> bool:
        return bool(self._get(key, bool, "a boolean"))

    def optional_items(self, key: str) -> list[_Reader]:
        return self.items(key) if key in self.raw else []

    def optional_child(self, key: str) -> _Reader | None:
        return self.child(key) if key in self.raw else None

    def items(self, key: str) -> list[_Reader]:
        items = self._get(key, list, "a list")
        return [_Reader(item, f"{self._at(key)}[{i}]") for i, item in enumerate(items)]

    def texts(self, key: str) -> list[str]:
        items = self._get(key, list, "a list")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise RoutingDocumentError(f"{self._at(key)}[{i}]", "expected a string")
        return list(items)

    def child(self, key: str) -> _Reader:
        return _Reader(self._get(key, dict, "an object"), self._at(key))

    def opt_child(self, key: str) -> _Reader | None:
        value = self._get(key, (dict, type(None)), "an object or null")
        return None if value is None else _Reader(value, self._at(key))

    def choice(self, key: str, kind: type[_E]) -> _E:
        value = self.text(key)
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in kind)
            raise RoutingDocumentError(self._at(key), f"expected one of {allowed}") from None

    def pattern(self, value: str, path: str) -> DomainPattern:
        try:
            return DomainPattern.parse(value)
        except InvalidDomainError as e:
            raise RoutingDocumentError(path, e.reason) from e

    def ref(self, key: str) -> ObjectRef:
        try:
            return ObjectRef.parse(self.text(key))
        except ValueError as e:
            raise RoutingDocumentError(self._at(key), str(e)) from e


def _read_tls(r: _Reader) -> TlsPolicy:
    return TlsPolicy(
        mode=r.choice("mode", TlsMode),
        certificate_name=r.opt_text("certificateName"),
        ca_bundle=r.opt_text("caBundle"),
        pinned_fingerprints=tuple(r.texts("pinnedFingerprints")),
        # Absent in documents from operators older than these fields: not used.
        dane=r.choice("dane", DaneMode) if "dane" in r.raw else DaneMode.NONE,
        mta_sts=r.choice("mtaSts", MtaStsMode) if "mtaSts" in r.raw else MtaStsMode.NONE,
    )


def _throttle_dict(throttle: Throttle) -> dict[str, object]:
    return {
        "maxConnections": throttle.max_connections,
        "messagesPerMinute": throttle.messages_per_minute,
        "recipientsPerMessage": throttle.recipients_per_message,
    }


def _server_limits_dict(limits: ServerLimits) -> dict[str, object]:
    return {
        "host": limits.server.host,
        "port": limits.server.port,
        "paused": limits.paused,
        "throttle": _throttle_dict(limits.throttle),
    }


def _limits_dict(connector: Connector) -> dict[str, object]:
    """Pause and throttles, only when set (documents without them keep their checksum)."""
    limits: dict[str, object] = {}
    if connector.paused:
        limits["paused"] = True
    if connector.throttle is not None:
        limits["throttle"] = _throttle_dict(connector.throttle)
    if connector.domain_throttles:
        limits["domainThrottles"] = [
            {"domain": d.domain, "throttle": _throttle_dict(d.throttle)}
            for d in connector.domain_throttles
        ]
    return limits


def _read_throttle(r: _Reader) -> Throttle:
    values = []
    for key in ("maxConnections", "messagesPerMinute", "recipientsPerMessage"):
        value = r._get(key, (int, type(None)), "an integer or null")
        if value is not None and not 1 <= value <= 1_000_000:
            raise RoutingDocumentError(r._at(key), "expected an integer from 1 to 1000000")
        values.append(value)
    return Throttle(*values)


def _read_server_limits(r: _Reader) -> ServerLimits:
    return ServerLimits(
        server=ServerAddress(r.text("host"), _port(r, "port")),
        paused=r.boolean("paused"),
        throttle=_read_throttle(r.child("throttle")),
    )


def _read_domain_throttle(r: _Reader) -> DomainThrottle:
    domain = r.text("domain")
    if not domain or domain != domain.lower() or domain.startswith("*"):
        raise RoutingDocumentError(r._at("domain"), "expected one domain name in lower case")
    return DomainThrottle(domain, _read_throttle(r.child("throttle")))


def _read_fleet(r: _Reader | None) -> int:
    if r is None:
        return 1
    relays = r.integer("relays")
    if not 1 <= relays <= 10_000:
        raise RoutingDocumentError(r._at("relays"), "expected an integer from 1 to 10000")
    return relays


def _read_server(r: _Reader) -> ServerAddress:
    port = _port(r, "port")
    # A document from an operator before implicitTls: the compiler's default (port 465).
    implicit = r.boolean("implicitTls") if "implicitTls" in r.raw else port == 465
    return ServerAddress(r.text("host"), port, implicit)


def _read_destination(r: _Reader) -> Destination:
    kind = r.text("kind")
    if kind == "SmartHost":
        port = _port(r, "port")
        # A document from an operator before implicitTls: the compiler's default (port 465).
        implicit = r.boolean("implicitTls") if "implicitTls" in r.raw else port == 465
        return SmartHost(host=r.text("host"), port=port, mx=r.boolean("mx"), implicit_tls=implicit)
    if kind == "Profile":
        servers = tuple(_read_server(s) for s in r.items("servers"))
        return ProfilePool(
            profile=r.ref("profile"),
            servers=servers,
            balancing=r.choice("balancing", Balancing),
            server_limits=tuple(_read_server_limits(s) for s in r.optional_items("serverLimits")),
        )
    if kind == "RecipientMx":
        return RecipientMx()
    raise RoutingDocumentError(r._at("kind"), "expected 'SmartHost', 'Profile' or 'RecipientMx'")


def _port(r: _Reader, key: str) -> int:
    port = r.integer(key)
    if not 1 <= port <= 65535:
        raise RoutingDocumentError(r._at(key), "expected a port between 1 and 65535")
    return port


def _read_connector(r: _Reader) -> Connector:
    auth = r.opt_child("auth")
    return Connector(
        ref=r.ref("ref"),
        generation=r.integer("generation"),
        created=r.text("created"),
        enabled=r.boolean("enabled"),
        description=r.text("description"),
        recipient_patterns=_patterns(r, "recipientDomains"),
        sender_patterns=_patterns(r, "senderDomains"),
        destination=_read_destination(r.child("destination")),
        tls=_read_tls(r.child("tls")),
        auth=None
        if auth is None
        else SmtpCredentials(auth.text("username"), auth.text("password")),
        unresolved=tuple(r.texts("unresolved")),
        clients=_read_clients(r),
        dkim_sign=_read_dkim_sign(r.optional_child("dkim")),
        paused=r.boolean("paused") if "paused" in r.raw else False,
        throttle=_opt(r.optional_child("throttle"), _read_throttle),
        domain_throttles=tuple(
            _read_domain_throttle(d) for d in r.optional_items("domainThrottles")
        ),
    )


def _opt(r: _Reader | None, read: Any) -> Any:
    return None if r is None else read(r)


def _read_clients(r: _Reader) -> ClientScope | None:
    if "clients" not in r.raw:
        return None
    scope = r.child("clients")
    networks = []
    for i, text in enumerate(scope.texts("networks")):
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as e:
            raise RoutingDocumentError(f"{scope._at('networks')}[{i}]", str(e)) from e
    users = tuple(scope.texts("users"))
    if not networks and not users:
        raise RoutingDocumentError(scope.path, "expected at least one network or user")
    return ClientScope(tuple(networks), users)


def _read_dkim_sign(r: _Reader | None) -> bool:
    return True if r is None else r.boolean("sign")


def _read_dkim_key(r: _Reader) -> DkimKey:
    algorithm = r.choice("algorithm", DkimAlgorithm)
    expire = r._get("expireAfter", (int, type(None)), "an integer or null")
    if expire is not None and expire < 1:
        raise RoutingDocumentError(r._at("expireAfter"), "expected a positive number of seconds")
    key = DkimKey(
        ref=r.text("ref"),
        domain=r.text("domain"),
        subdomains=r.boolean("subdomains"),
        selector=r.text("selector"),
        algorithm=algorithm,
        private_key=r.text("privateKey"),
        fingerprint=r.text("fingerprint"),
        signed_headers=tuple(r.texts("signedHeaders")),
        canonicalization=r.choice("canonicalization", DkimCanonicalization),
        expire_after=expire,
    )
    # A key that cannot sign refuses the whole document (fail closed): the generation in force
    # keeps signing. The error names the key and never quotes it.
    try:
        loaded = load_private_key(key.private_key, algorithm, ref=key.ref)
    except DkimKeyError as e:
        raise RoutingDocumentError(r._at("privateKey"), str(e)) from None
    if loaded.fingerprint != key.fingerprint:
        raise RoutingDocumentError(r._at("fingerprint"), "does not match the private key")
    if "from" not in (h.lower() for h in key.signed_headers):
        raise RoutingDocumentError(r._at("signedHeaders"), "must include From")
    refused = sorted({h.lower() for h in key.signed_headers} & NEVER_SIGNED)
    if refused:
        raise RoutingDocumentError(r._at("signedHeaders"), f"must not include {', '.join(refused)}")
    return key


def _patterns(r: _Reader, key: str) -> tuple[DomainPattern, ...]:
    return tuple(r.pattern(value, f"{r._at(key)}[{i}]") for i, value in enumerate(r.texts(key)))


def _read_conflict(r: _Reader) -> Conflict:
    sender = r.opt_text("sender")
    return Conflict(
        recipient=r.pattern(r.text("recipient"), r._at("recipient")),
        sender=None if sender is None else r.pattern(sender, r._at("sender")),
        winner=r.ref("winner"),
        losers=tuple(_refs(r, "losers")),
        clients=_read_clients(r),
    )


def _refs(r: _Reader, key: str) -> Sequence[ObjectRef]:
    refs = []
    for i, text in enumerate(r.texts(key)):
        try:
            refs.append(ObjectRef.parse(text))
        except ValueError as e:
            raise RoutingDocumentError(f"{r._at(key)}[{i}]", str(e)) from e
    return refs


def _read_default_route(r: _Reader) -> DefaultRoute:
    return DefaultRoute(action=r.choice("action", DefaultAction), tls=_read_tls(r.child("tls")))
