"""Domain normalisation and connector patterns (DESIGN.md, "Routing" and "API").

Property tests cover the matching rules for random domains; example tests pin down the
inputs that must be refused and the canonical form of next-hop hosts.
"""

from __future__ import annotations

import idna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow_relay.errors import InvalidDomainError
from mailflow_relay.routing.domains import (
    DomainPattern,
    PatternKind,
    normalize_domain,
    normalize_host,
    parent_domains,
)

# Fast, and no example database written into the working tree.
FAST = settings(max_examples=200, deadline=None, database=None)

# LDH labels that start with a letter (so no domain ever looks like an IPv4 address) and
# never carry "--" (IDNA 2008 forbids hyphens in the 3rd and 4th positions).
ascii_labels = st.from_regex(r"[a-z][a-z0-9]{0,8}(-[a-z0-9]{1,5})?", fullmatch=True)
ascii_domains = st.lists(ascii_labels, min_size=1, max_size=4).map(".".join)

# Real internationalised labels; each one is a valid IDNA 2008 U-label.
IDN_LABELS = ["bücher", "münchen", "日本語", "пример", "café", "straße", "ελλάδα", "中文"]
idn_labels = st.sampled_from(IDN_LABELS)


@st.composite
def idn_domains(draw: st.DrawFn) -> str:
    """A domain with at least one U-label, anywhere among random ASCII labels."""
    labels = draw(st.lists(ascii_labels, min_size=1, max_size=3))
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        labels.insert(draw(st.integers(min_value=0, max_value=len(labels))), draw(idn_labels))
    return ".".join(labels)


@st.composite
def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


def matches(pattern: str, domain: str) -> bool:
    return DomainPattern.parse(pattern).matches(normalize_domain(domain))


def upper(text: str) -> str:
    """Upper case, one character for one ("ß".upper() is "SS", a different label)."""
    return "".join(c.upper() if len(c.upper()) == 1 else c for c in text)


def punycode(domain: str) -> str:
    return idna.encode(domain, uts46=True).decode("ascii")


# --- case, trailing dot ----------------------------------------------------------------


@FAST
@given(domain=ascii_domains, data=st.data())
def test_matching_is_case_insensitive_for_exact_patterns(domain: str, data: st.DataObject) -> None:
    pattern = data.draw(random_case(domain), label="pattern")
    recipient = data.draw(random_case(domain), label="recipient")
    assert normalize_domain(recipient) == domain
    assert matches(pattern, recipient)


@FAST
@given(parent=ascii_domains, label=ascii_labels, data=st.data())
def test_matching_is_case_insensitive_for_wildcard_patterns(
    parent: str, label: str, data: st.DataObject
) -> None:
    pattern = "*." + data.draw(random_case(parent), label="pattern parent")
    recipient = data.draw(random_case(f"{label}.{parent}"), label="recipient")
    assert matches(pattern, recipient)
    assert not matches(pattern, data.draw(random_case(parent), label="apex"))


@FAST
@given(domain=ascii_domains, label=ascii_labels)
def test_a_trailing_dot_does_not_change_matching(domain: str, label: str) -> None:
    sub = f"{label}.{domain}"
    assert normalize_domain(domain + ".") == normalize_domain(domain)
    for pattern in (domain, domain + ".", f"*.{domain}", f"*.{domain}."):
        for recipient in (domain, sub):
            assert matches(pattern, recipient + ".") == matches(pattern, recipient), (
                pattern,
                recipient,
            )
    assert matches(domain + ".", domain)
    assert matches(f"*.{domain}.", sub + ".")


# --- internationalised domains -----------------------------------------------------------


@FAST
@given(domain=idn_domains())
def test_a_u_label_domain_and_its_punycode_normalise_identically(domain: str) -> None:
    ace = punycode(domain)
    assert ace.isascii()
    assert "xn--" in ace
    assert normalize_domain(domain) == normalize_domain(ace) == ace.lower()
    shouted = upper(domain)
    assert normalize_domain(shouted) == normalize_domain(ace.upper()) == ace.lower()
    assert normalize_domain(domain + ".") == ace.lower()


@FAST
@given(domain=idn_domains(), label=ascii_labels)
def test_an_exact_u_label_pattern_matches_the_punycode_recipient_and_vice_versa(
    domain: str, label: str
) -> None:
    ace = punycode(domain)
    assert matches(domain, ace)
    assert matches(ace, domain)
    assert matches(domain, domain)
    assert matches(ace, ace)
    assert not matches(domain, f"{label}.{ace}")
    assert not matches(ace, f"{label}.{domain}")


@FAST
@given(domain=idn_domains(), label=st.one_of(ascii_labels, idn_labels))
def test_a_wildcard_u_label_pattern_matches_punycode_subdomains_and_vice_versa(
    domain: str, label: str
) -> None:
    ace = punycode(domain)
    sub = f"{label}.{domain}"
    sub_ace = punycode(sub)
    assert matches(f"*.{domain}", sub_ace)
    assert matches(f"*.{ace}", sub)
    assert matches(f"*.{domain}", sub)
    assert matches(f"*.{ace}", sub_ace)
    assert not matches(f"*.{domain}", ace)
    assert not matches(f"*.{ace}", domain)
    assert DomainPattern.parse(f"*.{domain}") == DomainPattern.parse(f"*.{ace}")


def test_compatibility_forms_of_an_idn_are_mapped_like_mail_clients_do() -> None:
    expected = "xn--caf-dma.example"
    assert normalize_domain("café.example") == expected
    assert normalize_domain("cafe\u0301.example") == expected  # decomposed é
    assert normalize_domain("CAFÉ.EXAMPLE") == expected
    assert normalize_domain("café\u3002example") == expected  # ideographic full stop
    assert normalize_domain("XN--CAF-DMA.example.") == expected


def test_sharp_s_keeps_its_idna_2008_a_label() -> None:
    # Non-transitional processing: ß is its own character, not "ss".
    assert normalize_domain("straße.de") == "xn--strae-oqa.de"
    assert normalize_domain("strasse.de") == "strasse.de"


# --- pattern semantics -------------------------------------------------------------------


@FAST
@given(parent=ascii_domains, a=ascii_labels, b=ascii_labels)
def test_a_wildcard_never_matches_its_apex_but_matches_every_subdomain(
    parent: str, a: str, b: str
) -> None:
    pattern = DomainPattern.parse(f"*.{parent}")
    assert pattern.kind is PatternKind.SUBDOMAINS
    assert not pattern.matches(normalize_domain(parent))
    assert pattern.matches(normalize_domain(f"{a}.{parent}"))
    assert pattern.matches(normalize_domain(f"{a}.{b}.{parent}"))


@FAST
@given(parent=ascii_domains, a=ascii_labels)
def test_a_wildcard_does_not_match_a_domain_that_merely_ends_with_the_same_text(
    parent: str, a: str
) -> None:
    assert not matches(f"*.{parent}", a + parent)


@FAST
@given(domain=ascii_domains, a=ascii_labels, b=ascii_labels)
def test_an_exact_pattern_never_matches_a_subdomain_or_parent(domain: str, a: str, b: str) -> None:
    pattern = DomainPattern.parse(domain)
    assert pattern.kind is PatternKind.EXACT
    assert pattern.matches(normalize_domain(domain))
    assert not pattern.matches(normalize_domain(f"{a}.{domain}"))
    assert not pattern.matches(normalize_domain(f"{a}.{b}.{domain}"))
    for parent in parent_domains(normalize_domain(domain)):
        assert not pattern.matches(parent)


@FAST
@given(domain=st.one_of(ascii_domains, idn_domains()), spelling=st.sampled_from(["*", "*.*"]))
def test_a_catch_all_matches_every_domain(domain: str, spelling: str) -> None:
    pattern = DomainPattern.parse(spelling)
    assert pattern.kind is PatternKind.ANY
    assert pattern == DomainPattern.parse(" * ")
    assert pattern.matches(normalize_domain(domain))


@FAST
@given(domain=ascii_domains, a=ascii_labels, b=ascii_labels)
def test_specificity_orders_exact_then_longer_wildcard_then_shorter_wildcard_then_catch_all(
    domain: str, a: str, b: str
) -> None:
    recipient = f"{a}.{b}.{domain}"
    exact = DomainPattern.parse(recipient)
    longer = DomainPattern.parse(f"*.{b}.{domain}")
    shorter = DomainPattern.parse(f"*.{domain}")
    catch_all = DomainPattern.parse("*.*")
    ranked = [exact, longer, shorter, catch_all]
    assert all(p.matches(normalize_domain(recipient)) for p in ranked)
    assert exact.specificity > longer.specificity > shorter.specificity > catch_all.specificity
    shuffled = [catch_all, shorter, exact, longer]
    assert sorted(shuffled, key=lambda p: p.specificity, reverse=True) == ranked


def test_an_exact_single_label_pattern_beats_a_deep_wildcard() -> None:
    assert DomainPattern.parse("com").specificity > DomainPattern.parse("*.a.b.c.com").specificity


def test_parent_domains_are_listed_nearest_first() -> None:
    assert parent_domains("a.b.c") == ["b.c", "c"]
    assert parent_domains("c") == []


def test_patterns_print_in_their_canonical_spelling() -> None:
    assert str(DomainPattern.parse("*.*")) == "*"
    assert str(DomainPattern.parse("*.Bücher.Example.")) == "*.xn--bcher-kva.example"
    assert str(DomainPattern.parse("Contoso.COM")) == "contoso.com"


# --- invalid input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param(".", id="root-only"),
        pytest.param("a..b", id="empty-label"),
        pytest.param(".contoso.com", id="leading-dot"),
        pytest.param("x" * 64 + ".com", id="label-of-64-chars"),
        pytest.param(".".join(["a" * 63] * 4), id="longer-than-253"),
        pytest.param("192.0.2.10", id="ipv4-address"),
        pytest.param("2001:db8::1", id="ipv6-address"),
        pytest.param("[192.0.2.10]", id="address-literal"),
        pytest.param("under_score.com", id="underscore"),
        pytest.param("-lead.com", id="leading-hyphen"),
    ],
)
def test_normalize_domain_rejects_invalid_domains(text: str) -> None:
    with pytest.raises(InvalidDomainError) as info:
        normalize_domain(text)
    assert info.value.text == text


def test_a_label_of_63_chars_is_still_valid() -> None:
    assert normalize_domain("x" * 63 + ".com") == "x" * 63 + ".com"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("a..b", id="empty-label"),
        pytest.param("*.*.x", id="double-wildcard"),
        pytest.param("*.x.*", id="trailing-wildcard"),
        pytest.param("foo*.x", id="partial-wildcard"),
        pytest.param("a.*.x", id="inner-wildcard"),
        pytest.param("**", id="double-star"),
        pytest.param("*.", id="wildcard-without-suffix"),
        pytest.param("x" * 64 + ".com", id="label-of-64-chars"),
        pytest.param("*." + "x" * 64 + ".com", id="wildcard-label-of-64-chars"),
        pytest.param("192.0.2.10", id="ipv4-address"),
        pytest.param("*.192.0.2.10", id="wildcard-over-ipv4-address"),
        pytest.param("[2001:db8::1]", id="ipv6-literal"),
    ],
)
def test_domain_pattern_parse_rejects_invalid_patterns(text: str) -> None:
    with pytest.raises(InvalidDomainError):
        DomainPattern.parse(text)


def test_normalize_domain_rejects_two_trailing_dots() -> None:
    with pytest.raises(InvalidDomainError):
        normalize_domain("contoso.com..")


# --- next-hop hosts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("192.0.2.10", "192.0.2.10", id="ipv4"),
        pytest.param(" 192.0.2.10 ", "192.0.2.10", id="ipv4-padded"),
        pytest.param("[192.0.2.10]", "192.0.2.10", id="ipv4-literal"),
        pytest.param("[2001:db8::1]", "2001:db8::1", id="ipv6-literal"),
        pytest.param("2001:DB8:0:0::1", "2001:db8::1", id="ipv6-compressed"),
        pytest.param("Mail.Contoso.COM.", "mail.contoso.com", id="domain"),
        pytest.param("mx.bücher.example", "mx.xn--bcher-kva.example", id="idn-domain"),
    ],
)
def test_normalize_host_canonicalises_addresses_and_names(text: str, expected: str) -> None:
    assert normalize_host(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("999.1.1.1", id="octet-out-of-range"),
        pytest.param("1.2.3", id="three-octets"),
        pytest.param("1.2.3.4.5", id="five-octets"),
        pytest.param("256.256.256.256.", id="trailing-dot"),
        pytest.param("", id="empty"),
        pytest.param("a..b", id="empty-label"),
    ],
)
def test_normalize_host_rejects_invalid_hosts(text: str) -> None:
    with pytest.raises(InvalidDomainError):
        normalize_host(text)
