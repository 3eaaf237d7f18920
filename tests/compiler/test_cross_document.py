"""What the schema cannot see: references, conflicts, normalised duplicates, YAML itself."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, cast

import pytest

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.compiler import compile_routing
from mailflow_compiler.manifests import RawConnector, load_manifests
from mailflow_relay.routing.document import (
    DaneMode,
    MtaStsMode,
    ObjectRef,
    ProfilePool,
    RoutingDocument,
)

TRUSTED = "  tls: {mode: TrustedCA}"
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
        f"{tmp_path}/m.yaml:7:30: OutboundConnector/mail/a: spec.destination.profileRef.name: "
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
        f"{tmp_path}/m.yaml:6:22: OutboundConnector/mail/zeta: spec.recipientDomains[0]: "
        'Conflicted: "contoso.com" for every sender is also claimed by OutboundConnector mail/alpha; '
        "mail/alpha comes first by name and routes it",
        f"{tmp_path}/m.yaml:13:22: OutboundConnector/mail/alpha: spec.recipientDomains[0]: "
        'Conflicted: "contoso.com" for every sender is also claimed by OutboundConnector mail/zeta; '
        "this connector comes first by name and keeps routing it",
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
    # Creation times decided, so "older" is true here (and only here).
    assert any("mail/zeta is older and routes it" in p.message for p in result.problems), (
        result.problems
    )


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
        f"{tmp_path}/m.yaml:6:40: OutboundConnector/mail/a: spec.recipientDomains[1]: "
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
        f"{tmp_path}/m.yaml:7:29: OutboundConnector/mail/a: spec.destination.smartHost.host: "
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
        + oc("a", spec=f"  auth: {{secretRef: {{name: creds}}}}\n{TRUSTED}")
        + oc(
            "b",
            recipients='["b.example"]',
            spec=f"  auth: {{secretRef: {{name: nothere}}}}\n{TRUSTED}",
        )
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
    assert run(tmp_path, oc("a", spec=f"  auth: {{secretRef: {{name: creds}}}}\n{TRUSTED}")) == []


def test_auth_with_an_unverified_tls_mode_is_refused_even_without_the_crd_rule() -> None:
    # What the operator compiles for an object stored before the CEL rule existed (Helm
    # never upgrades CRDs): the compiler refuses it too, and its mail waits rather than
    # leaving without the login or with it over a session that proves nothing.
    body: dict[str, Any] = {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": "legacy", "namespace": "mail"},
        "spec": {
            "recipientDomains": ["*"],
            "destination": {"smartHost": {"host": "smtp.contoso.com"}},
            "tls": {"mode": "SelfSigned"},
            "auth": {"secretRef": {"name": "creds"}},
        },
    }
    secrets = {ObjectRef("mail", "creds"): {"username": "relay", "password": "s3cret"}}
    compiled = compile_routing([cast(RawConnector, body)], [], secrets)
    (finding,) = compiled.findings
    assert (finding.path, finding.condition, finding.reason) == (
        "spec.auth",
        "Accepted",
        "InvalidValue",
    )
    assert finding.message.startswith("Invalid value: SelfSigned: auth sends credentials only")
    (connector,) = compiled.document.connectors
    assert connector.auth is None
    assert connector.unresolved
    assert "verified TLS" in connector.unresolved[0]


def test_a_secret_with_data_that_is_not_base64_is_reported(tmp_path: Path) -> None:
    text = (
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: mail}\ndata: {key: '%%%'}\n"
    )
    assert run(tmp_path, text) == [
        f"{tmp_path}/m.yaml:4:8: Secret/mail/s: data.key: Invalid value: not base64-encoded UTF-8 text"
    ]


def test_the_same_object_twice_is_reported_with_both_places(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(oc("a"))
    (tmp_path / "b.yaml").write_text(oc("a"))
    problems = [p.format() for p in check_manifests(load_manifests([str(tmp_path)])).problems]
    assert problems == [
        f"{tmp_path}/b.yaml:4:12: OutboundConnector/mail/a: metadata.name: Duplicate value: "
        f"OutboundConnector mail/a is also defined at {tmp_path}/a.yaml:2:1"
    ]


def test_a_missing_namespace_means_the_default_namespace(tmp_path: Path) -> None:
    text = "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\nmetadata: {name: a}\nspec: {recipientDomains: [UPPER.example]}\n"
    (tmp_path / "m.yaml").write_text(text)
    (problem,) = check_manifests(load_manifests([str(tmp_path)]), default_namespace="ops").problems
    assert problem.format().startswith(
        f"{tmp_path}/m.yaml:4:27: OutboundConnector/ops/a: spec.recipientDomains[0]:"
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
        == f"{tmp_path}/bad.yaml:12:2: YAML: expected <block end>, but found '<block mapping start>'"
    )
    assert problems[1].startswith(
        f"{tmp_path}/good.yaml:6:22: OutboundConnector/mail/b: spec.recipientDomains[0]: Invalid value"
    )
    assert len(problems) == 2


def test_a_key_written_twice_is_a_problem(tmp_path: Path) -> None:
    text = "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\nmetadata: {name: a}\nspec:\n  recipientDomains: [a.example]\n  recipientDomains: [b.example]\n"
    assert run(tmp_path, text) == [
        f"{tmp_path}/m.yaml:6:3: YAML: duplicate key 'recipientDomains' (first at line 5)"
    ]


def test_unknown_kinds_are_skipped_with_a_note(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
    )
    result = check_manifests(load_manifests([str(tmp_path)]))
    assert result.problems == []
    assert result.notes == [f"{tmp_path}/m.yaml:1:1: skipped apps/v1/Deployment web"]


def test_a_document_that_is_not_a_mapping_is_a_problem(tmp_path: Path) -> None:
    assert run(tmp_path, "- just\n- a list\n") == [
        f"{tmp_path}/m.yaml:1:1: expected a Kubernetes object (a mapping), got list"
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
    assert [(p.name, p.line, p.column) for p in result.problems] == [("b", 5, 113)]


def test_a_problem_points_at_the_line_and_column_of_its_field(tmp_path: Path) -> None:
    text = """# the compliance connector, with a typo
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {name: all-via-compliance, namespace: mail}
spec:
  recipientDomains: ["*"]
  destination:
    smartHost:
      host: compliance.contoso.com
      port: 0
  tls:
    mode: NameMatch
    certificatename: "*.contoso.com"
"""
    (tmp_path / "m.yaml").write_text(text)
    result = check_manifests(load_manifests([str(tmp_path)]))
    # One mistake, one line: no "certificateName: Required value" after the typo.
    assert [(p.path, p.line, p.column) for p in result.problems] == [
        ("spec.destination.smartHost.port", 10, 7),
        ("spec.tls.certificatename", 13, 5),
    ]
    assert result.problems[1].format() == (
        f"{tmp_path}/m.yaml:13:5: OutboundConnector/mail/all-via-compliance: "
        'spec.tls.certificatename: Unknown field: did you mean "certificateName"?'
    )
    # A field that is missing is reported where its object is written.
    (tmp_path / "m.yaml").write_text(text.replace('    certificatename: "*.contoso.com"\n', ""))
    problems = check_manifests(load_manifests([str(tmp_path)])).problems
    assert [(p.path, p.line, p.column) for p in problems if "tls" in p.path] == [
        ("spec.tls.certificateName", 11, 3)
    ]


@pytest.mark.parametrize("name", ["a.YML", "b.Yaml", "c.yml", "d.JSON"])
def test_folder_scans_take_yaml_suffixes_in_any_case(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text(oc("a").removeprefix("---"))
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert check_manifests(load_manifests([str(tmp_path)])).checked == 1


def test_a_mailflow_kind_under_another_api_version_is_a_problem_not_a_note(tmp_path: Path) -> None:
    # Skipped, the connector would route nothing, and its mail would go elsewhere.
    text = oc("a").replace("mailflow.dev/v1alpha1", "mailflow.io/v1alpha1")
    assert run(tmp_path, text) == [
        f"{tmp_path}/m.yaml:2:1: OutboundConnector/mail/a: apiVersion: Invalid value: "
        '"mailflow.io/v1alpha1": OutboundConnector is served as mailflow.dev/v1alpha1; did you '
        "mean apiVersion: mailflow.dev/v1alpha1?"
    ]


def test_a_mistyped_mailflow_kind_is_offered_its_spelling(tmp_path: Path) -> None:
    text = oc("a").replace("kind: OutboundConnector", "kind: outboundconnector")
    (problem,) = run(tmp_path, text)
    assert 'kind: no matches for kind "outboundconnector" in version "mailflow.dev/v1alpha1": ' in (
        problem
    )
    assert "did you mean kind: OutboundConnector?" in problem


CRDS = Path(__file__).parents[2] / "crds"


def test_a_mailflow_crd_given_as_input_is_used_instead_of_the_built_in_one(tmp_path: Path) -> None:
    # The CRD a cluster runs may be older than this checkout (Helm never upgrades CRDs):
    # given on the command line, it is the one the objects are checked against.
    crd = (CRDS / "outboundconnectors.mailflow.dev.yaml").read_text()
    stricter = crd.replace("maxLength: 1024", "maxLength: 10", 1)
    assert stricter != crd
    (tmp_path / "crd.yaml").write_text(stricter)
    (tmp_path / "m.yaml").write_text(oc("a", spec='  description: "longer than ten"'))
    result = check_manifests(load_manifests([str(tmp_path)]))
    assert [(p.path, p.message) for p in result.problems] == [
        ("spec.description", "Too long: may not be more than 10 bytes")
    ]
    assert result.notes == [
        f"{tmp_path}/crd.yaml:4:1: checking mailflow.dev/v1alpha1 OutboundConnector against this "
        "CRD (given on the command line) instead of the built-in one"
    ]
    # Without it, the built-in CRD says nothing about that description.
    alone = check_manifests(load_manifests([str(tmp_path / "m.yaml")]))
    assert alone.problems == []


def test_two_different_crds_for_one_kind_are_a_problem_and_two_copies_are_not(
    tmp_path: Path,
) -> None:
    crd = (CRDS / "outboundconnectors.mailflow.dev.yaml").read_text()
    (tmp_path / "a.yaml").write_text(crd)
    (tmp_path / "b.yaml").write_text(crd)
    (tmp_path / "m.yaml").write_text(oc("a"))
    assert check_manifests(load_manifests([str(tmp_path)])).problems == []
    (tmp_path / "b.yaml").write_text(crd.replace("maxLength: 1024", "maxLength: 10", 1))
    (problem,) = check_manifests(load_manifests([str(tmp_path)])).problems
    assert (problem.file, problem.path) == (f"{tmp_path}/b.yaml", "spec.names.kind")
    assert problem.message == (
        "Duplicate value: mailflow.dev/v1alpha1 OutboundConnector is also defined at "
        f"{tmp_path}/a.yaml:4:1; give one CRD per kind"
    )


def test_a_mailflow_crd_that_cannot_be_used_is_a_problem(tmp_path: Path) -> None:
    crd = (CRDS / "outboundconnectors.mailflow.dev.yaml").read_text()
    (tmp_path / "crd.yaml").write_text(crd.replace("maxLength: 1024", "maxProperties: 3", 1))
    (problem,) = run(tmp_path, oc("a"), name="m.yaml")
    assert problem.startswith(f"{tmp_path}/crd.yaml:")
    assert (
        "CustomResourceDefinition/outboundconnectors.mailflow.dev: spec: cannot use this CRD: "
        in (problem)
    )
    assert "unsupported schema keywords ['maxProperties']" in problem


def test_a_crd_of_another_api_group_is_skipped_with_a_note(tmp_path: Path) -> None:
    other = """apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec: {group: example.com}
"""
    (tmp_path / "crd.yaml").write_text(other)
    result = check_manifests(load_manifests([str(tmp_path)]))
    assert result.problems == []
    assert result.notes == [
        f"{tmp_path}/crd.yaml:1:1: skipped CustomResourceDefinition widgets.example.com: not of "
        "the mailflow.dev API group"
    ]


def test_the_examples_ca_bundle_is_a_real_certificate() -> None:
    assert "BEGIN CERTIFICATE" in CA_PEM


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ({}, DaneMode.NONE),
        ({"dane": "Opportunistic"}, DaneMode.OPPORTUNISTIC),
        ({"dane": "Mandatory"}, DaneMode.MANDATORY),
    ],
)
def test_tls_dane_reaches_the_routing_document(written: dict[str, str], expected: DaneMode) -> None:
    body: dict[str, Any] = {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": "mx", "namespace": "mail"},
        "spec": {"recipientDomains": ["*"], "tls": {"mode": "Opportunistic", **written}},
    }
    compiled = compile_routing([cast(RawConnector, body)], [], {})
    (connector,) = compiled.document.connectors
    assert connector.tls.dane is expected
    again = RoutingDocument.from_json(compiled.document.to_json())
    assert again.connectors[0].tls.dane is expected
    assert ('"dane"' in compiled.document.to_json()) is (expected is not DaneMode.NONE)


def test_tls_mta_sts_reaches_the_routing_document() -> None:
    body: dict[str, Any] = {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": "mx", "namespace": "mail"},
        "spec": {
            "recipientDomains": ["*"],
            "tls": {"mode": "Opportunistic", "mtaSts": "Opportunistic"},
        },
    }
    compiled = compile_routing([cast(RawConnector, body)], [], {})
    again = RoutingDocument.from_json(compiled.document.to_json())
    assert again.connectors[0].tls.mta_sts is MtaStsMode.OPPORTUNISTIC
