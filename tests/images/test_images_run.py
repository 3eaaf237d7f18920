"""The images of `make images`, run as the chart runs them (uid 10001, read-only root file
system, every capability dropped, the chart's mounts), on the host network and 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import smtplib
import subprocess
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from helm.chart import ROOT
from helm.test_images import stages
from imagerun import COMPONENTS, OUT, VERSION, Archive, Podman, archive, chart_flags, read_digests
from peers import SmtpSink, free_port

pytestmark = pytest.mark.images

UID = 10001


# --- the archives -------------------------------------------------------------------------


def test_digest_file_names_each_archive_by_its_manifest_digest(archives: dict[str, str]) -> None:
    digests = read_digests()
    assert set(digests) == set(archives.values())
    for component, name in archives.items():
        index = Archive.read(archive(component)).index
        (manifest,) = index["manifests"]
        assert manifest["digest"] == digests[name]
        annotations = manifest["annotations"]
        # podman load, ctr images import and kind load image-archive name the image by these.
        assert annotations["org.opencontainers.image.ref.name"] == name
        assert annotations["io.containerd.image.name"] == name
    sums: dict[str, str] = {}
    for line in (OUT / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    for component in COMPONENTS:
        path = archive(component)
        assert sums[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_declares_what_its_dockerfile_declares(
    archives: dict[str, str], component: str
) -> None:
    _, (_, final) = stages((ROOT / component / "Dockerfile").read_text())
    config = Archive.read(archive(component)).config["config"]
    (user,) = final.all("USER")
    assert config["User"] == user == f"{UID}:{UID}"
    assert config["Entrypoint"] == json.loads(final.all("ENTRYPOINT")[0])
    assert config["Cmd"] == json.loads(final.all("CMD")[0])
    (workdir,) = final.all("WORKDIR")
    assert config["WorkingDir"] == workdir
    ports = {f"{port}/tcp" for line in final.all("EXPOSE") for port in line.split()}
    assert set(config.get("ExposedPorts", {})) == ports
    volumes = {volume for line in final.all("VOLUME") for volume in json.loads(line)}
    assert set(config.get("Volumes") or {}) == volumes
    env = dict(variable.split("=", 1) for variable in config["Env"])
    assert env["PATH"].startswith("/opt/mailflow/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONUNBUFFERED"] == "1"
    labels = config["Labels"]
    for line in final.all("LABEL"):
        for pair in line.split('" '):
            key, _, value = pair.strip().partition("=")
            assert labels[key] == value.strip('"'), key


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_holds_no_installer_and_nothing_of_the_build_host(
    archives: dict[str, str], component: str
) -> None:
    image = Archive.read(archive(component))
    files = image.files()
    site = "opt/mailflow/lib/python3.11/site-packages"
    assert f"{site}/mailflow_relay/__init__.py" in files
    packages = {path.split("/")[5] for path in files if path.startswith(site + "/")}
    assert not {"pip", "setuptools", "installer", "wheel"} & packages, packages
    assert not [
        path for path in files if path.startswith(("mnt/", "usr/share/man/", "var/lib/apt/"))
    ]
    # No documentation but the copyright files (dpkg leaves the packages' doc symlinks).
    docs = [
        path
        for path, entry in files.items()
        if path.startswith("usr/share/doc/") and entry.isfile() and not path.endswith("/copyright")
    ]
    assert not docs, docs
    assert files["etc/resolv.conf"].size == files["etc/hostname"].size == 0
    # The layers carry fixed timestamps (SOURCE_DATE_EPOCH) and root-owned files only.
    assert len({member.mtime for members in image.layers[1:] for member in members}) == 1
    # Root owns every file (Debian's own system groups aside); the app's user owns the spool only.
    others = {path for path, entry in files.items() if entry.uid != 0 or entry.gid == UID}
    assert others == ({"var/spool/mailflow"} if component == "relay" else set())
    if component == "relay":
        spool = files["var/spool/mailflow"]
        assert (spool.uid, spool.gid, spool.mode & 0o7777) == (UID, UID, 0o750)


# --- running them as the chart does --------------------------------------------------------


def relay_folders(tmp_path: Path) -> dict[str, Path]:
    """The relay pod's volumes on the host: the spool (a PersistentVolumeClaim, made writable
    for the pod's fsGroup) and a folder of manifests for the standalone relay."""
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, UID, UID)
    spool.chmod(0o770)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    manifests.chmod(0o755)
    return {"spool": spool, "manifests": manifests}


@pytest.mark.parametrize("component", COMPONENTS)
def test_mailflow_help_runs_as_the_chart_runs_it(
    podman: Podman,
    archives: dict[str, str],
    pod_specs: dict[str, dict[str, Any]],
    tmp_path: Path,
    component: str,
) -> None:
    flags = chart_flags(pod_specs[component], component, relay_folders(tmp_path))
    result = podman.run(archives[component], "--help", flags=flags)
    assert result.stdout.startswith("usage: mailflow"), result.stdout
    # Without arguments: the Dockerfile's CMD, the component's own help.
    result = podman.run(archives[component], flags=flags)
    assert f"usage: mailflow {component}" in result.stdout, result.stdout
    # Who runs it: uid and gid 10001, the fsGroup, no capability at all.
    result = podman.run(
        archives[component],
        "-c",
        "import os; print(os.getuid(), os.getgid(), sorted(os.getgroups()));"
        "print(open('/proc/self/status').read())",
        flags=["--entrypoint", "/opt/mailflow/bin/python", *flags],
    )
    first, status = result.stdout.split("\n", 1)
    assert first == f"{UID} {UID} [{UID}]"
    capabilities = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    assert {capabilities[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {
        "0000000000000000"
    }
    assert status.count("NoNewPrivs:\t1") == 1
    # A read-only root file system.
    result = podman.run(
        archives[component],
        "-c",
        "open('/opt/mailflow/x', 'w')",
        flags=["--entrypoint", "/opt/mailflow/bin/python", *flags],
        check=False,
    )
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr


def test_operator_image_validates_the_examples(
    podman: Podman, archives: dict[str, str], pod_specs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    flags = chart_flags(pod_specs["operator"], "operator", {})
    mounts = [
        "--volume",
        f"{ROOT / 'examples'}:/examples:ro",
        "--volume",
        f"{ROOT / 'tests' / 'fixtures' / 'broken'}:/broken:ro",
    ]
    # The feature tour (examples/*.yaml) and the compliance design are two separate sets:
    # both have a catch-all, so together they conflict.
    tour = [f"/examples/{p.name}" for p in sorted((ROOT / "examples").glob("*.yaml"))]
    for inputs in (tour, ["/examples/compliance"]):
        result = podman.run(archives["operator"], "validate", *inputs, flags=[*flags, *mounts])
        assert "0 problem(s)" in result.stdout + result.stderr, result.stdout + result.stderr
    result = podman.run(
        archives["operator"],
        "validate",
        *tour,
        "/broken",
        flags=[*flags, *mounts],
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Required value: certificateName is required when mode is NameMatch" in result.stdout


CONNECTORS = """\
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {{name: now, namespace: mail}}
spec:
  recipientDomains: ["now.example"]
  destination: {{smartHost: {{host: 127.0.0.1, port: {now}}}}}
  tls: {{mode: Opportunistic}}
---
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {{name: later, namespace: mail}}
spec:
  recipientDomains: ["later.example"]
  destination: {{smartHost: {{host: 127.0.0.1, port: {later}}}}}
  tls: {{mode: Opportunistic}}
"""


def wait_ready(podman: Podman, name: str, port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert podman.running(name), podman.logs(name)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the relay container did not become ready:\n{podman.logs(name)}")


def send(port: int, recipient: str) -> None:
    message = EmailMessage()
    message["From"] = "alice@contoso.com"
    message["To"] = recipient
    message["Subject"] = f"through the image to {recipient}"
    message.set_content("Hello from the relay image.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.send_message(message)


@pytest.mark.slow
def test_relay_image_delivers_drains_on_sigterm_and_keeps_its_queue_on_the_volume(
    podman: Podman, archives: dict[str, str], pod_specs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    folders = relay_folders(tmp_path)
    later = free_port()  # nothing listens there until the second container runs
    smtp, http = free_port(), free_port()
    with SmtpSink() as sink:
        (folders["manifests"] / "connectors.yaml").write_text(
            CONNECTORS.format(now=sink.port, later=later)
        )
        flags = [
            *chart_flags(pod_specs["relay"], "relay", folders),
            "--volume",
            f"{folders['manifests']}:/etc/mailflow/manifests:ro",
        ]
        args = [
            "relay",
            "--manifests",
            "/etc/mailflow/manifests",
            "--listen",
            f"127.0.0.1:{smtp}",
            "--http",
            f"127.0.0.1:{http}",
            "--spool",
            "/var/spool/mailflow",
            "--accept-from",
            "127.0.0.0/8",
            "--hostname",
            "relay-0.test",
            "--retry-initial",
            "0.5",
            "--drain-grace",
            "5",
        ]
        podman.start("relay-a", archives["relay"], *args, flags=flags)
        wait_ready(podman, "relay-a", http)
        send(smtp, "bob@now.example")
        (delivered,) = sink.wait_for(1, timeout=30)
        assert delivered.recipients == ["bob@now.example"]
        assert "Hello from the relay image." in delivered.text
        assert "relay-0.test" in delivered.text  # the relay's own Received header

        # Acknowledged, not deliverable yet: it waits in the spool on the volume.
        send(smtp, "carol@later.example")
        started = time.monotonic()
        podman("kill", "--signal", "TERM", "relay-a")
        exit_code = podman("wait", "relay-a", timeout=60).stdout.strip()
        assert exit_code == "0", podman.logs("relay-a")
        assert time.monotonic() - started < 30  # within the chart's grace period
        with pytest.raises(ConnectionRefusedError):
            smtplib.SMTP("127.0.0.1", smtp, timeout=5)

        # A new pod on the same volume delivers it, once the destination is up.
        with SmtpSink(port=later) as late:
            podman.start("relay-b", archives["relay"], *args, flags=flags)
            wait_ready(podman, "relay-b", http)
            (queued,) = late.wait_for(1, timeout=60)
            assert queued.recipients == ["carol@later.example"]
            podman("kill", "--signal", "TERM", "relay-b")
            assert podman("wait", "relay-b", timeout=60).stdout.strip() == "0"
        assert len(sink.messages()) == 1  # nothing delivered twice


# --- reproducible -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_build_in_a_fresh_store_gives_the_same_digests(
    archives: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "scripts/build-images.sh"],
        cwd=ROOT,
        env={
            **os.environ,
            "IMAGES_OUT": str(out),
            "IMAGES_WORK": str(tmp_path / "work"),
            # The first build's time stamp, even if a commit came in between.
            "SOURCE_DATE_EPOCH": (OUT / "SOURCE_DATE_EPOCH").read_text().strip(),
        },
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"second build: {time.monotonic() - started:.0f}s")
    assert read_digests(out) == read_digests()
    assert (out / "SHA256SUMS").read_text() == (OUT / "SHA256SUMS").read_text()
    assert (out / f"debian-packages-{VERSION}.txt").read_text() == (
        OUT / f"debian-packages-{VERSION}.txt"
    ).read_text()
