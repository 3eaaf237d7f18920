"""DKIM through the relay as users run it, judged by an independent verifier against real DNS.

`mailflow relay --manifests` (its own process) signs; Postfix's smtp-sink receives; Perl's
Mail::DKIM verifies, looking every public key up in NSD on a loopback port. Nothing here
shares code with the signer but the manifests and the key files.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dkim_peers import (
    KeyPair,
    Verdict,
    dkim_key_manifest,
    ed25519_key,
    rsa_key,
    verify,
    verify_with_mailauth,
)
from peers import DnsServer, SinkMessage, SmtpSink, require
from relayproc import RelayProcess, connector

pytestmark = pytest.mark.slow

RSA = rsa_key()
RSA_NEXT = rsa_key(3072, pkcs1=True)  # the rotation's new key, given as PKCS#1 PEM
ED25519 = ed25519_key()
OTHER = rsa_key()  # published for no DkimKey: a signature with it must not verify


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    require("nsd")
    zones = {
        "contoso.test": [
            RSA.txt_record("s2026"),
            RSA_NEXT.txt_record("s2027"),
            ED25519.txt_record("ed2026"),
            "mx A 127.0.0.1",
        ],
        "fabrikam.test": [OTHER.txt_record("s1")],
    }
    with DnsServer(zones) as server:
        yield server


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    require("smtp-sink")
    with SmtpSink() as running:
        yield running


def message(sender: str = "Alice <alice@contoso.test>", body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@dest.test\r\nSubject: signed?\r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m1@contoso.test>\r\n\r\n{body}"
    ).encode()


def relay_through(
    tmp_path: Path,
    sink: SmtpSink,
    keys: str,
    messages: Sequence[bytes],
    *,
    connector_spec: str = "",
) -> tuple[list[SinkMessage], str]:
    manifests = connector("all", '["*"]', sink.port).replace(
        "  tls: {mode: Opportunistic}\n", f"  tls: {{mode: Opportunistic}}\n{connector_spec}"
    )
    with RelayProcess(
        tmp_path, manifests + keys, "--accept-from", "127.0.0.1/32", "--log-format", "text"
    ) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
            for raw in messages:
                assert client.sendmail("bounce@contoso.test", ["bob@dest.test"], raw) == {}
        received = sink.wait_for(len(messages), timeout=60)
        relay.stop()
        return received, relay.output()


def crlf(received: SinkMessage) -> bytes:
    return received.data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def by_selector(verdicts: Sequence[Verdict]) -> dict[str, str]:
    return {v.selector: v.result for v in verdicts}


def test_rsa_signature_verifies_with_mail_dkim_against_the_test_dns(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest("contoso-s2026", "contoso.test", "s2026", RSA)
    (received,), log = relay_through(tmp_path, sink, keys, [message()])
    signed = crlf(received)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    # Signed after the relay's own Received: was added: the signature is above it, and
    # Received is not in h= (trace fields are not signed, RFC 6376 §5.4).
    assert b"\r\nReceived: from client.test" in signed
    header = signed.split(b"\r\n\r\n", 1)[0].decode()
    h_tag = re.search(r"h=([^;]+);", header.replace("\r\n", ""))
    assert h_tag is not None
    signed_fields = [f.strip() for f in h_tag.group(1).split(":")]
    assert signed_fields.count("from") == 2, "From is over-signed"
    assert "received" not in signed_fields
    assert [v.summary for v in verify(signed, dns, tmp_path)] == [
        ("contoso.test", "s2026", "rsa-sha256", "pass")
    ]
    assert "DKIM signed d=contoso.test s=s2026 a=rsa-sha256 key=sha256/" in log


def test_expire_after_puts_an_x_tag_under_the_signature(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest(
        "contoso-s2026", "contoso.test", "s2026", RSA, extra_spec="  expireAfter: 2d\n"
    )
    (received,), _ = relay_through(tmp_path, sink, keys, [message()])
    signed = crlf(received)
    header = signed.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n", "")
    tags = dict(re.findall(r"\b([a-z]+)=([0-9]+);", header))
    assert int(tags["x"]) - int(tags["t"]) == 2 * 86400
    assert by_selector(verify(signed, dns, tmp_path)) == {"s2026": "pass"}
    # x= is signed: moving the expiry breaks the signature.
    later = signed.replace(f"x={tags['x']}".encode(), f"x={int(tags['x']) + 1}".encode())
    assert by_selector(verify(later, dns, tmp_path)) == {"s2026": "fail"}


def test_tampered_body_or_headers_fail_verification(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest("contoso-s2026", "contoso.test", "s2026", RSA)
    (received,), _ = relay_through(tmp_path, sink, keys, [message()])
    signed = crlf(received)
    assert by_selector(verify(signed, dns, tmp_path)) == {"s2026": "pass"}
    tampered = {
        "body": signed.replace(b"Hello.", b"Hello!"),
        "subject": signed.replace(b"Subject: signed?", b"Subject: signed!"),
        "from": signed.replace(b"From: Alice <alice@", b"From: Mallory <alice@"),
        "added From": signed.replace(b"\r\n\r\n", b"\r\nFrom: mallory@contoso.test\r\n\r\n", 1),
    }
    for what, text in tampered.items():
        assert text != signed, what
        (verdict,) = verify(text, dns, tmp_path)
        assert verdict.result == "fail", (what, verdict)


def test_rsa_and_ed25519_and_two_selectors_sign_side_by_side(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = (
        dkim_key_manifest("contoso-s2026", "contoso.test", "s2026", RSA)
        + dkim_key_manifest("contoso-s2027", "contoso.test", "s2027", RSA_NEXT)
        + dkim_key_manifest("contoso-ed2026", "contoso.test", "ed2026", ED25519)
    )
    (received,), log = relay_through(tmp_path, sink, keys, [message()])
    verdicts = {v.selector: v for v in verify(crlf(received), dns, tmp_path)}
    assert set(verdicts) == {"s2026", "s2027", "ed2026"}
    assert verdicts["s2026"].result == "pass"
    assert verdicts["s2027"].result == "pass"
    # Debian 12's Mail::DKIM knows no Ed25519: it sees the signature and says so...
    assert verdicts["ed2026"].algorithm == "ed25519-sha256"
    assert verdicts["ed2026"].result == "invalid"
    assert "unsupported" in verdicts["ed2026"].detail
    # ...so mailauth, a third implementation, judges all three through the same DNS.
    assert sorted(v.summary for v in verify_with_mailauth(crlf(received), dns)) == [
        ("contoso.test", "ed2026", "ed25519-sha256", "pass"),
        ("contoso.test", "s2026", "rsa-sha256", "pass"),
        ("contoso.test", "s2027", "rsa-sha256", "pass"),
    ]
    assert log.count("DKIM signed d=contoso.test") == 3


def test_tampered_ed25519_signature_fails_with_mailauth(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest("contoso-ed2026", "contoso.test", "ed2026", ED25519)
    (received,), _ = relay_through(tmp_path, sink, keys, [message()])
    signed = crlf(received)
    assert [v.summary for v in verify_with_mailauth(signed, dns)] == [
        ("contoso.test", "ed2026", "ed25519-sha256", "pass")
    ]
    # mailauth reports a body hash mismatch as "neutral" (RFC 6376 §6.1.3 leaves the result
    # name to the verifier) and a bad header signature as "fail": neither passes.
    (body,) = verify_with_mailauth(signed.replace(b"Hello.", b"Hello!"), dns)
    assert (body.result, body.detail) == ("neutral", "body hash did not verify")
    (header,) = verify_with_mailauth(signed.replace(b"Subject: signed?", b"Subject: signed!"), dns)
    assert header.result == "fail", header


def test_rotation_the_disabled_old_selector_stops_signing(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest(
        "contoso-s2026", "contoso.test", "s2026", RSA, extra_spec="  enabled: false\n"
    ) + dkim_key_manifest("contoso-s2027", "contoso.test", "s2027", RSA_NEXT)
    (received,), _ = relay_through(tmp_path, sink, keys, [message()])
    assert by_selector(verify(crlf(received), dns, tmp_path)) == {"s2027": "pass"}


def test_a_key_signs_subdomains_only_when_it_allows_them(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest(
        "contoso-s2026", "contoso.test", "s2026", RSA, extra_spec="  subdomains: true\n"
    ) + dkim_key_manifest("contoso-s2027", "contoso.test", "s2027", RSA_NEXT)
    news, other = message("news@news.contoso.test"), message("eve@contoso.test.evil.test")
    first, second = relay_through(tmp_path, sink, keys, [news, other])[0]
    results = {m.data.count(b"DKIM-Signature"): m for m in (first, second)}
    assert set(results) == {0, 1}
    assert [v.summary for v in verify(crlf(results[1]), dns, tmp_path)] == [
        ("contoso.test", "s2026", "rsa-sha256", "pass")
    ]
    assert b"eve@contoso.test.evil.test" in results[0].data


def test_connector_opt_out_and_messages_without_one_from_stay_unsigned(
    tmp_path: Path, sink: SmtpSink
) -> None:
    keys = dkim_key_manifest("contoso-s2026", "contoso.test", "s2026", RSA)
    received, log = relay_through(
        tmp_path, sink, keys, [message()], connector_spec="  dkim: {sign: false}\n"
    )
    assert b"DKIM-Signature" not in received[0].data
    assert "DKIM skipped_opt_out d=contoso.test s=s2026" in log


def test_no_from_or_two_from_headers_pass_unsigned_with_a_log_line(
    tmp_path: Path, sink: SmtpSink
) -> None:
    keys = dkim_key_manifest("contoso-s2026", "contoso.test", "s2026", RSA)
    no_from = b"To: bob@dest.test\r\nSubject: none\r\n\r\nx\r\n"
    two_from = b"From: a@contoso.test\r\nFrom: b@contoso.test\r\nSubject: two\r\n\r\nx\r\n"
    received, log = relay_through(tmp_path, sink, keys, [no_from, two_from])
    assert all(b"DKIM-Signature" not in m.data for m in received)
    assert "DKIM skipped_no_from: unsigned: no From: header" in log
    assert "DKIM skipped_no_from: unsigned: 2 From: headers" in log


def test_the_private_key_never_appears_in_a_log_line(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest("contoso-s2026", "contoso.test", "s2026", RSA) + dkim_key_manifest(
        "contoso-ed2026", "contoso.test", "ed2026", ED25519
    )
    (received,), log = relay_through(tmp_path, sink, keys, [message()])
    assert by_selector(verify(crlf(received), dns, tmp_path))["s2026"] == "pass"
    assert "DKIM signed" in log
    for key in (RSA, ED25519):
        assert key.fingerprint in log  # named by the public fingerprint...
        body = key.pem_body
        for i in range(0, len(body) - 32, 16):  # ...and no 32 characters of the private key
            assert body[i : i + 32] not in log


@pytest.mark.slow
def test_a_25_mib_message_is_signed_and_verifies(
    tmp_path: Path, sink: SmtpSink, dns: DnsServer
) -> None:
    keys = dkim_key_manifest("contoso-s2026", "contoso.test", "s2026", RSA)
    line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789\r\n"
    body = line * (25 * 1024 * 1024 // len(line) + 1)
    big = message(body=body)
    assert len(big) > 25 * 1024 * 1024
    manifests_extra = ("--max-message-size", str(40 * 1024 * 1024))
    manifests = connector("all", '["*"]', sink.port) + keys
    with RelayProcess(
        tmp_path, manifests, "--accept-from", "127.0.0.1/32", *manifests_extra
    ) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=120) as client:
            assert client.sendmail("bounce@contoso.test", ["bob@dest.test"], big) == {}
        (received,) = sink.wait_for(1, timeout=180)
    signed = crlf(received)
    assert len(signed) > 25 * 1024 * 1024
    assert by_selector(verify(signed, dns, tmp_path)) == {"s2026": "pass"}
    assert by_selector(verify(signed[:-10] + b"tampered\r\n", dns, tmp_path)) == {"s2026": "fail"}


__all__ = ["KeyPair"]
