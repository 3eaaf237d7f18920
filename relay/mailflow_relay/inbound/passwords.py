"""Password hashes for the relay's SMTP AUTH users.

Credentials reach the relay from a Kubernetes Secret (or a manifest in standalone mode),
so they are stored hashed: whoever reads the Secret learns no password. The hash is
scrypt (RFC 7914) from :mod:`hashlib`, memory-hard, with a random 16-byte salt, in a
self-describing text form that carries its own cost parameters::

    scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>

so the cost can be raised later without invalidating stored hashes. Verification
compares in constant time (:func:`hmac.compare_digest`). A hash that cannot be parsed,
or whose parameters would make verification absurdly expensive (a hostile Secret could
otherwise ask for gigabytes of memory per AUTH attempt), never matches: it is logged,
without the password and without the hash, and :func:`verify_password` returns False.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets

__all__ = ["hash_password", "verify_password"]

log = logging.getLogger(__name__)

SCHEME = "scrypt"
N = 2**14
"""CPU/memory cost (a power of two): with r=8 about 16 MiB and a few tens of milliseconds."""
R = 8
P = 1
SALT_BYTES = 16
KEY_BYTES = 32

# Limits on parameters read from a stored hash, so a hostile hash cannot exhaust the relay.
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
MAX_MEMORY = 256 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # hashlib refuses by default above 32 MiB; allow what the parameters need, plus slack.
    maxmem = 128 * n * r * p + 128 * r * p + 1024 * 1024
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length
    )


def hash_password(password: str) -> str:
    """The stored form of ``password``: scrypt with a random salt, parameters included."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, N, R, P, KEY_BYTES)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(key)}"


class _MalformedHashError(ValueError):
    """A stored hash that is not ``scrypt$n$r$p$salt$hash`` with sane parameters."""


def _parse(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    parts = hashed.split("$")
    if len(parts) != 6:
        raise _MalformedHashError(f"expected 6 '$'-separated fields, found {len(parts)}")
    scheme, n_text, r_text, p_text, salt_text, key_text = parts
    if scheme != SCHEME:
        raise _MalformedHashError(f"unknown scheme {scheme[:20]!r}, expected {SCHEME!r}")
    if not all(text.isascii() and text.isdigit() for text in (n_text, r_text, p_text)):
        raise _MalformedHashError("n, r and p must be decimal integers")
    n, r, p = int(n_text), int(r_text), int(p_text)
    if n < 2 or n & (n - 1) or n > MAX_N:
        raise _MalformedHashError(f"n={n} is not a power of two between 2 and {MAX_N}")
    if not 1 <= r <= MAX_R or not 1 <= p <= MAX_P or 128 * n * r * p > MAX_MEMORY:
        raise _MalformedHashError(f"r={r}, p={p} out of range")
    try:
        salt = base64.b64decode(salt_text, validate=True)
        key = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _MalformedHashError("salt or hash is not valid base64") from error
    if not salt or len(key) < 16:
        raise _MalformedHashError("salt is empty or hash shorter than 16 bytes")
    return n, r, p, salt, key


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed`` (from :func:`hash_password`).

    A malformed ``hashed`` is logged (without its content) and never matches.
    """
    try:
        n, r, p, salt, key = _parse(hashed)
    except _MalformedHashError as error:
        log.error("Malformed password hash, treating as no match: %s", error)
        return False
    candidate = _scrypt(password, salt, n, r, p, len(key))
    return hmac.compare_digest(candidate, key)
