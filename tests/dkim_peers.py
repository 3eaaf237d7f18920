"""DKIM test peers: keys made here, their DNS records for NSD, and an independent verifier.

The verifier is Perl's Mail::DKIM (Debian's libmail-dkim-perl), a second implementation
that shares nothing with dkimpy. A small Perl script points its resolver (Net::DNS) at the
test NSD on its loopback port, so every public key is looked up in real DNS.
Mail::DKIM 1.20230212 (Debian 12) verifies rsa-sha256 only: it reports an Ed25519
signature as ``invalid`` with "unsupported" in its detail, which the tests say outright.
Ed25519 signatures are verified by mailauth (Node.js, from npm; tests/verifiers), a third
implementation, through the same NSD.
"""

from __future__ import annotations

import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailflow_relay.routing.dkim_keys import (
    DkimAlgorithm,
    dns_txt_strings,
    load_private_key,
)
from peers import DnsServer, missing, require

VERIFY_SCRIPT = textwrap.dedent(
    r"""
    use strict;
    use warnings;
    use Mail::DKIM::Verifier;
    use Mail::DKIM::DNS;
    use Net::DNS::Resolver;
    my ($server, $port) = @ARGV;
    my $resolver = Net::DNS::Resolver->new(
        nameservers => [$server], port => $port, recurse => 0,
        udp_timeout => 5, tcp_timeout => 5, retry => 2,
    );
    Mail::DKIM::DNS::resolver($resolver);
    my $dkim = Mail::DKIM::Verifier->new();
    binmode STDIN;
    while (my $line = <STDIN>) {
        $line =~ s/\r?\n\z/\015\012/;
        $dkim->PRINT($line);
    }
    $dkim->CLOSE;
    foreach my $signature ($dkim->signatures) {
        print join("\t", $signature->domain, $signature->selector, $signature->algorithm,
            $signature->result, $signature->result_detail // ''), "\n";
    }
    """
)


def require_mail_dkim() -> str:
    """perl with Mail::DKIM; skips (fails with CI=true, through `require`) when missing."""
    perl = require("perl")
    probe = subprocess.run(
        [perl, "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver", "-e", "1"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        missing("Mail::DKIM::Verifier", "libmail-dkim-perl")
    return perl


@dataclass(frozen=True)
class Verdict:
    domain: str
    selector: str
    algorithm: str
    result: str
    detail: str

    @property
    def summary(self) -> tuple[str, str, str, str]:
        return (self.domain, self.selector, self.algorithm, self.result)


def verify(message: bytes, dns: DnsServer, folder: Path) -> list[Verdict]:
    """Every DKIM-Signature of ``message`` as Mail::DKIM judges it, keys from ``dns``."""
    perl = require_mail_dkim()
    script = folder / "verify-dkim.pl"
    script.write_text(VERIFY_SCRIPT)
    result = subprocess.run(
        [perl, str(script), dns.address, str(dns.port)],
        input=message,
        capture_output=True,
        timeout=60,
        check=True,
    )
    verdicts = []
    for line in result.stdout.decode().splitlines():
        domain, selector, algorithm, outcome, detail = [*line.split("\t"), ""][:5]
        verdicts.append(Verdict(domain, selector, algorithm, outcome, detail))
    return verdicts


VERIFIERS = Path(__file__).resolve().parent / "verifiers"


def verify_with_mailauth(message: bytes, dns: DnsServer) -> list[Verdict]:
    """Every DKIM-Signature as mailauth (Node.js; verifies Ed25519 too) judges it, keys from ``dns``.

    ``scripts/install-test-verifiers.sh`` (``make venv``) installs it into tests/verifiers.
    """
    node = require("node")
    if not (VERIFIERS / "node_modules" / "mailauth").is_dir():
        missing("mailauth (tests/verifiers)", "npm: bash scripts/install-test-verifiers.sh")
    result = subprocess.run(
        [node, str(VERIFIERS / "verify-dkim.mjs"), dns.address, str(dns.port)],
        input=message,
        capture_output=True,
        timeout=60,
        check=True,
    )
    verdicts = []
    for line in result.stdout.decode().splitlines():
        domain, selector, algorithm, outcome, detail = [*line.split("\t"), ""][:5]
        verdicts.append(Verdict(domain, selector, algorithm, outcome, detail))
    return verdicts


@dataclass(frozen=True)
class KeyPair:
    pem: str
    algorithm: DkimAlgorithm

    @property
    def fingerprint(self) -> str:
        return load_private_key(self.pem, self.algorithm).fingerprint

    def txt_record(self, selector: str) -> str:
        """The zone-file line for ``<selector>._domainkey`` (relative to the domain's zone)."""
        strings = dns_txt_strings(load_private_key(self.pem, self.algorithm))
        return f"{selector}._domainkey IN TXT " + " ".join(f'"{s}"' for s in strings)

    @property
    def pem_body(self) -> str:
        """The base64 lines of the PEM, without the BEGIN/END lines: what must never be logged."""
        return "".join(line for line in self.pem.splitlines() if not line.startswith("-----"))


def rsa_key(bits: int = 2048, *, pkcs1: bool = False) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    form = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if pkcs1
        else serialization.PrivateFormat.PKCS8
    )
    pem = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    return KeyPair(pem.decode(), DkimAlgorithm.RSA_SHA256)


def ed25519_key() -> KeyPair:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyPair(pem.decode(), DkimAlgorithm.ED25519_SHA256)


def dkim_key_manifest(
    name: str,
    domain: str,
    selector: str,
    key: KeyPair,
    *,
    namespace: str = "mail",
    extra_spec: str = "",
    with_secret: bool = True,
) -> str:
    """A DkimKey and (by default) its Secret, as YAML documents."""
    pem = textwrap.indent(key.pem, "    ")
    secret = (
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key, namespace: {namespace}}}\n"
        f"stringData:\n  private.key: |\n{pem}---\n"
        if with_secret
        else ""
    )
    return (
        f"{secret}apiVersion: mailflow.dev/v1alpha1\nkind: DkimKey\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  domain: {domain}\n  selector: {selector}\n"
        f"  algorithm: {key.algorithm.value}\n"
        f"  privateKey: {{secretRef: {{name: {name}-key}}}}\n{extra_spec}---\n"
    )


__all__ = [
    "KeyPair",
    "Verdict",
    "dkim_key_manifest",
    "ed25519_key",
    "require_mail_dkim",
    "rsa_key",
    "verify",
    "verify_with_mailauth",
]
