"""What the schema cannot see: references, conflicts, normalised duplicates, YAML itself."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.routing.document import ObjectRef, ProfilePool

CA_PEM = (Path(__file__).parents[2] / "examples" / "00-secrets.yaml").read_text()


def run(tmp_path: Path, text: str, name: str = "m.yaml") -> list[str]:
    (tmp_path / name).write_text(text)
    return [p.format() for p in check_manifests(load_manifests([str(tmp_path)])).problems]


CONNECTOR = """
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {{name: {name}, namespace: {ns}{extra_meta}}}
spec:
  recipientDomains: {recipients}
{spec}
"""


def oc(
    name: str,
    recipients: str = '["contoso.com"]',
    spec: str = "",
    ns: str = "mail",
    extra_meta: str = "",
) -> str:
    return "---" + CONNECTOR.format(
        name=name, recipients=recipients, spec=spec, ns=ns, extra_meta=extra_meta
    )


def test_profile_ref_to_a_missing_profile_is_reported_on_the_field(tmp_path: Path) -> None:
    text = oc("a", spec="  destination: {profileRef: {name: pool}}")
    assert run(tmp_path, text) == [
        f"{tmp_path}/m.yaml:1: OutboundConnector/mail/a: spec.destination.profileRef.name: "
        'Not found: "pool": no MultiSmtpProfile named "pool" in namespace "mail"'
    ]


def test_profile_ref_does_not_reach_into_another_namespace(tmp_path: Path) -> None:
    profile = """---
apiVersion: mailflow.dev/v1alpha1
kind: MultiSmtpProfile
metadata: {name: pool, namespace: other}
spec: {servers: [{host: 192.0.2.1}]}
"""
    text = profile + oc("a", spec="  destination: {profileRef: {name: pool}}")
    problems = run(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].endswith(
        'Not found: "pool": no MultiSmtpProfile named "pool" in namespace "mail"'
    )


def test_profile_ref_resolves_to_the_profile_servers(tmp_path: Path) -> None:
    profile = """---
apiVersion: mailflow.dev/v1alpha1
kind: MultiSmtpProfile
metadata: {name: pool, namespace: mail}
spec: {servers: [{host: 192.0.2.1}, {host: mx2.contoso.com, port: 587}], balancing: Failover}
"""
    (tmp_path / "m.yaml").write_text(
        profile + oc("a", spec="  destination: {profileRef: {name: pool}}")
    )
    result = check_manifests(load_manifests([str(tmp_path)]))
    assert result.problems == []
    assert result.compiled is not None
    connector = result.compiled.document.connector(ObjectRef("mail", "a"))
    assert connector is not None
    assert isinstance(connector.destination, ProfilePool)
    assert [str(s) for s in connector.destination.servers] == [
        "192.0.2.1:25",
        "mx2.contoso.com:587",
    ]
    assert connector.destination.balancing.value == "Failover"


def test_two_connectors_with_the_same_pattern_and_scope_conflict_and_both_are_told(
    tmp_path: Path,
) -> None:
    text = oc("zeta") + oc("alpha")
    problems = run(tmp_path, text)
    assert problems == [
        f"{tmp_path}/m.yaml:1: OutboundConnector/mail/zeta: spec.recipientDomains[0]: "
        'Conflicted: "contoso.com" for every sender is also claimed by OutboundConnector mail/alpha; '
        "mail/alpha is older (or first by name) and routes it",
        f"{tmp_path}/m.yaml:2: OutboundConnector/mail/alpha: spec.recipientDomains[0]: "
        'Conflicted: "contoso.com" for every sender is also claimed by OutboundConnector mail/zeta; '
        "this connector is older (or first by name) and keeps routing it",
    ]


def test_the_older_connector_wins_a_conflict_whatever_its_name(tmp_path: Path) -> None:
    text = oc("alpha", extra_meta=", creationTimestamp: '2026-02-01T00:00:00Z'") + oc(
        "zeta", extra_meta=", creationTimestamp: '2026-01-01T00:00:00Z'"
    )
    (tmp_path / "m.yaml").write_text(text)
    result = check_manifests(load_manifests([str(tmp_path)]))
    assert result.compiled is not None
    (conflict,) = result.compiled.document.conflicts
    assert conflict.winner == ObjectRef("mail", "zeta")
    assert conflict.losers == (ObjectRef("mail", "alpha"),)


def test_the_same_domain_as_u_label_and_punycode_conflicts(tmp_path: Path) -> None:
    text = oc("a", recipients='["bücher.example"]') + oc(
        "b", recipients='["xn--bcher-kva.example"]'
    )
    problems = run(tmp_path, text)
    assert len(problems) == 2
    assert all('Conflicted: "xn--bcher-kva.example"' in p for p in problems)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ('["contoso.com"]', '["*.contoso.com"]'),
        ('["*"]', '["contoso.com"]'),
    ],
    ids=["exact-vs-wildcard", "catch-all-vs-exact"],
)
def test_different_patterns_do_not_conflict(tmp_path: Path, first: str, second: str) -> None:
    assert run(tmp_path, oc("a", recipients=first) + oc("b", recipients=second)) == []


def test_different_sender_scopes_do_not_conflict(tmp_path: Path) -> None:
    text = oc("a") + oc("b", spec="  senderDomains: [fabrikam.com]")
    assert run(tmp_path, text) == []


def test_a_disabled_connector_does_not_conflict(tmp_path: Path) -> None:
    text = oc("a") + oc("b", spec="  enabled: false")
    assert run(tmp_path, text) == []


def test_connectors_in_different_namespaces_share_one_fleet_and_conflict(tmp_path: Path) -> None:
    problems = run(tmp_path, oc("a", ns="team1") + oc("a", ns="team2"))
    assert len(problems) == 2


def test_u_label_and_punycode_in_one_list_are_duplicates(tmp_path: Path) -> None:
    problems = run(tmp_path, oc("a", recipients='["bücher.example", "xn--bcher-kva.example"]'))
    assert problems == [
        f"{tmp_path}/m.yaml:1: OutboundConnector/mail/a: spec.recipientDomains[1]: "
        'Duplicate value: "xn--bcher-kva.example" is the same domain pattern as '
        "spec.recipientDomains[0] (xn--bcher-kva.example)"
    ]


def test_a_domain_that_idna_refuses_is_reported(tmp_path: Path) -> None:
    problems = run(tmp_path, oc("a", recipients='["xn--zz.example"]'))
    assert len(problems) == 1
    assert ': spec.recipientDomains[0]: Invalid value: "xn--zz.example": not a valid' in problems[0]


def test_a_numeric_host_that_is_not_an_ipv4_address_is_reported(tmp_path: Path) -> None:
    problems = run(tmp_path, oc("a", spec="  destination: {smartHost: {host: 999.1.1.1}}"))
    assert problems == [
        f"{tmp_path}/m.yaml:1: OutboundConnector/mail/a: spec.destination.smartHost.host: "
        'Invalid value: "999.1.1.1": looks like an IPv4 address but is not a valid one'
    ]


SECRETS = """---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: mail}
stringData: {username: relay}
---
apiVersion: v1
kind: Secret
metadata: {name: notpem, namespace: mail}
data: {ca.crt: %s}
"""


def test_secret_references_are_checked_when_secrets_are_given(tmp_path: Path) -> None:
    secrets = SECRETS % base64.b64encode(b"hello").decode()
    text = (
        secrets
        + oc("a", spec="  auth: {secretRef: {name: creds}}")
        + oc("b", recipients='["b.example"]', spec="  auth: {secretRef: {name: nothere}}")
        + oc(
            "c",
            recipients='["c.example"]',
            spec="  tls: {mode: TrustedCA, caBundle: {secretRef: {name: notpem}}}",
        )
        + oc(
            "d",
            recipients='["d.example"]',
            spec="  tls: {mode: TrustedCA, caBundle: {secretRef: {name: creds, key: ca.pem}}}",
        )
    )
    problems = run(tmp_path, text)
    assert [p.split(": ", 1)[1] for p in problems] == [
        'OutboundConnector/mail/a: spec.auth.secretRef.name: Not found: Secret "creds" has no key "password"',
        'OutboundConnector/mail/b: spec.auth.secretRef.name: Not found: "nothere": no Secret named '
        '"nothere" in namespace "mail"',
        'OutboundConnector/mail/c: spec.tls.caBundle.secretRef.key: Invalid value: key "ca.crt" of '
        'Secret "notpem" holds no PEM CA certificates (Unable to load PEM file. See '
        "https://cryptography.io/en/latest/faq/#why-can-t-i-import-my-pem-file for more details. "
        "MalformedFraming)",
        'OutboundConnector/mail/d: spec.tls.caBundle.secretRef.name: Not found: Secret "creds" has '
        'no key "ca.pem"',
    ]


def test_secret_references_are_not_checked_without_secret_manifests(tmp_path: Path) -> None:
    assert run(tmp_path, oc("a", spec="  auth: {secretRef: {name: creds}}")) == []


def test_a_secret_with_data_that_is_not_base64_is_reported(tmp_path: Path) -> None:
    text = (
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: mail}\ndata: {key: '%%%'}\n"
    )
    assert run(tmp_path, text) == [
        f"{tmp_path}/m.yaml:1: Secret/mail/s: data.key: Invalid value: not base64-encoded UTF-8 text"
    ]


def test_the_same_object_twice_is_reported_with_both_places(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(oc("a"))
    (tmp_path / "b.yaml").write_text(oc("a"))
    problems = [p.format() for p in check_manifests(load_manifests([str(tmp_path)])).problems]
    assert problems == [
        f"{tmp_path}/b.yaml:1: OutboundConnector/mail/a: metadata.name: Duplicate value: "
        f"OutboundConnector mail/a is also defined at {tmp_path}/a.yaml:1"
    ]


def test_a_missing_namespace_means_the_default_namespace(tmp_path: Path) -> None:
    text = "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\nmetadata: {name: a}\nspec: {recipientDomains: [UPPER.example]}\n"
    (tmp_path / "m.yaml").write_text(text)
    (problem,) = check_manifests(load_manifests([str(tmp_path)]), default_namespace="ops").problems
    assert problem.format().startswith(
        f"{tmp_path}/m.yaml:1: OutboundConnector/ops/a: spec.recipientDomains[0]:"
    )


def test_unparsable_yaml_is_a_problem_with_its_line_and_other_files_are_still_checked(
    tmp_path: Path,
) -> None:
    (tmp_path / "bad.yaml").write_text(
        oc("a") + "---\nkind: OutboundConnector\nspec:\n  a: b\n c: d\n"
    )
    (tmp_path / "good.yaml").write_text(oc("b", recipients='["Upper.example"]'))
    problems = run(tmp_path, "", name="empty.yaml")
    assert (
        problems[0]
        == f"{tmp_path}/bad.yaml:2: -: -: line 12, column 2: YAML: expected <block end>, but found '<block mapping start>'"
    )
    assert problems[1].startswith(
        f"{tmp_path}/good.yaml:1: OutboundConnector/mail/b: spec.recipientDomains[0]: Invalid value"
    )
    assert len(problems) == 2


def test_a_key_written_twice_is_a_problem(tmp_path: Path) -> None:
    text = "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\nmetadata: {name: a}\nspec:\n  recipientDomains: [a.example]\n  recipientDomains: [b.example]\n"
    assert run(tmp_path, text) == [
        f"{tmp_path}/m.yaml:1: -: -: line 6, column 3: YAML: duplicate key 'recipientDomains' (first at line 5)"
    ]


def test_unknown_kinds_are_skipped_with_a_note(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
    )
    result = check_manifests(load_manifests([str(tmp_path)]))
    assert result.problems == []
    assert result.notes == [f"{tmp_path}/m.yaml:1: skipped apps/v1/Deployment web"]


def test_a_document_that_is_not_a_mapping_is_a_problem(tmp_path: Path) -> None:
    assert run(tmp_path, "- just\n- a list\n") == [
        f"{tmp_path}/m.yaml:1: -: -: line 1: expected a Kubernetes object (a mapping), got list"
    ]


def test_a_kubernetes_list_is_read_item_by_item(tmp_path: Path) -> None:
    text = """apiVersion: v1
kind: List
items:
  - {apiVersion: mailflow.dev/v1alpha1, kind: OutboundConnector, metadata: {name: a}, spec: {recipientDomains: [x.example]}}
  - {apiVersion: mailflow.dev/v1alpha1, kind: OutboundConnector, metadata: {name: b}, spec: {recipientDomains: [X]}}
"""
    (tmp_path / "m.yaml").write_text(text)
    result = check_manifests(load_manifests([str(tmp_path)]))
    assert result.checked == 2
    assert [p.name for p in result.problems] == ["b"]


def test_the_examples_ca_bundle_is_a_real_certificate() -> None:
    assert "BEGIN CERTIFICATE" in CA_PEM
