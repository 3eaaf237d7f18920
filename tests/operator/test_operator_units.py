"""Pure parts of the operator: label selectors, condition bookkeeping, command-line options."""

from __future__ import annotations

import re

import pytest

from mailflow_cli.main import build_parser
from mailflow_cli.operator_command import config_from_args
from mailflow_compiler.errors import UsageError
from mailflow_operator.selectors import LabelSelector
from mailflow_operator.status import Condition, merge_conditions
from mailflow_relay.routing.document import DefaultAction, ObjectRef


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("app=relay", {"app": "relay"}, True),
        ("app==relay", {"app": "other"}, False),
        ("app!=relay", {}, True),
        ("app=relay,tier in (mail, edge)", {"app": "relay", "tier": "edge"}, True),
        ("app=relay,tier notin (edge)", {"app": "relay", "tier": "edge"}, False),
        (
            "app.kubernetes.io/name=mailflow-relay,!canary",
            {"app.kubernetes.io/name": "mailflow-relay"},
            True,
        ),
        ("canary", {"canary": ""}, True),
    ],
)
def test_label_selectors_match_as_the_api_server_does(
    selector: str, labels: dict[str, str], matches: bool
) -> None:
    assert LabelSelector.parse(selector).matches(labels) is matches


@pytest.mark.parametrize("text", ["", "app=(x", "a b c"])
def test_bad_label_selectors_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        LabelSelector.parse(text)


def test_last_transition_time_changes_only_with_the_status() -> None:
    first = merge_conditions(None, [Condition("Ready", "False", "Pending", "1/2")], 1, "T1")
    assert first[0]["lastTransitionTime"] == "T1"
    reworded = merge_conditions(
        first, [Condition("Ready", "False", "NoReadyRelays", "0/0")], 2, "T2"
    )
    assert reworded[0]["lastTransitionTime"] == "T1"
    assert (reworded[0]["reason"], reworded[0]["observedGeneration"]) == ("NoReadyRelays", 2)
    flipped = merge_conditions(reworded, [Condition("Ready", "True", "Ready", "ok")], 2, "T3")
    assert flipped[0]["lastTransitionTime"] == "T3"


def test_probe_conditions_survive_a_pass_without_a_probe_result() -> None:
    stored = merge_conditions(
        None,
        [
            Condition("Ready", "True", "Ready", "ok"),
            Condition("TLSVerified", "True", "Verified", "ok"),
        ],
        1,
        "T1",
    )
    again = merge_conditions(stored, [Condition("Ready", "True", "Ready", "ok")], 1, "T2")
    assert again == stored


def test_operator_options_become_the_documented_configuration() -> None:
    args = build_parser().parse_args(
        [
            "operator", "--namespace", "mail", "--namespace", "billing",
            "--routing-secret", "mailflow-system/mailflow-routing",
            "--relay-selector", "app.kubernetes.io/name=mailflow-relay",
            "--probe-interval", "60", "--default-route", "Reject", "--webhook-port", "9443",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.reconcile.namespaces == ("mail", "billing")
    assert config.reconcile.routing_secret == ObjectRef("mailflow-system", "mailflow-routing")
    assert config.reconcile.default_route.action is DefaultAction.REJECT
    assert config.reconcile.probe_interval == 60
    assert config.reconcile.certificate_warning_days == 14
    assert config.webhook is not None
    assert (config.webhook.port, config.webhook.strict) == (9443, False)


def test_routing_secret_must_name_a_namespace() -> None:
    args = build_parser().parse_args(
        ["operator", "-n", "mail", "--routing-secret", "routing", "--relay-selector", "app=r"]
    )
    with pytest.raises(UsageError, match="--routing-secret"):
        config_from_args(args)


def operator_args(*extra: str) -> list[str]:
    return ["operator", "-n", "mail", "--routing-secret", "ns/routing", "--relay-selector",
            "app=r", *extra]  # fmt: skip


def test_the_dns_servers_of_the_dns_published_check_and_the_queue_lifetime() -> None:
    extra = ["--dns-server", "192.0.2.53:5353", "--dns-server", "[2001:db8::53]:5353",
             "--queue-lifetime", "86400"]  # fmt: skip
    args = build_parser().parse_args(operator_args(*extra))
    config = config_from_args(args)
    assert config.reconcile.dns_servers == ("192.0.2.53", "2001:db8::53")
    assert config.reconcile.dns_port == 5353
    assert config.reconcile.queue_lifetime == 86400
    defaults = config_from_args(build_parser().parse_args(operator_args()))
    assert (defaults.reconcile.dns_servers, defaults.reconcile.dns_port) == ((), 53)
    assert defaults.reconcile.queue_lifetime == 5 * 86400


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["ns1.example"], "--dns-server 'ns1.example': expected IP[:PORT] of a resolver"),
        (["192.0.2.1:x"], "--dns-server '192.0.2.1:x': expected IP[:PORT]"),
        (["192.0.2.1:53", "192.0.2.2:5353"], "the resolvers use different ports (53, 5353)"),
    ],
)
def test_dns_servers_that_cannot_be_asked_are_refused_in_one_line(
    values: list[str], message: str
) -> None:
    extra = [a for v in values for a in ("--dns-server", v)]
    with pytest.raises(UsageError, match=re.escape(message)):
        config_from_args(build_parser().parse_args(operator_args(*extra)))


def test_transport_security_from_the_relays_reports() -> None:
    from mailflow_operator.status import transport_security
    from mailflow_operator.store import pod_state

    assert transport_security("mail/a", [{}, {}], shown_before=False) is None
    gone = transport_security("mail/a", [{}], shown_before=True)
    assert gone is not None
    assert (gone.status, gone.reason) == ("Unknown", "NotReported")
    plain = transport_security("mail/a", [{"mail/a": {"dane": "unusable"}}], shown_before=False)
    assert plain is not None
    assert (plain.status, plain.reason) == ("True", "NoPolicy")
    assert "No usable DANE records (unusable)" in plain.message
    # What a relay writes is its word, but bounded and checked: junk reads as nothing.
    pod = {
        "metadata": {
            "annotations": {
                "mailflow.dev/transport-security": (
                    '{"mail/a":{"dane":"verified","x":"y"},"mail/b":{"dane":"<script>"},'
                    '"mail/c":"verified"}'
                )
            }
        }
    }
    assert pod_state(pod).transport == {"mail/a": {"dane": "verified"}}
    broken = {"metadata": {"annotations": {"mailflow.dev/transport-security": "not json"}}}
    assert pod_state(broken).transport == {}
