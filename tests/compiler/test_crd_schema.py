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


CREDS = {"secretRef": {"name": "relay-creds"}}
AUTH_MESSAGE = (
    "Invalid value: auth sends credentials only over a verified TLS session: set "
    "tls.mode to TrustedCA, DomainMatch or NameMatch, or SelfSigned with pinnedFingerprints"
)


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
        'Invalid value: "Contoso.com": must be lower case: "contoso.com"',
    ),
    (
        "a wildcard is only the leftmost label",
        connector(recipientDomains=["mail.*.contoso.com"]),
        "spec.recipientDomains[0]",
        'Invalid value: "mail.*.contoso.com": a wildcard may only be the first label, as in "*.contoso.com"',
    ),
    (
        "a wildcard is a whole label",
        connector(recipientDomains=["*contoso.com"]),
        "spec.recipientDomains[0]",
        'Invalid value: "*contoso.com": a wildcard may only be the first label, as in "*.contoso.com"',
    ),
    (
        "a label does not start with a hyphen",
        connector(recipientDomains=["-contoso.com"]),
        "spec.recipientDomains[0]",
        'Invalid value: "-contoso.com": a label (the part between dots) may not start or end with "-"',
    ),
    (
        "recipient domains are at most 253 characters",
        connector(recipientDomains=[".".join(["a" * 60] * 5)]),
        "spec.recipientDomains[0]",
        "Too long: may not be more than 253 bytes",
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
        "Invalid value: '*' and '*.*' both mean every domain; list only one of them",
    ),
    (
        "sender domains are not catch-alls",
        connector(senderDomains=["*"]),
        "spec.senderDomains[0]",
        'Invalid value: "*": leave senderDomains out (or empty) for mail from the whole organisation',
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
        "Too long: may not be more than 1024 bytes",
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
        'Unknown field: did you mean "recipientDomains"?',
    ),
    # --- destination ---------------------------------------------------------------------
    (
        "smartHost and profileRef exclude each other",
        connector(
            destination={"smartHost": {"host": "mx.contoso.com"}, "profileRef": {"name": "p"}}
        ),
        "spec.destination",
        "Invalid value: set at most one of smartHost and profileRef; "
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
        'Invalid value: "mail server.contoso.com": must not contain spaces',
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
        "Invalid value: mx: true resolves the MX records of a host name; an IP address has none",
    ),
    (
        "mx needs a host name, not an IPv6 address",
        connector(destination={"smartHost": {"host": "2001:db8::25", "mx": True}}),
        "spec.destination.smartHost.mx",
        "Invalid value: mx: true resolves the MX records of a host name; an IP address has none",
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
        'Invalid value: "Contoso_Pool": may contain only lower-case letters, digits, "-" and "." (found "C", "P", "_")',
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
        "tls.dane is not for profiles",
        connector(
            destination={"profileRef": {"name": "pool"}},
            tls={"mode": "Opportunistic", "dane": "Mandatory"},
        ),
        "spec.tls.dane",
        "Invalid value: tls.dane applies to the recipient MX and to smart hosts, not to a "
        "profile's servers: remove tls.dane or set it to None",
    ),
    (
        "tls.mtaSts is not for profiles",
        connector(
            destination={"profileRef": {"name": "pool"}},
            tls={"mode": "Opportunistic", "mtaSts": "Opportunistic"},
        ),
        "spec.tls.mtaSts",
        "Invalid value: tls.mtaSts applies to the recipient MX and to smart hosts, not to a "
        "profile's servers: remove tls.mtaSts or set it to None",
    ),
    (
        "tls.mtaSts is Opportunistic or None",
        connector(tls={"mode": "Opportunistic", "mtaSts": "Enforce"}),
        "spec.tls.mtaSts",
        'Unsupported value: "Enforce": supported values: "Opportunistic", "None"',
    ),
    (
        "tls.dane is Opportunistic, Mandatory or None",
        connector(tls={"mode": "Opportunistic", "dane": "Always"}),
        "spec.tls.dane",
        'Unsupported value: "Always": supported values: "Opportunistic", "Mandatory", "None"',
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
        "Invalid value: certificateName is only used when mode is NameMatch",
    ),
    (
        "certificateName is a host name or a one-label wildcard",
        connector(tls={"mode": "NameMatch", "certificateName": "*.*.contoso.com"}),
        "spec.tls.certificateName",
        'Invalid value: "*.*.contoso.com": a wildcard may only be the first label, as in "*.contoso.com"',
    ),
    (
        "pins are only for SelfSigned",
        connector(tls={"mode": "TrustedCA", "pinnedFingerprints": ["sha256/" + "a" * 64]}),
        "spec.tls.pinnedFingerprints",
        "Invalid value: pinnedFingerprints are only used when mode is SelfSigned",
    ),
    (
        "pins are sha256 in base64 or hex",
        connector(tls={"mode": "SelfSigned", "pinnedFingerprints": ["md5/abcdef"]}),
        "spec.tls.pinnedFingerprints[0]",
        'Invalid value: "md5/abcdef": only SHA-256 pins are supported: start with "sha256/"',
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
        "Invalid value: caBundle is only used when mode is TrustedCA, DomainMatch or NameMatch",
    ),
    (
        "a CA bundle names its Secret",
        connector(tls={"mode": "TrustedCA", "caBundle": {"secretRef": {"key": "ca.crt"}}}),
        "spec.tls.caBundle.secretRef.name",
        "Required value",
    ),
    (
        "auth names its Secret",
        connector(auth={}, tls={"mode": "TrustedCA"}),
        "spec.auth.secretRef",
        "Required value",
    ),
    (
        "auth needs a verifying TLS mode: not the default Opportunistic",
        connector(auth=CREDS),
        "spec.auth",
        AUTH_MESSAGE,
    ),
    (
        "auth needs a verifying TLS mode: not Opportunistic",
        connector(auth=CREDS, tls={"mode": "Opportunistic"}),
        "spec.auth",
        AUTH_MESSAGE,
    ),
    (
        "auth needs a verifying TLS mode: not SelfSigned without pins",
        connector(auth=CREDS, tls={"mode": "SelfSigned"}),
        "spec.auth",
        AUTH_MESSAGE,
    ),
    # --- metadata and kind ----------------------------------------------------------------
    (
        "objects have a name",
        {**connector(), "metadata": {"namespace": "mail"}},
        "metadata.name",
        "Required value: name or generateName is required",
    ),
    (
        "names are RFC 1123 subdomains",
        {**connector(), "metadata": {"name": "All_Outbound", "namespace": "mail"}},
        "metadata.name",
        'Invalid value: "All_Outbound": a lowercase RFC 1123 subdomain must consist of lower case '
        "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character "
        "(e.g. 'example.com', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
    ),
    (
        "only served versions exist",
        {**connector(), "apiVersion": "mailflow.dev/v1"},
        "apiVersion",
        'no matches for kind "OutboundConnector" in version "mailflow.dev/v1": did you mean '
        "apiVersion: mailflow.dev/v1alpha1? known: mailflow.dev/v1alpha1/DkimKey, "
        "mailflow.dev/v1alpha1/MultiSmtpProfile, mailflow.dev/v1alpha1/OutboundConnector",
    ),
    # --- words instead of regexes, and near misses -----------------------------------------
    (
        "a field in the wrong case is offered its spelling",
        connector(tls={"mode": "TrustedCA", "certificatename": "mx.contoso.com"}),
        "spec.tls.certificatename",
        'Unknown field: did you mean "certificateName"?',
    ),
    (
        "an unknown field without a near miss lists the fields of its object",
        connector(destination={"smartHost": {"host": "mx.contoso.com", "tls": True}}),
        "spec.destination.smartHost.tls",
        "Unknown field: not declared in the schema (fields here: host, implicitTls, mx, port)",
    ),
    (
        "an enum value in the wrong case is offered its spelling",
        connector(tls={"mode": "namematch", "certificateName": "mx.contoso.com"}),
        "spec.tls.mode",
        'Unsupported value: "namematch": did you mean "NameMatch"? supported values: '
        '"Opportunistic", "SelfSigned", "TrustedCA", "DomainMatch", "NameMatch"',
    ),
    (
        "a port written into the host is sent to port:",
        connector(destination={"smartHost": {"host": "mx.contoso.com:2525"}}),
        "spec.destination.smartHost.host",
        'Invalid value: "mx.contoso.com:2525": put the port in `port:` (2525) and only the host '
        'in `host:` ("mx.contoso.com")',
    ),
    (
        "an address where a domain goes",
        connector(recipientDomains=["bob@Contoso.com"]),
        "spec.recipientDomains[0]",
        'Invalid value: "bob@Contoso.com": a domain, not an address: write "contoso.com"',
    ),
    (
        "a secret key with a slash",
        connector(
            tls={"mode": "TrustedCA", "caBundle": {"secretRef": {"name": "ca", "key": "a/b"}}}
        ),
        "spec.tls.caBundle.secretRef.key",
        'Invalid value: "a/b": a Secret key may contain only letters, digits, "-", "_" and "."',
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
        'Invalid value: "smtp_1.contoso.com": may contain only lower-case letters, digits, "-" and "." (found "_")',
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
    result = check_manifests([Manifest("t.yaml", 1, 1, copy.deepcopy(body))])
    assert [(p.path, p.message) for p in result.problems] == [(path, message)]
    # Like kube-apiserver: a wrong type, an unsupported value, a missing required field, a
    # too long string or list stops the CEL rules, and the user is told that more may follow
    # (only where there are rules: MultiSmtpProfile has none) — once, in the summary.
    blocking = (
        message in ("Required value", "Required value: name or generateName is required")
        or message.startswith(("Unsupported value", "Too long", "Too many"))
        or "must be of type" in message
    )
    has_rules = body.get("kind") == "OutboundConnector"
    assert result.incomplete == (1 if blocking and has_rules else 0)


def test_no_field_a_user_writes_answers_with_a_regex() -> None:
    """Every pattern under ``spec`` has words for a value that breaks it (status is ours)."""
    dumped = []
    for kind in load_crds().values():
        stack: list[tuple[str, Any]] = [("spec", kind.schema.raw["properties"]["spec"])]
        while stack:
            path, node = stack.pop()
            if "pattern" in node:
                for bad in ("Bad Value!", "-x", "a..b"):
                    errors = kind.schema._validate(node, bad, path)
                    dumped += [e for e in errors if "should match" in e.message]
            for name, child in node.get("properties", {}).items():
                stack.append((f"{path}.{name}", child))
            if "items" in node:
                stack.append((f"{path}[0]", node["items"]))
    assert dumped == []


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


@pytest.mark.parametrize(
    "tls",
    [
        {"mode": "TrustedCA"},
        {"mode": "DomainMatch"},
        {"mode": "NameMatch", "certificateName": "smtp.contoso.com"},
        {"mode": "SelfSigned", "pinnedFingerprints": ["sha256/" + "a" * 64]},
    ],
    ids=lambda tls: str(tls["mode"]),
)
def test_auth_is_accepted_with_every_verifying_tls_mode(tls: Body) -> None:
    assert problems_of(connector(auth=CREDS, tls=tls)) == []


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
