"""The built images (`make images`) in a throwaway podman store, run as the chart runs them.

Podman gets a store and a configuration of its own in a temporary folder (vfs storage, runc:
crun refuses a hybrid cgroup v1 layout; no raised RLIMIT_NOFILE, which root cannot raise on
some machines), so nothing of the machine's containers is touched and nothing outlives the
tests. Every container uses the host's network and only 127.0.0.1: no bridge, no CNI range.

The security context, the environment and the volume mounts come from the chart itself
(`helm template`), translated into podman's flags by `chart_flags`: a mount the translation
does not know fails the test rather than being left out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "dist" / "images"
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PREFIX = os.environ.get("IMAGE_PREFIX", "ghcr.io/mailflow/")
COMPONENTS = ("operator", "relay")
PODMAN_TIMEOUT = 120.0

CONTAINERS_CONF = """\
# Written by tests/imagerun.py for a throwaway store.
[containers]
default_ulimits = []
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def missing(what: str) -> None:
    """Skips the test, or fails it under CI=true (where nothing may be left out)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: a missing tool fails)")
    pytest.skip(what)


def image_name(component: str) -> str:
    return f"{PREFIX}mailflow-{component}:{VERSION}"


def archive(component: str, folder: Path = OUT) -> Path:
    return folder / f"mailflow-{component}-{VERSION}.oci.tar"


def read_digests(folder: Path = OUT) -> dict[str, str]:
    """digests.txt: image name -> manifest digest."""
    lines = (folder / "digests.txt").read_text().split()
    return dict(line.rsplit("@", 1) for line in lines)


@dataclass
class Archive:
    """An OCI archive read with tarfile: its index, manifest, config and layer file lists."""

    index: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[list[tarfile.TarInfo]]

    @classmethod
    def read(cls, path: Path) -> Archive:
        with tarfile.open(path) as tar:

            def blob(digest: str) -> bytes:
                member = tar.extractfile("blobs/" + digest.replace(":", "/"))
                assert member is not None, digest
                return member.read()

            index_file = tar.extractfile("index.json")
            assert index_file is not None
            index = json.load(index_file)
            manifest = json.loads(blob(index["manifests"][0]["digest"]))
            config = json.loads(blob(manifest["config"]["digest"]))
            layers: list[list[tarfile.TarInfo]] = []
            for layer in manifest["layers"]:
                member = tar.extractfile("blobs/" + layer["digest"].replace(":", "/"))
                assert member is not None
                with tarfile.open(fileobj=member, mode="r:*") as inner:
                    layers.append(inner.getmembers())
        return cls(index, manifest, config, layers)

    def files(self) -> dict[str, tarfile.TarInfo]:
        """The merged file system: path -> the last layer's entry (whiteouts applied)."""
        merged: dict[str, tarfile.TarInfo] = {}
        for members in self.layers:
            for member in members:
                name = member.name.removeprefix("./").rstrip("/")
                base = os.path.basename(name)
                if base.startswith(".wh."):
                    gone = os.path.join(os.path.dirname(name), base.removeprefix(".wh."))
                    merged = {
                        path: entry
                        for path, entry in merged.items()
                        if path != gone and not path.startswith(gone + "/")
                    }
                    continue
                merged[name] = member
        return merged


def _mount_flags(
    mounts: Sequence[Mapping[str, Any]],
    volumes: Mapping[str, Mapping[str, Any]],
    host_paths: Mapping[str, Path],
) -> list[str]:
    flags: list[str] = []
    for mount in mounts:
        name, target = mount["name"], mount["mountPath"]
        volume = volumes.get(name, {})
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "64Mi").removesuffix("i").lower()
            flags += ["--tmpfs", f"{target}:rw,nosuid,nodev,size={size},mode=1777"]
        elif name in host_paths:  # a PersistentVolumeClaim or a Secret: a folder on the host
            options = "ro" if mount.get("readOnly") else "rw"
            flags += ["--volume", f"{host_paths[name]}:{target}:{options}"]
        else:
            raise AssertionError(f"the chart mounts {name!r} at {target}: give it a host folder")
    return flags


def chart_flags(
    pod_spec: Mapping[str, Any],
    container: str,
    host_paths: Mapping[str, Path],
) -> list[str]:
    """podman flags for a container of a rendered pod spec: its user, groups, read-only root,
    capabilities, privilege escalation, seccomp, environment (downward API values made up)
    and volume mounts."""
    (spec,) = [c for c in pod_spec["containers"] if c["name"] == container]
    pod = pod_spec.get("securityContext", {})
    own = spec.get("securityContext", {})
    flags: list[str] = []
    uid = own.get("runAsUser", pod.get("runAsUser"))
    gid = own.get("runAsGroup", pod.get("runAsGroup"))
    assert uid is not None, "the chart must set a numeric user"
    assert int(uid) != 0
    flags += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    if "fsGroup" in pod:  # the kubelet adds fsGroup to the supplementary groups
        flags += ["--group-add", str(pod["fsGroup"])]
    if own.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--read-only-tmpfs=false"]
    for capability in own.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", capability]
    for capability in own.get("capabilities", {}).get("add", []):
        flags += ["--cap-add", capability]
    if own.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    seccomp = own.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
    assert seccomp in (None, "RuntimeDefault"), seccomp  # podman's default profile
    for variable in spec.get("env", []):
        if "value" in variable:
            flags += ["--env", f"{variable['name']}={variable['value']}"]
        elif variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            flags += ["--env", f"{variable['name']}={container}-0"]
        elif (
            variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            == "metadata.namespace"
        ):
            flags += ["--env", f"{variable['name']}=mail"]
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    flags += _mount_flags(spec.get("volumeMounts", []), volumes, host_paths)
    return flags


class Podman:
    """podman with a private store under `folder`; `close()` removes every container and the
    store."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("podman")
        if self.binary is None:
            missing("podman is not installed: `make test-images` installs it (as root)")
        if os.geteuid() != 0:
            missing("the image tests run podman as root (vfs storage, runc)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "containers.conf").write_text(CONTAINERS_CONF)
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(folder / "containers.conf"),
            # No registry is asked for anything: every image is loaded from an archive.
            "CONTAINERS_REGISTRIES_CONF": str(folder / "registries.conf"),
        }
        (folder / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.global_flags = [
            "--root",
            str(folder / "store"),
            "--runroot",
            str(folder / "run"),
            "--storage-driver",
            "vfs",
            "--tmpdir",
            str(folder / "tmp"),
        ]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        assert self.binary is not None
        command = [self.binary, *self.global_flags, *args]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited with {result.returncode}\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            )
        return result

    def load(self, path: Path) -> str:
        self("load", "--quiet", "--input", str(path), timeout=300)
        return path.name

    def run_flags(self, flags: Sequence[str], *, name: str | None = None) -> list[str]:
        """The flags every test container gets: the host network (127.0.0.1 only), no
        registry pull, no init, and the chart's flags."""
        base = ["--network", "host", "--pull", "never", "--log-driver", "k8s-file"]
        if name is not None:
            base += ["--name", name]
        return [*base, *flags]

    def run(
        self,
        image: str,
        *args: str,
        flags: Sequence[str] = (),
        check: bool = True,
        timeout: float = PODMAN_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        return self("run", "--rm", *self.run_flags(flags), image, *args, check=check,
                    timeout=timeout)  # fmt: skip

    def start(self, name: str, image: str, *args: str, flags: Sequence[str] = ()) -> None:
        self("run", "--detach", *self.run_flags(flags, name=name), image, *args)

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr

    def running(self, name: str) -> bool:
        result = self("inspect", "--format", "{{.State.Running}}", name, check=False)
        return result.stdout.strip() == "true"

    def close(self) -> None:
        if self.binary is not None and (self.folder / "store").exists():
            self("rm", "--all", "--force", "--time", "0", check=False)
            self("rmi", "--all", "--force", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def containers(podman: Podman) -> Iterator[str]:
    result = podman("ps", "--all", "--format", "{{.Names}}")
    yield from result.stdout.split()
