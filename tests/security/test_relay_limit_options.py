"""The limits as a user sets them: `mailflow relay` options and the chart's values.

Issue 12, points 5 and 9: the session cap, the slowloris timeouts and the error and AUTH
limits are options with the settings' defaults; the relay's name defaults to the host's
FQDN for both the listener and the outbound EHLO, and a bare localhost (which many next
hops refuse in EHLO; the old outbound default) only when given explicitly.
"""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path

import pytest

from helm.chart import HELM, helm, parse, template_args
from mailflow_cli.main import build_parser
from mailflow_cli.relay_command import relay_setup
from mailflow_compiler.errors import UsageError
from mailflow_relay.inbound.settings import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings

ROOT = Path(__file__).resolve().parents[2]
# The feature tour (examples/*.yaml); examples/compliance is a design of its own.
TOUR = [str(p) for p in sorted((ROOT / "examples").glob("*.yaml"))]
BASE_ARGS = ["relay", "--manifests", *TOUR, "--accept-from", "127.0.0.1/32"]


def _setup(tmp_path: Path, *extra: str) -> tuple[ListenerSettings, DeliverySettings]:
    args = build_parser().parse_args([*BASE_ARGS, "--spool", str(tmp_path / "spool"), *extra])
    settings, _, _ = relay_setup(args, io.StringIO())
    return settings.listener, settings.delivery


def test_the_name_defaults_to_the_hosts_fqdn_for_listener_and_outbound_ehlo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the listener used getfqdn() but the outbound EHLO said "localhost".
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "relay-0.relays.mail.svc.cluster.local")
    listener, delivery = _setup(tmp_path)
    assert listener.hostname == delivery.helo_name == "relay-0.relays.mail.svc.cluster.local"
    assert DeliverySettings().helo_name == "relay-0.relays.mail.svc.cluster.local"


def test_a_bare_localhost_is_refused_unless_given_explicitly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    with pytest.raises(UsageError, match="--hostname: this host's FQDN is 'localhost'"):
        _setup(tmp_path)
    listener, delivery = _setup(tmp_path, "--hostname", "localhost")
    assert listener.hostname == delivery.helo_name == "localhost"


def test_limits_are_options_whose_defaults_are_the_settings_defaults(tmp_path: Path) -> None:
    defaults = ListenerSettings(hostname="relay.test")
    listener, _ = _setup(tmp_path, "--hostname", "relay.test")
    for name in (
        "max_connections",
        "command_timeout",
        "data_timeout",
        "soft_error_limit",
        "hard_error_limit",
        "error_sleep",
        "max_auth_failures",
    ):
        assert getattr(listener, name) == getattr(defaults, name), name
    assert (defaults.command_timeout, defaults.data_timeout) == (300.0, 600.0)
    listener, _ = _setup(
        tmp_path,
        "--hostname",
        "relay.test",
        "--max-connections",
        "64",
        "--command-timeout",
        "30",
        "--data-timeout",
        "120",
        "--hard-error-limit",
        "5",
        "--soft-error-limit",
        "2",
        "--error-sleep",
        "0.5",
        "--max-auth-failures",
        "2",
    )
    assert (listener.max_connections, listener.command_timeout, listener.data_timeout) == (
        64,
        30.0,
        120.0,
    )
    assert (listener.soft_error_limit, listener.hard_error_limit, listener.error_sleep) == (
        2,
        5,
        0.5,
    )
    assert listener.max_auth_failures == 2


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-connections", "0", "--max-connections: must be at least 1"),
        ("--command-timeout", "0", "--command-timeout: must be a positive number of seconds"),
        ("--soft-error-limit", "30", "--soft-error-limit: must not exceed hard_error_limit (20)"),
    ],
)
def test_limits_that_cannot_work_are_refused(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        _setup(tmp_path, "--hostname", "relay.test", option, value)


def _relay_args(*sets: str) -> list[str]:
    if not HELM.exists():
        pytest.skip("Helm is missing: run `bash scripts/install-helm.sh`")
    result = helm(*template_args("default", *sets))
    assert result.returncode == 0, result.stderr
    (statefulset,) = parse(result.stdout).of_kind("StatefulSet")
    (container,) = [
        c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "relay"
    ]
    return list(container["args"])


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_chart_sets_the_session_cap_and_the_timeouts_as_values() -> None:
    args = _relay_args()
    assert (_value(args, "--max-connections"), _value(args, "--command-timeout")) == ("500", "300")
    assert _value(args, "--data-timeout") == "600"
    args = _relay_args(
        "--set",
        "relay.maxConnections=200",
        "--set",
        "relay.commandTimeoutSeconds=60",
        "--set",
        "relay.dataTimeoutSeconds=120",
    )
    assert [
        _value(args, f) for f in ("--max-connections", "--command-timeout", "--data-timeout")
    ] == [
        "200",
        "60",
        "120",
    ]
    values = (ROOT / "helm" / "mailflow" / "values.yaml").read_text()
    assert "RLIMIT_NOFILE" in values  # the fd limit the default assumes is documented
