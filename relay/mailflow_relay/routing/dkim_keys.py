"""DKIM keys as the routing document carries them (RFC 6376, Ed25519 per RFC 8463).

A :class:`DkimKey` is one enabled ``DkimKey`` resource with its private key resolved from
its Secret. The private key travels in the routing document, which lives in a Kubernetes
Secret (the routing Secret) like the key's own Secret: no new place holds it. It is kept
out of every ``repr``, and what is shown anywhere else (status, ``mailflow explain``,
logs, errors) is the *public* key's fingerprint, ``sha256/<hex>`` of its
SubjectPublicKeyInfo (DER) — the same value for the same key in every form of PEM.

The helpers here are the one implementation of what both planes need: the compiler checks
keys with them, the relay loads them to sign, the operator derives the DNS record to
publish from them.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailflow_relay.errors import DkimKeyError

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "MIN_RSA_BITS",
    "NEVER_SIGNED",
    "DkimAlgorithm",
    "DkimCanonicalization",
    "DkimKey",
    "LoadedKey",
    "dns_record_name",
    "dns_txt_strings",
    "keys_for",
    "load_private_key",
    "parse_duration",
]

MIN_RSA_BITS = 2048
"""RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits; we require 2048."""

DEFAULT_SIGNED_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "In-Reply-To", "References",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Resent-Date", "Resent-From",
    "Resent-To", "Resent-Cc", "List-Id", "List-Help", "List-Unsubscribe", "List-Unsubscribe-Post",
    "List-Subscribe", "List-Post", "List-Owner", "List-Archive",
)  # fmt: skip
"""RFC 6376 §5.4.1's recommendation (the CRD's default is the same list)."""

NEVER_SIGNED = frozenset(
    ("return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature")
)
"""Fields that change on the way or must not be revealed (RFC 6376 §5.4; dkimpy refuses them)."""


class DkimAlgorithm(enum.Enum):
    RSA_SHA256 = "RSA-SHA256"
    ED25519_SHA256 = "Ed25519-SHA256"

    @property
    def tag(self) -> str:
        """The a= value of the signature."""
        return "rsa-sha256" if self is DkimAlgorithm.RSA_SHA256 else "ed25519-sha256"

    @property
    def key_type(self) -> str:
        """The k= value of the DNS record."""
        return "rsa" if self is DkimAlgorithm.RSA_SHA256 else "ed25519"


class DkimCanonicalization(enum.Enum):
    """The c= tag: header/body."""

    RELAXED_RELAXED = "relaxed/relaxed"
    RELAXED_SIMPLE = "relaxed/simple"
    SIMPLE_RELAXED = "simple/relaxed"
    SIMPLE_SIMPLE = "simple/simple"

    @property
    def parts(self) -> tuple[str, str]:
        header, _, body = self.value.partition("/")
        return header, body


@dataclass(frozen=True)
class DkimKey:
    """One enabled DKIM key: who it signs for, how, and with what."""

    ref: str
    """The DkimKey resource, ``namespace/name``."""
    domain: str
    """The d= domain, normalised (lower case, A-labels)."""
    selector: str
    algorithm: DkimAlgorithm
    private_key: str = field(repr=False)
    """The private key, PEM (PKCS#8). Never logged; shown only as :attr:`fingerprint`."""
    fingerprint: str
    """``sha256/<hex>`` of the public key's SubjectPublicKeyInfo (DER)."""
    subdomains: bool = False
    """Also sign mail whose From: domain is a subdomain of :attr:`domain`."""
    signed_headers: tuple[str, ...] = DEFAULT_SIGNED_HEADERS
    canonicalization: DkimCanonicalization = DkimCanonicalization.RELAXED_RELAXED
    expire_after: int | None = None
    """Seconds from signing to x=; None: no x= tag."""

    def signs_for(self, domain: str) -> bool:
        """Whether mail From: ``domain`` (normalised) is signed with this key."""
        return domain == self.domain or (self.subdomains and domain.endswith("." + self.domain))

    def describe(self) -> str:
        scope = " (and subdomains)" if self.subdomains else ""
        return f"d={self.domain}{scope} s={self.selector} {self.algorithm.value} {self.fingerprint}"


@dataclass(frozen=True)
class LoadedKey:
    """A parsed private key with what the checks and the DNS record need."""

    algorithm: DkimAlgorithm
    bits: int
    """RSA modulus size; 256 for Ed25519."""
    fingerprint: str
    public_key: str
    """The p= value of the DNS record (base64)."""
    signing_key: bytes = field(repr=False)
    """The key in the form dkimpy signs with: PKCS#1 PEM for RSA, the base64 seed for Ed25519."""
    pkcs8: str = field(repr=False)
    """The key as PKCS#8 PEM, the form the routing document carries."""


def load_private_key(pem: str, algorithm: DkimAlgorithm, *, ref: str = "") -> LoadedKey:
    """Parse ``pem`` and check that it is a key of ``algorithm`` that may sign.

    Raises :class:`DkimKeyError` naming ``ref``; the error never quotes the PEM, and the
    cause is not chained (the parser's own message could quote bytes of the key).
    """
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DkimKeyError(
            ref, "the private key is not an unencrypted PEM private key (PKCS#8 or PKCS#1)"
        ) from None
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = "sha256/" + hashlib.sha256(spki).hexdigest()
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    if isinstance(key, rsa.RSAPrivateKey):
        if algorithm is not DkimAlgorithm.RSA_SHA256:
            raise DkimKeyError(ref, f"the private key is an RSA key, not {algorithm.value}")
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                ref, f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
        signing = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return LoadedKey(
            algorithm, key.key_size, fingerprint, base64.b64encode(spki).decode(), signing, pkcs8
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if algorithm is not DkimAlgorithm.ED25519_SHA256:
            raise DkimKeyError(ref, f"the private key is an Ed25519 key, not {algorithm.value}")
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        raw_public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        # RFC 8463 §4.2: p= is the raw 32-byte public key, not a SubjectPublicKeyInfo.
        return LoadedKey(
            algorithm,
            256,
            fingerprint,
            base64.b64encode(raw_public).decode(),
            base64.b64encode(seed),
            pkcs8,
        )
    raise DkimKeyError(
        ref, f"the private key is a {type(key).__name__}; only RSA and Ed25519 keys sign DKIM"
    )


def keys_for(keys: Sequence[DkimKey], domain: str) -> list[DkimKey]:
    """The keys that sign mail From: ``domain`` (normalised).

    Every key of exactly that domain; if there is none, every key of the closest parent
    domain that allows subdomains. The relay's signer and ``mailflow explain`` both ask this.
    """
    exact = [k for k in keys if k.domain == domain]
    if exact:
        return exact
    labels = domain.split(".")
    for i in range(1, len(labels)):
        parent = ".".join(labels[i:])
        found = [k for k in keys if k.domain == parent and k.subdomains]
        if found:
            return found
    return []


def dns_record_name(selector: str, domain: str) -> str:
    """Where the public key is published (RFC 6376 §3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def dns_txt_strings(loaded: LoadedKey) -> tuple[str, ...]:
    """The TXT record's value, split into character-strings of at most 255 bytes (RFC 1035)."""
    text = f"v=DKIM1; k={loaded.algorithm.key_type}; p={loaded.public_key}"
    return tuple(text[i : i + 255] for i in range(0, len(text), 255))


_DURATION = re.compile(r"^([1-9][0-9]{0,8})(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``"30d"``, ``"168h"``, ``"90m"``, ``"3600s"`` → seconds (the CRD's expireAfter)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 168h, 90m or 3600s")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
