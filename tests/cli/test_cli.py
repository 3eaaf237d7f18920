"""The ``mailflow`` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "tests" / "fixtures" / "broken"
# The feature tour: examples/*.yaml. Scenario folders under examples/ (compliance/) are
# designs of their own, tested by themselves.
TOUR = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.yaml"))


def mailflow(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "mailflow"
    command = [str(script)] if script.exists() else [shutil.which("mailflow") or "mailflow"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_crds_and_every_example_validate_cleanly() -> None:
    result = mailflow("validate", "crds/", *TOUR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == "checked 9 object(s): 0 problem(s)"
    # The CRDs given are used, and the user is told so (they used to be skipped silently).
    assert (
        "note: crds/outboundconnectors.mailflow.dev.yaml:4:1: checking mailflow.dev/v1alpha1 "
        "OutboundConnector against this CRD (given on the command line) instead of the built-in one"
    ) in result.stderr.splitlines()


def test_broken_manifests_get_one_precise_line_per_problem_and_exit_1() -> None:
    result = mailflow("validate", "tests/fixtures/broken")
    assert result.returncode == 1
    b = "tests/fixtures/broken"
    assert result.stdout.splitlines() == [
        f"{b}/connectors.yaml:9:3: OutboundConnector/mail/name-match-without-name: "
        "spec.tls.certificateName: Required value: certificateName is required when mode is NameMatch",
        f"{b}/connectors.yaml:18:22: OutboundConnector/mail/two-destinations: "
        'spec.recipientDomains[0]: Invalid value: "Contoso.com": must be lower case: "contoso.com"',
        f"{b}/connectors.yaml:19:3: OutboundConnector/mail/two-destinations: "
        "spec.destination: Invalid value: set at most one of smartHost and profileRef; "
        "omit both to deliver to the recipient's MX",
        f"{b}/connectors.yaml:20:39: OutboundConnector/mail/two-destinations: "
        "spec.destination.smartHost.port: Invalid value: 70000: should be less than or equal to 65535",
        f"{b}/connectors.yaml:31:18: OutboundConnector/mail/missing-profile: "
        'spec.destination.profileRef.name: Not found: "no-such-pool": no MultiSmtpProfile named '
        '"no-such-pool" in namespace "mail"',
        f"{b}/connectors.yaml:50:5: OutboundConnector/mail/second-catch-all: "
        "spec.tls.pinnedFingerprints: Invalid value: pinnedFingerprints are only used when "
        "mode is SelfSigned",
        f"{b}/profiles.yaml:7:3: MultiSmtpProfile/mail/empty-pool: spec.servers: "
        "Invalid value: 0: should have at least 1 items",
        f"{b}/profiles.yaml:8:3: MultiSmtpProfile/mail/empty-pool: spec.balancing: "
        'Unsupported value: "Random": supported values: "RoundRobin", "Failover"',
        f"{b}/typos.yaml:8:22: OutboundConnector/mail/all-via-compliance-typos: "
        'spec.recipientDomains[0]: Invalid value: "Payroll.example": must be lower case: '
        '"payroll.example"',
        f"{b}/typos.yaml:10:17: OutboundConnector/mail/all-via-compliance-typos: "
        'spec.destination.smartHost.host: Invalid value: "compliance.contoso.com:2525": put the '
        'port in `port:` (2525) and only the host in `host:` ("compliance.contoso.com")',
        f"{b}/typos.yaml:13:5: OutboundConnector/mail/all-via-compliance-typos: "
        'spec.tls.certificatename: Unknown field: did you mean "certificateName"?',
        f"{b}/unparsable.yaml:5:2: YAML: expected <block end>, but found '<block mapping start>'",
    ]
    # No cascaded "-:" line; and no CEL note here: the one blocking error is on a
    # MultiSmtpProfile, which has no CEL rules (kube-apiserver says nothing either).
    assert " -: " not in result.stdout
    assert "CEL rules" not in result.stderr


def test_cel_rules_that_did_not_run_are_one_note_in_the_summary(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\n"
        "metadata: {name: c, namespace: mail}\n"
        "spec: {recipientDomains: [contoso.com], tls: {mode: namematch}}\n"
    )
    result = mailflow("validate", str(tmp_path))
    assert result.returncode == 1
    assert 'did you mean "NameMatch"?' in result.stdout
    assert (
        "note: the CEL rules of 1 object(s) did not run because of the errors above; fix those "
        "and run again, more may follow"
    ) in result.stderr.splitlines()


def test_validate_json_output_gives_the_line_and_column_of_the_field() -> None:
    result = mailflow("validate", "--output", "json", "tests/fixtures/broken/profiles.yaml")
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert body["checked"] == 1
    assert body["problems"][1] == {
        "file": "tests/fixtures/broken/profiles.yaml",
        "document": 1,
        "line": 8,
        "column": 3,
        "kind": "MultiSmtpProfile",
        "namespace": "mail",
        "name": "empty-pool",
        "path": "spec.balancing",
        "message": 'Unsupported value: "Random": supported values: "RoundRobin", "Failover"',
    }


@pytest.mark.parametrize(
    "layout",
    [{}, {"README.md": "# not a manifest"}, {"deploy.yaml": "apiVersion: v1\nkind: ConfigMap\n"}],
    ids=["empty-folder", "no-yaml-file", "no-mailflow-object"],
)
def test_validate_with_nothing_to_check_exits_1_and_says_why(
    tmp_path: Path, layout: dict[str, str]
) -> None:
    for name, text in layout.items():
        (tmp_path / name).write_text(text)
    result = mailflow("validate", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"mailflow: error: no OutboundConnector or MultiSmtpProfile found in {tmp_path}: nothing "
        "was checked (give the files or folders that hold them; folders are searched for .yaml, "
        ".yml and .json)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "no/such/folder"], "mailflow: error: no/such/folder: no such file or folder"),
        (["validate"], "mailflow: error: the following arguments are required: PATH"),
        (
            ["explain", *TOUR, "--from", "a@contoso.com", "--to", "bob"],
            "mailflow: error: --to 'bob': expected local-part@domain",
        ),
        (
            ["explain", *TOUR, "--from", "alice@", "--to", "bob@contoso.com"],
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
        *TOUR,
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
        "explain", *TOUR, "--from", "news@marketing.contoso.com", "--to", "x@elsewhere.example"
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
        *TOUR,
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
        ("--max-hops", "0", "--max-hops: must be at least 1"),
        ("--handoff-peer", "10.0.0.0/33", "--handoff-peer '10.0.0.0/33':"),
    ],
)
def test_relay_settings_refuse_values_that_cannot_work(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = mailflow("relay", "--manifests", *TOUR, "--spool", str(tmp_path), option, value)
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
    assert args.max_hops == listener.max_hops == 50
    assert (args.allow_open_relay, args.skip_invalid, args.handoff_peer) == (False, False, [])
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


# --- one line, not a traceback ----------------------------------------------------------------


def command() -> list[str]:
    script = Path(sys.executable).parent / "mailflow"
    return [str(script)] if script.exists() else [shutil.which("mailflow") or "mailflow"]


@pytest.mark.parametrize("option", ["--listen", "--http"])
def test_a_port_already_in_use_is_one_line_naming_the_option(tmp_path: Path, option: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        ports = {"--listen": "127.0.0.1:0", "--http": "127.0.0.1:0", option: address}
        result = mailflow(
            "relay", "--manifests", *TOUR, "--spool", str(tmp_path / "spool"),
            "--hostname", "relay.test",
            "--listen", ports["--listen"], "--http", ports["--http"],
        )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"mailflow: error: {option} {address}: address already in use: another process (another "
        f"relay?) listens on {address}; stop it or choose another port"
    )


def test_the_operator_without_a_cluster_to_talk_to_says_so_in_one_line(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
    }
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    result = subprocess.run(
        [*command(), "operator", "-n", "mail", "--routing-secret", "mail/routing",
         "--relay-selector", "app=relay"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "mailflow: error: no Kubernetes credentials: not running in a pod (no service account) "
        "and no usable kubeconfig (Invalid kube-config file. No configuration found.); set "
        "KUBECONFIG to a kubeconfig file, or run the operator in the cluster (helm/mailflow)"
    ]


def test_queue_list_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # `mailflow queue list | head`: the reader is gone before the output is.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*command(), "queue", "list", "--spool", str(tmp_path)],
            cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 0


def test_relay_help_says_that_http_serves_metrics_too() -> None:
    result = mailflow("relay", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--http HOST:PORT serve /healthz, /readyz and /metrics here" in text


def test_the_operator_and_the_relay_take_the_same_log_formats() -> None:
    from mailflow_cli.main import build_parser

    def choices(command: str) -> list[str]:
        parser = build_parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (action,) = [a for a in subparsers.choices[command]._actions if a.dest == "log_format"]
        return list(action.choices or [])

    assert choices("operator") == choices("relay") == ["text", "json"]


@pytest.mark.parametrize(
    ("resolvers", "message"),
    [
        (["dns.example"], "--dnssec-resolver 'dns.example': expected IP[:PORT] of a resolver"),
        (["127.0.0.1:99999"], "--dnssec-resolver '127.0.0.1:99999': expected IP[:PORT]"),
        (
            ["127.0.0.1:5353", "127.0.0.2"],
            "--dnssec-resolver: the resolvers use different ports (53, 5353)",
        ),
    ],
)
def test_a_dnssec_resolver_is_an_address_with_one_port(resolvers: list[str], message: str) -> None:
    flags = [f"--dnssec-resolver={r}" for r in resolvers]
    result = mailflow(
        "explain", *TOUR, "--from", "a@contoso.com", "--to", "b@contoso.com", "--resolve", *flags
    )
    assert result.returncode == 2, result.stderr
    assert f"mailflow: error: {message}" in result.stderr
