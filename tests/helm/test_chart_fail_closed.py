"""The chart fails closed: no open relay unless asked for, and the documented path works.

Rendered with Helm's own binary. The README's install command narrows ``relay.acceptFrom``;
what the install notes then tell the user to do (port-forward, ``helm test``) and what the
relays do on their own (hand-off between pods) must still be trusted, or the chart must
refuse the values with a message that says what to set.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from helm.chart import CHART, NAMESPACE, RELEASE, ROOT, Rendered, helm, parse, template_args


def relay_args(rendered: Rendered) -> list[str]:
    (relay,) = [
        c
        for c in rendered.get("StatefulSet", "mailflow-relay")["spec"]["template"]["spec"][
            "containers"
        ]
        if c["name"] == "relay"
    ]
    return list(relay["args"])


def accept_from(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--accept-from"]


def refused(*settings: str) -> str:
    result = helm(*template_args("default", *(a for s in settings for a in ("--set", s))))
    assert result.returncode != 0, "the chart rendered values it must refuse"
    return result.stderr


# --- point 5: an open relay must be asked for ----------------------------------------------


@pytest.mark.usefixtures("helm_binary")
@pytest.mark.parametrize(
    ("setting", "network"),
    [
        ("relay.acceptFrom={0.0.0.0/0}", "0.0.0.0/0"),
        ("relay.acceptFrom={::/0}", "::/0"),
        ("relay.acceptFrom={10.20.0.0/16,0.0.0.0/0}", "0.0.0.0/0"),
        ("relay.handoff.peerCIDRs={0.0.0.0/0}", "0.0.0.0/0"),
    ],
)
def test_an_open_relay_is_refused_with_a_clear_message(setting: str, network: str) -> None:
    stderr = refused(setting)
    assert (
        f"relay.acceptFrom (or relay.handoff.peerCIDRs) contains {network}: every client anywhere "
        "could relay mail through Mailflow, an open relay."
    ) in stderr
    assert "set relay.allowOpenRelay=true" in stderr


def test_an_open_relay_asked_for_passes_exactly_the_relay_s_switch(
    render: Callable[..., Rendered],
) -> None:
    args = relay_args(
        render(
            "default", "--set", "relay.acceptFrom={0.0.0.0/0}", "--set", "relay.allowOpenRelay=true"
        )
    )
    assert "0.0.0.0/0" in accept_from(args)
    assert args.count("--allow-open-relay") == 1
    assert "--allow-open-relay" not in relay_args(render())


@pytest.mark.usefixtures("helm_binary")
def test_allow_open_relay_must_be_a_boolean() -> None:
    assert "allowOpenRelay" in refused("relay.allowOpenRelay=yes-please")


# --- point 7: the README's install command, and what the notes then promise ------------------


def readme_install_settings() -> list[str]:
    """The `--set` arguments of the README's `helm install` command, as a shell reads them."""
    readme = (ROOT / "README.md").read_text()
    (command,) = [
        block
        for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
        if "helm install mailflow helm/mailflow" in block
    ]
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def test_the_readme_install_command_narrows_accept_from_and_still_renders(
    render: Callable[..., Rendered],
) -> None:
    settings = readme_install_settings()
    assert any(s.startswith("relay.acceptFrom=") for s in settings)
    rendered = render("default", *(a for s in settings for a in ("--set", s)))
    trusted = accept_from(relay_args(rendered))
    # The mail hosts, the pod's loopback (kubectl port-forward) and the pod network (the
    # hand-off between relay pods and the `helm test` pod): nothing else.
    assert "10.20.0.0/16" in trusted
    assert {"127.0.0.0/8", "::1/128"} <= set(trusted)
    assert not {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} & set(trusted)
    (pod_network,) = [s.split("=", 1)[1].strip("{}") for s in settings if "peerCIDRs" in s]
    assert pod_network in trusted
    # From the pod network, the NetworkPolicy admits only the relay pods and the test pod.
    policy = rendered.get("NetworkPolicy", "mailflow-relay")
    smtp_from = policy["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": pod_network}} not in smtp_from
    components = {
        f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for f in smtp_from
        if "podSelector" in f
    }
    assert components == {"relay", "helm-test"}
    test_pod = rendered.get("Pod", "mailflow-test-send")
    assert test_pod["metadata"]["labels"]["app.kubernetes.io/component"] == "helm-test"


def test_the_readme_install_command_gets_notes_that_say_what_is_true(helm_binary: Path) -> None:
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    settings = readme_install_settings()
    result = helm(*args, *(a for s in settings for a in ("--set", s)))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "swaks --server 127.0.0.1:2525" in notes
    assert "port-forwarded connections arrive from the pod's loopback" in notes
    assert "helm test mailflow -n mail" in notes
    trusted = notes.split("Relaying without authentication is allowed from: ", 1)[1].split("\n")[0]
    assert trusted == "10.20.0.0/16, 127.0.0.0/8, ::1/128, 10.244.0.0/16"
    assert "Hand-off between relay pods: trusted from relay.handoff.peerCIDRs (10.244.0.0/16)." in (
        notes
    )


@pytest.mark.usefixtures("helm_binary")
def test_a_narrowed_accept_from_without_the_pod_network_is_refused_with_what_to_set() -> None:
    # What the README used to say: hand-off and `helm test` would then get 550.
    stderr = refused("relay.acceptFrom={10.20.0.0/16}")
    assert (
        "relay.acceptFrom (10.20.0.0/16) has none of the private ranges, so the chart cannot tell "
        "that it covers the pod network, which the hand-off between relay pods "
        "(relay.handoff.enabled) and `helm test` (tests.enabled) sends from: the relays would "
        "refuse it (550). Set relay.handoff.peerCIDRs to your cluster's pod network"
    ) in stderr
    only_tests = refused("relay.acceptFrom={10.20.0.0/16}", "relay.handoff.enabled=false")
    assert "which `helm test` (tests.enabled) sends from" in only_tests


def test_a_narrowed_accept_from_renders_when_nothing_needs_the_pod_network(
    render: Callable[..., Rendered],
) -> None:
    rendered = render(
        "default",
        "--set", "relay.acceptFrom={10.20.0.0/16}",
        "--set", "relay.handoff.enabled=false",
        "--set", "tests.enabled=false",
    )  # fmt: skip
    assert accept_from(relay_args(rendered)) == ["10.20.0.0/16", "127.0.0.0/8", "::1/128"]
    assert not rendered.has("Pod")


def test_loopback_trust_can_be_turned_off_and_the_notes_say_so(
    render: Callable[..., Rendered], helm_binary: Path
) -> None:
    rendered = render("default", "--set", "relay.trustLoopback=false")
    assert "::1/128" not in accept_from(relay_args(rendered))
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    result = helm(*args, "--set", "relay.trustLoopback=false",
                  "--set-json", "relay.acceptFrom=[\"10.0.0.0/8\"]")  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "port-forwarded clients must log in" in notes
    assert "which is not set: the relays refuse them (550)" in notes


def test_the_rendered_objects_parse(helm_binary: Path) -> None:
    result = helm(*template_args("default"))
    assert result.returncode == 0, result.stderr
    assert parse(result.stdout).has("StatefulSet")
