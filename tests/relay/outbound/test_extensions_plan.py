"""outbound/extensions.py on its own: every branch of the per-hop decision, without sockets.

The same branches run end to end against Postfix in
tests/relay/engine/test_smtp_extensions_postfix.py; these pin the details (which options,
in which order, what the converted content looks like).
"""

from __future__ import annotations

import email
import email.policy

from mailflow_relay.envelope import (
    BodyType,
    EnvelopeParameters,
    MailParameters,
    Notify,
    RecipientParameters,
    Ret,
)
from mailflow_relay.outbound.extensions import (
    ExtensionRefusal,
    TransactionPlan,
    plan_transaction,
    to_quoted_printable,
)

ALL = frozenset({"smtputf8", "8bitmime", "dsn", "requiretls"})
ASCII_MESSAGE = b"Subject: x\r\n\r\nhello\r\n"


def plan(
    parameters: EnvelopeParameters,
    data: bytes = ASCII_MESSAGE,
    *,
    capabilities: frozenset[str] = ALL,
    verified: bool = True,
    sender: str = "a@x.test",
    recipients: tuple[str, ...] = ("b@y.test",),
) -> TransactionPlan | ExtensionRefusal:
    return plan_transaction(
        parameters,
        sender,
        recipients,
        data,
        capabilities=capabilities,
        verified_tls=verified,
        server="mx.y.test[127.0.0.1]:25",
    )


def test_every_parameter_is_passed_on_to_a_hop_offering_everything() -> None:
    parameters = EnvelopeParameters(
        MailParameters(
            body=BodyType.EIGHT_BIT_MIME, smtputf8=True, ret=Ret.HDRS, envid="a b", requiretls=True
        ),
        (("zoë@y.test", RecipientParameters(frozenset({Notify.DELAY, Notify.SUCCESS}))),),
    )
    result = plan(parameters, "Subject: é\r\n\r\nü\r\n".encode(), recipients=("zoë@y.test",))
    assert isinstance(result, TransactionPlan)
    assert result.mail_options == (
        "SMTPUTF8",
        "BODY=8BITMIME",
        "RET=HDRS",
        "ENVID=a+20b",
        "REQUIRETLS",
    )
    assert result.rcpt_options == {
        "zoë@y.test": ("NOTIFY=SUCCESS,DELAY", r"ORCPT=utf-8;zo\x{EB}@y.test")
    }
    assert result.encoding == "utf-8"
    assert result.dsn is True
    assert result.conversions == ()


def test_smtputf8_asked_but_not_needed_is_not_sent() -> None:
    result = plan(EnvelopeParameters(MailParameters(smtputf8=True)), capabilities=frozenset())
    assert isinstance(result, TransactionPlan)
    assert result.mail_options == ()
    assert result.encoding == "ascii"


def test_utf8_domains_become_a_labels_and_a_utf8_local_part_or_header_refuses_5_6_7() -> None:
    utf8 = EnvelopeParameters(MailParameters(smtputf8=True))
    downgraded = plan(
        utf8, sender="a@bücher.test", recipients=("b@例え.jp",), capabilities=frozenset()
    )
    assert isinstance(downgraded, TransactionPlan)
    assert downgraded.mail_from == "a@xn--bcher-kva.test"
    assert downgraded.recipients == {"b@例え.jp": "b@xn--r8jz45g.jp"}
    assert downgraded.conversions == ("a-labels",)
    for kwargs in ({"recipients": ("jürgen@y.test",)}, {"sender": "jürgen@x.test"}):
        refused = plan(utf8, capabilities=frozenset(), **kwargs)
        assert isinstance(refused, ExtensionRefusal)
        assert refused.reply.startswith("5.6.7 SMTPUTF8 is required")
    header = plan(utf8, "Subject: é\r\n\r\nx\r\n".encode(), capabilities=frozenset())
    assert isinstance(header, ExtensionRefusal)


def test_8bit_to_a_7bit_hop_is_quoted_printable_unless_signed_or_binary() -> None:
    mime = (
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Köln\r\n--b\r\nContent-Type: text/plain\r\n\r\nascii stays\r\n--b--\r\n"
    ).encode()
    converted = plan(EnvelopeParameters(), mime, capabilities=frozenset({"dsn"}))
    assert isinstance(converted, TransactionPlan)
    assert converted.conversions == ("quoted-printable",)
    assert converted.data.isascii()
    parts = [
        p.get_content()
        for p in email.message_from_bytes(converted.data, policy=email.policy.default).walk()
        if not p.is_multipart()
    ]
    assert parts == ["Köln", "ascii stays"]
    for headers in (
        b"DKIM-Signature: v=1; d=x.test\r\n",
        b"Content-Type: multipart/signed; b=c\r\n",
    ):
        refused = plan(
            EnvelopeParameters(), headers + b"\r\n\xc3\xa9\r\n", capabilities=frozenset()
        )
        assert isinstance(refused, ExtensionRefusal)
        assert refused.reply.startswith("5.6.3 Conversion required and prohibited")
    binary = b"Content-Transfer-Encoding: binary\r\n\r\n\xc3\xa9\r\n"
    assert to_quoted_printable(binary) is None


def test_body_is_declared_only_to_a_hop_with_8bitmime() -> None:
    seven = EnvelopeParameters(MailParameters(body=BodyType.SEVEN_BIT))
    offered = plan(seven)
    assert isinstance(offered, TransactionPlan)
    assert offered.mail_options == ("BODY=7BIT",)
    not_offered = plan(seven, capabilities=frozenset())
    assert isinstance(not_offered, TransactionPlan)
    assert not_offered.mail_options == ()


def test_dsn_parameters_stay_here_without_dsn_and_orcpt_is_added_with_it() -> None:
    parameters = EnvelopeParameters(
        MailParameters(ret=Ret.FULL, envid="e"),
        (("b@y.test", RecipientParameters(frozenset({Notify.NEVER}), ("rfc822", "B@Y.test"))),),
    )
    without = plan(parameters, capabilities=frozenset())
    assert isinstance(without, TransactionPlan)
    assert (without.mail_options, without.rcpt_options, without.dsn) == (
        (),
        {"b@y.test": ()},
        False,
    )
    with_dsn = plan(
        parameters, recipients=("b@y.test", "c@y.test"), capabilities=frozenset({"dsn"})
    )
    assert isinstance(with_dsn, TransactionPlan)
    assert with_dsn.mail_options == ("RET=FULL", "ENVID=e")
    assert with_dsn.rcpt_options == {
        "b@y.test": ("NOTIFY=NEVER", "ORCPT=rfc822;B@Y.test"),
        "c@y.test": ("ORCPT=rfc822;c@y.test",),
    }


def test_requiretls_needs_verified_tls_and_the_extension() -> None:
    required = EnvelopeParameters(MailParameters(requiretls=True))
    unverified = plan(required, verified=False)
    assert isinstance(unverified, ExtensionRefusal)
    assert unverified.reply.startswith("5.7.30 REQUIRETLS support required: TLS to")
    not_offered = plan(required, capabilities=frozenset({"dsn"}))
    assert isinstance(not_offered, ExtensionRefusal)
    assert "not offered by host mx.y.test" in not_offered.reply
