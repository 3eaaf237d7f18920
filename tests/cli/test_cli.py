"""The ``mailflow`` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "tests" / "fixtures" / "broken"


def mailflow(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "mailflow"
    command = [str(script)] if script.exists() else [shutil.which("mailflow") or "mailflow"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_crds_and_every_example_validate_cleanly() -> None:
    result = mailflow("validate", "crds/", "examples/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == "checked 9 object(s): 0 problem(s)"
    assert "note: crds/outboundconnectors.mailflow.dev.yaml:1: skipped" in result.stderr


def test_broken_manifests_get_one_precise_line_per_problem_and_exit_1() -> None:
    result = mailflow("validate", "tests/fixtures/broken")
    assert result.returncode == 1
    b = "tests/fixtures/broken"
    assert result.stdout.splitlines() == [
        f"{b}/connectors.yaml:1: OutboundConnector/mail/name-match-without-name: "
        "spec.tls.certificateName: Required value: certificateName is required when mode is NameMatch",
        f"{b}/connectors.yaml:2: OutboundConnector/mail/two-destinations: "
        'spec.destination: Invalid value: "object": set at most one of smartHost and profileRef; '
        "omit both to deliver to the recipient's MX",
        f"{b}/connectors.yaml:2: OutboundConnector/mail/two-destinations: "
        "spec.destination.smartHost.port: Invalid value: 70000: should be less than or equal to 65535",
        f"{b}/connectors.yaml:2: OutboundConnector/mail/two-destinations: "
        'spec.recipientDomains[0]: Invalid value: "Contoso.com": should match \'^(\\*|\\*\\.\\*|(\\*\\.)?'
        "[a-z0-9\\u0080-\\uffff]([-a-z0-9\\u0080-\\uffff]{0,61}[a-z0-9\\u0080-\\uffff])?(\\.[a-z0-9\\u0080-\\uffff]"
        "([-a-z0-9\\u0080-\\uffff]{0,61}[a-z0-9\\u0080-\\uffff])?)*)$'",
        f"{b}/connectors.yaml:3: OutboundConnector/mail/missing-profile: "
        'spec.destination.profileRef.name: Not found: "no-such-pool": no MultiSmtpProfile named '
        '"no-such-pool" in namespace "mail"',
        f"{b}/connectors.yaml:5: OutboundConnector/mail/second-catch-all: "
        'spec.tls.pinnedFingerprints: Invalid value: "object": pinnedFingerprints are only used when '
        "mode is SelfSigned",
        f"{b}/profiles.yaml:1: MultiSmtpProfile/mail/empty-pool: spec.balancing: "
        'Unsupported value: "Random": supported values: "RoundRobin", "Failover"',
        f"{b}/profiles.yaml:1: MultiSmtpProfile/mail/empty-pool: spec.servers: "
        "Invalid value: 0: should have at least 1 items",
        f"{b}/profiles.yaml:1: MultiSmtpProfile/mail/empty-pool: -: some validation rules were not "
        "checked because the object was invalid; correct the existing errors to complete validation",
        f"{b}/unparsable.yaml:1: -: -: line 5, column 2: YAML: expected <block end>, but found "
        "'<block mapping start>'",
    ]


def test_validate_json_output_carries_every_field_of_a_problem() -> None:
    result = mailflow("validate", "--output", "json", "tests/fixtures/broken/profiles.yaml")
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert body["checked"] == 1
    assert body["problems"][0] == {
        "file": "tests/fixtures/broken/profiles.yaml",
        "document": 1,
        "line": 1,
        "kind": "MultiSmtpProfile",
        "namespace": "mail",
        "name": "empty-pool",
        "path": "spec.balancing",
        "message": 'Unsupported value: "Random": supported values: "RoundRobin", "Failover"',
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "no/such/folder"], "mailflow: error: no/such/folder: no such file or folder"),
        (["validate"], "mailflow: error: the following arguments are required: PATH"),
        (
            ["explain", "examples", "--from", "a@contoso.com", "--to", "bob"],
            "mailflow: error: --to 'bob': expected local-part@domain",
        ),
        (
            ["explain", "examples", "--from", "alice@", "--to", "bob@contoso.com"],
            "mailflow: error: --from 'alice@': expected local-part@domain",
        ),
        (["frobnicate"], "mailflow: error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
    ids=["missing-path", "no-path", "bad-recipient", "bad-sender", "unknown-command"],
)
def test_usage_errors_exit_2_and_say_what_is_wrong(args: list[str], message: str) -> None:
    result = mailflow(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_explain_uses_the_most_specific_connector_per_recipient() -> None:
    result = mailflow(
        "explain",
        "examples",
        "--from",
        "alice@contoso.com",
        "--to",
        "bob@fabrikam.example",
        "--to",
        "eve@Sales.Fabrikam.Example.",
        "--to",
        "someone@elsewhere.example",
        "--to",
        "boss@bank.example",
        "--output",
        "json",
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    got = [
        (
            r["connector"],
            r["rule"],
            r["recipientPattern"],
            r["destination"]["kind"],
            r["tls"]["mode"],
        )
        for r in body["recipients"]
    ]
    assert got == [
        ("mail/fabrikam-partner", "exact", "fabrikam.example", "Profile", "TrustedCA"),
        ("mail/fabrikam-partner", "wildcard", "*.fabrikam.example", "Profile", "TrustedCA"),
        ("mail/all-via-compliance", "catch-all", "*", "SmartHost", "NameMatch"),
        ("mail/tls-domain-match", "exact", "bank.example", "RecipientMx", "DomainMatch"),
    ]
    assert body["recipients"][0]["destination"]["servers"] == [
        "192.0.2.21:25",
        "192.0.2.22:25",
        "gw3.fabrikam.example:587",
    ]
    assert body["recipients"][2]["tls"]["caBundle"] == "connector"
    assert body["problems"] == []


def test_explain_prefers_the_sender_scoped_connector_and_says_why() -> None:
    result = mailflow(
        "explain", "examples", "--from", "news@marketing.contoso.com", "--to", "x@elsewhere.example"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "x@elsewhere.example  (from news@marketing.contoso.com)"
    assert lines[1] == "  connector    mail/marketing-bulk"
    assert "beats unscoped connectors" in lines[2]
    assert lines[3] == "  destination  smart host smtp.bulkmail.example:587"
    assert (
        "mail/all-via-compliance (catch-all '*'): an equally specific connector scoped to the sender wins"
        in result.stdout
    )


def test_explain_never_prints_a_secret() -> None:
    result = mailflow(
        "explain",
        "examples",
        "--from",
        "news@marketing.contoso.com",
        "--to",
        "x@fabrikam.example",
        "-o",
        "json",
    )
    assert result.returncode == 0
    assert "example-only-change-me" not in result.stdout
    assert "BEGIN CERTIFICATE" not in result.stdout


def test_explain_shows_an_unresolved_reference_as_deferred(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text((ROOT / "examples" / "01-smart-host-onprem.yaml").read_text())
    result = mailflow("explain", str(tmp_path), "--from", "a@contoso.com", "--to", "b@x.example")
    assert result.returncode == 0
    assert (
        '  UNRESOLVED   Not found: "contoso-ca": no Secret named "contoso-ca" in namespace "mail" '
        "— mail on this route is deferred"
    ) in result.stdout


def test_explain_with_a_reject_default_route_rejects_unmatched_recipients(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text((ROOT / "examples" / "04-tls-modes.yaml").read_text())
    result = mailflow(
        "explain",
        str(tmp_path),
        "--from",
        "a@contoso.com",
        "--to",
        "b@x.example",
        "--default-route",
        "Reject",
    )
    assert result.returncode == 0
    assert "  destination  rejected (550 5.7.1): the default route is Reject" in result.stdout


@pytest.mark.parametrize(
    "command", [[], ["validate"], ["explain"]], ids=["top", "validate", "explain"]
)
def test_help_documents_every_command(command: list[str]) -> None:
    result = mailflow(*command, "--help")
    assert result.returncode == 0
    assert "usage: mailflow" in result.stdout


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "0", "--workers: 0: must be more than 0"),
        ("--retry-initial", "-1", "--retry-initial: -1.0: must be more than 0"),
        ("--idle-connections", "-1", "--idle-connections: -1: must be 0 or more"),
        ("--max-recipients", "0", "--max-recipients:"),
    ],
)
def test_relay_settings_refuse_values_that_cannot_work(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = mailflow(
        "relay", "--manifests", str(ROOT / "examples"), "--spool", str(tmp_path), option, value
    )
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1]


def test_relay_defaults_come_from_the_settings_dataclasses() -> None:
    from mailflow_cli.main import build_parser
    from mailflow_relay.engine.relay import RelaySettings
    from mailflow_relay.inbound.listener import ListenerSettings
    from mailflow_relay.outbound.deliverer import DeliverySettings

    args = build_parser().parse_args(["relay", "--manifests", "x", "--spool", "y"])
    listener = ListenerSettings()
    relay = RelaySettings(listener=listener, spool_dir=Path("y"))
    assert args.idle_connections == DeliverySettings().idle_connections_per_target
    assert args.max_recipients == listener.max_recipients
    assert args.max_message_size == listener.max_message_size
    assert args.max_connections_per_client == listener.max_connections_per_client
    assert (args.workers, args.retry_initial, args.retry_max) == (
        relay.workers,
        relay.retry_initial,
        relay.retry_max,
    )
    assert (args.queue_lifetime, args.drain_grace) == (relay.queue_lifetime, relay.drain_grace)


def test_mailflow_relay_never_imports_kopf_or_the_kubernetes_client() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mailflow_cli", "relay", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "mailflow_relay.engine.relay" in imported
    assert not {m for m in imported if m.split(".")[0] in ("kopf", "kubernetes", "aiohttp")}
