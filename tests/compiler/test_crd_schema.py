"""Every schema constraint and CEL rule of the CRDs, each with a manifest that breaks it.

Each case asserts the exact field path and message that ``mailflow validate`` reports,
which are the ones the API server would give (``field.Error`` wording).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.crds import load_crds
from mailflow_compiler.manifests import Manifest

Body = dict[str, Any]


def connector(**spec: Any) -> Body:
    body: Body = {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": "c1", "namespace": "mail"},
        "spec": {"recipientDomains": ["contoso.com"]},
    }
    body["spec"].update(spec)
    return body


def profile(**spec: Any) -> Body:
    body: Body = {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "MultiSmtpProfile",
        "metadata": {"name": "p1", "namespace": "mail"},
        "spec": {"servers": [{"host": "192.0.2.1"}]},
    }
    body["spec"].update(spec)
    return body


def problems_of(*bodies: Body) -> list[tuple[str, str]]:
    manifests = [Manifest("t.yaml", i + 1, 1, copy.deepcopy(b)) for i, b in enumerate(bodies)]
    result = check_manifests(manifests)
    return [(p.path, p.message) for p in result.problems]


def pattern_of(kind: str, *path: str) -> str:
    schema = load_crds()[("mailflow.dev/v1alpha1", kind)].schema.raw
    node: Any = schema
    for step in path:
        node = node["items"] if step == "[]" else node["properties"][step]
    return "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" for c in node["pattern"])


RECIPIENT_PATTERN = pattern_of("OutboundConnector", "spec", "recipientDomains", "[]")
SENDER_PATTERN = pattern_of("OutboundConnector", "spec", "senderDomains", "[]")
HOST_PATTERN = pattern_of("OutboundConnector", "spec", "destination", "smartHost", "host")
NAME_PATTERN = pattern_of("OutboundConnector", "spec", "destination", "profileRef", "name")
PIN_PATTERN = pattern_of("OutboundConnector", "spec", "tls", "pinnedFingerprints", "[]")
CERT_NAME_PATTERN = pattern_of("OutboundConnector", "spec", "tls", "certificateName")
PROFILE_HOST_PATTERN = pattern_of("MultiSmtpProfile", "spec", "servers", "[]", "host")


def without(key: str) -> Callable[[Body], Body]:
    def edit(body: Body) -> Body:
        del body["spec"][key]
        return body

    return edit


CASES: list[tuple[str, Body, str, str]] = [
    # --- OutboundConnector: structure ---------------------------------------------------
    (
        "spec is required",
        {k: v for k, v in connector().items() if k != "spec"},
        "spec",
        "Required value",
    ),
    (
        "recipientDomains is required",
        without("recipientDomains")(connector()),
        "spec.recipientDomains",
        "Required value",
    ),
    (
        "recipientDomains may not be empty",
        connector(recipientDomains=[]),
        "spec.recipientDomains",
        "Invalid value: 0: should have at least 1 items",
    ),
    (
        "recipientDomains has at most 256 entries",
        connector(recipientDomains=[f"d{i}.example" for i in range(257)]),
        "spec.recipientDomains",
        "Too many: 257: must have at most 256 items",
    ),
    (
        "recipient domains are lower case",
        connector(recipientDomains=["Contoso.com"]),
        "spec.recipientDomains[0]",
        f"Invalid value: \"Contoso.com\": should match '{RECIPIENT_PATTERN}'",
    ),
    (
        "a wildcard is only the leftmost label",
        connector(recipientDomains=["mail.*.contoso.com"]),
        "spec.recipientDomains[0]",
        f"Invalid value: \"mail.*.contoso.com\": should match '{RECIPIENT_PATTERN}'",
    ),
    (
        "a wildcard is a whole label",
        connector(recipientDomains=["*contoso.com"]),
        "spec.recipientDomains[0]",
        f"Invalid value: \"*contoso.com\": should match '{RECIPIENT_PATTERN}'",
    ),
    (
        "a label does not start with a hyphen",
        connector(recipientDomains=["-contoso.com"]),
        "spec.recipientDomains[0]",
        f"Invalid value: \"-contoso.com\": should match '{RECIPIENT_PATTERN}'",
    ),
    (
        "recipient domains are at most 253 characters",
        connector(recipientDomains=[".".join(["a" * 60] * 5)]),
        "spec.recipientDomains[0]",
        "Too long: may not be longer than 253",
    ),
    (
        "recipient domains are unique",
        connector(recipientDomains=["contoso.com", "fabrikam.com", "contoso.com"]),
        "spec.recipientDomains[2]",
        'Duplicate value: "contoso.com"',
    ),
    (
        "star and star-dot-star are the same catch-all",
        connector(recipientDomains=["*", "*.*"]),
        "spec.recipientDomains",
        "Invalid value: \"array\": '*' and '*.*' both mean every domain; list only one of them",
    ),
    (
        "sender domains are not catch-alls",
        connector(senderDomains=["*"]),
        "spec.senderDomains[0]",
        f"Invalid value: \"*\": should match '{SENDER_PATTERN}'",
    ),
    (
        "sender domains are unique",
        connector(senderDomains=["contoso.com", "contoso.com"]),
        "spec.senderDomains[1]",
        'Duplicate value: "contoso.com"',
    ),
    (
        "description is at most 1024 characters",
        connector(description="x" * 1025),
        "spec.description",
        "Too long: may not be longer than 1024",
    ),
    (
        "enabled is a boolean",
        connector(enabled="yes please"),
        "spec.enabled",
        'Invalid value: "string": must be of type boolean',
    ),
    (
        "unknown fields are refused",
        connector(recipientDomain=["contoso.com"]),
        "spec.recipientDomain",
        "Unknown field: not declared in the schema",
    ),
    # --- destination ---------------------------------------------------------------------
    (
        "smartHost and profileRef exclude each other",
        connector(
            destination={"smartHost": {"host": "mx.contoso.com"}, "profileRef": {"name": "p"}}
        ),
        "spec.destination",
        'Invalid value: "object": set at most one of smartHost and profileRef; '
        "omit both to deliver to the recipient's MX",
    ),
    (
        "smartHost needs a host",
        connector(destination={"smartHost": {"port": 25}}),
        "spec.destination.smartHost.host",
        "Required value",
    ),
    (
        "smartHost host is a host name or an address",
        connector(destination={"smartHost": {"host": "mail server.contoso.com"}}),
        "spec.destination.smartHost.host",
        f"Invalid value: \"mail server.contoso.com\": should match '{HOST_PATTERN}'",
    ),
    (
        "port is at least 1",
        connector(destination={"smartHost": {"host": "mx.contoso.com", "port": 0}}),
        "spec.destination.smartHost.port",
        "Invalid value: 0: should be greater than or equal to 1",
    ),
    (
        "port is at most 65535",
        connector(destination={"smartHost": {"host": "mx.contoso.com", "port": 70000}}),
        "spec.destination.smartHost.port",
        "Invalid value: 70000: should be less than or equal to 65535",
    ),
    (
        "port is an integer",
        connector(destination={"smartHost": {"host": "mx.contoso.com", "port": "25"}}),
        "spec.destination.smartHost.port",
        'Invalid value: "string": must be of type integer',
    ),
    (
        "mx needs a host name, not an IPv4 address",
        connector(destination={"smartHost": {"host": "192.0.2.10", "mx": True}}),
        "spec.destination.smartHost.mx",
        'Invalid value: "object": mx: true resolves the MX records of a host name; an IP address has none',
    ),
    (
        "mx needs a host name, not an IPv6 address",
        connector(destination={"smartHost": {"host": "2001:db8::25", "mx": True}}),
        "spec.destination.smartHost.mx",
        'Invalid value: "object": mx: true resolves the MX records of a host name; an IP address has none',
    ),
    (
        "profileRef needs a name",
        connector(destination={"profileRef": {}}),
        "spec.destination.profileRef.name",
        "Required value",
    ),
    (
        "profileRef name is an object name",
        connector(destination={"profileRef": {"name": "Contoso_Pool"}}),
        "spec.destination.profileRef.name",
        f"Invalid value: \"Contoso_Pool\": should match '{NAME_PATTERN}'",
    ),
    # --- tls -----------------------------------------------------------------------------
    (
        "tls mode is one of the five",
        connector(tls={"mode": "Mandatory"}),
        "spec.tls.mode",
        'Unsupported value: "Mandatory": supported values: "Opportunistic", "SelfSigned", '
        '"TrustedCA", "DomainMatch", "NameMatch"',
    ),
    (
        "NameMatch requires certificateName",
        connector(tls={"mode": "NameMatch"}),
        "spec.tls.certificateName",
        "Required value: certificateName is required when mode is NameMatch",
    ),
    (
        "certificateName is only for NameMatch",
        connector(tls={"mode": "TrustedCA", "certificateName": "mx.contoso.com"}),
        "spec.tls.certificateName",
        'Invalid value: "object": certificateName is only used when mode is NameMatch',
    ),
    (
        "certificateName is a host name or a one-label wildcard",
        connector(tls={"mode": "NameMatch", "certificateName": "*.*.contoso.com"}),
        "spec.tls.certificateName",
        f"Invalid value: \"*.*.contoso.com\": should match '{CERT_NAME_PATTERN}'",
    ),
    (
        "pins are only for SelfSigned",
        connector(tls={"mode": "TrustedCA", "pinnedFingerprints": ["sha256/" + "a" * 64]}),
        "spec.tls.pinnedFingerprints",
        'Invalid value: "object": pinnedFingerprints are only used when mode is SelfSigned',
    ),
    (
        "pins are sha256 in base64 or hex",
        connector(tls={"mode": "SelfSigned", "pinnedFingerprints": ["md5/abcdef"]}),
        "spec.tls.pinnedFingerprints[0]",
        f"Invalid value: \"md5/abcdef\": should match '{PIN_PATTERN}'",
    ),
    (
        "pins are unique",
        connector(tls={"mode": "SelfSigned", "pinnedFingerprints": ["sha256/" + "a" * 64] * 2}),
        "spec.tls.pinnedFingerprints[1]",
        f'Duplicate value: "sha256/{"a" * 64}"',
    ),
    (
        "a CA bundle is only for modes that check the chain",
        connector(tls={"mode": "SelfSigned", "caBundle": {"secretRef": {"name": "ca"}}}),
        "spec.tls.caBundle",
        'Invalid value: "object": caBundle is only used when mode is TrustedCA, DomainMatch or NameMatch',
    ),
    (
        "a CA bundle names its Secret",
        connector(tls={"mode": "TrustedCA", "caBundle": {"secretRef": {"key": "ca.crt"}}}),
        "spec.tls.caBundle.secretRef.name",
        "Required value",
    ),
    (
        "auth names its Secret",
        connector(auth={}),
        "spec.auth.secretRef",
        "Required value",
    ),
    # --- metadata and kind ----------------------------------------------------------------
    (
        "objects have a name",
        {**connector(), "metadata": {"namespace": "mail"}},
        "metadata.name",
        "Required value: name is required",
    ),
    (
        "names are RFC 1123 subdomains",
        {**connector(), "metadata": {"name": "All_Outbound", "namespace": "mail"}},
        "metadata.name",
        'Invalid value: "All_Outbound": a lowercase RFC 1123 subdomain must consist of lower case '
        "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
    ),
    (
        "only served versions exist",
        {**connector(), "apiVersion": "mailflow.dev/v1"},
        "apiVersion",
        'no matches for kind "OutboundConnector" in version "mailflow.dev/v1"; '
        "known: mailflow.dev/v1alpha1/MultiSmtpProfile, mailflow.dev/v1alpha1/OutboundConnector",
    ),
    # --- MultiSmtpProfile ------------------------------------------------------------------
    ("a profile has servers", without("servers")(profile()), "spec.servers", "Required value"),
    (
        "a profile has at least one server",
        profile(servers=[]),
        "spec.servers",
        "Invalid value: 0: should have at least 1 items",
    ),
    (
        "a profile has at most 64 servers",
        profile(servers=[{"host": f"192.0.2.{i}"} for i in range(65)]),
        "spec.servers",
        "Too many: 65: must have at most 64 items",
    ),
    (
        "a server has a host",
        profile(servers=[{"port": 25}]),
        "spec.servers[0].host",
        "Required value",
    ),
    (
        "a server host is a host name or an address",
        profile(servers=[{"host": "smtp_1.contoso.com"}]),
        "spec.servers[0].host",
        f"Invalid value: \"smtp_1.contoso.com\": should match '{PROFILE_HOST_PATTERN}'",
    ),
    (
        "servers are unique by host and port, with the default port filled in",
        profile(servers=[{"host": "192.0.2.1"}, {"host": "192.0.2.1", "port": 25}]),
        "spec.servers[1]",
        'Duplicate value: {"host":"192.0.2.1","port":25}',
    ),
    (
        "a server port is in range",
        profile(servers=[{"host": "192.0.2.1", "port": 65536}]),
        "spec.servers[0].port",
        "Invalid value: 65536: should be less than or equal to 65535",
    ),
    (
        "balancing is RoundRobin or Failover",
        profile(balancing="Random"),
        "spec.balancing",
        'Unsupported value: "Random": supported values: "RoundRobin", "Failover"',
    ),
]


@pytest.mark.parametrize(
    ("body", "path", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_schema_rule_reports_exact_field_and_message(body: Body, path: str, message: str) -> None:
    problems = problems_of(body)
    assert [p for p in problems if p != CEL_SKIPPED] == [(path, message)]
    # Like kube-apiserver: a type error or an unsupported value stops the CEL rules, and
    # the user is told that more may follow.
    blocking = message.startswith("Unsupported value") or "must be of type" in message
    assert (CEL_SKIPPED in problems) == blocking


CEL_SKIPPED = (
    "",
    "some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation",
)


def test_cel_rules_still_run_next_to_ordinary_schema_errors() -> None:
    body = connector(
        destination={
            "smartHost": {"host": "mx.contoso.com", "port": 0},
            "profileRef": {"name": "p"},
        }
    )
    assert [path for path, _ in problems_of(body)] == [
        "spec.destination",
        "spec.destination.smartHost.port",
    ]


def test_minimal_valid_objects_have_no_problems() -> None:
    assert problems_of(connector(), profile()) == []


def test_defaults_are_applied_before_rules() -> None:
    manifests = [
        Manifest("t.yaml", 1, 1, connector(destination={"smartHost": {"host": "mx.contoso.com"}}))
    ]
    result = check_manifests(manifests)
    assert result.problems == []
    assert result.compiled is not None
    (compiled,) = result.compiled.document.connectors
    assert compiled.enabled is True
    assert compiled.tls.mode.value == "Opportunistic"
    assert (compiled.destination.port, compiled.destination.mx) == (25, False)  # type: ignore[union-attr]


def test_every_pattern_in_the_crds_is_also_valid_go_re2_syntax() -> None:
    """The API server compiles patterns with Go's RE2: no lookarounds or backreferences."""
    forbidden = ("(?=", "(?!", "(?<=", "(?<!", "\\1", "(?P<")
    for kind in load_crds().values():
        stack: list[Any] = [kind.schema.raw]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("pattern"), str):
                    assert not any(token in node["pattern"] for token in forbidden), node["pattern"]
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)


def test_every_schema_field_has_a_description() -> None:
    """`kubectl explain` reads these; metadata is described by Kubernetes itself."""
    missing = []
    for kind in load_crds().values():
        stack: list[tuple[str, Any]] = [(kind.kind, kind.schema.raw)]
        while stack:
            path, node = stack.pop()
            for name, child in node.get("properties", {}).items():
                if name == "metadata":
                    continue
                if not child.get("description"):
                    missing.append(f"{path}.{name}")
                stack.append((f"{path}.{name}", child))
            if "items" in node:
                stack.append((f"{path}[]", node["items"]))
    assert missing == []
