"""DKIM signing at acceptance (RFC 6376; Ed25519-SHA256 per RFC 8463), with dkimpy.

When: once, in :meth:`Relay._accept`, after the relay's own ``Received:`` header is prepended
and before the spool write. So the signature is stored with the message, retries and
hand-offs to a peer relay deliver the same bytes and never sign again, and ``250`` still
means "stored durably". The work runs in the spool's thread, beside the write it precedes.

Which keys: the domain of the RFC 5322 ``From:`` header (never the envelope sender, which
receivers do not align DMARC with). Keys for exactly that domain sign; if there are none,
keys of the closest parent domain that allow subdomains. Every enabled key found signs, one
``DKIM-Signature`` each: an RSA and an Ed25519 key side by side, or two selectors during a
rotation. A message with no ``From:``, with several, or with a ``From:`` of several mailboxes
is passed on unsigned (RFC 6376 §5.4 requires From to be signed, and a verifier cannot tell
which author the signature vouches for).

Not twice: a key does not sign a message that already carries a signature with its ``d=``
and ``s=`` that verifies with that key's own public key (no DNS lookup: the relay knows the
key). A broken or stale signature with the same ``d=``/``s=`` does not stop a fresh one.

Opt-out: a connector with ``dkim: {sign: false}`` says its next hop signs. The message is
stored once for all its recipients, so it is signed unless *every* recipient is routed by an
opting-out connector; in the mixed case the opting-out route also gets the signed copy, which
a next hop that signs (and adds its own signature) does not mind. Recipients on the default
route count as "sign".

Failure never loses mail: a key that fails to sign is counted (``error``) and logged, and the
message is stored with the signatures that did succeed.

Headers: each listed header field is signed as often as it occurs in the message; ``From``
once more (over-signing: no ``From:`` can be added without breaking the signature).

Every decision is a log line and a ``mailflow_dkim_signing_total`` sample, by key domain,
selector and outcome. A log line names a key by its public fingerprint, never by any part
of the private key.
"""

from __future__ import annotations

import email.utils
import enum
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

import dkim
from prometheus_client import Counter

from mailflow_relay.errors import InvalidDomainError
from mailflow_relay.routing.dkim_keys import (
    DkimKey,
    LoadedKey,
    dns_record_name,
    dns_txt_strings,
    keys_for,
    load_private_key,
)
from mailflow_relay.routing.domains import normalize_domain
from mailflow_relay.routing.router import RouteDecision

__all__ = ["DkimSigner", "SigningOutcome", "every_route_opts_out", "from_domain"]

logger = logging.getLogger(__name__)
# dkimpy's own lines: at DEBUG they quote hashed header text, and its verifier logs a
# malformed signature in a client's message at ERROR. Our decision lines say what matters.
_dkimpy_logger = logging.getLogger(__name__ + ".dkimpy")
_dkimpy_logger.propagate = False
_dkimpy_logger.addHandler(logging.NullHandler())


class SigningOutcome(enum.Enum):
    SIGNED = "signed"
    SKIPPED_NO_KEY = "skipped_no_key"
    SKIPPED_OPT_OUT = "skipped_opt_out"
    SKIPPED_NO_FROM = "skipped_no_from"
    SKIPPED_ALREADY_SIGNED = "skipped_already_signed"
    ERROR = "error"


class _NoSingleFrom(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def from_domain(headers: bytes) -> str:
    """The normalised domain of the one mailbox in the one ``From:`` of ``headers``.

    Raises ``ValueError`` (with a reason fit for a log line) when there is no ``From:``,
    more than one, or one that does not name exactly one mailbox with a usable domain.
    """
    parsed = BytesHeaderParser(policy=compat32).parsebytes(headers)
    values = parsed.get_all("From") or []
    if not values:
        raise _NoSingleFrom("no From: header")
    if len(values) > 1:
        raise _NoSingleFrom(f"{len(values)} From: headers")
    mailboxes = [address for _, address in email.utils.getaddresses([str(values[0])]) if address]
    if len(mailboxes) != 1:
        raise _NoSingleFrom(f"From: names {len(mailboxes)} mailboxes, not one")
    local, at, domain = mailboxes[0].rpartition("@")
    if not at or not local:
        raise _NoSingleFrom("From: has no domain")
    try:
        return normalize_domain(domain)
    except InvalidDomainError as e:
        raise _NoSingleFrom(f"From: domain {e.reason}") from e


@dataclass(frozen=True)
class _Signing:
    key: DkimKey
    loaded: LoadedKey = field(repr=False)
    record: bytes
    """The TXT record, as dkimpy's DNS hook returns it, for the "already signed" check."""


class _ExpiringDkim(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's signer with an x= tag: its ``sign`` has no parameter for one.

    ``gen_header`` receives the tag list before the signature is computed over it, so
    inserting x= there puts it under the signature like any other tag.
    """

    expire_after: int | None = None

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: object, **kw: object) -> bytes:
        if self.expire_after is not None and fields and fields[0][0] == b"v":
            stamp = dict(fields).get(b"t")
            signed_at = int(stamp) if stamp else int(time.time())
            expiry = (b"x", str(signed_at + self.expire_after).encode("ascii"))
            at = next((i for i, (tag, _) in enumerate(fields) if tag == b"h"), len(fields))
            fields = [*fields[:at], expiry, *fields[at:]]
        header: bytes = super().gen_header(fields, *args, **kw)
        return header


class DkimSigner:
    """Signs accepted messages with the DKIM keys of one routing document."""

    def __init__(self, keys: Sequence[DkimKey], counter: Counter) -> None:
        self._counter = counter
        self._signings: dict[DkimKey, _Signing] = {}
        for key in keys:
            loaded = load_private_key(key.private_key, key.algorithm, ref=key.ref)
            record = "".join(dns_txt_strings(loaded)).encode("ascii")
            self._signings[key] = _Signing(key, loaded, record)
        self._keys = tuple(self._signings)

    @property
    def configured(self) -> bool:
        return bool(self._signings)

    def _signings_for(self, domain: str) -> list[_Signing]:
        return [self._signings[key] for key in keys_for(self._keys, domain)]

    def sign(self, message: bytes, *, queue_id: str, opted_out: bool) -> bytes:
        """``message`` with a ``DKIM-Signature`` per key that signs it, prepended."""
        if not self._signings:
            # No DkimKey at all: the From: header cannot change the outcome, so it is not
            # parsed (a fifth of the spool thread's time per message otherwise).
            self._decided(SigningOutcome.SKIPPED_NO_KEY, None, queue_id, "unsigned: no DkimKey")
            return message
        head, _, _ = message.partition(b"\r\n\r\n")
        try:
            domain = from_domain(head + b"\r\n\r\n")
        except _NoSingleFrom as e:
            self._decided(SigningOutcome.SKIPPED_NO_FROM, None, queue_id, f"unsigned: {e.reason}")
            return message
        signings = self._signings_for(domain)
        if not signings:
            self._decided(
                SigningOutcome.SKIPPED_NO_KEY, None, queue_id, f"unsigned: no key for {domain}"
            )
            return message
        if opted_out:
            for signing in signings:
                self._decided(
                    SigningOutcome.SKIPPED_OPT_OUT,
                    signing,
                    queue_id,
                    "unsigned: every route opts out (dkim.sign false)",
                )
            return message
        try:
            signer = _ExpiringDkim(message, logger=_dkimpy_logger, linesep=b"\r\n")
        except dkim.DKIMException as e:
            # A header block dkimpy cannot parse (a line without a colon): stored unsigned.
            for signing in signings:
                self._decided(SigningOutcome.ERROR, signing, queue_id, f"cannot sign: {_short(e)}")
            return message
        signatures: list[bytes] = []
        for signing in signings:
            signature = self._sign_one(signer, signing, message, queue_id)
            if signature:
                signatures.append(signature)
        return b"".join(signatures) + message

    def _sign_one(
        self, signer: _ExpiringDkim, signing: _Signing, message: bytes, queue_id: str
    ) -> bytes | None:
        key = signing.key
        if self._already_signed(message, signing):
            self._decided(
                SigningOutcome.SKIPPED_ALREADY_SIGNED,
                signing,
                queue_id,
                "already carries a valid signature",
            )
            return None
        header_c, body_c = key.canonicalization.parts
        signer.expire_after = key.expire_after
        try:
            signature: bytes = signer.sign(
                key.selector.encode("ascii"),
                key.domain.encode("ascii"),
                signing.loaded.signing_key,
                signature_algorithm=key.algorithm.tag.encode("ascii"),
                canonicalize=(header_c.encode("ascii"), body_c.encode("ascii")),
                include_headers=_headers_to_sign(key.signed_headers, signer.headers),
            )
        except dkim.DKIMException as e:
            # dkimpy's messages name parameters and formats, never key bytes.
            self._decided(SigningOutcome.ERROR, signing, queue_id, f"signing failed: {_short(e)}")
            return None
        except Exception as e:  # a bug in the library must not refuse the message
            kind = type(e).__name__  # only the type: its text could hold anything
            self._decided(SigningOutcome.ERROR, signing, queue_id, f"signing failed: {kind}")
            return None
        self._decided(SigningOutcome.SIGNED, signing, queue_id, "signed")
        return signature

    def _already_signed(self, message: bytes, signing: _Signing) -> bool:
        if b"dkim-signature" not in message.partition(b"\r\n\r\n")[0].lower():
            return False
        checker = dkim.DKIM(message, logger=_dkimpy_logger)
        name = f"{dns_record_name(signing.key.selector, signing.key.domain)}.".encode("ascii")

        def own_record(qname: bytes, timeout: int = 5) -> bytes | None:
            return signing.record if qname.lower() == name else None

        signatures = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
        for index, value in enumerate(signatures):
            try:
                tags = dkim.util.parse_tag_value(value)
            except dkim.InvalidTagValueList:
                continue
            if tags.get(b"d", b"").lower() != signing.key.domain.encode("ascii"):
                continue
            if tags.get(b"s", b"").lower() != signing.key.selector.encode("ascii"):
                continue
            try:
                if checker.verify(idx=index, dnsfunc=own_record):
                    return True
            except dkim.DKIMException:
                continue
        return False

    def _decided(
        self, outcome: SigningOutcome, signing: _Signing | None, queue_id: str, detail: str
    ) -> None:
        domain = signing.key.domain if signing else ""
        selector = signing.key.selector if signing else ""
        self._counter.labels(domain, selector, outcome.value).inc()
        if signing is None:
            level = logging.INFO if self.configured else logging.DEBUG
            logger.log(level, "queue %s: DKIM %s: %s", queue_id, outcome.value, detail)
            return
        level = logging.WARNING if outcome is SigningOutcome.ERROR else logging.INFO
        logger.log(
            level,
            "queue %s: DKIM %s d=%s s=%s a=%s key=%s: %s",
            queue_id,
            outcome.value,
            signing.key.domain,
            signing.key.selector,
            signing.key.algorithm.tag,
            signing.key.fingerprint,
            detail,
        )


def _short(error: Exception) -> str:
    """dkimpy's message, bounded: it may quote a line of the client's header."""
    text = str(error)
    return text if len(text) <= 120 else text[:117] + "..."


def _headers_to_sign(listed: Iterable[str], present: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """h=: each listed field as often as it occurs, in message order; From once more."""
    wanted = {name.lower().encode("ascii") for name in listed}
    names = [name.lower() for name, _ in present if name.lower() in wanted]
    return [*names, b"from"]


def every_route_opts_out(decisions: Iterable[RouteDecision]) -> bool:
    """Whether every recipient is routed by a connector with ``dkim: {sign: false}``.

    The default route (no connector) signs; so does any mix (see the module's essay).
    """
    listed = list(decisions)
    return bool(listed) and all(
        d.connector is not None and not d.connector.dkim_sign for d in listed
    )
