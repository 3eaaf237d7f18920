"""DkimKey manifests: the schema (CEL included), the compiler's checks, the document, explain."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dkim_peers import KeyPair, dkim_key_manifest, ed25519_key, rsa_key
from mailflow_compiler.checks import CheckResult, check_manifests
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.errors import RoutingDocumentError
from mailflow_relay.routing.dkim_keys import DEFAULT_SIGNED_HEADERS, DkimAlgorithm
from mailflow_relay.routing.document import RoutingDocument

RSA = rsa_key()
RSA_PKCS1 = rsa_key(pkcs1=True)
ED25519 = ed25519_key()
ROOT = Path(__file__).resolve().parents[2]

CONNECTOR = """apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {name: all, namespace: mail}
spec:
  recipientDomains: ["*"]
  destination: {smartHost: {host: 192.0.2.1}}
---
"""


def check(tmp_path: Path, text: str) -> CheckResult:
    (tmp_path / "m.yaml").write_text(text)
    return check_manifests(load_manifests([str(tmp_path)]))


def lines(result: CheckResult) -> list[str]:
    """Problems without their line and column: these tests are about the messages."""
    return [re.sub(r"^(.+?\.yaml):\d+:\d+: ", r"\1: ", p.format()) for p in result.problems]


def test_a_valid_key_and_its_secret_compile_into_the_document(tmp_path: Path) -> None:
    result = check(tmp_path, dkim_key_manifest("contoso", "Contoso.Test", "s2026", RSA_PKCS1))
    assert lines(result) == [
        f"{tmp_path}/m.yaml: DkimKey/mail/contoso: spec.domain: Invalid value: "
        '"Contoso.Test": must be lower case: "contoso.test"'
    ]
    result = check(tmp_path, dkim_key_manifest("contoso", "contoso.test", "s2026", RSA_PKCS1))
    assert lines(result) == []
    assert result.compiled is not None
    (key,) = result.compiled.document.dkim_keys
    assert (key.ref, key.domain, key.selector, key.algorithm) == (
        "mail/contoso",
        "contoso.test",
        "s2026",
        DkimAlgorithm.RSA_SHA256,
    )
    assert key.fingerprint == RSA_PKCS1.fingerprint
    assert key.private_key.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#1 → PKCS#8
    assert key.signed_headers == DEFAULT_SIGNED_HEADERS  # the CRD's default
    assert key.subdomains is False
    assert key.expire_after is None
    assert "PRIVATE" not in repr(key)


@pytest.mark.parametrize(
    ("pair", "spec", "message"),
    [
        (
            ED25519,
            "  algorithm: RSA-SHA256\n",
            "the private key is an Ed25519 key, not RSA-SHA256",
        ),
        (RSA, "  algorithm: Ed25519-SHA256\n", "the private key is an RSA key, not Ed25519-SHA256"),
        (
            rsa_key(1024),
            "",
            "the RSA key has 1024 bits; at least 2048 are required",
        ),
    ],
)
def test_a_key_of_the_wrong_kind_or_size_is_one_line_naming_the_secret(
    tmp_path: Path, pair: KeyPair, spec: str, message: str
) -> None:
    manifest = dkim_key_manifest("k", "contoso.test", "s1", pair).replace(
        f"  algorithm: {pair.algorithm.value}\n", spec or f"  algorithm: {pair.algorithm.value}\n"
    )
    result = check(tmp_path, manifest)
    assert lines(result) == [
        f"{tmp_path}/m.yaml: DkimKey/mail/k: spec.privateKey.secretRef: Invalid value: key "
        f'"private.key" of Secret "k-key": {message}'
    ]
    assert result.compiled is not None
    assert result.compiled.document.dkim_keys == ()


def test_a_secret_that_is_no_pem_is_reported_without_quoting_it(tmp_path: Path) -> None:
    garbage = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC-not-a-key"
    manifest = dkim_key_manifest("k", "contoso.test", "s1", RSA).replace(
        RSA.pem.splitlines()[1], garbage
    )
    (line,) = lines(check(tmp_path, manifest))
    assert line.endswith(
        'Invalid value: key "private.key" of Secret "k-key": the private key is not an '
        "unencrypted PEM private key (PKCS#8 or PKCS#1)"
    )
    assert "MIIE" not in line


def test_two_enabled_keys_with_one_domain_and_selector_conflict(tmp_path: Path) -> None:
    text = (
        dkim_key_manifest("b-key", "contoso.test", "s1", RSA)
        + dkim_key_manifest("a-key", "contoso.test", "s1", ED25519)
        + dkim_key_manifest(
            "c-key", "contoso.test", "s1", RSA, extra_spec="  enabled: false\n"
        )  # disabled: no conflict
        + dkim_key_manifest("d-key", "contoso.test", "s2", RSA)
    )
    result = check(tmp_path, text)
    assert [p.split(": ", 1)[1] for p in lines(result)] == [
        'DkimKey/mail/b-key: spec.selector: Conflicted: selector "s1" of domain "contoso.test" '
        "is also claimed by DkimKey mail/a-key; mail/a-key is older (or first by name) and signs",
        'DkimKey/mail/a-key: spec.selector: Conflicted: selector "s1" of domain "contoso.test" '
        "is also claimed by DkimKey mail/b-key; this key is older (or first by name) and keeps "
        "signing",
    ]
    assert result.compiled is not None
    assert [k.ref for k in result.compiled.document.dkim_keys] == ["mail/a-key", "mail/d-key"]


def test_a_missing_secret_is_reported_only_when_secrets_are_given(tmp_path: Path) -> None:
    alone = dkim_key_manifest("k", "contoso.test", "s1", RSA, with_secret=False)
    result = check(tmp_path, alone)
    assert lines(result) == []  # no Secret manifests: not checked, and nothing to carry
    assert result.compiled is not None
    assert result.compiled.document.dkim_keys == ()
    other_secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: other, namespace: mail}\n---\n"
    assert lines(check(tmp_path, other_secret + alone)) == [
        f'{tmp_path}/m.yaml: DkimKey/mail/k: spec.privateKey.secretRef.name: Not found: "k-key": '
        'no Secret named "k-key" in namespace "mail"'
    ]
    wrong_key = dkim_key_manifest("k", "contoso.test", "s1", RSA).replace(
        "privateKey: {secretRef: {name: k-key}}",
        "privateKey: {secretRef: {name: k-key, key: tls.key}}",
    )
    assert lines(check(tmp_path, wrong_key)) == [
        f"{tmp_path}/m.yaml: DkimKey/mail/k: spec.privateKey.secretRef.key: Not found: Secret "
        '"k-key" has no key "tls.key"'
    ]


def test_signed_headers_must_include_from_and_never_trace_fields(tmp_path: Path) -> None:
    no_from = dkim_key_manifest(
        "k", "contoso.test", "s1", RSA, extra_spec="  signedHeaders: [Subject, To]\n"
    )
    assert lines(check(tmp_path, no_from)) == [
        f"{tmp_path}/m.yaml: DkimKey/mail/k: spec.signedHeaders: Invalid value: "
        "signedHeaders must include From (RFC 6376 section 5.4)"
    ]
    received = dkim_key_manifest(
        "k", "contoso.test", "s1", RSA, extra_spec="  signedHeaders: [from, Received]\n"
    )
    assert lines(check(tmp_path, received)) == [
        f'{tmp_path}/m.yaml: DkimKey/mail/k: spec.signedHeaders[1]: Invalid value: "Received": '
        "this field changes on the way or must stay hidden and is never signed (RFC 6376 section 5.4)"
    ]


def test_schema_defaults_and_limits(tmp_path: Path) -> None:
    extra = "  expireAfter: 30d\n  subdomains: true\n  canonicalization: simple/relaxed\n"
    result = check(
        tmp_path, dkim_key_manifest("k", "contoso.test", "s1", ED25519, extra_spec=extra)
    )
    assert lines(result) == []
    assert result.compiled is not None
    (key,) = result.compiled.document.dkim_keys
    assert (key.expire_after, key.subdomains, key.canonicalization.value) == (
        30 * 86400,
        True,
        "simple/relaxed",
    )
    bad = dkim_key_manifest(
        "k", "contoso.test", "S_1", RSA, extra_spec="  expireAfter: 2w\n"
    ).replace("algorithm: RSA-SHA256", "algorithm: RSA-SHA1")
    problems = {p.split(": ")[2]: p for p in lines(check(tmp_path, bad))}
    assert sorted(problems) == ["spec.algorithm", "spec.expireAfter", "spec.selector"]
    assert 'Unsupported value: "RSA-SHA1"' in problems["spec.algorithm"]
    assert 'Invalid value: "2w"' in problems["spec.expireAfter"]
    assert 'Invalid value: "S_1"' in problems["spec.selector"]


def test_the_document_carries_keys_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    text = CONNECTOR.replace("  destination", "  dkim: {sign: false}\n  destination")
    text += dkim_key_manifest("k", "contoso.test", "s1", RSA)
    result = check(tmp_path, text)
    assert lines(result) == []
    assert result.compiled is not None
    document = result.compiled.document
    assert document.connectors[0].dkim_sign is False
    again = RoutingDocument.from_json(document.to_json())
    assert again == document
    assert again.checksum == document.checksum
    body = json.loads(document.to_json())
    assert body["connectors"][0]["dkim"] == {"sign": False}
    other = rsa_key()
    body["dkimKeys"][0]["privateKey"] = other.pem
    with pytest.raises(RoutingDocumentError) as refused:
        RoutingDocument.from_dict(body)
    assert str(refused.value) == "dkimKeys[0].fingerprint: does not match the private key"
    body["dkimKeys"][0]["privateKey"] = (
        "-----BEGIN PRIVATE KEY-----\nMIIEnope\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(RoutingDocumentError) as refused:
        RoutingDocument.from_dict(body)
    assert "MIIE" not in str(refused.value)
    assert str(refused.value).startswith("dkimKeys[0].privateKey: DkimKey mail/k: the private key")


def test_a_document_without_dkim_keeps_its_bytes(tmp_path: Path) -> None:
    result = check(tmp_path, CONNECTOR)
    assert result.compiled is not None
    text = result.compiled.document.to_json()
    assert '"dkim' not in text  # neither dkimKeys nor a connector's dkim: same bytes as before


def mailflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "mailflow"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_explain_names_the_keys_that_would_sign_by_fingerprint_only(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        CONNECTOR
        + dkim_key_manifest("rsa", "contoso.test", "s1", RSA, extra_spec="  subdomains: true\n")
        + dkim_key_manifest("ed", "contoso.test", "ed1", ED25519)
    )
    text = mailflow(
        "explain", str(tmp_path), "--from", "bounce@elsewhere.test", "--to", "b@dest.test",
        "--header-from", "news@news.contoso.test",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert text.stdout.split("DKIM", 1)[1].splitlines() == [
        "  (From: news@news.contoso.test)",
        "  signs with",
        f"    - mail/rsa: d=contoso.test (and subdomains) s=s1 RSA-SHA256 {RSA.fingerprint}",
    ]
    as_json = mailflow(
        "explain", str(tmp_path), "--from", "alice@contoso.test", "--to", "b@dest.test",
        "--output", "json",
    )  # fmt: skip
    dkim = json.loads(as_json.stdout)["dkim"]
    assert dkim["outcome"] == "signed"
    assert [(k["selector"], k["fingerprint"]) for k in dkim["keys"]] == [
        ("ed1", ED25519.fingerprint),
        ("s1", RSA.fingerprint),
    ]
    for pair in (RSA, ED25519):
        assert pair.pem_body[:40] not in as_json.stdout + text.stdout


def test_validate_reports_key_problems_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        dkim_key_manifest("small", "contoso.test", "s1", rsa_key(1024))
        + dkim_key_manifest("dup", "contoso.test", "s1", RSA)
    )
    result = mailflow("validate", str(tmp_path))
    assert result.returncode == 1
    assert [line.split(": ", 2)[1] for line in result.stdout.splitlines()] == [
        "DkimKey/mail/small",  # spec.privateKey.secretRef: too small
        "DkimKey/mail/small",  # spec.selector: conflicts with dup
        "DkimKey/mail/dup",  # spec.selector: conflicts with small
    ]
    assert "1024 bits" in result.stdout
